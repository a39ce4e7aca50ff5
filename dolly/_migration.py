"""Live migration: move a running container to another Docker Engine, memory and files.

    checkpoint (stops the source)  ->  transfer: its members streamed into the target's host
    (image too)
        ->  restore under the same name  ->  check that it runs  ->  remove the source

Downtime runs from the start of the checkpoint, when CRIU freezes the source, to the moment the
container on the target runs (and passes ``ready``, when given). The move is final only once that
container has then kept running for a short settle (``SETTLE_SECONDS``), neither stopped nor
restarted: a restored process that dies just after it passed still has its source to come back to.

If any step fails, the container made on the target is removed and the source is started again
from the checkpoint, as itself, so it goes on with its state; the error names the step. That
holds for the checkpoint step too: when the dump stopped the source and a later part of the
checkpoint failed, the images it kept (``CheckpointFailed.kept``) start the source again. The
source is started again only once the target is known to hold no container of this migration:
when that cannot be confirmed (the target engine stopped answering, say), the container there may
still run, and starting the source too would make two copies. Then the source stays stopped, its
checkpoint is kept, and ``MigrationFailed`` (step ``"roll back"``) says where, and how to resume it
(:func:`dolly.resume`) once the container on the target is known to be gone.

Established TCP connections do not move: the container on the target gets the address its network
there hands out (each engine has a bridge of its own, and a clone never asks for the source's
address), so a connection restored there would belong to an address the container no longer has.
The checkpoint carries them (``tcp_established``), so that a server with keep-alive clients or a
connection pool can move at all, and the target starts with them closed: its process reads
end-of-file on them, and the clients, whose peer vanished with the source, reconnect to the
container's new address. Keeping them would need the address to move too (one network spanning
both engines, and a restore with CRIU's network lock and --tcp-established): not so today.

Volumes do not move: a checkpoint carries memory and the writable layer, not volume contents. A
source with volume mounts is refused unless ``drop_volumes=True`` says that the moved container
may start with fresh, empty volumes; the source's volumes stay on the source engine either way,
since Dolly never removes them. Bind mounts do not move either: they name paths of the source's
host. A source with bind mounts is refused unless ``rebind_mounts=True`` says that the moved
container may bind the same paths on the target's host, whatever they hold there.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import docker
from docker.models.containers import Container

from . import _postcopy as postcopy, ready as _ready
from ._catalog import checkpoint, get_checkpoint, remove_checkpoint
from ._checkpoint import Checkpoint
from ._cloning import resume, start_on
from ._engine import ContainerRef, Engine, id_of, name_of
from ._hosts import host_of
from ._start import LABEL_CHECKPOINT, LABEL_SOURCE
from ._transfer import transfer
from .errors import (
    CheckpointFailed,
    ContainerNotFound,
    ContainerNotRunning,
    DollyError,
    HostNotReady,
    InvalidArgument,
    MigrationFailed,
    NameConflict,
)

__all__ = ["Migration", "migrate"]

log = logging.getLogger("dolly")

# How long the container on the target must go on running, unrestarted, after it passed the
# verify step, before the source and the checkpoints are removed.
SETTLE_SECONDS = 1.0


@dataclass(frozen=True)
class Migration:
    """What :func:`migrate` did.

    Attributes:
        container: the running container on the target engine.
        downtime: seconds from the freeze of the source to the target container running (and
            ready, when a check was given).
        steps: seconds each step took (checkpoint, export, import, restore, verify: the check and
            the settle after it).
    """

    container: Container
    downtime: float
    steps: Dict[str, float] = field(default_factory=dict)


def migrate(
    container: ContainerRef,
    target_client: docker.DockerClient,
    *,
    source_client: Optional[docker.DockerClient] = None,
    ready: Optional[Callable[[Container], bool]] = None,
    ready_timeout: float = 60.0,
    compression: str = "none",
    drop_volumes: bool = False,
    rebind_mounts: bool = False,
    post_copy: bool = False,
) -> Migration:
    """Move a running container to the engine of ``target_client``, under the same name.

    Args:
        container: a Container, a name or an ID on the source engine.
        target_client: the engine to move it to.
        source_client: its engine; default ``docker.from_env()``.
        ready: a check (:mod:`dolly.ready`) the moved container must pass before the source is
            removed; without one, running is enough.
        compression: ``"zstd"``, ``"gzip"`` or ``"none"``, checked and kept for callers of
            earlier versions: the checkpoint now streams from the source's host into the
            target's, member by member, never as a bundle file, so nothing is compressed.
        drop_volumes: move a container that has volume mounts (named or anonymous) although their
            contents do not move: the container on the target gets fresh, empty volumes (named
            ones under the same names, on the target engine; a named volume that already exists
            there is used as it is, which is how to bring data along: copy it there first),
            while the source's volumes, with their data, stay on the source engine (Dolly never
            removes them; remove them yourself once they are no longer needed). Without it such
            a container is refused.
        rebind_mounts: move a container that has bind mounts although what they show does not
            move: the container on the target binds the same host paths on the target's host,
            whatever they hold there (another machine's files, or none: Docker then refuses a
            missing path, or makes it empty for a ``-v`` bind). Without it such a container is
            refused.
        post_copy: move the memory after the process: the container runs on the target as soon
            as everything but its memory is there, and its memory follows from the source (CRIU's
            page server and lazy-pages daemon, joined by Dolly through both engines' APIs): the
            downtime no longer grows with the memory. The source stays frozen, holding the memory,
            until the moved container has passed its check and has every page; until then a
            failure still rolls back (the source runs on, as it was). Needs Dolly's runtime on
            the source and userfaultfd on the target (``dolly doctor``). ``steps["memory"]`` is
            the time from the restore until every page was in.

    Raises:
        ContainerNotFound, ContainerNotRunning, HostNotReady: before anything is touched.
        NameConflict: the target engine already has a container of that name.
        InvalidArgument: the target is the source engine, or the source has volume mounts and
            ``drop_volumes`` is not set, or bind mounts and ``rebind_mounts`` is not set (the
            message names them); nothing was touched.
        MigrationFailed: a step failed (``.step``); the source is running again with its state.
            When the checkpoint step failed after the dump had stopped the source, the source
            was started again from the images the checkpoint kept; if even that fails, the step
            is ``"roll back"`` and the message says where the images are kept. The step is
            ``"roll back"`` too when the source could not be started again from its checkpoint,
            or was not, because the container made on the target could not be confirmed gone:
            the source is then stopped, its checkpoint kept, and the message says where and how
            to resume it.
    """
    source_engine = Engine.of(source_client)
    target_engine = Engine.of(target_client)
    if compression not in ("zstd", "gzip", "none"):
        raise InvalidArgument(f"compression must be one of zstd, gzip, none, got {compression!r}")
    source_engine.require_checkpoint_support()
    target_engine.require_checkpoint_support()
    source = source_engine.container(container)
    if source_engine.identity == target_engine.identity:
        raise InvalidArgument("the target engine is the source engine: use dolly.clone or dolly.restore")
    if not source.attrs["State"].get("Running") or source.attrs["State"].get("Paused"):
        raise ContainerNotRunning(f"container {source.name} is {source.status}, not running")
    volumes = _mounts(source, "volume")
    if volumes and not drop_volumes:
        raise InvalidArgument(
            f"container {source.name} has volume mounts ({', '.join(volumes)}), whose contents a "
            "migration does not carry: pass drop_volumes=True to move it with fresh, empty volumes "
            "on the target (the source's volumes stay on the source engine)"
        )
    binds = _mounts(source, "bind")
    if binds and not rebind_mounts:
        raise InvalidArgument(
            f"container {source.name} has bind mounts ({', '.join(binds)}), host paths whose "
            "contents a migration does not carry: pass rebind_mounts=True to move it binding the "
            "same paths on the target's host, whatever they hold there"
        )
    if source.name in target_engine.container_names():
        raise NameConflict(f"the target engine already has a container named {source.name!r}")

    # Both hosts ready before the source freezes: CRIU checked and pycriu loaded here for a host
    # whose files are here; an agent's workers started, so that the checkpoint, export, import
    # and restore skip Python's start (and its CPU). Two calls each (checkpoint and export;
    # import and restore), three on the target (its commit), and post-copy's page stream.
    hosts = [host_of(source_engine), host_of(target_engine)]
    waits = [hosts[0].prepare(2), hosts[1].prepare(4 if post_copy else 3)]
    for wait in waits:
        wait(10.0)
    try:
        if post_copy:
            return _migrate_post_copy(source_engine, target_engine, source, ready=ready,
                                      ready_timeout=ready_timeout)
        return _migrate_pre_copy(source_engine, target_engine, source, ready=ready, ready_timeout=ready_timeout)
    finally:
        for host in hosts:
            host.release()


def _migrate_pre_copy(source_engine: Engine, target_engine: Engine, source: Container, *,
                      ready: Optional[Callable[[Container], bool]], ready_timeout: float) -> Migration:
    """:func:`migrate` without ``post_copy``: the memory moves with the checkpoint."""
    steps: Dict[str, float] = {}
    step = "checkpoint"
    started = time.perf_counter()
    try:
        # Its connections too (a server's keep-alive clients): they are restored closed, since the
        # target's address is another (see migrate's docstring).
        cp = checkpoint(source, _name(), leave_running=False, tcp_established=True, client=source_engine.client)
    except CheckpointFailed as e:
        state = _resume_after_failed_checkpoint(source_engine, source, e)
        raise MigrationFailed(f"migration of {source.name} failed at step 'checkpoint': {e}; {state}",
                              step=step) from e
    steps[step] = time.perf_counter() - started
    moved: Optional[Checkpoint] = None
    target: Optional[Container] = None
    try:
        step = "transfer"
        moved = transfer(cp, target_engine.client, source=source_engine.client, steps=steps)
        step = "restore"
        t = time.perf_counter()
        target = start_on(target_engine, moved, 1, chosen=[name_of(source)])[0]
        restored_as = _start_marks(target)
        steps[step] = time.perf_counter() - t
        step = "verify"
        downtime = _verify(target_engine, target, restored_as, ready=ready, ready_timeout=ready_timeout,
                           started=started, steps=steps)
    except BaseException as e:
        _roll_back(source_engine, target_engine, source, cp, moved, target, step=step, error=e)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise MigrationFailed(f"migration of {source.name} failed at step '{step}': {e}; "
                              "the source is running again", step=step) from e

    _remove_what_moved(source_engine, source, cp, moved)
    return Migration(container=target, downtime=downtime, steps=steps)


# How long the memory may take to reach the target after the restore, in a post-copy migration.
MEMORY_TIMEOUT = 600.0


def _migrate_post_copy(source_engine: Engine, target_engine: Engine, source: Container, *,
                       ready: Optional[Callable[[Container], bool]], ready_timeout: float) -> Migration:
    """:func:`migrate` with ``post_copy``: see :mod:`dolly._postcopy`."""
    steps: Dict[str, float] = {}
    step = "checkpoint"
    # Where the daemon will connect on the target's host, made meanwhile (another host's agent
    # takes a moment to start).
    page_target = host_of(target_engine).post_copy_target()  # where the daemon will connect, before the freeze
    try:
        page_source = host_of(source_engine).post_copy_source(source, _name())
    except BaseException as e:
        page_target.end.close()
        if isinstance(e, CheckpointFailed):
            state = _resume_after_failed_checkpoint(source_engine, source, e)
        elif isinstance(e, (HostNotReady, ContainerNotFound, ContainerNotRunning)) or not isinstance(e, Exception):
            raise  # refused before anything was dumped, or interrupted
        elif _still_running(source_engine, source):
            state = "the source is still running"
        else:
            raise MigrationFailed(f"migration of {source.name} failed at step 'checkpoint': {e}; the source is not "
                                  "running", step="roll back") from e
        raise MigrationFailed(f"migration of {source.name} failed at step 'checkpoint': {e}; {state}",
                              step=step) from e
    cp = page_source.checkpoint
    started = page_source.frozen_at  # the downtime runs from the freeze
    steps[step] = time.perf_counter() - started
    moved: Optional[Checkpoint] = None
    target: Optional[Container] = None
    relay: Optional[postcopy.Relay] = None
    try:
        step = "transfer"
        moved = transfer(cp, target_engine.client, source=source_engine.client, steps=steps)
        step = "restore"
        t = time.perf_counter()
        relay = postcopy.Relay(page_source.end, page_target.end)
        target = start_on(target_engine, moved, 1, chosen=[name_of(source)], page_port=page_target.relay)[0]
        restored_as = _start_marks(target)
        steps[step] = time.perf_counter() - t
        step = "verify"
        downtime = _verify(target_engine, target, restored_as, ready=ready, ready_timeout=ready_timeout,
                           started=started, steps=steps)
        step = "memory"
        relay.wait_for_pages(MEMORY_TIMEOUT)
        steps[step] = time.perf_counter() - t
        _settle(target_engine, target, restored_as, seconds=0)  # and it still runs, every page in
    except BaseException as e:
        if relay is None:
            page_target.end.close()
        _roll_back_post_copy(source_engine, target_engine, source, page_source, moved, target, relay, step=step,
                             error=e)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise MigrationFailed(f"migration of {source.name} failed at step '{step}': {e}; "
                              "the source is running again, as it was", step=step) from e

    # The commit point: the page server's transfer ends, and with it the source's processes.
    relay.commit(timeout=60)
    try:
        page_source.wait(60)
    except (DollyError, TimeoutError) as e:  # pragma: no cover - logged: the target runs
        # Whatever became of the dump, the moved container runs with every page: the source,
        # should it run on, goes below (never two copies).
        log.warning("migrate: the source's post-copy dump did not end cleanly: %s", e)
    _remove_what_moved(source_engine, source, cp, moved)
    return Migration(container=target, downtime=downtime, steps=steps)


def _roll_back_post_copy(source_engine: Engine, target_engine: Engine, source: Container,
                         page_source: postcopy.PageSource, moved: Optional[Checkpoint],
                         target: Optional[Container], relay: Optional[postcopy.Relay], *, step: str,
                         error: BaseException) -> None:
    """Undo a failed post-copy migration before its commit point: the container made on the
    target goes, and the page server's transfer is broken off, so that the source's processes,
    frozen with their memory, run on. Raises MigrationFailed (step "roll back") when the source
    does not run again."""
    doubt = _clear_target_and_copy(target_engine, source, moved, target)
    if relay is not None:
        relay.abort()
    else:
        page_source.end.close()  # before the daemon's close record: a reset
    with contextlib.suppress(CheckpointFailed, TimeoutError, DollyError):
        page_source.wait(60)  # fails, as it should: the transfer was broken off
    failed = f"migration of {source.name} failed at step '{step}': {error}"
    if not _still_running(source_engine, source):
        raise MigrationFailed(f"{failed}; the source did not run on after the transfer was broken off; its "
                              f"images, without the memory, are at {page_source.checkpoint.path}",
                              step="roll back") from error
    try:
        remove_checkpoint(page_source.checkpoint)
    except DollyError as e:  # pragma: no cover - logged, not raised: the source runs
        log.warning("migrate: could not remove the source checkpoint: %s", e)
    if doubt is not None:
        # The source runs on (kept frozen, it would be lost with this process); the container on
        # the target may still run too.
        raise MigrationFailed(f"{failed}; the source runs on, but the container {source.name!r} made on the "
                              f"target engine could not be removed, or its removal confirmed ({doubt}): "
                              "remove it there once that engine answers", step="roll back") from error


def _verify(target_engine: Engine, target: Container, restored_as: tuple, *,
            ready: Optional[Callable[[Container], bool]], ready_timeout: float, started: float,
            steps: Dict[str, float]) -> float:
    """The verify step: the moved container passes ``ready`` (or runs), then keeps running for
    the settle; returns the downtime (from ``started`` until it passed).

    Raises:
        NotReady, ContainerNotRunning, ContainerNotFound: as :func:`dolly.ready.wait` and
            :func:`_settle`.
    """
    t = time.perf_counter()
    _ready.wait(target, ready or _running, timeout=ready_timeout)
    downtime = time.perf_counter() - started
    _settle(target_engine, target, restored_as)
    steps["verify"] = time.perf_counter() - t
    return downtime


def _remove_what_moved(source_engine: Engine, source: Container, cp: Checkpoint, moved: Optional[Checkpoint]) -> None:
    """After a move: the source container and both copies of the checkpoint go. The container
    runs on the target by now, so failures are only logged. The source goes without its volumes:
    they hold the user's data (see drop_volumes)."""
    removals: List[Tuple[str, Callable[[], None]]] = [
        ("source container", lambda: source_engine.remove(id_of(source), volumes=False)),
        ("source checkpoint", lambda: remove_checkpoint(cp))]
    if moved is not None:
        removals.append(("target checkpoint", lambda: remove_checkpoint(moved)))
    for what, undo in removals:
        try:
            undo()
        except DollyError as e:  # pragma: no cover - logged, not raised
            log.warning("migrate: could not remove the %s: %s", what, e)


def _roll_back(source_engine: Engine, target_engine: Engine, source: Container, cp: Checkpoint,
               moved: Optional[Checkpoint], target: Optional[Container], *, step: str,
               error: BaseException) -> None:
    """Undo a failed migration: the target's container and checkpoint go, the source comes back.

    The source comes back only once no container of this migration is left on the target. When
    that cannot be confirmed, the one there may still run: starting the source too would make two
    copies, so it stays stopped with its checkpoint kept. Raises MigrationFailed (step "roll
    back") then, and when starting the source fails."""
    doubt = _clear_target_and_copy(target_engine, source, moved, target)
    failed = f"migration of {source.name} failed at step '{step}': {error}"
    how = (f"dolly.resume(dolly.get_checkpoint({source.id!r}, {cp.name!r}, client=C), client=C), "
           "C being a client of the source engine")
    if doubt is not None:
        raise MigrationFailed(
            f"{failed}; then the container it made on the target engine could not be removed, or "
            f"its removal could not be confirmed ({doubt}): its state there is unknown, and it may "
            f"still run. The source was not started again, so that two copies never run: it is "
            f"stopped, and its checkpoint {cp.name!r} is kept at {cp.path}. Once the container "
            f"{source.name!r} on the target is known to be gone, start the source again from it "
            f"with {how}", step="roll back"
        ) from error
    try:
        resume(cp, source.id, client=source_engine.client)
    except DollyError as e:
        raise MigrationFailed(
            f"{failed}; starting the source again from its checkpoint failed too: {e}; the "
            f"checkpoint {cp.name!r} is kept at {cp.path}", step="roll back"
        ) from e
    try:
        remove_checkpoint(cp)
    except DollyError as e:  # pragma: no cover - logged, not raised: the source runs
        log.warning("migrate: could not remove the source checkpoint at %s: %s", cp.path, e)


def _clear_target_and_copy(target_engine: Engine, source: Container, moved: Optional[Checkpoint],
                           target: Optional[Container]) -> Optional[str]:
    """:func:`_clear_target`, then the checkpoint copied to the target (a failure to remove it is
    logged: it is a copy, the source keeps its own)."""
    doubt = _clear_target(target_engine, source, moved, target)
    if moved is not None:
        try:
            remove_checkpoint(moved)
        except DollyError as e:
            log.warning("migrate: could not remove the checkpoint copied to the target: %s", e)
    return doubt


def _clear_target(target_engine: Engine, source: Container, moved: Optional[Checkpoint],
                  target: Optional[Container]) -> Optional[str]:
    """Remove the container this migration made on the target and confirm that none is left;
    returns None once confirmed, else why it could not be.

    None is made before the restore step (``moved`` is None until the transfer ends). After it:
    the container restore returned (``target``), and whatever the target holds under the source's
    name that was restored from ``moved`` (labelled with the source and the checkpoint): a restore
    that failed part-way may have left it, its own clean-up failing with the engine."""
    if moved is None:
        return None
    try:
        if target is not None:
            target_engine.remove(id_of(target))
        try:
            left = target_engine.container(name_of(source))
        except ContainerNotFound:
            return None
        labels = left.attrs.get("Config", {}).get("Labels") or {}
        if (left.name == source.name and labels.get(LABEL_SOURCE) == source.id
                and labels.get(LABEL_CHECKPOINT) == moved.name):
            target_engine.remove(id_of(left))
        # Else a container that is not this migration's took the name meanwhile: not ours to
        # remove, and ours, which would hold that name, is gone.
        return None
    except Exception as e:  # whatever the engine did, the target's state is unknown
        return f"{type(e).__name__}: {e}"


def _start_marks(container: Container) -> tuple:
    """What changes whenever a container starts again: its start time and restart count."""
    return (container.attrs.get("State", {}).get("StartedAt"), container.attrs.get("RestartCount"))


def _settle(engine: Engine, container: Container, marks: tuple, *, seconds: float = SETTLE_SECONDS,
            interval: float = 0.1) -> None:
    """Confirm, polling its state for ``seconds``, that ``container`` goes on running the process
    restored into it: running, not restarting, and not started again since the restore
    (``marks``: :func:`_start_marks` as the restore left it). A restart would have begun it
    from scratch: the state it was restored with would be gone.

    Raises:
        ContainerNotRunning: it stopped, or it was started again.
        ContainerNotFound: it was removed.
    """
    deadline = time.monotonic() + seconds
    while True:
        now = engine.container(id_of(container))
        state = now.attrs.get("State") or {}
        if not state.get("Running") or state.get("Restarting"):
            raise ContainerNotRunning(
                f"container {now.name} on the target is {state.get('Status') or now.status} (exit code "
                f"{state.get('ExitCode')}) after it passed the check: it did not keep running"
            )
        if _start_marks(now) != marks:
            raise ContainerNotRunning(
                f"container {now.name} on the target was started again after the restore (at "
                f"{marks[0]}, then at {_start_marks(now)[0]}; restart count {now.attrs.get('RestartCount')}): "
                "it runs from scratch, without the state it was restored with"
            )
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def _resume_after_failed_checkpoint(source_engine: Engine, source: Container, error: CheckpointFailed) -> str:
    """A failed checkpoint step: start the source again from the images the checkpoint kept, when
    the dump had already stopped it; returns what became of the source. Raises MigrationFailed
    (step "roll back") when it stays stopped."""
    if error.kept is None:
        # Nothing was kept: the dump failed and left the source as it was, running.
        if _still_running(source_engine, source):
            return "the source is still running, untouched"
        raise MigrationFailed(
            f"migration of {source.name} failed at step 'checkpoint': {error}; the source is not "
            "running and no images were kept to start it again from", step="roll back"
        ) from error
    try:
        # By its place in the store (<id>/<name>), on the source's engine, wherever its files are.
        kept = get_checkpoint(Path(error.kept).parent.name, Path(error.kept).name, source_engine.client)
        resume(kept, source.id, client=source_engine.client)
    except DollyError as e:
        raise MigrationFailed(
            f"migration of {source.name} failed at step 'checkpoint': {error}; starting the source "
            f"again from the images the checkpoint kept failed too: {e}; they are kept at {error.kept}",
            step="roll back",
        ) from e
    try:
        remove_checkpoint(kept)
    except DollyError as e:  # pragma: no cover - logged, not raised: the source runs
        log.warning("migrate: could not remove the images kept at %s: %s", error.kept, e)
    return "the source is running again, from the images the checkpoint kept"


def _still_running(engine: Engine, container: Container) -> bool:
    try:
        return bool(engine.container(id_of(container)).attrs["State"].get("Running"))
    except DollyError:
        return False


def _mounts(container: Container, kind: str) -> list:
    """The mounts of ``container`` of type ``kind``: for ``"volume"``, ``name:/destination`` (a
    long ID for an anonymous one); for ``"bind"``, ``/host/path:/destination``."""
    key = "Name" if kind == "volume" else "Source"
    return [f"{m.get(key) or '?'}:{m.get('Destination')}"
            for m in container.attrs.get("Mounts") or [] if m.get("Type") == kind]


def _running(container: Container) -> bool:
    return container.status == "running"


def _name() -> str:
    return "migrate-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
