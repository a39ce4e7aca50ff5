"""A checkpoint's working set (``lazy=True``): the pages its first lazy clone faulted in are
recorded beside the checkpoint, and the next lazy clones have CRIU restore those eagerly (their own
copy of the pagemap rewritten), the rest served lazily. On the real engine, CRIU and kernel; the
unit tests at the end need none."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import pycriu.images
import pytest
from pycriu.images import pb
from test_lazy import answered, checkpointed, restore_folder, wait_gone

import dolly
from dolly import _lazy_keeper as keeper, _working_set as working_set
from dolly._criu_log import CRIU_LOG_DIR
from dolly._start import _place_images, _prefetch_working_set

PAGE = working_set.PAGE_SIZE


@pytest.fixture
def restore_stats():
    """CRIU's restore statistics of each start, kept (by scripts/dolly-runc) while the test runs:
    ``pages(clone)`` is the number of pages CRIU's restore itself wrote (the lazy ones not)."""
    keep = CRIU_LOG_DIR / ".keep"
    kept_before = keep.exists()
    CRIU_LOG_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    keep.touch()
    seen: List[str] = []

    def pages(clone) -> int:
        seen.append(clone.id)
        with open(CRIU_LOG_DIR / f"{clone.id}.stats-restore", "rb") as f:
            return int(pycriu.images.load(f)["entries"][0]["restore"]["pages_restored"])

    try:
        yield pages
    finally:
        if not kept_before:
            keep.unlink(missing_ok=True)
        for cid in seen:
            for name in (f"{cid}.stats-restore", f"{cid}.restore.log"):
                (CRIU_LOG_DIR / name).unlink(missing_ok=True)


def digests(folder: Path) -> Dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def pagemap(path: Path) -> List[dict]:
    with open(path, "rb") as f:
        return pycriu.images.load(f)["entries"]


def eager_pages(entries: List[dict]) -> int:
    """Pages of a pagemap that CRIU's restore writes itself (present in the pages image, not lazy)."""
    return sum(e["nr_pages"] for e in entries[1:]
               if e["flags"] & working_set.PE_PRESENT and not e["flags"] & working_set.PE_LAZY)


def pages_in(runs: List[List[int]]) -> List[int]:
    return [a + i * PAGE for a, n in runs for i in range(n)]


def flags_of(entries: List[dict], address: int) -> Tuple[int, int]:
    """The flags of the entry holding ``address``, and where its page is in the pages image."""
    offset = 0
    for e in entries[1:]:
        if e["vaddr"] <= address < e["vaddr"] + e["nr_pages"] * PAGE:
            return e["flags"], offset + (address - e["vaddr"])
        if e["flags"] & working_set.PE_PRESENT:
            offset += e["nr_pages"] * PAGE
    raise AssertionError(f"{address:#x} is in no entry")


def test_the_first_lazy_clone_records_the_working_set_and_the_next_ones_prefetch_it(run, engine, restore_stats):
    at_checkpoint, cp = checkpointed(run, 128)
    record = working_set.path_of(cp.path)
    images_before = digests(cp.images_dir)
    assert not record.exists()

    (first,) = dolly.clone(cp, 1, lazy=True)
    assert answered(first) == at_checkpoint
    assert wait_gone(restore_folder(engine, first))
    # Recorded once every page was in: the pages the clone faulted on to answer, each a lazy page
    # of the checkpoint's pagemap (apply checks every one).
    doc = json.loads(record.read_text())
    runs = working_set.load(record, working_set.binding(cp.images_dir))
    assert runs and sum(n for r in runs.values() for _, n in r) > 0
    ((pid, ws_runs),) = runs.items()
    checkpoint_map = pagemap(cp.images_dir / f"pagemap-{pid}.img")
    for address in pages_in(doc["processes"][str(pid)]):
        flags, _ = flags_of(checkpoint_map, address)
        assert flags & working_set.PE_LAZY, f"{address:#x} was not lazy in the checkpoint"
    assert restore_stats(first) == eager_pages(checkpoint_map)

    (second,) = dolly.clone(cp, 1, lazy=True)
    assert answered(second) == at_checkpoint
    # CRIU's restore itself wrote the working set's pages: the checkpoint's eager ones and those.
    n = sum(n for _, n in ws_runs)
    assert restore_stats(second) == eager_pages(checkpoint_map) + n
    assert wait_gone(restore_folder(engine, second))
    assert answered(second) == at_checkpoint
    # The second clone did not record again (it had a working set): the record is the first one's.
    assert json.loads(record.read_text()) == doc

    # A clone's restore folder as _start_from lays it out (here, where the keeper does not remove
    # it): its pagemap has the working set's pages non-lazy, each at the same place in the pages
    # image as in the checkpoint's pagemap, every other page as it was.
    with tempfile.TemporaryDirectory(dir=engine.spool_dir) as spool:  # hard links: the store's filesystem
        folder = Path(spool) / "restore"
        _place_images(cp, folder, hostname="ws-test")
        assert _prefetch_working_set(cp, folder) is None  # applied: nothing to record
        clone_map = pagemap(folder / f"pagemap-{pid}.img")
        assert not os.path.samefile(folder / f"pagemap-{pid}.img", cp.images_dir / f"pagemap-{pid}.img")
    wanted = set(pages_in(doc["processes"][str(pid)]))
    for e in checkpoint_map[1:]:
        for address in range(e["vaddr"], e["vaddr"] + e["nr_pages"] * PAGE, PAGE):
            flags, offset = flags_of(clone_map, address)
            assert offset == flags_of(checkpoint_map, address)[1]
            expected = e["flags"] & ~working_set.PE_LAZY if address in wanted else e["flags"]
            assert flags == expected, f"{address:#x}: {flags} != {expected}"
    assert eager_pages(clone_map) == eager_pages(checkpoint_map) + n
    # The checkpoint's own images are unchanged.
    assert digests(cp.images_dir) == images_before


@pytest.mark.parametrize("bad", ["not json", "mismatched binding", "outside the pagemap", "eager page"])
def test_a_working_set_that_does_not_fit_is_ignored_and_recorded_again(run, engine, restore_stats, caplog, bad):
    at_checkpoint, cp = checkpointed(run, 32)
    record = working_set.path_of(cp.path)
    bound = working_set.binding(cp.images_dir)
    ((pid, entries),) = ((int(p.name[8:-4]), pagemap(p)) for p in cp.images_dir.glob("pagemap-*.img"))
    eager = next(e for e in entries[1:] if not e["flags"] & working_set.PE_LAZY)
    text = {
        "not json": "{\"format\": 1, \"binding\": ",
        "mismatched binding": json.dumps({"format": 1, "binding": "0" * 64, "page_size": PAGE,
                                          "processes": {str(pid): [[entries[1]["vaddr"], 1]]}}),
        # Page 1 of the address space: no process has memory there.
        "outside the pagemap": json.dumps({"format": 1, "binding": bound, "page_size": PAGE,
                                           "processes": {str(pid): [[PAGE, 1]]}}),
        "eager page": json.dumps({"format": 1, "binding": bound, "page_size": PAGE,
                                  "processes": {str(pid): [[eager["vaddr"], 1]]}}),
    }[bad]
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    images_before = digests(cp.images_dir)

    with caplog.at_level(logging.WARNING, logger="dolly"):
        (clone,) = dolly.clone(cp, 1, lazy=True)
    assert any("ignoring the working set" in r.getMessage() for r in caplog.records)
    assert answered(clone) == at_checkpoint
    # Nothing of it was restored eagerly: only the pages the checkpoint holds eagerly.
    assert restore_stats(clone) == eager_pages(entries)
    assert wait_gone(restore_folder(engine, clone))
    assert answered(clone) == at_checkpoint
    # This clone recorded a working set of its own over it.
    assert working_set.load(record, bound)
    assert digests(cp.images_dir) == images_before


# --- no engine -----------------------------------------------------------------------------------

LOG = b"""\
(00.000000) CRIU run id = 4eff798b
(00.147148) uffd: 1-8: #PF at 0x7f0000002000
(00.147154) pr1-1 Read 7f0000002000 1 pages
(00.147156) \tpr1-1 Read page from self 7f0000002000/88c4000
(00.147160) uffd: 1-8: uffd_copy: 0x7f0000002000/4096
(00.150000) pr1-1 Read 7f0000100000 16 pages
(00.221284) uffd: 1-8: #PF at 0x7f0000001000
(00.221293) pr1-1 Read 7f0000001000 1 pages
(00.223064) uffd: 1-8: #PF at 0x7f0000009000
(00.223065) uffd: 1-8: zero page at 0x7f0000009000
(00.223066) pr1-1 Read 7f0000200000 1 pages
(00.223070) uffd: 7-9: #PF at 0x7f0000005000
(00.223071) pr7-2 Read 7f0000005000 1 pages
(00.223130) uffd: 1-8: #PF at 0x7f0000002000
(00.223131) pr1-1 Read 7f0000002000 1 pages
(100.22313) uffd: 1-8: #PF at 0x7f0000003000
(100.22313) pr1-1 Read 7f0000003000 1 pages
(00.223140) uffd: 1-8: #PF at 0x7f0000008000
(00.223141) uffd: 1-8: excess message in queue: 0
(00.223142) pr1-1 Read 7f0000008000 1 pages
"""


def test_the_keeper_records_the_pages_read_for_a_fault_in_fault_order():
    pages = keeper.faulted_pages(LOG.splitlines(keepends=True))
    # Not the background transfer's reads, not a zero page, not a read that does not follow its
    # fault, each page once; per process.
    assert pages == {1: [0x7f0000002000, 0x7f0000001000, 0x7f0000003000], 7: [0x7f0000005000]}
    assert keeper.runs(pages) == {1: [[0x7f0000001000, 3]], 7: [[0x7f0000005000, 1]]}


def test_the_keeper_caps_the_working_set(monkeypatch):
    monkeypatch.setattr(keeper, "MAX_PAGES", 3)
    lines = []
    for a in (0x10000, 0x30000, 0x50000, 0x70000):
        lines += [b"(00.1) uffd: 1-8: #PF at 0x%x\n" % a, b"(00.1) pr1-1 Read %x 1 pages\n" % a]
    assert keeper.faulted_pages(lines) == {1: [0x10000, 0x30000, 0x50000]}
    monkeypatch.setattr(keeper, "MAX_RANGES", 2)
    # Too many runs: the pages faulted last go first.
    assert keeper.runs({1: [0x10000, 0x30000, 0x50000, 0x70000]}) == {1: [[0x10000, 1], [0x30000, 1]]}


def test_the_keeper_writes_the_record_only_where_its_checkpoint_still_is(tmp_path):
    log = tmp_path / "lazy-pages.log"
    log.write_bytes(LOG)
    keeper._record_working_set(str(log), str(tmp_path / "cp" / working_set.FILE), "b" * 64)
    assert not (tmp_path / "cp").exists()
    (tmp_path / "cp").mkdir()
    keeper._record_working_set(str(log), str(tmp_path / "cp" / working_set.FILE), "b" * 64)
    assert os.listdir(tmp_path / "cp") == [working_set.FILE]
    assert (tmp_path / "cp" / working_set.FILE).stat().st_mode & 0o777 == 0o600
    assert working_set.load(tmp_path / "cp" / working_set.FILE, "b" * 64) == {
        1: [(0x7f0000001000, 3)], 7: [(0x7f0000005000, 1)]}


LAZY = working_set.PE_LAZY | working_set.PE_PRESENT


def entry(vaddr: int, nr: int, flags: int):
    e = pb.pagemap_entry()
    e.vaddr, e.compat_nr_pages, e.flags, e.nr_pages = vaddr, 0, flags, nr
    return e


def test_split_clears_the_lazy_flag_of_the_working_set_and_keeps_the_pages_image_order():
    entries = [entry(0x1000, 2, working_set.PE_PRESENT), entry(0x10000, 8, LAZY), entry(0x20000, 2, LAZY)]
    out, eager = working_set.split(entries, [(0x12000, 2), (0x17000, 1), (0x20000, 1)])
    assert eager == 4
    assert out == [
        entry(0x1000, 2, working_set.PE_PRESENT),
        entry(0x10000, 2, LAZY), entry(0x12000, 2, working_set.PE_PRESENT), entry(0x14000, 3, LAZY),
        entry(0x17000, 1, working_set.PE_PRESENT),
        entry(0x20000, 1, working_set.PE_PRESENT), entry(0x21000, 1, LAZY),
    ]
    # Same pages, same order: each page keeps its place in the pages image.
    assert sum(e.nr_pages for e in out) == sum(e.nr_pages for e in entries)
    # A run over two adjacent entries, and an entry taken whole.
    out, eager = working_set.split([entry(0x10000, 2, LAZY), entry(0x12000, 2, LAZY)], [(0x11000, 3)])
    assert eager == 3
    assert out == [entry(0x10000, 1, LAZY), entry(0x11000, 1, working_set.PE_PRESENT),
                   entry(0x12000, 2, working_set.PE_PRESENT)]
    # An entry of an older CRIU (its length in compat_nr_pages only).
    old = pb.pagemap_entry()
    old.vaddr, old.compat_nr_pages, old.flags = 0x10000, 2, LAZY
    out, eager = working_set.split([old], [(0x10000, 1)])
    assert [(e.vaddr, e.compat_nr_pages, e.flags, e.HasField("nr_pages")) for e in out] == [
        (0x10000, 1, working_set.PE_PRESENT, False), (0x11000, 1, LAZY, False)]


def test_a_pagemap_that_is_not_one_is_a_mismatch(tmp_path):
    (tmp_path / "pagemap-1.img").write_bytes(b"\x19CVT%@\x08V\xff\xff\xff\x7f")
    (tmp_path / "pagemap-2.img").write_bytes(b"not an image")
    for pid in (1, 2, 3):
        with pytest.raises(working_set.Mismatch):
            working_set.apply({pid: [(0x1000, 1)]}, tmp_path, tmp_path / "out")


@pytest.mark.parametrize("runs, why", [
    ([(0x5000, 1)], "in no pagemap entry"),               # before every entry
    ([(0x12000, 1)], "in no pagemap entry"),              # between two
    ([(0x30000, 1)], "in no pagemap entry"),              # after every entry
    ([(0x11000, 2)], "in no pagemap entry"),              # running past an entry's end
    ([(0x1000, 1)], "not a lazy page"),                   # an eager page
    ([(0x40000, 1)], "not a lazy page"),                  # lazy, but not in the pages image
])
def test_split_refuses_a_page_the_pagemap_does_not_hold_lazily(runs, why):
    entries = [entry(0x1000, 1, working_set.PE_PRESENT), entry(0x10000, 2, LAZY), entry(0x20000, 1, LAZY),
               entry(0x40000, 1, working_set.PE_LAZY)]
    with pytest.raises(working_set.Mismatch, match=why):
        working_set.split(entries, runs)


@pytest.mark.parametrize("text", [
    "", "[]", "{\"format\": 2}", "\0\1\2",
    json.dumps({"format": 1, "binding": "b", "page_size": 1, "processes": {}}),
    json.dumps({"format": 1, "binding": "other", "page_size": PAGE, "processes": {}}),
    json.dumps({"format": 1, "binding": "b", "page_size": PAGE, "processes": {"1": [[4097, 1]]}}),
    json.dumps({"format": 1, "binding": "b", "page_size": PAGE, "processes": {"1": [[4096, 0]]}}),
    json.dumps({"format": 1, "binding": "b", "page_size": PAGE, "processes": {"x": []}}),
    json.dumps({"format": 1, "binding": "b", "page_size": PAGE, "processes": {"1": [[4096, True]]}}),
    " " * (working_set.MAX_FILE_BYTES + 1),
])
def test_a_record_that_is_not_a_working_set_of_these_images_is_ignored(tmp_path, caplog, text):
    path = tmp_path / working_set.FILE
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="dolly"):
        assert working_set.load(path, "b") is None
    assert "ignoring the working set" in caplog.text


def test_no_record_is_no_working_set_and_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dolly"):
        assert working_set.load(tmp_path / working_set.FILE, "b") is None
    assert not caplog.records
