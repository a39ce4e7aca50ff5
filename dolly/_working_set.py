"""A checkpoint's working set: the pages its first lazy clone faulted in, restored eagerly for the
next lazy clones (REAP's record and prefetch, on CRIU's lazy restore).

CRIU marks every private anonymous page lazy at dump (``PE_LAZY`` in ``pagemap-<pid>.img``); a
restore with --lazy-pages skips those (criu/mem.c, restore_priv_vma_content) and the lazy-pages
daemon serves them through userfaultfd, first those the clone touches, then the rest
(criu/uffd.c collects only the lazy entries). A pagemap entry without ``PE_LAZY`` is read from
``pages-<id>.img`` by the restore itself, before the process runs, and the daemon never serves it.
So a clone's own copy of the pagemap, with the flag cleared for the working set's pages, has CRIU
restore those eagerly and leave the rest to the daemon. Entries are split where the working set
begins and ends inside one: both readers find an entry's pages in ``pages-<id>.img`` by summing
the lengths of the entries before it that have ``PE_PRESENT`` (criu/pagemap.c), which a split in
place leaves unchanged.

The record is made by the first lazy clone's keeper (dolly/_lazy_keeper.py, from the daemon's log
of page faults) into ``working-set.json`` beside the checkpoint's images in Dolly's store, bound
to them by the digest of their pagemaps. It is host-side data Dolly wrote, but it is still
checked before use: a file that is not one, was recorded from other images, or names a page the
pagemap does not hold lazily is ignored, with a log line, and recorded again by the next lazy
clone. Whatever the working set says, every page still comes from the checkpoint's images: it
decides only which arrive before the process runs. The checkpoint's own images are never changed.
A checkpoint imported from a bundle or a registry has none (it is not a member of a bundle) until
its first local lazy clone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ._images import MAX_IMAGE_BYTES
from .errors import HostNotReady

log = logging.getLogger("dolly")

FILE = "working-set.json"
FORMAT = 1
# The pages a record holds at most (dolly/_lazy_keeper.py's MAX_PAGES).
MAX_PAGES = 65536
# A record is at most MAX_RANGES (dolly/_lazy_keeper.py) runs: far below this.
MAX_FILE_BYTES = 1 << 20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# CRIU's pagemap entry flags (criu/include/pagemap.h).
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

Runs = Dict[int, List[Tuple[int, int]]]


class Mismatch(ValueError):
    """A working set that does not fit the images it is to be applied to."""


def path_of(checkpoint_path: Path) -> Path:
    """Where a checkpoint's working set is kept: beside its images, in its folder of the store."""
    return Path(checkpoint_path) / FILE


def binding(images_dir: Path) -> str:
    """The digest of a checkpoint's pagemaps (every ``pagemap-*.img``, by name and content): what
    a working set was recorded from. Small files (bytes per run of pages), read in milliseconds."""
    h = hashlib.sha256()
    for p in sorted(Path(images_dir).glob("pagemap-*.img")):
        data = p.read_bytes()
        h.update(f"{p.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def load(path: Path, expected_binding: str) -> Optional[Runs]:
    """The working set recorded at ``path`` when it was recorded from images whose
    :func:`binding` is ``expected_binding``; None when there is none. A file that is not a
    working set, or one recorded from other images, is None too, with a log line.

    Raises:
        nothing: an unreadable record is only a missing optimisation.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("ignoring the working set %s: %s", path, e)
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    try:
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a working set of this Dolly's format")
        if doc.get("page_size") != PAGE_SIZE:
            raise ValueError(f"recorded with pages of {doc.get('page_size')!r} bytes, this host's are {PAGE_SIZE}")
        if doc.get("binding") != expected_binding:
            raise ValueError("recorded from other images (their pagemaps' digest differs)")
        processes = doc.get("processes")
        if not isinstance(processes, dict):
            raise ValueError("no processes")
        found: Runs = {}
        for pid, runs in processes.items():
            if not (isinstance(pid, str) and pid.isdigit() and isinstance(runs, list)):
                raise ValueError(f"process {pid!r} is not a process ID with a list of runs")
            found[int(pid)] = [_run(r) for r in runs]
        # split() holds every page of the set at once: a run of 10**15 pages would exhaust memory.
        if (total := sum(n for rs in found.values() for _, n in rs)) > MAX_PAGES:
            raise ValueError(f"{total} pages, more than the {MAX_PAGES} a record holds")
        return found
    except (ValueError, TypeError, RecursionError) as e:
        log.warning("ignoring the working set %s: %s; the next lazy clone records it again", path, e)
        return None


def _run(r: object) -> Tuple[int, int]:
    if not (isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)):
        raise ValueError(f"{r!r} is not a run [address, pages]")
    address, pages = r
    if address < 0 or address % PAGE_SIZE or pages <= 0:
        raise ValueError(f"{r!r} is not a run of whole pages")
    return address, pages


def apply(runs: Runs, images_dir: Path, folder: Path) -> int:
    """Have the working set ``runs`` restored eagerly from the images in ``folder`` (a clone's
    restore folder, whose files are hard links to ``images_dir``'s): each of its
    ``pagemap-<pid>.img`` that the working set names is replaced by a new file (written beside,
    renamed over the link: the checkpoint's is never written), a copy of ``images_dir``'s with
    ``PE_LAZY`` cleared for those pages. Every pagemap is made and checked before the first is
    replaced. Returns the number of pages made eager.

    Raises:
        Mismatch: a page of the working set is not one the pagemap holds lazily in
            ``pages-<id>.img``, or a process has no pagemap (the working set is not these images').
        HostNotReady: pycriu cannot be imported.
        OSError: a pagemap cannot be read or written.
    """
    made: List[Tuple[Path, bytes]] = []
    total = 0
    for pid, wanted in sorted(runs.items()):
        source = Path(images_dir) / f"pagemap-{pid}.img"
        try:
            if source.stat().st_size > MAX_IMAGE_BYTES:
                raise Mismatch(f"{source.name} is larger than Dolly reads")
            head, entries = _read_pagemap(source.read_bytes(), source.name)
        except FileNotFoundError:
            raise Mismatch(f"the images hold no process {pid} (no {source.name})") from None
        split_entries, eager = split(entries, wanted)
        data = head + b"".join(_record(e.SerializeToString()) for e in split_entries)
        made.append((Path(folder) / source.name, data))
        total += eager
    for dst, data in made:
        new = dst.with_name(f".{dst.name}.new")
        new.unlink(missing_ok=True)
        try:
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(new, dst)
        finally:
            new.unlink(missing_ok=True)
    return total


def _record(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


def _read_pagemap(data: bytes, name: str) -> Tuple[bytes, list]:
    """A pagemap image's bytes up to its first entry (its magic and its head, kept as they are),
    and its entries (pycriu's ``pagemap_entry`` messages). pycriu's dict form is not used: its
    conversion of every field took milliseconds of each lazy clone's start.

    Raises:
        Mismatch: ``data`` is not a pagemap image.
        HostNotReady: pycriu cannot be imported.
    """
    try:
        from pycriu.images import magic, pb
    except ImportError as e:
        raise HostNotReady(f"pycriu is not importable ({e}): run `make host`") from e
    if data[:8] != struct.pack("<II", magic.by_name["IMG_COMMON"], magic.by_name["PAGEMAP"]):
        raise Mismatch(f"{name} is not a pagemap image")
    at = 8
    entries = []
    head_end = None
    try:
        while at < len(data):
            (size,) = struct.unpack_from("<I", data, at)
            payload = data[at + 4: at + 4 + size]
            if len(payload) != size:
                raise ValueError("truncated")
            at += 4 + size
            if head_end is None:
                pb.pagemap_head().ParseFromString(payload)
                head_end = at
                continue
            entry = pb.pagemap_entry()
            entry.ParseFromString(payload)
            entries.append(entry)
    except Exception as e:  # struct.error, protobuf's DecodeError
        raise Mismatch(f"{name} cannot be read: {type(e).__name__}: {e}") from e
    if head_end is None:
        raise Mismatch(f"{name} has no pagemap head")
    return data[:head_end], entries


def split(entries: list, wanted: List[Tuple[int, int]]) -> Tuple[list, int]:
    """The pagemap ``entries`` (pycriu's ``pagemap_entry`` messages, the head left out) with
    ``PE_LAZY`` cleared for the pages of ``wanted`` (runs ``(address, pages)``), entries split
    where a run begins or ends inside one, in the same order; and the number of pages made eager.

    Raises:
        Mismatch: a page of ``wanted`` is not in a lazy entry whose pages are in the pages image.
    """
    pages = sorted({a + i * PAGE_SIZE for a, n in wanted for i in range(n)})
    out: list = []
    k = 0  # the next wanted page
    eager = 0
    for e in entries:
        start = e.vaddr
        end = start + _nr_pages(e) * PAGE_SIZE
        if k < len(pages) and pages[k] < start:
            raise Mismatch(f"page {pages[k]:#x} is in no pagemap entry")
        if k >= len(pages) or pages[k] >= end:
            out.append(e)
            continue
        flags = e.flags if e.HasField("flags") else None
        if flags is None or flags & (PE_LAZY | PE_PRESENT | PE_PARENT) != PE_LAZY | PE_PRESENT:
            raise Mismatch(f"page {pages[k]:#x} is not a lazy page of the pages image (flags {flags!r})")
        # Alternate runs of lazy and eager pages, in address order.
        at = start
        while at < end:
            eager_here = k < len(pages) and pages[k] == at
            run_end = at
            if eager_here:
                while k < len(pages) and pages[k] == run_end and run_end < end:
                    k += 1
                    run_end += PAGE_SIZE
                eager += (run_end - at) // PAGE_SIZE
            else:
                run_end = min(end, pages[k]) if k < len(pages) else end
            out.append(_piece(e, at, (run_end - at) // PAGE_SIZE, flags & ~PE_LAZY if eager_here else flags))
            at = run_end
    if k < len(pages):
        raise Mismatch(f"page {pages[k]:#x} is in no pagemap entry")
    return out, eager


def _nr_pages(e) -> int:
    return int(e.nr_pages if e.HasField("nr_pages") else e.compat_nr_pages)


def _piece(e, vaddr: int, nr: int, flags: int):
    piece = type(e)()
    piece.CopyFrom(e)
    piece.vaddr = vaddr
    piece.flags = flags
    if e.HasField("nr_pages"):
        piece.nr_pages = nr
    else:
        piece.compat_nr_pages = nr
    return piece
