"""Dolly's checkpoint store on an engine's host, as this process sees it: finding and removing
checkpoints, the clones' shared layer images, sealing a new checkpoint folder and root-only writes.
The folder's layout is in dolly._checkpoint; the public operations over it (on either host) are
dolly._catalog's.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, List, Optional

from docker.models.containers import Container

from . import _names as names
from ._checkpoint import LAYER_IMAGE_REPOSITORY, METADATA, Checkpoint
from ._engine import ContainerRef, Engine, id_of
from .errors import CheckpointNotFound, ContainerNotFound, DollyError, InvalidArgument


def find_all(engine: Engine, container: Optional[ContainerRef]) -> List[Checkpoint]:
    """The checkpoints of ``container`` kept on ``engine``'s host (every container's when None),
    oldest first; a removed container's are found by its name or ID.

    Raises:
        ContainerNotFound: no such container, now or in the checkpoints Dolly keeps.
        InvalidArgument: ``container`` names more than one removed container.
    """
    if container is None:
        folders = sorted(engine.store_dir.iterdir()) if engine.store_dir.is_dir() else []
    else:
        folders = [_source_folder(engine, container)]
    found = []
    for folder in folders:
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name.startswith(".") or not (path / METADATA).exists():
                continue
            try:
                found.append(Checkpoint.load(path, engine.client))
            except CheckpointNotFound:  # removed (renamed away) since the folder was listed
                continue
    return sorted(found, key=lambda cp: cp.created_at)


def find(engine: Engine, container: ContainerRef, name: str) -> Checkpoint:
    """The checkpoint ``name`` of ``container`` on ``engine``'s host.

    Raises:
        InvalidArgument, ContainerNotFound: as :func:`find_all`.
        CheckpointNotFound: the container has no checkpoint of that name.
    """
    path = _source_folder(engine, container) / names.checkpoint_name(name)
    if not (path / METADATA).exists():
        raise CheckpointNotFound(f"no checkpoint named {name!r} for container {_ref_text(container)}")
    return Checkpoint.load(path, engine.client)


def find_same(engine: Engine, container_id: str, name: str, created_at: datetime) -> Checkpoint:
    """``engine``'s own copy of the checkpoint ``name`` of ``container_id`` taken at
    ``created_at``: the original (taken here) or a copy Dolly's transfer made here. An imported
    checkpoint that only claims the same identity is never taken for it.

    Raises:
        CheckpointNotFound, ContainerNotFound: there is none.
    """
    found = find(engine, container_id, name)
    if found.created_at != created_at or not (found.origin is None or found.origin.get("copy") is True):
        raise CheckpointNotFound(f"this engine holds no copy of checkpoint {name!r} of {container_id[:12]} "
                                 f"taken at {created_at.isoformat()}")
    return found


def remove(engine: Engine, checkpoint: Checkpoint) -> None:
    """Delete a checkpoint's folder, then its clones' shared layer image unless it is in use.

    Raises:
        InvalidArgument: its path is not a folder of Dolly's store.
        CheckpointNotFound: it was removed already.
    """
    path = checkpoint.path
    # The folder must be what Dolly's store layout says it is (<store>/<container-id>/<name>), a
    # real folder and no symlink: a Checkpoint made by hand must not aim the removal elsewhere.
    if (path.name != checkpoint.name or path.parent.name != checkpoint.container_id
            or path.parent.parent.name != "checkpoints" or path.is_symlink()
            or os.path.realpath(path) != os.path.abspath(path)):
        raise InvalidArgument(f"{path} is not a checkpoint folder of Dolly's store")
    # Rename first, so that a concurrent restore never sees a half-deleted folder.
    doomed = path.with_name(f".removing-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError as e:
        raise CheckpointNotFound(f"checkpoint {checkpoint.name!r} was removed already") from e
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        path.parent.rmdir()  # the source's folder, once it holds no checkpoint
    except OSError:
        pass
    # Its clones' shared layer, unless a clone still runs on it (then prune removes it later) or
    # a checkpoint of such a clone was taken from it.
    remove_unused_layer_images(engine, only={checkpoint.layer_image})


def remove_all_of(engine: Engine, container_id: str) -> None:
    """Remove every checkpoint kept of a container (a full ID: a plain name under the store), and
    their shared layer images that no container uses any more."""
    folder = engine.store_dir / names.container_id(container_id)
    tags = set()
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        with contextlib.suppress(CheckpointNotFound):
            tags.add(Checkpoint.load(path).layer_image)
    shutil.rmtree(folder, ignore_errors=True)
    if tags:
        remove_unused_layer_images(engine, only=tags)


def _layer_record(engine: Engine, tag: str) -> Path:
    """Where Dolly records the ID of the shared layer image it made under ``tag``: root-only,
    beside the store. A tag is predictable (it derives from the checkpoint's fields), so an image
    found under it is Dolly's only when its ID, which the engine derives from the image's content,
    is the one recorded here."""
    return engine.store_dir.parent / "layer-images" / tag.rsplit(":", 1)[1]


def made_layer_image(engine: Engine, tag: str) -> Optional[str]:
    """The ID Dolly recorded for the layer image it made under ``tag``, or None."""
    try:
        fd = os.open(_layer_record(engine, tag), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        text = f.read(200).strip()
    return text if names.IMAGE_ID.match(text) else None


def record_layer_image(engine: Engine, tag: str, image_id: str) -> None:
    """Record that Dolly made ``image_id`` under ``tag``: a file of a random name, created
    exclusively, renamed over the record.

    Raises:
        OSError: it cannot be written.
    """
    path = _layer_record(engine, tag)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.parent / f".{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(image_id)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def forget_layer_image(engine: Engine, tag: str) -> None:
    _layer_record(engine, tag).unlink(missing_ok=True)


def remove_unused_layer_images(engine: Engine, *, only: Optional[set[str]] = None) -> None:
    """Remove the clones' shared layer images (of ``only``, default all) that nothing needs: not
    the layer of a checkpoint still kept, not the image a checkpoint of a clone was taken from,
    and not used by a container (the engine refuses that removal)."""
    # Tags first, then checkpoints: an image made meanwhile belongs to a checkpoint listed below.
    tags = [t for t in engine.image_tags(LAYER_IMAGE_REPOSITORY) if only is None or t in only]
    if not tags:
        return
    kept = find_all(engine, None)
    needed = {cp.layer_image for cp in kept}
    recorded = {cp.image_id for cp in kept}
    for tag in tags:
        if tag in needed:
            continue
        with contextlib.suppress(DollyError):
            if engine.image_id(tag) in recorded:
                continue
            engine.remove_image(tag)
            if not engine.has_image(tag):
                forget_layer_image(engine, tag)


def require(checkpoint: Any) -> Path:
    """The folder of a checkpoint that still exists.

    Raises:
        InvalidArgument: ``checkpoint`` is not a :class:`Checkpoint`.
        CheckpointNotFound: its files are gone.
    """
    if not isinstance(checkpoint, Checkpoint):
        raise InvalidArgument(f"expected a dolly.Checkpoint, got {type(checkpoint).__name__}")
    if not (checkpoint.path / METADATA).exists() or not checkpoint.images_dir.is_dir():
        raise CheckpointNotFound(
            f"checkpoint {checkpoint.name!r} of {checkpoint.container_name} no longer exists "
            f"({checkpoint.path})"
        )
    return checkpoint.path


def _source_folder(engine: Engine, container: ContainerRef) -> Path:
    try:
        return engine.store_dir / id_of(engine.container(container))
    except ContainerNotFound:
        if isinstance(container, Container) and container.id is not None:
            return engine.store_dir / container.id
    # The source is gone: find its folder by full ID, else by a unique ID prefix or recorded name.
    # Two removed containers may have had one name: then the reference is ambiguous, never
    # silently the first one found.
    ref = str(container)
    if not names.CHECKPOINT_NAME.match(ref) or not engine.store_dir.is_dir():
        raise ContainerNotFound(f"no such container: {ref}")
    folders = sorted(f for f in engine.store_dir.iterdir() if names.CONTAINER_ID.match(f.name))
    exact = [f for f in folders if f.name == ref]
    found = exact or [f for f in folders if len(ref) >= 12 and f.name.startswith(ref)]
    if not found:
        found = [f for f in folders if ref in _recorded_names(f)]
    if len(found) > 1:
        raise InvalidArgument(
            f"{ref!r} names {len(found)} removed containers that have checkpoints "
            f"({', '.join(f.name[:12] for f in found)}): use the container's full ID"
        )
    if not found:
        raise ContainerNotFound(f"no such container: {ref}")
    return found[0]


def _recorded_names(folder: Path) -> set:
    """The names a removed container had, as its checkpoints recorded them."""
    recorded = set()
    for meta in folder.glob(f"*/{METADATA}"):
        try:
            recorded.add(json.loads(meta.read_text()).get("container_name"))
        except (OSError, ValueError):
            continue
    return recorded


def _ref_text(container: ContainerRef) -> str:
    return str(container.name) if isinstance(container, Container) else str(container)



def seal(cp: Checkpoint, folder: Path) -> None:
    """Write ``cp``'s metadata into its new checkpoint folder (never through a symlink, never
    over a file) and make everything in it root-only: the last step before it goes into the
    store."""
    fd = os.open(folder / METADATA, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cp._metadata(), f)
    for p in folder.rglob("*"):
        os.chmod(p, 0o700 if p.is_dir() else 0o600)


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for p in (path, path.parent, path.parent.parent):
        os.chmod(p, 0o700)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
