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

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import types
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import docker
from docker.models.containers import Container
from filelock import FileLock

from . import _criu as criu, _names as names, _retry as retry, _rootfs as rootfs
from ._engine import RUNTIME, ContainerRef, Engine, id_of, name_of
from .errors import (
    CheckpointExists,
    CheckpointFailed,
    CheckpointNotFound,
    ContainerNotFound,
    ContainerNotRunning,
    DollyError,
    HostNotReady,
    InvalidArgument,
)

log = logging.getLogger("dolly")

__all__ = ["Checkpoint", "PruneReport", "checkpoint", "list_checkpoints", "get_checkpoint", "remove_checkpoint",
           "prune", "DEFAULT_MAX_LAYER_BYTES"]

METADATA = "dolly.json"
LAYER_IMAGE_REPOSITORY = "dolly/checkpoint-layer"
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
        client: the engine that holds it (a docker-py client), so that later calls need no
            ``client=``; None for a value made by hand.
        origin: None for a checkpoint taken on this engine; for one imported from a bundle, where
            it came from (``bundle_id``, ``signer``: the verified key's id or None, ``source``)
            and the restore policy items its importer allowed (``allowed``, see
            :mod:`dolly.policy`).

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
    remote_size: Optional[int] = field(default=None, repr=False, compare=False, hash=False)

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
    def size(self) -> int:
        """Bytes on disk (images and writable layer). For a checkpoint on another host, as its
        engine's agent measured it: its path names a folder there, not here."""
        if self.client is not None and not Engine.of(self.client).files_are_local():
            return int(self.remote_size or 0)
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

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
            return cls.from_metadata(json.loads((Path(path) / METADATA).read_text()), Path(path), client)
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
            remote_size=meta.get("size") if isinstance(meta.get("size"), int) else None,
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
        return meta


# The cap on a checkpoint's writable layer (its allocated bytes: sparse files count what they
# hold) unless the caller passes another; scripts/dolly-runc has the same default for a plain
# `docker checkpoint create`.
DEFAULT_MAX_LAYER_BYTES = 8 << 30
# What Dolly asks of its runtime for one checkpoint: a file in the spool folder, which the runtime
# reads and removes before it dumps (scripts/dolly-runc).
RUNTIME_REQUEST = "dolly-request"
# The runtime's shell compares in 64-bit arithmetic.
_MAX_LAYER_LIMIT = 10**18 - 1


def checkpoint(
    container: ContainerRef,
    name: Optional[str] = None,
    *,
    leave_running: bool = True,
    max_layer_bytes: int = DEFAULT_MAX_LAYER_BYTES,
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
        client: the engine; default ``docker.from_env()``.

    Raises:
        InvalidArgument: ``name`` is not a valid checkpoint name, or ``max_layer_bytes`` is not a
            positive int.
        ContainerNotFound: no such container.
        ContainerNotRunning: the container is not running, or is paused (for longer than the
            few seconds Docker takes to notice the end of another checkpoint's pause).
        CheckpointExists: the container already has a checkpoint of that name.
        HostNotReady: the engine or CRIU cannot checkpoint (see :func:`dolly.check_host`), or
            pycriu is missing (with ``leave_running=False``: ``CheckpointFailed`` with ``kept``).
        CheckpointFailed: CRIU failed (the error carries CRIU's log), or the writable layer was
            refused (the message gives its size and the cap, or the free space). The container
            keeps running when ``leave_running`` is set, and after any failure before the dump.
            When the dump had stopped the container and a later step failed, its images are not
            deleted: ``kept`` is the checkpoint folder holding them (``"complete": false`` in its
            dolly.json), from which :func:`dolly.resume` starts the container again.
    """
    name = names.checkpoint_name(name) if name is not None else _default_name()
    if isinstance(max_layer_bytes, bool) or not isinstance(max_layer_bytes, int) or not (
        0 < max_layer_bytes <= _MAX_LAYER_LIMIT
    ):
        raise InvalidArgument(f"max_layer_bytes must be a positive int (at most {_MAX_LAYER_LIMIT}), "
                              f"not {max_layer_bytes!r}")
    engine = Engine.of(client)
    if not engine.files_are_local():  # another host's engine: its agent does the same there
        from . import _remote

        return _remote.checkpoint(engine, container, name, leave_running=leave_running,
                                  max_layer_bytes=max_layer_bytes)
    criu.require_version()
    engine.require_checkpoint_support()
    source = engine.container(container)
    if not source.attrs["State"].get("Running"):
        raise ContainerNotRunning(f"container {source.name} is {source.status}, not running")
    with _claimed(engine, source, name) as (source, final):
        return _checkpoint_locked(engine, source, name, final, leave_running, max_layer_bytes)


@contextlib.contextmanager
def _claimed(engine: Engine, source: Container, name: str) -> Iterator[Tuple[Container, Path]]:
    """The source, running, and the checkpoint's place in the store, with the container's
    checkpoint lock held: one checkpoint of a container at a time (one spool folder per
    container: the runtime knows the container, not the checkpoint, and two checkpoints at once
    would dump into, and delete, each other's). The container's store folder goes again when
    what runs under it fails, unless it holds checkpoints.

    Raises:
        CheckpointExists: the container has a checkpoint of that name.
        ContainerNotRunning: as :func:`_running`.
    """
    final = engine.store_dir / id_of(source) / name
    if final.exists():
        raise CheckpointExists(f"container {source.name} already has a checkpoint named {name!r}")
    # Root-only: the spool holds process memory on its way into the store.
    engine.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(engine.spool_dir, 0o700)
    reap_spool(engine)
    engine.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with FileLock(str(engine.lock_dir / f"{source.id}.checkpoint.lock")):
        _resume_if_left_paused(engine, id_of(source))
        # As it is now, after any checkpoint we waited for (which paused it meanwhile).
        source = _running(engine, id_of(source))
        if final.exists():
            raise CheckpointExists(f"container {source.name} already has a checkpoint named {name!r}")
        _make_private_dir(final.parent)
        try:
            yield source, final
        except BaseException:
            with contextlib.suppress(OSError):
                final.parent.rmdir()
            raise


class PendingDump:
    """A post-copy dump that goes on after :func:`checkpoint_lazy` returned: CRIU's page server
    serves the memory to the target, and the source's processes stay frozen until it ends. It
    ends well once the target took every page (the source container has then exited), or fails
    when the transfer is broken off (CRIU then lets the source run on, with its memory)."""

    def __init__(self, engine: Engine, container_id: str, thread: threading.Thread, outcome: List[BaseException],
                 leftovers: Sequence[Path], policy: Optional[Dict[str, Any]]) -> None:
        self.engine, self.container_id, self._thread, self._outcome = engine, container_id, thread, outcome
        self._leftovers, self._policy = leftovers, policy
        self.started_at = 0.0  # time.perf_counter() when the dump was asked for: the source freezes

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Wait for the end of the dump.

        Raises:
            TimeoutError: it goes on after ``timeout`` seconds.
            CheckpointFailed: the page server failed (the transfer was broken off).
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the post-copy dump is still serving pages")
        if self._outcome:
            raise self._outcome[0]

    def ended(self) -> None:
        """What the dump's thread does once the dump ended, however: Docker's own folder (made
        then) and the ready file go, and the source's restart policy comes back."""
        for leftover in self._leftovers:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        if self._policy is not None:  # the source's own restart policy, when it runs on
            policy, self._policy = self._policy, None
            with contextlib.suppress(DollyError):
                self.engine.set_restart_policy(self.container_id, policy)


def checkpoint_lazy(container: ContainerRef, name: str, *, port: int, client: Optional[docker.DockerClient] = None,
                    ready_timeout: float = 600.0) -> Tuple[Checkpoint, PendingDump]:
    """Checkpoint a running container for a post-copy migration: everything but its memory,
    which CRIU's page server keeps serving on 127.0.0.1:``port`` of the engine's host (see
    scripts/dolly-runc). Returns once the images are in the store and the page server listens;
    the dump goes on (:class:`PendingDump`). The checkpoint is only of use to the restore that
    takes its memory from that page server; CRIU refuses to restore it otherwise.

    Raises:
        as :func:`checkpoint` (``leave_running`` False); HostNotReady when the container is not
        under Dolly's runtime (only it can dump lazily).
    """
    engine = Engine.of(client)
    criu.require_version()
    engine.require_checkpoint_support()
    source = engine.container(container)
    if not source.attrs["State"].get("Running") or source.attrs["State"].get("Paused"):
        raise ContainerNotRunning(f"container {source.name} is {source.status}, not running")
    if source.attrs["HostConfig"].get("Runtime") != RUNTIME:
        raise HostNotReady(f"container {source.name} runs under {source.attrs['HostConfig'].get('Runtime')!r}: "
                           f"only the {RUNTIME!r} runtime can dump its memory lazily (post-copy)")
    with _claimed(engine, source, name) as (source, final):
        return _checkpoint_lazy_locked(engine, source, name, final, port, ready_timeout)


def _checkpoint_lazy_locked(engine: Engine, source: Container, name: str, final: Path, port: int,
                            ready_timeout: float) -> Tuple[Checkpoint, PendingDump]:
    docker_name = f"dolly-{uuid.uuid4().hex[:16]}"
    staging = final.parent / f".{docker_name}"
    spool = engine.spool_dir / f"{source.id}.checkpoint"
    ready = engine.spool_dir / f"{source.id}.lazy-ready"
    for old in (spool, ready):
        if old.is_symlink() or old.is_file():
            old.unlink()
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(mode=0o700, exist_ok=True)
    _write_private(spool / RUNTIME_REQUEST, f"max_layer_bytes={DEFAULT_MAX_LAYER_BYTES}\nlazy_pages_port={port}\n")
    created_at = datetime.now(UTC)
    outcome: List[BaseException] = []
    # As for any dump that stops its container: no restart from scratch when the dump ends.
    policy = source.attrs["HostConfig"].get("RestartPolicy") or {}
    kept_policy = policy if policy.get("Name") not in (None, "", "no") else None
    if kept_policy is not None:
        engine.set_restart_policy(id_of(source), {"Name": "no", "MaximumRetryCount": 0})

    def dump() -> None:
        try:
            engine.create_checkpoint(id_of(source), docker_name, exit=True, unbounded=True)
        except BaseException as e:  # handed to whoever waits for the dump
            outcome.append(e)
        finally:
            pending.ended()

    thread = threading.Thread(target=dump, name="dolly-lazy-dump", daemon=True)
    pending = PendingDump(engine, id_of(source), thread, outcome,
                          [engine.checkpoints_dir(id_of(source)) / docker_name, ready], kept_policy)
    listening = False
    try:
        pending.started_at = time.perf_counter()
        thread.start()
        deadline = time.monotonic() + ready_timeout
        while not (ready.is_file() and ready.stat().st_size > 0):
            if not thread.is_alive():
                pending.wait()  # raises the dump's error
                raise CheckpointFailed(f"the dump of {source.name} ended without serving its memory")
            if time.monotonic() > deadline:
                raise CheckpointFailed(f"the dump of {source.name} did not start its page server in "
                                       f"{ready_timeout:.0f} s")
            time.sleep(0.002)
        listening = True
        staging.mkdir(mode=0o700)
        os.rename(spool, staging / "criu")
        if not (staging / "criu" / RUNTIME_ROOTFS_DIFF).exists():
            raise CheckpointFailed(f"the '{RUNTIME}' runtime left no {RUNTIME_ROOTFS_DIFF} in the checkpoint of "
                                   f"{source.name}: is /usr/local/sbin/dolly-runc current? (run `make host`)")
        _settle_images(staging)
        cp = Checkpoint(container_id=id_of(source), container_name=name_of(source), name=name,
                        created_at=created_at, hostname=criu.read_hostname(staging / "criu"),
                        config=types.MappingProxyType(source.attrs), path=final, client=engine.client)
        _write_private(staging / METADATA, json.dumps(cp._metadata()))
        os.rename(staging, final)
        return cp, pending
    except BaseException:
        # The source waits, frozen, once the page server listens (or will, when the dump goes
        # on): break the transfer off as soon as it does, and the source runs on.
        deadline = time.monotonic() + 120
        while thread.is_alive() and not listening and time.monotonic() < deadline:
            listening = ready.is_file() and ready.stat().st_size > 0
            time.sleep(0.01)
        if listening:
            criu.break_off_page_server(criu.lazy_netns_record(engine.spool_dir, id_of(source)), port)
        with contextlib.suppress(Exception):
            pending.wait(timeout=60)
        shutil.rmtree(staging, ignore_errors=True)
        if not thread.is_alive():  # never under a dump still writing into it
            shutil.rmtree(spool, ignore_errors=True)
        raise


def _running(engine: Engine, container_id: str, *, settle: float = 5.0) -> Container:
    """The container, running and not paused.

    A checkpoint pauses its container (containerd) and Docker learns of the resume from an event:
    just after another checkpoint, Docker may still say paused. That clears within ``settle``
    seconds; a pause that lasts is the user's.

    Raises:
        ContainerNotFound: no such container.
        ContainerNotRunning: it is not running, or is paused.
    """
    deadline = time.monotonic() + settle
    while True:
        source = engine.container(container_id)
        state = source.attrs["State"]
        if not state.get("Running") or (state.get("Paused") and time.monotonic() > deadline):
            raise ContainerNotRunning(f"container {source.name} is {source.status}, not running")
        if not state.get("Paused"):
            return source
        time.sleep(0.05)


def _checkpoint_locked(
    engine: Engine, source: Container, name: str, final: Path, leave_running: bool, max_layer_bytes: int
) -> Checkpoint:
    folder = final.parent
    # Docker refuses a custom checkpoint folder: it writes into the container's own, under a name
    # of ours. Dolly's runtime has CRIU dump into the spool folder made here instead, so that the
    # images skip Docker's copy through containerd; Docker's folder then holds nothing we need.
    # A container under another runtime (runc) takes the engine's own path: Dolly pauses it,
    # archives its writable layer, has Docker dump it while still paused, and then resumes it.
    docker_name = f"dolly-{uuid.uuid4().hex[:16]}"
    staging = folder / f".{docker_name}"
    spool = engine.spool_dir / f"{source.id}.checkpoint"
    own_runtime = source.attrs["HostConfig"].get("Runtime") == RUNTIME
    if spool.is_symlink():
        spool.unlink()
    shutil.rmtree(spool, ignore_errors=True)
    if own_runtime:
        spool.mkdir(mode=0o700, exist_ok=True)  # a mount point stays (a spool on a filesystem of its own)
    created_at = datetime.now(UTC)
    images = engine.checkpoints_dir(id_of(source)) / docker_name
    doomed = [images, staging, spool]
    paused = False
    try:
        # A restart policy would have Docker start the container again, from scratch, as soon as
        # the dump stops it: "no" for the length of the dump, then the user's own again.
        policy = source.attrs["HostConfig"].get("RestartPolicy") or {}
        pause_policy = not leave_running and policy.get("Name") not in (None, "", "no")
        if pause_policy:
            engine.set_restart_policy(id_of(source), {"Name": "no", "MaximumRetryCount": 0})
        try:
            if not own_runtime:
                staging.mkdir(mode=0o700)
                # A marker beside the container's lock: if this process dies while the container is
                # paused, the next checkpoint of it (under the same lock) resumes it.
                _write_private(_paused_marker(engine, id_of(source)), f"{os.getpid()}\n")
                engine.pause(id_of(source))
                paused = True
                _take_files_paused(engine, source, staging, max_layer_bytes)
            _dump(engine, source, docker_name, spool if own_runtime else None, leave_running, max_layer_bytes)
        except CheckpointFailed as e:
            refused = _refusal(e, source, engine)
            if refused is not None:
                raise refused from e
            raise
        finally:
            # The container first: a failure to restore its restart policy must not leave it paused.
            try:
                if paused:
                    _unpause(engine, source)
                elif not own_runtime:
                    _paused_marker(engine, id_of(source)).unlink(missing_ok=True)
            finally:
                if pause_policy:
                    engine.set_restart_policy(id_of(source), policy)
        staging.mkdir(mode=0o700, exist_ok=True)
        os.rename(spool if (spool / "inventory.img").exists() else images, staging / "criu")
        if own_runtime and not (staging / "criu" / RUNTIME_ROOTFS_DIFF).exists():
            raise CheckpointFailed(
                f"the '{RUNTIME}' runtime left no {RUNTIME_ROOTFS_DIFF} in the checkpoint of "
                f"{source.name}: is /usr/local/sbin/dolly-runc current? (run `make host`)"
            )
        _settle_images(staging)
        cp = Checkpoint(
            container_id=id_of(source),
            container_name=name_of(source),
            name=name,
            created_at=created_at,
            hostname=criu.read_hostname(staging / "criu"),
            config=types.MappingProxyType(source.attrs),
            path=final,
            client=engine.client,
        )
        _write_private(staging / METADATA, json.dumps(cp._metadata()))
        try:
            os.rename(staging, final)
        except OSError as e:  # another caller took the same name meanwhile
            raise CheckpointExists(f"container {source.name} already has a checkpoint named {name!r}") from e
        return cp
    except BaseException as e:
        if leave_running:
            raise
        kept = _keep_images(engine, source, name, created_at, staging, spool, images, doomed, e)
        if kept is None or not isinstance(e, Exception):
            raise
        raise CheckpointFailed(
            f"checkpoint {name!r} of container {source.name} failed after the dump: "
            f"{type(e).__name__}: {e}",
            kept=kept,
        ) from e
    finally:
        for leftover in doomed:
            shutil.rmtree(leftover, ignore_errors=True)


def _dump(engine: Engine, source: Container, docker_name: str, spool: Optional[Path], leave_running: bool,
          max_layer_bytes: int) -> None:
    """Have the engine dump ``source``, again when CRIU found a task in uninterruptible sleep
    (it then let every task run on and dumped nothing: see :class:`retry.TasksBusy`). With
    Dolly's runtime, its request goes into ``spool`` before each try (the runtime takes it).

    Raises:
        CheckpointFailed: Docker or CRIU failed, each time for a busy task.
    """
    try:
        for attempt in retry.busy_tasks():
            with attempt:
                if spool is not None:
                    _write_private(spool / RUNTIME_REQUEST, f"max_layer_bytes={max_layer_bytes}\n")
                try:
                    engine.create_checkpoint(id_of(source), docker_name, exit=not leave_running)
                except CheckpointFailed as e:
                    if any("Unseizable non-zombie" in line for line in e.log_lines or ()):
                        raise retry.TasksBusy(e) from e
                    raise
    except retry.TasksBusy as busy:
        raise busy.error from None


def _take_files_paused(engine: Engine, source: Container, staging: Path, max_layer_bytes: int) -> None:
    """What Dolly's runtime adds to a dump, for a container under another runtime, taken while
    it is paused: its writable layer, and its OCI spec from the bundle of its runtime's shim (the
    parent of its first process, whose working folder the bundle is; skipped when not found).

    Raises:
        CheckpointFailed: the layer was refused (too large, no room) or could not be archived.
    """
    try:
        rootfs.archive_layer(engine.upper_dir(source), staging / ROOTFS_DIFF, max_bytes=max_layer_bytes)
    except rootfs.LayerRefused as e:
        raise _refused(e.reason, e.fields, source, staging) from e
    except DollyError as e:
        raise CheckpointFailed(f"container {source.name} was not checkpointed: {e}") from e
    spec = _runtime_spec(engine, id_of(source))
    if spec is not None:
        _write_private(staging / "spec.dump", spec)


def _runtime_spec(engine: Engine, container_id: str, *, limit: int = 1 << 20) -> Optional[str]:
    """The OCI spec (config.json) in the bundle of the container's runtime shim, or None when it
    cannot be found for certain. The shim is the parent of the container's first process (its pid
    as the engine says it now, with the container paused) and its working folder is the bundle,
    which is named after the container: anything else (a pid reused by another process, say) is
    not taken. The file is opened without following a link or blocking, and must be a regular
    file of JSON under ``limit`` bytes."""
    try:
        pid = int(engine.container(container_id).attrs["State"].get("Pid") or 0)
        if pid <= 0:
            return None
        with open(f"/proc/{pid}/stat") as f:
            shim = int(f.read().rsplit(")", 1)[1].split()[1])
        bundle = os.readlink(f"/proc/{shim}/cwd")
        if os.path.basename(bundle) != container_id:
            return None
        fd = os.open(f"/proc/{shim}/cwd/config.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
                return None
            text = f.read(limit).decode()
        json.loads(text)
        return text
    except (OSError, ValueError, IndexError, DollyError):
        return None


def _paused_marker(engine: Engine, container_id: str) -> Path:
    return engine.lock_dir / f"{container_id}.paused"


def _unpause(engine: Engine, source: Container) -> None:
    """Resume a container Dolly paused, unless the dump has stopped it, and drop the marker that
    says it did.

    Raises:
        DollyError: the container stays paused (the engine refused to resume it).
    """
    container_id = id_of(source)
    try:
        state = engine.container(container_id).attrs["State"]
        if state.get("Running") and state.get("Paused"):
            try:
                engine.unpause(container_id)
            except DollyError:
                # Resumed meanwhile (containerd resumes the task after a checkpoint, and Docker
                # learns it from an event): only a container that stays paused is an error.
                if engine.container(container_id).attrs["State"].get("Paused"):
                    raise
    except ContainerNotFound:
        pass
    _paused_marker(engine, container_id).unlink(missing_ok=True)


def _resume_if_left_paused(engine: Engine, container_id: str) -> None:
    """Resume a container that an earlier checkpoint paused and never resumed (its process died
    meanwhile: the marker it wrote is still there). Called under the container's checkpoint lock,
    so no checkpoint of it is under way."""
    marker = _paused_marker(engine, container_id)
    if not marker.exists():
        return
    log.warning("container %s was left paused by a checkpoint that did not finish: resuming it", container_id[:12])
    try:
        state = engine.container(container_id).attrs["State"]
        if state.get("Running") and state.get("Paused"):
            engine.unpause(container_id)
    except ContainerNotFound:
        pass
    marker.unlink(missing_ok=True)


def _settle_images(staging: Path, *, rescue: bool = False) -> None:
    """Move what the runtime added beside CRIU's images to their places in the checkpoint, have
    the images restore without CRIU's network lock wherever they are restored (Dolly's clones,
    `docker start --checkpoint`, Podman from an export: see criu.without_network_lock), and
    make every file root-only. A ``rescue`` of images after a failure leaves the inventory as
    CRIU wrote it: nothing that might fail again may stand between the images and the keeping
    of them (a clone's own inventory skips the lock anyway)."""
    images = staging / "criu"
    if not rescue:
        criu.without_network_lock(images / "inventory.img", images / "inventory.img")
    if (images / RUNTIME_ROOTFS_DIFF).exists():
        os.rename(images / RUNTIME_ROOTFS_DIFF, staging / ROOTFS_DIFF)
    for made, kept in RUNTIME_EXTRAS.items():
        if (images / made).exists():
            os.rename(images / made, staging / kept)
    (images / RUNTIME_REQUEST).unlink(missing_ok=True)
    for path in [staging, *staging.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, 0o700 if path.is_dir() else 0o600)


def _refusal(error: CheckpointFailed, source: Container, engine: Engine) -> Optional[CheckpointFailed]:
    """The runtime's refusal of the writable layer, from the marker line that Docker passed into
    its error (only the first line of the runtime's output gets there), made into Dolly's words."""
    m = re.search(r"DOLLY_REFUSED reason=([a-z-]+)((?: [a-z_]+=[0-9]+)*)", str(error))
    if m is None:
        return None
    reason = m.group(1)
    fields = {k: int(v) for k, v in (kv.split("=", 1) for kv in m.group(2).split())}
    if (reason == "layer-too-large" and {"allocated", "max"} <= fields.keys()) or (
            reason == "no-space" and {"need", "avail"} <= fields.keys()):
        return _refused(reason, fields, source, engine.spool_dir / f"{source.id}.checkpoint")
    untouched = "Nothing was dumped: the container is untouched and keeps running."
    return CheckpointFailed(f"container {source.name} was not checkpointed: {m.group(0)}. {untouched}")


def _refused(reason: str, fields: Dict[str, int], source: Container, where: Path) -> CheckpointFailed:
    """Dolly's words for a refused writable layer (``reason`` and ``fields`` as the runtime
    reports them: layer-too-large with allocated and max, no-space with need and avail)."""
    untouched = "Nothing was dumped: the container is untouched and keeps running."
    if reason == "layer-too-large":
        size, cap = fields["allocated"], fields["max"]
        return CheckpointFailed(
            f"container {source.name} was not checkpointed: its writable layer holds "
            f"{_bytes_text(size)} ({size} bytes allocated), over the cap of {_bytes_text(cap)} "
            f"({cap} bytes). To take it anyway, raise the cap: "
            f"dolly.checkpoint(..., max_layer_bytes={_next_cap(size)}). {untouched}"
        )
    need, avail = fields["need"], fields["avail"]
    return CheckpointFailed(
        f"container {source.name} was not checkpointed: its writable layer needs "
        f"{_bytes_text(need)} ({need} bytes) in {where}, whose filesystem has "
        f"{_bytes_text(avail)} ({avail} bytes) free. Free space there (or remove old "
        f"checkpoints with dolly.remove_checkpoint). {untouched}"
    )


def _bytes_text(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _next_cap(n: int) -> int:
    """A round cap above ``n``: the next whole GiB, or MiB below 1 GiB."""
    step = 1 << 30 if n >= 1 << 30 else 1 << 20
    return (n // step + 1) * step


def _keep_images(
    engine: Engine,
    source: Container,
    name: str,
    created_at: datetime,
    staging: Path,
    spool: Path,
    images: Path,
    doomed: List[Path],
    error: BaseException,
) -> Optional[Path]:
    """After a failure of a checkpoint that stops its container: when the dump had succeeded and
    stopped it, its images are the only copy of its state. Make them a checkpoint folder rather
    than delete them, and take them off ``doomed``. Returns that folder, or None when there is
    nothing to keep (no complete dump, or the container still runs).

    Raises:
        CheckpointFailed: the images could not be made a checkpoint; the message says where
            they were left.
    """
    inventory = "inventory.img"  # CRIU writes it last: its presence means a complete dump
    found = next((d for d in (staging / "criu", spool, images) if (d / inventory).is_file()), None)
    if found is None:
        return None
    if not _stopped(engine, source):
        return None  # the dump did not stop it: nothing is lost by deleting the images

    # The folder must outlive this call, whatever else fails below.
    for d in (staging, found):
        if d in doomed:
            doomed.remove(d)
    try:
        staging.mkdir(mode=0o700, exist_ok=True)
        if found != staging / "criu":
            try:
                os.rename(found, staging / "criu")
            except OSError:  # another filesystem (a spool mounted apart): copy, then delete
                try:
                    shutil.copytree(found, staging / "criu")
                except BaseException:
                    shutil.rmtree(staging / "criu", ignore_errors=True)
                    raise
                doomed.append(found)
        _settle_images(staging, rescue=True)
        try:
            hostname = criu.read_hostname(staging / "criu")
        except Exception:  # pycriu missing or the image unreadable: the container's own
            hostname = source.attrs["Config"].get("Hostname") or id_of(source)[:12]
        kept_name = name
        if (staging.parent / name).exists():
            kept_name = f"{name[:105]}-kept-{uuid.uuid4().hex[:8]}"
        cp = Checkpoint(
            container_id=id_of(source),
            container_name=name_of(source),
            name=kept_name,
            created_at=created_at,
            hostname=hostname,
            config=types.MappingProxyType(source.attrs),
            path=staging.parent / kept_name,
        )
        meta = cp._metadata()
        meta["complete"] = False
        meta["failure"] = f"{type(error).__name__}: {error}"
        (staging / METADATA).unlink(missing_ok=True)  # written before a failed final rename
        _write_private(staging / METADATA, json.dumps(meta))
        os.rename(staging, cp.path)
        return cp.path
    except Exception as e:
        where = staging / "criu" if (staging / "criu" / inventory).is_file() else found
        if where == found:
            if found in doomed:
                doomed.remove(found)
            if found == spool:  # out of the way of the next checkpoint and of reap_spool
                aside = spool.with_name(f"{source.id}.kept-{uuid.uuid4().hex[:8]}")
                try:
                    os.rename(spool, aside)
                    where = aside
                except OSError:
                    pass
        raise CheckpointFailed(
            f"checkpoint {name!r} of container {source.name} failed after the dump had stopped "
            f"the container ({type(error).__name__}: {error}), and its images could not be made "
            f"a checkpoint ({type(e).__name__}: {e}); they were left, not deleted, in {where}"
        ) from error


def _stopped(engine: Engine, source: Container, *, settle: float = 5.0) -> bool:
    """Whether the container's processes are gone. CRIU kills them right after a dump without
    --leave-running; Docker learns it from an event, so its state may lag: its first process
    gone from /proc settles it at once, else Docker's state within ``settle`` seconds."""
    pid = source.attrs["State"].get("Pid")
    if pid and not os.path.exists(f"/proc/{pid}"):
        return True
    deadline = time.monotonic() + settle
    while True:
        try:
            if not engine.container(id_of(source)).attrs["State"].get("Running"):
                return True
        except ContainerNotFound:
            return True  # removed meanwhile: its images are all there is
        except Exception:  # the engine does not answer: keep them, to be safe
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def reap_spool(engine: Engine, *, older_than: float = 24 * 3600.0) -> None:
    """Remove spool folders and files left by an operation that died with its process
    (a host crash, a SIGKILL): each lives for seconds to hours, so a day is safe. Images set aside after a
    failed checkpoint had stopped their container (``<id>.kept-*``) are the only copy of its
    state: they stay."""
    now = time.time()
    for entry in list(engine.spool_dir.iterdir()) if engine.spool_dir.is_dir() else []:
        if ".kept-" in entry.name:
            continue  # the only images of a stopped container (see _keep_images)
        try:
            if now - entry.lstat().st_mtime <= older_than:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        except OSError:
            pass  # gone meanwhile, or not ours to remove: the next reap tries again


def list_checkpoints(
    container: Optional[ContainerRef] = None, client: Optional[docker.DockerClient] = None
) -> List[Checkpoint]:
    """The checkpoints of ``container`` (of every container when None), oldest first. The
    container may have been removed since: its checkpoints are still listed by its name or ID.

    Raises:
        ContainerNotFound: no such container, now or in the checkpoints Dolly keeps.
        InvalidArgument: ``container`` names more than one removed container.
    """
    engine = Engine.of(client)
    if not engine.files_are_local():
        from . import _remote

        return _remote.list_checkpoints(engine, container)
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


def get_checkpoint(
    container: ContainerRef, name: str, client: Optional[docker.DockerClient] = None
) -> Checkpoint:
    """The checkpoint ``name`` of ``container``.

    Raises:
        InvalidArgument: ``name`` is not a valid checkpoint name, or ``container`` names more
            than one removed container (give its full ID).
        ContainerNotFound: no such container, now or in the checkpoints Dolly keeps.
        CheckpointNotFound: the container has no checkpoint of that name.
    """
    names.checkpoint_name(name)
    engine = Engine.of(client)
    if not engine.files_are_local():
        from . import _remote

        return _remote.get_checkpoint(engine, container, name)
    path = _source_folder(engine, container) / name
    if not (path / METADATA).exists():
        raise CheckpointNotFound(f"no checkpoint named {name!r} for container {_ref_text(container)}")
    return Checkpoint.load(path, engine.client)


def remove_checkpoint(checkpoint: Checkpoint, client: Optional[docker.DockerClient] = None) -> None:
    """Delete a checkpoint's files. Containers restored from it are not affected.

    Raises:
        InvalidArgument: ``checkpoint`` is not a :class:`Checkpoint`, or its path is not a
            folder of Dolly's store.
        CheckpointNotFound: it was removed already.
    """
    require(checkpoint)
    engine = engine_of(checkpoint, client)
    if not engine.files_are_local():
        from . import _remote

        return _remote.remove_checkpoint(engine, checkpoint)
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


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune` removed (or, with ``dry_run``, would remove).

    Attributes:
        checkpoints: the checkpoints, oldest first.
        reclaimed: the bytes they held.
        dry_run: nothing was removed.
    """

    checkpoints: Tuple[Checkpoint, ...]
    reclaimed: int
    dry_run: bool = False


def prune(
    *,
    all_containers: bool = False,
    older_than: Optional[timedelta] = None,
    labels: Optional[Mapping[str, str]] = None,
    dry_run: bool = False,
    client: Optional[docker.DockerClient] = None,
) -> PruneReport:
    """Remove the checkpoints nobody needs any more, as ``docker image prune`` removes images.

    By default: the checkpoints taken on this engine of containers that no longer exist.
    Imported checkpoints (which never had a container here) and those of existing containers
    are kept unless ``all_containers`` is set. ``older_than`` and ``labels`` narrow either
    choice. Containers restored from a removed checkpoint are
    not affected.

    Args:
        all_containers: every checkpoint, not only those of removed containers.
        older_than: only checkpoints taken more than this long ago.
        labels: only checkpoints whose source container carried all these labels (as
            ``docker ... prune --filter label=KEY=VALUE``).
        dry_run: remove nothing; report what would go.
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
    for cp in list_checkpoints(client=engine.client):
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
            if exists[cp.container_id]:
                continue
        chosen.append(cp)
    if dry_run:
        return PruneReport(tuple(chosen), sum(cp.size for cp in chosen), dry_run=True)
    return remove_pruned(engine, chosen)


def remove_pruned(engine: Engine, checkpoints: Sequence[Checkpoint]) -> PruneReport:
    """Remove these checkpoints (what :func:`prune` chose, or a dry run of it reported), then the
    clones' shared layer images nothing needs any more.
    A checkpoint removed meanwhile by another caller is left out of the report."""
    reclaimed = 0
    removed = []
    for cp in checkpoints:
        size = cp.size
        try:
            remove_checkpoint(cp, engine.client)
        except CheckpointNotFound:  # removed meanwhile by another caller
            continue
        reclaimed += size
        removed.append(cp)
    remove_unused_layer_images(engine)
    return PruneReport(tuple(removed), reclaimed)


def remove_all_of(engine: Engine, container_id: str) -> None:
    """Remove every checkpoint kept of a container (a full ID: a plain name under the store), and
    their shared layer images that no container uses any more."""
    if not engine.files_are_local():  # another host's engine: through its agent, one by one
        try:
            kept = list_checkpoints(names.container_id(container_id), engine.client)
        except ContainerNotFound:
            return
        for cp in kept:
            with contextlib.suppress(CheckpointNotFound):
                remove_checkpoint(cp, engine.client)
        if kept:
            remove_unused_layer_images(engine, only={cp.layer_image for cp in kept})
        return
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
    kept = list_checkpoints(client=engine.client)
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


def require(checkpoint: Any) -> Path:
    """The folder of a checkpoint that still exists.

    Raises:
        InvalidArgument: ``checkpoint`` is not a :class:`Checkpoint`.
        CheckpointNotFound: its files are gone.
    """
    if not isinstance(checkpoint, Checkpoint):
        raise InvalidArgument(f"expected a dolly.Checkpoint, got {type(checkpoint).__name__}")
    if checkpoint.client is not None and not Engine.of(checkpoint.client).files_are_local():
        return checkpoint.path  # on another host: its engine's agent checks it there
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


def _default_name() -> str:
    return "cp-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


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
