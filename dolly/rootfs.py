"""The container's writable layer: carrying the source's file changes into a clone.

Docker's checkpoint holds memory only. CRIU refuses to restore a process whose open files are
missing or have another size in the clone, and a user expects the clone to see what the source
wrote. ``scripts/dolly-runc`` archives the source's overlay upper directory while the container is
frozen for the dump; here it is unpacked into the clone's own upper directory before it starts.

GNU tar, not :mod:`tarfile`: the archive holds overlayfs whiteouts (character devices 0:0 that
mark deleted files) and ``trusted.overlay.*`` extended attributes (opaque directories), which
tarfile does not restore. The archive is Dolly's own, made on this host and readable by root only.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from .errors import CheckpointNotFound, DollyError

TAR_OPTIONS = ["--numeric-owner", "--xattrs", "--xattrs-include=*"]


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
