"""Checkpoints: taking them, finding them, removing them.

Docker writes a checkpoint into the source container's own folder and deletes it with the
container. Dolly takes each one over at once (a rename, on the same filesystem) into its own store
beside Docker's folders, so that a checkpoint outlives its source and can be cloned after the
source is gone:

    <DockerRootDir>/dolly/checkpoints/<container-id>/<name>/
        criu/              CRIU's images, as Docker wrote them
        rootfs-diff.tar    the container's writable layer, taken while it was frozen (an overlay
                           upper directory: deletions are whiteouts)
        dolly.json         the source's recorded configuration and this checkpoint's metadata
        spec.dump          the container's OCI runtime spec, stats-dump CRIU's dump statistics

Everything in the store is readable by root only: the images hold the process's memory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import types
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, List, Mapping, Optional

import docker
from docker.models.containers import Container

from . import criu
from .engine import RUNTIME, ContainerRef, Engine
from .errors import (
    CheckpointExists,
    CheckpointFailed,
    CheckpointNotFound,
    ContainerNotFound,
    ContainerNotRunning,
    HostNotReady,
    InvalidArgument,
)

__all__ = ["Checkpoint", "checkpoint", "list_checkpoints", "get_checkpoint", "remove_checkpoint"]

# Docker's own rule for checkpoint names; it also keeps names out of paths ("..", "/").
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
METADATA = "dolly.json"
ROOTFS_DIFF = "rootfs-diff.tar"
# What scripts/dolly-runc writes into the image folder at checkpoint time, and where it goes.
RUNTIME_ROOTFS_DIFF = "dolly-rootfs-diff.tar"
RUNTIME_EXTRAS = {"dolly-spec.dump": "spec.dump", "dolly-stats-dump": "stats-dump"}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint of a container: an immutable value.

    Attributes:
        container_id: the source container's full ID.
        container_name: its name at checkpoint time.
        name: the checkpoint's name, unique per source container.
        created_at: when it was taken (UTC).
        hostname: the source's kernel hostname, as CRIU recorded it.
        config: the source's ``docker inspect`` at checkpoint time; clones are created from it.
        path: the checkpoint's folder on the engine's host.
    """

    container_id: str
    container_name: str
    name: str
    created_at: datetime
    hostname: str
    config: Mapping[str, Any] = field(repr=False, compare=False, hash=False)
    path: Path = field(compare=False)

    @property
    def images_dir(self) -> Path:
        """CRIU's images."""
        return self.path / "criu"

    @property
    def rootfs_diff(self) -> Path:
        """The source's writable layer at the instant of the checkpoint (a tar)."""
        return self.path / ROOTFS_DIFF

    @property
    def size(self) -> int:
        """Bytes on disk (images and writable layer)."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    @property
    def image_id(self) -> str:
        """The ID of the image the source was created from."""
        return str(self.config["Image"])

    @classmethod
    def load(cls, path: Path) -> "Checkpoint":
        """The checkpoint stored at ``path``.

        Raises:
            CheckpointNotFound: ``path`` holds no complete checkpoint.
        """
        try:
            meta = json.loads((Path(path) / METADATA).read_text())
            return cls(
                container_id=meta["container_id"],
                container_name=meta["container_name"],
                name=meta["name"],
                created_at=datetime.fromisoformat(meta["created_at"]),
                hostname=meta["hostname"],
                config=types.MappingProxyType(meta["config"]),
                path=Path(path),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointNotFound(f"no usable checkpoint at {path}: {e}") from e

    def _metadata(self) -> dict:
        return {
            "format": 1,
            "container_id": self.container_id,
            "container_name": self.container_name,
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "hostname": self.hostname,
            "config": dict(self.config),
        }


def checkpoint(
    container: ContainerRef,
    name: Optional[str] = None,
    *,
    leave_running: bool = True,
    client: Optional[docker.DockerClient] = None,
) -> Checkpoint:
    """Checkpoint a running container: its processes' memory (CRIU) and its writable layer.

    Args:
        container: a docker-py ``Container``, a name or an ID.
        name: the checkpoint's name (letters, digits, ``_.-``); default ``cp-<UTC time>``.
        leave_running: keep the container running after the dump (default); ``False`` stops it.
        client: the engine; default ``docker.from_env()``.

    Raises:
        InvalidArgument: ``name`` is not a valid checkpoint name.
        ContainerNotFound: no such container.
        ContainerNotRunning: the container is not running (or is paused).
        CheckpointExists: the container already has a checkpoint of that name.
        HostNotReady: the engine or CRIU cannot checkpoint (see :func:`dolly.check_host`).
        CheckpointFailed: CRIU failed; the error carries CRIU's log. The container keeps running
            when ``leave_running`` is set.
    """
    name = _check_name(name) if name is not None else _default_name()
    engine = Engine.of(client)
    criu.require_version()
    engine.require_checkpoint_support()
    source = engine.container(container)
    state = source.attrs["State"]
    if not state.get("Running") or state.get("Paused"):
        raise ContainerNotRunning(f"container {source.name} is {source.status}, not running")
    if source.attrs["HostConfig"].get("Runtime") != RUNTIME:
        raise HostNotReady(
            f"container {source.name} runs with the runtime "
            f"{source.attrs['HostConfig'].get('Runtime')!r}; Dolly needs the '{RUNTIME}' runtime "
            f"(`make host` makes it the engine's default; or create it with runtime='{RUNTIME}') "
            "to take its files at the instant of the checkpoint"
        )

    folder = engine.store_dir / source.id
    final = folder / name
    if final.exists():
        raise CheckpointExists(f"container {source.name} already has a checkpoint named {name!r}")
    _make_private_dir(folder)

    # Docker refuses a custom checkpoint folder: it writes into the container's own, under a name
    # of ours. Dolly's runtime has CRIU dump into the spool folder made here instead, so that the
    # images skip Docker's copy through containerd; Docker's folder then holds nothing we need.
    docker_name = f"dolly-{uuid.uuid4().hex[:16]}"
    staging = folder / f".{docker_name}"
    spool = engine.spool_dir / f"{source.id}.checkpoint"
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(mode=0o700, parents=True)
    reap_spool(engine)
    created_at = datetime.now(timezone.utc)
    images = engine.checkpoints_dir(source.id) / docker_name
    try:
        engine.create_checkpoint(source.id, docker_name, exit=not leave_running)
        staging.mkdir(mode=0o700)
        os.rename(spool if any(spool.iterdir()) else images, staging / "criu")
        diff = staging / "criu" / RUNTIME_ROOTFS_DIFF
        if not diff.exists():
            raise CheckpointFailed(
                f"the '{RUNTIME}' runtime left no {RUNTIME_ROOTFS_DIFF} in the checkpoint of "
                f"{source.name}: is /usr/local/sbin/dolly-runc current? (run `make host`)"
            )
        os.rename(diff, staging / ROOTFS_DIFF)
        for made, kept in RUNTIME_EXTRAS.items():
            if (staging / "criu" / made).exists():
                os.rename(staging / "criu" / made, staging / kept)
        cp = Checkpoint(
            container_id=source.id,
            container_name=source.name,
            name=name,
            created_at=created_at,
            hostname=criu.read_hostname(staging / "criu"),
            config=types.MappingProxyType(source.attrs),
            path=final,
        )
        _write_private(staging / METADATA, json.dumps(cp._metadata()))
        try:
            os.rename(staging, final)
        except OSError as e:  # another caller took the same name meanwhile
            raise CheckpointExists(f"container {source.name} already has a checkpoint named {name!r}") from e
        return cp
    finally:
        for leftover in (images, staging, spool):
            shutil.rmtree(leftover, ignore_errors=True)


def reap_spool(engine: Engine, *, older_than: float = 3600.0) -> None:
    """Remove spool folders left by an operation that died with its process (a host crash, a
    SIGKILL): every one of them lives for seconds."""
    now = time.time()
    for entry in engine.spool_dir.iterdir() if engine.spool_dir.is_dir() else []:
        try:
            if now - entry.stat().st_mtime > older_than:
                shutil.rmtree(entry, ignore_errors=True)
        except FileNotFoundError:
            pass


def list_checkpoints(
    container: Optional[ContainerRef] = None, client: Optional[docker.DockerClient] = None
) -> List[Checkpoint]:
    """The checkpoints of ``container`` (of every container when None), oldest first. The
    container may have been removed since: its checkpoints are still listed by its name or ID.

    Raises:
        ContainerNotFound: no such container, now or in the checkpoints Dolly keeps.
    """
    engine = Engine.of(client)
    if container is None:
        folders = sorted(engine.store_dir.iterdir()) if engine.store_dir.is_dir() else []
    else:
        folders = [_source_folder(engine, container)]
    found = []
    for folder in folders:
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name.startswith(".") or not (path / METADATA).exists():
                continue
            found.append(Checkpoint.load(path))
    return sorted(found, key=lambda cp: cp.created_at)


def get_checkpoint(
    container: ContainerRef, name: str, client: Optional[docker.DockerClient] = None
) -> Checkpoint:
    """The checkpoint ``name`` of ``container``.

    Raises:
        InvalidArgument: ``name`` is not a valid checkpoint name.
        ContainerNotFound: no such container, now or in the checkpoints Dolly keeps.
        CheckpointNotFound: the container has no checkpoint of that name.
    """
    _check_name(name)
    engine = Engine.of(client)
    path = _source_folder(engine, container) / name
    if not (path / METADATA).exists():
        raise CheckpointNotFound(f"no checkpoint named {name!r} for container {_ref_text(container)}")
    return Checkpoint.load(path)


def remove_checkpoint(checkpoint: Checkpoint, client: Optional[docker.DockerClient] = None) -> None:
    """Delete a checkpoint's files. Containers restored from it are not affected.

    Raises:
        InvalidArgument: ``checkpoint`` is not a :class:`Checkpoint`.
        CheckpointNotFound: it was removed already.
    """
    path = require(checkpoint)
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
        return engine.store_dir / engine.container(container).id
    except ContainerNotFound:
        if isinstance(container, Container):
            return engine.store_dir / container.id
    # The source is gone: find its folder by full ID, ID prefix or recorded name.
    ref = str(container)
    if _NAME_RE.match(ref):
        for folder in sorted(engine.store_dir.glob("*")) if engine.store_dir.is_dir() else []:
            if folder.name == ref or (len(ref) >= 12 and folder.name.startswith(ref)):
                return folder
            for meta in folder.glob(f"*/{METADATA}"):
                if json.loads(meta.read_text()).get("container_name") == ref:
                    return folder
    raise ContainerNotFound(f"no such container: {ref}")


def _ref_text(container: ContainerRef) -> str:
    return container.name if isinstance(container, Container) else str(container)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgument(
            f"not a valid checkpoint name: {name!r} (letters, digits and _.-, "
            "starting with a letter or digit, at most 128)"
        )
    return name


def _default_name() -> str:
    return "cp-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for p in (path, path.parent, path.parent.parent):
        os.chmod(p, 0o700)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
