"""The container's writable layer: carrying the source's file changes into a clone.

Docker's checkpoint holds memory only. CRIU refuses to restore a process whose open files are
missing or have another size in the clone, and a user expects the clone to see what the source
wrote. ``scripts/dolly-runc`` archives the source's overlay upper directory while the container is
frozen for the dump; here it is unpacked into the clone's own upper directory before it starts.

GNU tar, not :mod:`tarfile`: the archive holds overlayfs whiteouts (character devices 0:0 that
mark deleted files) and ``trusted.overlay.*`` extended attributes (opaque directories), which
tarfile does not restore. The archive is Dolly's own, made on this host and readable by root only.

Bundles carry the layer in Podman's form instead (:func:`to_bundle_form`): the files as they are,
and the deleted paths listed apart. :func:`to_overlay_form` turns a bundle's layer, written by
whoever sent it, back into an overlay upper directory's form, refusing anything that could write
outside the clone's layer.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import stat
import subprocess
from pathlib import Path
from typing import IO, Dict, Iterator, List, Optional, Tuple

from . import _archive as archive
from ._archive import tarfile
from .errors import CheckpointNotFound, DollyError, InvalidArgument, UnsafeArchive

MAX_FILES = 100_000
_OPAQUE = "SCHILY.xattr.trusted.overlay.opaque"
_OVERLAY_XATTRS = "SCHILY.xattr.trusted.overlay."
_OVERLAY_REDIRECTS = ("SCHILY.xattr.trusted.overlay.redirect", "SCHILY.xattr.trusted.overlay.metacopy")
_SPARSE = "GNU.sparse."
# The pax records a layer from outside may carry on into the overlay form: extended attributes a
# container's files may have. Everything else is rebuilt from the checked member (GNU tar would
# obey a "path" or "GNU.sparse.name" record over the name that was checked).
_KEPT_XATTRS = ("SCHILY.xattr.user.", "SCHILY.xattr.security.capability")

TAR_OPTIONS = ["--numeric-owner", "--xattrs", "--xattrs-include=*"]
# Room left free on the destination's filesystem beyond the archive itself, and the headers a file
# takes in it: the same figures as scripts/dolly-runc's.
RESERVE_BYTES = 1 << 20
HEADER_BYTES = 2048


class LayerRefused(DollyError):
    """The writable layer was not archived: ``reason`` is ``"layer-too-large"`` (``fields``:
    allocated, max) or ``"no-space"`` (need, avail), as scripts/dolly-runc reports them."""

    def __init__(self, reason: str, fields: Dict[str, int]) -> None:
        super().__init__(f"{reason} {fields}")
        self.reason = reason
        self.fields = fields


def allocated_bytes(upper_dir: Path) -> Tuple[int, int]:
    """The bytes a layer's files hold on disk (a sparse file counts what it holds; hard links
    count once) and the number of entries, not crossing into other filesystems."""
    top = os.lstat(upper_dir)
    seen = set()
    total, entries = top.st_blocks * 512, 1
    # Nothing in the layer is followed: it is the container's, and a symlink there may point
    # anywhere on this host (os.walk does not descend into links; lstat does not follow them).
    for folder, dirs, files in os.walk(upper_dir):
        descend = []
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            entries += 1
            if st.st_dev != top.st_dev:
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_dir and name in dirs:
                descend.append(name)
            if st.st_nlink > 1 and not is_dir:
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
            total += st.st_blocks * 512
        dirs[:] = descend
    return total, entries


def archive_layer(upper_dir: Path, out: Path, *, max_bytes: int) -> None:
    """Archive a writable layer (an overlay upper directory) as scripts/dolly-runc does: GNU tar,
    sparse-aware, with whiteouts and extended attributes, readable by root only. The caller has
    frozen the container.

    Raises:
        LayerRefused: the layer holds more than ``max_bytes``, or ``out``'s filesystem lacks room.
        DollyError: tar failed.
    """
    size, entries = allocated_bytes(upper_dir)
    if size > max_bytes:
        raise LayerRefused("layer-too-large", {"allocated": size, "max": max_bytes})
    need = size + entries * HEADER_BYTES + RESERVE_BYTES
    avail = shutil.disk_usage(out.parent).free
    if avail < need:
        raise LayerRefused("no-space", {"need": need, "avail": avail})
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        # Sockets are left out without a word, as scripts/dolly-runc does (CRIU binds them again).
        res = subprocess.run(["tar", "-C", str(upper_dir), *TAR_OPTIONS, "--sparse", "--warning=no-file-ignored",
                              "-cf", "-", "."],
                             stdout=f, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        out.unlink(missing_ok=True)
        raise DollyError(f"could not archive the writable layer {upper_dir}: {res.stderr.strip()}")


def apply_diff(diff: Path, upper_dir: Path) -> None:
    """Unpack a writable-layer archive into a created (not yet started) container's upper dir.

    Raises:
        CheckpointNotFound: the archive is missing.
        DollyError: tar failed (the message has tar's own words).
    """
    if not Path(diff).is_file():
        raise CheckpointNotFound(f"the checkpoint's writable layer {diff} is missing")
    res = subprocess.run(
        ["tar", "-C", str(upper_dir), "-xpf", str(diff), *TAR_OPTIONS],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise DollyError(f"could not unpack {diff} into {upper_dir}: {res.stderr.strip()}")


def to_bundle_form(overlay_tar: Path, out: Path, *, max_bytes: int) -> List[str]:
    """Podman's form of a writable layer: the files as they are, and deletions listed apart.
    Overlay whiteouts (character devices 0:0) become deleted paths; an opaque directory (one that
    hides everything the image had there) becomes a deleted path and the directory again. Sparse
    files are written out whole (tarfile cannot write them sparse): compression takes the holes.
    Returns the deleted paths.

    Raises:
        InvalidArgument: the layer in this form would take more than ``max_bytes`` (a sparse
            file of 10 TiB allocates little, but is 10 TiB here).
    """
    deleted: List[str] = []
    too_large = (f"the writable layer takes more than {max_bytes} bytes in a bundle (sparse files are "
                 "written out whole there); pass a larger max_bytes to export it")
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tout:
        for m, data in _layer_members(overlay_tar, max_bytes=max_bytes, too_large=too_large):
            if _is_whiteout(m):
                deleted.append("/" + m.name)
                continue
            if m.pax_headers.get(_OPAQUE) == "y":
                deleted.append("/" + m.name)
            tout.addfile(_plain(m), data)
    return deleted


def to_image_layer(overlay_tar: Path, out: IO[bytes], *, max_bytes: int) -> None:
    """An image layer (OCI's form, which ``docker load`` takes) of a checkpoint's writable layer,
    written to ``out``: an overlay whiteout (character device 0:0) becomes an empty ``.wh.<name>``
    beside it, an opaque directory gets a ``.wh..wh..opq`` inside, overlay's own extended
    attributes are left out, and sparse files are written whole. The archive is Dolly's own, made
    on this host (:func:`archive_layer`).

    Raises:
        InvalidArgument: the layer in this form would take more than ``max_bytes``, or holds what
            an image layer cannot say (a file named ``.wh.*``, overlayfs' redirects or metacopy).
    """
    too_large = f"the writable layer takes more than {max_bytes} bytes as an image layer"
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tout:
        for m, data in _layer_members(overlay_tar, max_bytes=max_bytes, too_large=too_large):
            folder, base = posixpath.split(m.name)
            if base.startswith(".wh."):  # an image layer would read it as a whiteout
                raise InvalidArgument(f"{m.name} cannot be carried in an image layer")
            if any(k.startswith(_OVERLAY_REDIRECTS) for k in m.pax_headers):
                # A renamed folder or a file whose data stays below (overlayfs' redirect_dir and
                # metacopy): only this overlay understands it.
                raise InvalidArgument(f"{m.name} has overlayfs' redirect or metacopy attributes")
            if _is_whiteout(m):
                tout.addfile(_marker(posixpath.join(folder, ".wh." + base), m))
                continue
            opaque = m.pax_headers.get(_OPAQUE) == "y"
            tout.addfile(_plain(m), data)
            if opaque:
                tout.addfile(_marker(posixpath.join(m.name, ".wh..wh..opq"), m))


def _layer_members(overlay_tar: Path, *, max_bytes: int, too_large: str
                   ) -> Iterator[Tuple[tarfile.TarInfo, Optional[IO[bytes]]]]:
    """The members of a writable-layer archive in overlay's form (Dolly's own, made on this
    host), each with its name normalized, the root left out, and the contents of a regular file
    (read whole: a sparse file with its holes as zeros; None for anything else). Whiteouts do not
    count toward ``max_bytes``; the files do, at the size they take written whole.

    Raises:
        InvalidArgument: ``too_large``, once the files take more than ``max_bytes``.
    """
    total = 0
    with tarfile.open(overlay_tar, "r:", tarinfo=archive.OwnTarInfo) as tin:
        for m in tin:
            m.name = posixpath.normpath(m.name)
            if m.name == ".":
                continue
            if _is_whiteout(m):
                yield m, None
                continue
            total += m.size
            if total > max_bytes:
                raise InvalidArgument(too_large)
            yield m, tin.extractfile(m) if m.isfile() else None


def _is_whiteout(m: tarfile.TarInfo) -> bool:
    """An overlayfs whiteout: a character device 0:0 marking a deleted path."""
    return m.ischr() and m.devmajor == 0 and m.devminor == 0


def _plain(m: tarfile.TarInfo) -> tarfile.TarInfo:
    """``m`` as a plain member: overlayfs' own extended attributes left out, and not sparse (its
    contents, already opened, are written whole)."""
    m.pax_headers = {k: v for k, v in m.pax_headers.items() if not k.startswith((_OVERLAY_XATTRS, _SPARSE))}
    m.sparse = None
    return m


def _marker(name: str, like: tarfile.TarInfo) -> tarfile.TarInfo:
    """An empty regular file ``name``: a whiteout of an image layer."""
    marker = tarfile.TarInfo(name)
    marker.mode, marker.mtime, marker.uid, marker.gid = 0o600, like.mtime, 0, 0
    return marker


def to_overlay_form(bundle_tar: Path, deleted: List[str], out: Path, *, max_bytes: int) -> None:
    """A bundle's layer back in an overlay upper directory's form, refusing anything that could
    write outside the container's layer when GNU tar unpacks it: absolute paths, "..", paths
    through a symlink (also one made by a hard link to a symlink, and deleted paths beneath one),
    hard links out of the archive, device nodes, sparse files, more than ``max_bytes`` or
    :data:`MAX_FILES` files.

    Raises:
        UnsafeArchive: naming the first such member.
    """
    gone = {_deleted_relpath(d) for d in deleted}
    kinds: Dict[str, str] = {}  # name -> "dir", "symlink" or "file", as the archive makes it
    total = 0
    with tarfile.open(bundle_tar, "r:", tarinfo=archive.BoundedTarInfo) as tin, \
            tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tout, \
            archive.damaged_is_bundle_error(bundle_tar):
        for count, m in enumerate(tin):
            if count >= MAX_FILES:
                raise UnsafeArchive(f"rootfs-diff.tar holds more than {MAX_FILES} files")
            name = archive.safe_relpath(m.name)
            _refuse_beneath_non_dir(name, kinds, "rootfs-diff.tar: " + name)
            if m.isdev() and not m.isfifo():
                raise UnsafeArchive(f"rootfs-diff.tar: {name} is a device node")
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
                raise UnsafeArchive(f"rootfs-diff.tar: {name} has an unsupported type")
            kind = "dir" if m.isdir() else "symlink" if m.issym() else "file"
            if m.islnk():
                target = archive.safe_relpath(m.linkname)
                if target not in kinds or kinds[target] == "dir":
                    raise UnsafeArchive(f"rootfs-diff.tar: hard link {name} points outside the archive")
                kind = kinds[target]  # a hard link to a symlink is that symlink again
                m.linkname = target
            total += m.size
            if total > max_bytes:
                raise UnsafeArchive(f"rootfs-diff.tar unpacks to more than {max_bytes} bytes")
            kinds[name] = kind
            headers = {k: v for k, v in m.pax_headers.items() if k.startswith(_KEPT_XATTRS)}
            if name in gone:
                if m.isdir():
                    headers[_OPAQUE] = "y"  # deleted, then made again: it hides what the image had
                gone.discard(name)  # deleted, then made again: the archive's version stands
            m.pax_headers, m.name = headers, name
            tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
        for name in sorted(gone):
            _refuse_beneath_non_dir(name, kinds, f"deleted.files: /{name}")
            whiteout = tarfile.TarInfo(name)
            whiteout.type, whiteout.devmajor, whiteout.devminor, whiteout.mode = tarfile.CHRTYPE, 0, 0, 0
            tout.addfile(whiteout)


def _refuse_beneath_non_dir(name: str, kinds: Dict[str, str], what: str) -> None:
    parts = name.split("/")
    parent = ""
    for part in parts[:-1]:  # safe_relpath bounds the depth, so this stays cheap
        parent = f"{parent}/{part}" if parent else part
        if kinds.get(parent, "dir") != "dir":
            raise UnsafeArchive(f"{what} lies beneath {parent}, which the archive makes a {kinds[parent]}")


def _deleted_relpath(path: str) -> str:
    """An entry of deleted.files: an absolute path inside the container."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise UnsafeArchive(f"deleted.files holds {path!r}, not an absolute path")
    return archive.safe_relpath(path.lstrip("/"))
