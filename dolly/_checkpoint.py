"""The checkpoint value: :class:`Checkpoint`, an immutable record of one checkpoint in Dolly's store,
and the names of the files a checkpoint folder holds.

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

Everything in the store is readable by root only: the images hold the process's memory. Taking
checkpoints is dolly._dump's (and dolly._lazy_dump's); finding, removing and pruning them is
dolly._store's.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import types
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional

import docker

from . import _names as names
from .errors import CheckpointNotFound

__all__ = ["Checkpoint", "User"]

METADATA = "dolly.json"
LAYER_IMAGE_REPOSITORY = "dolly/checkpoint-layer"
ROOTFS_DIFF = "rootfs-diff.tar"
# What scripts/dolly-runc writes into the image folder at checkpoint time, and where it goes.
RUNTIME_ROOTFS_DIFF = "dolly-rootfs-diff.tar"
RUNTIME_EXTRAS = {"dolly-spec.dump": "spec.dump", "dolly-stats-dump": "stats-dump"}


@dataclass(frozen=True)
class User:
    """Who asked Dolly for a checkpoint: the calling process's uid and login name (for root under
    sudo, the user who ran sudo). It tells the users of one engine apart, so that ``dolly.prune``
    removes only a user's own checkpoints; it is their word, not a permission: whoever reaches the
    engine's socket is root on its host."""

    uid: int
    name: str

    @classmethod
    def current(cls) -> User:
        uid = os.getuid()
        name = os.environ.get("SUDO_USER") if uid == 0 else None
        try:
            name = name or getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
            name = name or str(uid)
        return cls(uid, name)

    @classmethod
    def from_json(cls, data: Any) -> Optional[User]:
        """The user ``data`` names; None for anything else (a checkpoint that recorded none)."""
        if isinstance(data, Mapping) and type(data.get("uid")) is int and isinstance(data.get("name"), str):
            return cls(data["uid"], data["name"][:256])
        return None

    def to_json(self) -> dict:
        return {"uid": self.uid, "name": self.name}


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
        client: the engine that holds it (a docker-py client), so that later calls need no
            ``client=``; None for a value made by hand.
        size: bytes on disk (images and writable layer), measured on the engine's host when
            the checkpoint was read there (0 for a value made by hand). The value does no I/O:
            :meth:`load` reads a folder once, and nothing after that touches the disk.
        origin: None for a checkpoint taken on this engine; for one imported from a bundle, where
            it came from (``bundle_id``, ``signer``: the verified key's id or None, ``source``)
            and the restore policy items its importer allowed (``allowed``, see
            :mod:`dolly.policy`).
        tcp_established: the dump carries the container's established TCP connections
            (``dolly.checkpoint(..., tcp_established=True)``). Dolly starts every clone and
            restore of it with those connections closed: the clone has an address of its own.
        made_by: the :class:`User` who took it (None for a checkpoint of an older Dolly, or
            imported): ``dolly.prune`` removes only its caller's own.

    Raises:
        InvalidArgument: ``container_id`` or ``name`` breaks Dolly's rules (they become paths).
    """

    container_id: str
    container_name: str
    name: str
    created_at: datetime
    hostname: str
    config: Mapping[str, Any] = field(repr=False, compare=False, hash=False)
    path: Path = field(compare=False)
    origin: Optional[Mapping[str, Any]] = field(default=None, repr=False, compare=False, hash=False)
    client: Optional[docker.DockerClient] = field(default=None, repr=False, compare=False, hash=False)
    size: int = field(default=0, compare=False, hash=False)
    tcp_established: bool = field(default=False, compare=False, hash=False)
    made_by: Optional[User] = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Both become path parts (the store, the clone's checkpoints folder): checked here, so no
        # Checkpoint, however it was made, can point a removal or a write elsewhere.
        names.container_id(self.container_id)
        names.checkpoint_name(self.name)

    @property
    def images_dir(self) -> Path:
        """CRIU's images."""
        return self.path / "criu"

    @property
    def rootfs_diff(self) -> Path:
        """The source's writable layer at the instant of the checkpoint (a tar)."""
        return self.path / ROOTFS_DIFF

    @property
    def layer_image(self) -> str:
        """The name of the image that clones of a large writable layer share (the source's image
        with the layer on top), made by the first clone and removed with the checkpoint."""
        key = f"{self.container_id}/{self.name}/{self.created_at.isoformat()}"
        return f"{LAYER_IMAGE_REPOSITORY}:{hashlib.sha256(key.encode()).hexdigest()[:40]}"

    @property
    def image_id(self) -> str:
        """The ID of the image the source was created from."""
        return str(self.config["Image"])

    @classmethod
    def load(cls, path: Path, client: Optional[docker.DockerClient] = None) -> Checkpoint:
        """The checkpoint stored at ``path``, on the engine of ``client``.

        Raises:
            CheckpointNotFound: ``path`` holds no complete checkpoint.
        """
        try:
            meta = json.loads((Path(path) / METADATA).read_text())
            meta["size"] = folder_size(Path(path))
            return cls.from_metadata(meta, Path(path), client)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointNotFound(f"no usable checkpoint at {path}: {e}") from e

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], path: Path, client: Optional[docker.DockerClient]) -> Checkpoint:
        """The checkpoint its ``dolly.json`` describes, at ``path`` on the engine of ``client``.

        Raises:
            KeyError, ValueError, TypeError: metadata that is not a checkpoint's.
        """
        return cls(
            container_id=meta["container_id"],
            container_name=meta["container_name"],
            name=meta["name"],
            created_at=datetime.fromisoformat(meta["created_at"]),
            hostname=meta["hostname"],
            config=types.MappingProxyType(meta["config"]),
            path=path,
            origin=meta.get("origin"),
            client=client,
            size=meta["size"] if type(meta.get("size")) is int else 0,
            tcp_established=meta.get("tcp_established") is True,
            made_by=User.from_json(meta.get("made_by")),
        )

    def _metadata(self) -> dict:
        meta = {
            "format": 1,
            "container_id": self.container_id,
            "container_name": self.container_name,
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "hostname": self.hostname,
            "config": dict(self.config),
        }
        if self.origin is not None:
            meta["origin"] = dict(self.origin)
        if self.tcp_established:  # absent otherwise: the metadata of other checkpoints is unchanged
            meta["tcp_established"] = True
        if self.made_by is not None:
            meta["made_by"] = self.made_by.to_json()
        return meta


def folder_size(folder: Path) -> int:
    """Bytes on disk of a checkpoint's folder (images and writable layer), as its ``size`` says.

    Raises:
        OSError: the folder cannot be read.
    """
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
