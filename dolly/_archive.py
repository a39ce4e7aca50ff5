"""Tar archives that come from outside: read once, as a stream, with every header bounded.

A bundle, and the writable layer inside it, is written by whoever sent it. Python's :mod:`tarfile`
reads a pax or GNU long-name header whole before anything can look at it, and on Pythons before
3.11.10 parses pax headers in quadratic time (CVE-2024-6232: a 611 KB gzip bundle once grew memory
by 1.2 GB). :class:`BoundedTarInfo` checks each extended header before tarfile parses it: at most
:data:`MAX_HEADER` bytes, records well formed (each ``"<length> <key>=<value>\\n"`` exactly its
length long), no long digit runs (tarfile's regular expressions backtrack over them), no sparse
files from outside. That makes reading linear in the archive's size.

:func:`open_bundle` is the one read of a bundle file: decrypted chunk by chunk when encrypted
(:class:`dolly.trust.DecryptingReader`), decompressed as a stream, never copied or decrypted to a
file first, so that what is verified is what is extracted.

One archive goes the other way: :func:`layer_image_archive`, the ``docker load`` stream of a
layer image Dolly builds (the writable layer the clones of one checkpoint share).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import sys
import threading
import zlib
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Union, cast

import zstandard

from . import trust
from .errors import BundleError, DecryptionFailed, DigestMismatch, DollyError, EngineError, UnsafeArchive

# The tarfile of Python 3.12, with its extraction filters (`data_filter`), on every Python Dolly
# runs on: Debian 12's 3.11.2 predates them, and backports.tarfile is the same module. Dolly's
# other modules take it from here, so one archive is never read by two different tarfiles.
# (Type checking reads the standard library's, whose stubs describe the same module.)
if TYPE_CHECKING or sys.version_info >= (3, 12):
    import tarfile
else:
    from backports import tarfile

MAX_HEADER = 64 << 10  # one pax or GNU long-name header; Linux's largest xattr value is 64 KiB
CHUNK = 1 << 20
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_LONG_NAMES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_DIGIT_RUN = re.compile(rb"[0-9]{65}")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"

# What a damaged archive raises from the tar, gzip and zstd readers (the fuzz tests found each).
DAMAGED = (tarfile.TarError, EOFError, zstandard.ZstdError, zlib.error, gzip.BadGzipFile,
           UnicodeDecodeError, ValueError, RecursionError)
MAX_CHAIN = 8  # extended headers in a row before one member (tarfile reads them recursively)
MAX_PATH = 4096  # Linux's PATH_MAX
MAX_DEPTH = 256


class BoundedTarInfo(tarfile.TarInfo):
    """A tar header read with bounds (see the module's docstring). Sparse files are refused.

    It overrides tarfile's private header parsers, which its type stubs leave out: hence the
    ``type: ignore`` on the calls to them."""

    sparse_ok = False

    def _proc_member(self, tar: tarfile.TarFile) -> Any:
        if self.type in _EXTENDED or self.type in _LONG_NAMES:
            if self.size > MAX_HEADER:
                raise UnsafeArchive(f"a tar header of {self.size} bytes (at most {MAX_HEADER})")
            chain = getattr(tar, "_dolly_chain", 0) + 1
            if chain > MAX_CHAIN:
                raise UnsafeArchive(f"more than {MAX_CHAIN} extended tar headers in a row")
            tar._dolly_chain = chain  # type: ignore[attr-defined]
            try:
                return super()._proc_member(tar)  # type: ignore[misc]
            finally:
                tar._dolly_chain = chain - 1  # type: ignore[attr-defined]
        if self.type == tarfile.GNUTYPE_SPARSE and not self.sparse_ok:
            raise UnsafeArchive(f"{self.name!r} is a sparse file, which Dolly does not accept from outside")
        return super()._proc_member(tar)  # type: ignore[misc]

    def _proc_pax(self, tar: tarfile.TarFile) -> Any:
        raw = tar.fileobj
        buf = raw.read(self._block(self.size))  # type: ignore[attr-defined]
        _check_pax(buf[: self.size])
        # tarfile reads the same bytes again, now known to be sound
        tar.fileobj = _Replay(buf, raw)  # type: ignore[assignment]
        try:
            info = super()._proc_pax(tar)  # type: ignore[misc]
        finally:
            tar.fileobj = raw
        if info.sparse is not None and not self.sparse_ok:
            raise UnsafeArchive(f"{info.name!r} is a sparse file, which Dolly does not accept from outside")
        return info

    def _proc_gnusparse_10(self, next: Any, pax_headers: Any, tar: tarfile.TarFile) -> Any:
        # Version 1.0 keeps its map in data blocks, as many as the header claims.
        if not self.sparse_ok:
            raise UnsafeArchive("a sparse file, which Dolly does not accept from outside")
        return super()._proc_gnusparse_10(next, pax_headers, tar)  # type: ignore[misc]


class OwnTarInfo(BoundedTarInfo):
    """For Dolly's own archives (the runtime's writable layer, GNU tar ``--sparse``)."""

    sparse_ok = True


class _Replay:
    """``first``, then the rest of ``rest``: what tarfile's pax parser reads from its file."""

    def __init__(self, first: bytes, rest: Any) -> None:
        self.first, self.rest = first, rest

    def read(self, n: int = -1) -> bytes:
        if self.first:
            n = len(self.first) if n < 0 else n
            out, self.first = self.first[:n], self.first[n:]
            return out if len(out) == n else out + self.rest.read(n - len(out))
        return self.rest.read(n)

    def tell(self) -> int:
        return int(self.rest.tell()) - len(self.first)

    def seek(self, pos: int, whence: int = 0) -> int:
        if self.first:
            raise io.UnsupportedOperation("seek while replaying a header")
        return int(self.rest.seek(pos, whence))


def _check_pax(buf: bytes) -> None:
    """Refuse a pax header that is not a sequence of well-formed records, in linear time."""
    pos = 0
    while pos < len(buf) and buf[pos] != 0:
        space = buf.find(b" ", pos, pos + 21)
        digits = buf[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise UnsafeArchive("a malformed pax header (a record without its length)")
        end = pos + int(digits)
        if end <= space or end > len(buf) or buf[end - 1] != 0x0A or b"=" not in buf[space + 1:end]:
            raise UnsafeArchive("a malformed pax header (a record of the wrong length)")
        pos = end
    if _DIGIT_RUN.search(buf):
        raise UnsafeArchive("a pax header with a run of more than 64 digits")


@contextlib.contextmanager
def open_bundle(source: Union[Path, IO[bytes], io.RawIOBase], key: Optional[bytes]) -> Iterator[tarfile.TarFile]:
    """The bundle at ``source`` (a path, or a readable binary stream such as a pipe) as a tar
    stream (``r|``): one sequential read, decrypted with ``key`` when it is encrypted,
    decompressed when compressed.

    Raises:
        BundleError: not readable, not a tar, or damaged (also while iterating).
        DecryptionFailed: encrypted and ``key`` is missing or wrong, or the ciphertext was altered.
        UnsafeArchive: a header breaks the bounds (also while iterating).
    """
    path = source if isinstance(source, (str, Path)) else "the bundle stream"
    try:
        raw: Any = open(source, "rb") if isinstance(source, (str, Path)) else source
    except OSError as e:
        raise BundleError(f"cannot read bundle {source}: {e}") from e
    if not hasattr(raw, "peek"):
        raw = io.BufferedReader(raw, CHUNK)
    with contextlib.ExitStack() as own:
        if isinstance(source, (str, Path)):
            own.enter_context(raw)
        try:
            if raw.peek(len(trust.MAGIC))[: len(trust.MAGIC)] == trust.MAGIC:
                if key is None:
                    raise DecryptionFailed("the bundle is encrypted: pass encryption_key")
                plain: Any = io.BufferedReader(trust.DecryptingReader(key, raw), CHUNK)
            else:
                plain = raw
            magic = plain.peek(4)[:4]
            if magic == ZSTD_MAGIC:
                stream: Union[IO[bytes], gzip.GzipFile] = zstandard.ZstdDecompressor().stream_reader(plain)
            elif magic[:2] == GZIP_MAGIC:
                stream = gzip.GzipFile(fileobj=plain, mode="rb")
            else:
                stream = plain
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=BoundedTarInfo)
        except DollyError:
            raise
        except DAMAGED as e:
            raise BundleError(f"{path} is not a bundle (not a readable tar archive): {e}") from e
        with tar, damaged_is_bundle_error(path):
            yield tar


@contextlib.contextmanager
def damaged_is_bundle_error(path: Any) -> Iterator[None]:
    """What the readers raise for a damaged archive, as a :class:`BundleError`. Errors of the
    host (a full disk) are not the bundle's: they pass as they are."""
    try:
        yield
    except DollyError:
        raise
    except DAMAGED as e:
        raise BundleError(f"the bundle {path} is damaged: {type(e).__name__}: {e}") from e
    except OSError as e:
        if e.errno is not None:
            raise
        raise BundleError(f"the bundle {path} is damaged: {type(e).__name__}: {e}") from e


def write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, *, sha256: Optional[str]) -> None:
    """Write a regular member's data to the new file ``dest`` (0600, never through a symlink),
    hashing as it goes (``sha256`` None: an archive that lists no digests).

    Raises:
        DigestMismatch: the data does not hash to ``sha256``; ``dest`` is removed.
    """
    src = tar.extractfile(member)
    if src is None:
        raise UnsafeArchive(f"{member.name!r} is not a regular file")
    write_data(member.name, src, dest, sha256=sha256, size=member.size)


def write_data(name: str, src: IO[bytes], dest: Path, *, sha256: Optional[str], size: int) -> None:
    """Write ``size`` bytes of ``src`` to the new file ``dest`` (0600, never through a symlink),
    hashing as it goes (``sha256`` None: an archive that lists no digests).

    Raises:
        DigestMismatch: the data does not hash to ``sha256``, or ends before ``size`` bytes, or
            goes on after them; ``dest`` is removed.
    """
    h = hashlib.sha256()
    left = size
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            while left > 0:
                chunk = src.read(min(CHUNK, left))
                if not chunk:
                    raise DigestMismatch(f"{name} ends {left} bytes before its size")
                h.update(chunk)
                out.write(chunk)
                left -= len(chunk)
            if src.read(1):
                raise DigestMismatch(f"{name} goes on past its size")
        if sha256 is not None and h.hexdigest() != sha256:
            raise DigestMismatch(f"{name} does not match its SHA-256 in the manifest")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def safe_relpath(name: str) -> str:
    """``name`` normalised, if it stays inside the folder it is unpacked into.

    Raises:
        UnsafeArchive: absolute, with "..", a NUL, empty, too long or too deep.
    """
    if (not isinstance(name, str) or name.startswith("/") or "\0" in name
            or ".." in name.split("/") or posixpath.normpath(name) in ("", ".")):
        raise UnsafeArchive(f"unsafe path in archive: {name!r:.200}")
    if len(name) > MAX_PATH or name.count("/") >= MAX_DEPTH:
        raise UnsafeArchive(f"a path longer than {MAX_PATH} bytes or deeper than {MAX_DEPTH}: {name!r:.100}")
    return posixpath.normpath(name)


class compressor:
    """A writable stream that compresses into ``raw`` (``"zstd"``, ``"gzip"`` or ``"none"``);
    closing it ends the compressed stream, not ``raw``."""

    def __init__(self, raw: IO[bytes], compression: str) -> None:
        self.raw, self.compression = raw, compression

    def __enter__(self) -> IO[bytes]:
        if self.compression == "zstd":
            self.stream: Any = zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(self.raw, closefd=False)
        elif self.compression == "gzip":
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="wb", compresslevel=6)
        else:
            self.stream = None
        return self.stream or self.raw

    def __exit__(self, *exc: Any) -> None:
        if self.stream is not None:
            self.stream.close()


# A member parsed whole (config.dump, spec.dump, deleted.files, ...) is at most this large.
MAX_JSON = 16 << 20


def small_json(path: Path) -> Any:
    """A member of an archive from outside, parsed as JSON.

    Raises:
        UnsafeArchive: larger than :data:`MAX_JSON`.
        BundleError: not JSON.
    """
    if path.stat().st_size > MAX_JSON:
        raise UnsafeArchive(f"{path.name} is larger than {MAX_JSON} bytes")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{path.name} is not JSON: {e}") from None


class HashingReader(io.RawIOBase):
    """A file read once, in order, whose SHA-256 and size are taken as it is read: what was
    checked is what was read, with no second read for the file to change in between."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "rb")
        self._hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)
        if n:
            self._hash.update(memoryview(b)[:n])
            self.size += n
        return n or 0

    def file_size(self) -> int:
        """The file's size now (a cheap first check: the digest decides)."""
        return os.fstat(self._f.fileno()).st_size

    def finish(self) -> str:
        """Read what is left and return the whole file's SHA-256 (hex)."""
        for chunk in iter(lambda: self._f.read(CHUNK), b""):
            self._hash.update(chunk)
            self.size += len(chunk)
        return self._hash.hexdigest()

    def close(self) -> None:
        self._f.close()
        super().close()


# The character devices Docker makes in every container's /dev: null, zero, full, random,
# urandom, tty, console, ptmx.
CONTAINER_DEVICES = frozenset({(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2)})
MAX_TMPFS_MEMBERS = 100_000


def repack_tmpfs(source: Path, out: Path, *, max_bytes: int) -> None:
    """Write the new file ``out``, a tmpfs's files as CRIU keeps them (a gzipped tar), rebuilt
    from ``source`` (the same, or a plain tar): CRIU unpacks it with GNU tar, as root, so only
    folders, regular files, symlinks and the character devices Docker gives every container
    pass, with no member under a symlink of the archive, no set-id bits (owners are kept), and
    headers read with :class:`BoundedTarInfo`.

    Raises:
        UnsafeArchive: any other member, an unsafe name, more than ``max_bytes`` or
            :data:`MAX_TMPFS_MEMBERS` members, or not a tar.
    """
    links: set = set()
    total = count = 0
    try:
        with open(source, "rb") as raw, open(out, "xb") as sink, \
                gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=1) as packed, \
                tarfile.open(fileobj=packed, mode="w|", format=tarfile.PAX_FORMAT) as clean:
            stream: Any = gzip.GzipFile(fileobj=raw) if raw.peek(2)[:2] == GZIP_MAGIC else raw
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=BoundedTarInfo) as tar:
                for member in tar:
                    cast(Any, tar).members.clear()  # a stream: nothing is looked up again
                    count += 1
                    name = member.name.removeprefix("./").rstrip("/")
                    rel = safe_relpath(name) if name not in ("", ".") else "."
                    parts = rel.split("/")
                    if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
                        raise UnsafeArchive(f"a tmpfs image has {member.name!r:.200} under one of its symlinks")
                    if member.issym():
                        links.add(rel)
                    elif member.ischr():
                        if (member.devmajor, member.devminor) not in CONTAINER_DEVICES:
                            raise UnsafeArchive(f"a tmpfs image makes device {member.devmajor}:{member.devminor}")
                    elif not (member.isdir() or member.isfile()) or member.sparse is not None:
                        raise UnsafeArchive(f"a tmpfs image holds {member.name!r:.200}, which is no file, folder, "
                                            "symlink or container device")
                    total += member.size
                    if total > max_bytes or count > MAX_TMPFS_MEMBERS:
                        raise UnsafeArchive(f"a tmpfs image holds more than {max_bytes} bytes or "
                                            f"{MAX_TMPFS_MEMBERS} members")
                    member.name, member.mode = "./" + rel if rel != "." else "./", member.mode & 0o1777
                    clean.addfile(member, tar.extractfile(member) if member.isfile() else None)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        out.unlink(missing_ok=True)
        raise UnsafeArchive(f"a tmpfs image is not a readable tar ({type(e).__name__}: {e})") from e
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def layer_image_archive(base: Dict[str, Any], layer: Path, tag: str) -> Iterator[Iterator[bytes]]:
    """A ``docker load`` archive, as chunks of 1 MiB written meanwhile by a thread, of the image
    ``tag``: the image ``base`` (its inspect) with one more layer, the tar at ``layer`` (an image
    layer: OCI's whiteouts, uncompressed). It carries only the new layer: the engine has the others
    (a load looks each layer up before it reads it). Leaving the block closes the stream, which
    stops a writer the engine no longer reads from.

    Raises:
        EngineError: the archive could not be written to the end (the reader stopped).
    """
    diff_ids = [*base["RootFS"]["Layers"], f"sha256:{sha256_file(layer)}"]
    config = json.dumps({
        "architecture": base.get("Architecture") or "amd64",
        "os": base.get("Os") or "linux",
        "config": base.get("Config") or {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode()
    manifest = json.dumps([{
        "Config": "config.json",
        "RepoTags": [tag],
        "Layers": [f"base-{i}/layer.tar" for i in range(len(diff_ids) - 1)] + ["layer/layer.tar"],
    }]).encode()
    failed: List[BaseException] = []
    read_end, write_end = os.pipe()

    def write() -> None:
        try:
            with os.fdopen(write_end, "wb") as sink, tarfile.open(fileobj=sink, mode="w|") as tar:
                for name, data in (("config.json", config), ("manifest.json", manifest)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                tar.add(str(layer), arcname="layer/layer.tar", recursive=False)
        except BaseException as e:  # the reader stopped: its error is the one to raise
            failed.append(e)

    writer = threading.Thread(target=write, name="dolly-layer-image", daemon=True)
    writer.start()
    try:
        with os.fdopen(read_end, "rb") as source:
            yield iter(lambda: source.read(1 << 20), b"")
    finally:
        writer.join()
    if failed:
        raise EngineError(f"could not send the layer image {tag}: {failed[0]}") from failed[0]
