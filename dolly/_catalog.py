"""Checkpoints as the caller sees them, on any engine: take one, list, get, remove and prune them.
Each call composes the engine's API and its host (:func:`dolly._hosts.host_of`), whose files hold
the store (dolly._store).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import docker

from . import _names as names
from ._checkpoint import Checkpoint, User
from ._dump import DEFAULT_MAX_LAYER_BYTES, MAX_LAYER_LIMIT
from ._engine import ContainerRef, Engine
from ._hosts import host_of
from ._start import restored_from
from .errors import CheckpointNotFound, InvalidArgument

__all__ = ["PruneReport", "checkpoint", "list_checkpoints", "get_checkpoint", "remove_checkpoint", "prune"]


def checkpoint(
    container: ContainerRef,
    name: Optional[str] = None,
    *,
    leave_running: bool = True,
    max_layer_bytes: int = DEFAULT_MAX_LAYER_BYTES,
    tcp_established: bool = False,
    client: Optional[docker.DockerClient] = None,
) -> Checkpoint:
    """Checkpoint a running container: its processes' memory (CRIU) and its writable layer.

    The writable layer is archived (sparse files stay sparse) while the container is frozen, just
    before CRIU dumps it: by Dolly's runtime, or, for a container under another runtime (runc),
    by Dolly around the engine's own checkpoint, with the container paused from before the archive
    to after the dump (slower: the images go through containerd; README, "Runtimes"). A layer
    over ``max_layer_bytes``, or one the destination's filesystem has no room for, is refused
    before anything is dumped: the container is left as it was, running, whatever
    ``leave_running`` says. Checkpoints of one container are taken one at a
    time.

    Args:
        container: a docker-py ``Container``, a name or an ID.
        name: the checkpoint's name (letters, digits, ``_.-``); default ``cp-<UTC time>``.
        leave_running: keep the container running after the dump (default); ``False`` stops it.
        max_layer_bytes: refuse a writable layer holding more than this (allocated bytes);
            default :data:`DEFAULT_MAX_LAYER_BYTES` (8 GiB).
        tcp_established: take a container that holds established TCP connections (a server
            with keep-alive clients, a connection pool): the dump carries them (CRIU's
            ``--tcp-established``) and, with ``leave_running``, the container keeps serving them
            after it. Clones and restores of the checkpoint start with them closed (CRIU's
            ``--tcp-close``: the process reads end-of-file on them), since a clone has an
            address of its own and the clients stay with the source. Without it, such a
            container is refused (``CheckpointFailed`` saying so). Needs Dolly's runtime.
            Recorded as the checkpoint's ``tcp_established``.
        client: the engine; default ``docker.from_env()``.

    Raises:
        InvalidArgument: ``name`` is not a valid checkpoint name, ``max_layer_bytes`` is not a
            positive int, or ``tcp_established`` not a bool.
        ContainerNotFound: no such container.
        ContainerNotRunning: the container is not running, or is paused (for longer than the
            few seconds Docker takes to notice the end of another checkpoint's pause).
        CheckpointExists: the container already has a checkpoint of that name.
        HostNotReady: the engine or CRIU cannot checkpoint (see :func:`dolly.check_host`), or
            pycriu is missing (with ``leave_running=False``: ``CheckpointFailed`` with ``kept``).
        CheckpointFailed: CRIU failed (the error carries CRIU's log), or the writable layer was
            refused (the message gives its size and the cap, or the free space), or the container
            holds established TCP connections and ``tcp_established`` is not set, or is set for a
            container under another runtime than Dolly's (the message says what to do). The container
            keeps running when ``leave_running`` is set, and after any failure before the dump.
            When the dump had stopped the container and a later step failed, its images are not
            deleted: ``kept`` is the checkpoint folder holding them (``"complete": false`` in its
            dolly.json), from which :func:`dolly.resume` starts the container again.
    """
    name = names.checkpoint_name(name) if name is not None else "cp-" + datetime.now(UTC).strftime(
        "%Y%m%dT%H%M%S.%fZ")
    if isinstance(max_layer_bytes, bool) or not isinstance(max_layer_bytes, int) or not (
        0 < max_layer_bytes <= MAX_LAYER_LIMIT
    ):
        raise InvalidArgument(f"max_layer_bytes must be a positive int (at most {MAX_LAYER_LIMIT}), "
                              f"not {max_layer_bytes!r}")
    if not isinstance(tcp_established, bool):
        raise InvalidArgument(f"tcp_established must be True or False, not {tcp_established!r}")
    return host_of(Engine.of(client)).checkpoint(container, name, leave_running=leave_running,
                                                 max_layer_bytes=max_layer_bytes, tcp_established=tcp_established,
                                                 made_by=User.current())


def list_checkpoints(
    container: Optional[ContainerRef] = None, client: Optional[docker.DockerClient] = None
) -> List[Checkpoint]:
    """The checkpoints of ``container`` (of every container when None), oldest first. The
    container may have been removed since: its checkpoints are still listed by its name or ID.

    Raises:
        ContainerNotFound: no such container, now or in the checkpoints Dolly keeps.
        InvalidArgument: ``container`` names more than one removed container.
    """
    return host_of(Engine.of(client)).list_checkpoints(container)


def get_checkpoint(
    container: ContainerRef, name: str, client: Optional[docker.DockerClient] = None
) -> Checkpoint:
    """The checkpoint ``name`` of ``container``. When the container named so now is another one
    (:func:`dolly.reset` replaced it, or it was removed and its name taken again) and holds no
    such checkpoint, the one a removed container of that name took (recorded by Dolly when it
    took it; never what a container's labels claim, which anyone who builds an image can set).

    Raises:
        InvalidArgument: ``name`` is not a valid checkpoint name, or ``container`` names more
            than one removed container (give its full ID).
        ContainerNotFound: no such container, now or in the checkpoints Dolly keeps.
        CheckpointNotFound: the container has no checkpoint of that name.
    """
    names.checkpoint_name(name)
    engine = Engine.of(client)
    host = host_of(engine)
    try:
        return host.get_checkpoint(container, name)
    except CheckpointNotFound:
        if not isinstance(container, str):
            raise
        taken = [cp for cp in host.list_checkpoints(None) if cp.origin is None and cp.name == name
                 and cp.container_name == container.lstrip("/") and not engine.has_container(cp.container_id)]
        if len(taken) > 1:
            raise InvalidArgument(
                f"{len(taken)} removed containers once named {container!r} have a checkpoint {name!r} "
                f"({', '.join(cp.container_id[:12] for cp in taken)}): give the removed container's ID") from None
        if not taken:
            raise
        return taken[0]


def remove_checkpoint(checkpoint: Checkpoint, client: Optional[docker.DockerClient] = None) -> None:
    """Delete a checkpoint's files. Containers restored from it are not affected.

    Raises:
        InvalidArgument: ``checkpoint`` is not a :class:`Checkpoint`, or its path is not a
            folder of Dolly's store.
        CheckpointNotFound: it was removed already.
    """
    require(checkpoint)
    host_of(engine_of(checkpoint, client)).remove_checkpoint(checkpoint)


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune` removed (or, with ``dry_run``, would remove).

    Attributes:
        checkpoints: the checkpoints, oldest first.
        reclaimed: the bytes they held.
        dry_run: nothing was removed.
        others: how many checkpoints that would have gone were kept because another user took
            them (or a Dolly that recorded no one); ``all_users`` takes them too.
    """

    checkpoints: Tuple[Checkpoint, ...]
    reclaimed: int
    dry_run: bool = False
    others: int = 0


def prune(
    *,
    all_containers: bool = False,
    older_than: Optional[timedelta] = None,
    labels: Optional[Mapping[str, str]] = None,
    dry_run: bool = False,
    all_users: bool = False,
    client: Optional[docker.DockerClient] = None,
) -> PruneReport:
    """Remove the checkpoints nobody needs any more, as ``docker image prune`` removes images.

    By default: the checkpoints taken on this engine of containers that no longer exist, and
    from which no existing container was restored (a clone, or a container :func:`dolly.reset`
    put back at it). Imported checkpoints (which never had a container here) and those in use
    are kept unless ``all_containers`` is set. ``older_than`` and ``labels`` narrow either
    choice. Containers restored from a removed checkpoint are not affected.

    Only the caller's own: a checkpoint records who took it (:attr:`Checkpoint.made_by`: the
    uid and login name of the process that called :func:`dolly.checkpoint`, for root under sudo
    the user who ran sudo), and one that records another user, or none (taken by an older Dolly),
    is kept unless ``all_users`` is set; the report counts them (``others``). Imported
    checkpoints record no user: ``all_containers`` takes them whoever imported them.

    Args:
        all_containers: every checkpoint, not only those of removed containers.
        older_than: only checkpoints taken more than this long ago.
        labels: only checkpoints whose source container carried all these labels (as
            ``docker ... prune --filter label=KEY=VALUE``).
        dry_run: remove nothing; report what would go.
        all_users: other users' checkpoints too (on an engine only you use, the same as without).
        client: the engine; default ``docker.from_env()``.

    Raises:
        InvalidArgument: ``older_than`` is not a non-negative ``timedelta``, or ``labels`` not a
            mapping of strings.
    """
    if labels is not None and not (isinstance(labels, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items())):
        raise InvalidArgument(f"labels must map strings to strings, not {labels!r}")
    if older_than is not None and (not isinstance(older_than, timedelta) or older_than < timedelta(0)):
        raise InvalidArgument(f"older_than must be a non-negative timedelta, not {older_than!r}")
    engine = Engine.of(client)
    cutoff = None if older_than is None else datetime.now(UTC) - older_than
    exists: Dict[str, bool] = {}
    chosen = []
    me, others = User.current(), 0
    for cp in host_of(engine).list_checkpoints(None):
        if cutoff is not None and cp.created_at > cutoff:
            continue
        source_labels = (cp.config.get("Config") or {}).get("Labels") or {}
        if labels and any(source_labels.get(k) != v for k, v in labels.items()):
            continue
        if not all_containers:
            if cp.origin is not None:
                continue
            if cp.container_id not in exists:
                exists[cp.container_id] = engine.has_container(cp.container_id)
            if exists[cp.container_id] or engine.has_labelled(restored_from(cp)):
                continue
        if not all_users and cp.origin is None and cp.made_by != me:
            others += 1
            continue
        chosen.append(cp)
    if dry_run:
        return PruneReport(tuple(chosen), sum(cp.size for cp in chosen), dry_run=True, others=others)
    return dataclasses.replace(remove_pruned(engine, chosen), others=others)


def remove_pruned(engine: Engine, checkpoints: Sequence[Checkpoint]) -> PruneReport:
    """Remove these checkpoints (what :func:`prune` chose, or a dry run of it reported), then the
    clones' shared layer images nothing needs any more.
    A checkpoint removed meanwhile by another caller is left out of the report."""
    host = host_of(engine)
    reclaimed = 0
    removed = []
    for cp in checkpoints:
        try:
            host.remove_checkpoint(cp)
        except CheckpointNotFound:  # removed meanwhile by another caller
            continue
        reclaimed += cp.size
        removed.append(cp)
    host.remove_unused_layer_images()
    return PruneReport(tuple(removed), reclaimed)


def engine_of(checkpoint: Checkpoint, client: Optional[docker.DockerClient]) -> Engine:
    """The engine that holds ``checkpoint``: ``client``'s, which must then be that one.

    Raises:
        InvalidArgument: ``client`` is another engine than the one the checkpoint is on.
    """
    if client is None:
        return Engine.of(checkpoint.client)
    engine = Engine.of(client)
    if checkpoint.client is not None and checkpoint.client is not client \
            and Engine.of(checkpoint.client).identity != engine.identity:
        raise InvalidArgument(
            f"checkpoint {checkpoint.name!r} is on another engine than the client given: pass its own "
            "(checkpoint.client), or copy it there (dolly.clone(..., engines=[client]))")
    return engine


def require(checkpoint: Any) -> Checkpoint:
    """``checkpoint``, when it is one.

    Raises:
        InvalidArgument: ``checkpoint`` is not a :class:`Checkpoint`.
    """
    if not isinstance(checkpoint, Checkpoint):
        hint = (f": a checkpoint kept by name is dolly.get_checkpoint({checkpoint!r}, NAME), and "
                "dolly.list_checkpoints(CONTAINER) lists them" if isinstance(checkpoint, str) else "")
        raise InvalidArgument(f"expected a dolly.Checkpoint, got {type(checkpoint).__name__}{hint}")
    return checkpoint
