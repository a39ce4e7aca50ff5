"""Live migration: move a running container to another Docker Engine, memory and files.

    checkpoint (stops the source)  ->  bundle.transfer: a signed bundle imported on the target
    (image too)
        ->  restore under the same name  ->  check that it runs  ->  remove the source

Downtime runs from the start of the checkpoint, when CRIU freezes the source, to the moment the
container on the target runs (and passes ``ready``, when given). If any step fails, the container
made on the target is removed and the source is started again from the checkpoint, as itself, so
it goes on with its state; the error names the step. That holds for the checkpoint step too: when
the dump stopped the source and a later part of the checkpoint failed, the images it kept
(``CheckpointFailed.kept``) start the source again.

Volumes do not move: a checkpoint carries memory and the writable layer, not volume contents. A
source with volume mounts is refused unless ``drop_volumes=True`` says that the moved container
may start with fresh, empty volumes; the source's volumes stay on the source engine either way,
since Dolly never removes them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, Optional

import docker
from docker.models.containers import Container

from . import bundle, criu
from . import ready as _ready
from .checkpoint import Checkpoint, checkpoint, remove_checkpoint
from .engine import ContainerRef, Engine
from .errors import (
    CheckpointFailed,
    ContainerNotRunning,
    DollyError,
    InvalidArgument,
    MigrationFailed,
    NameConflict,
)
from .restore import restore, resume

__all__ = ["Migration", "migrate"]

log = logging.getLogger("dolly")


@dataclass(frozen=True)
class Migration:
    """What :func:`migrate` did.

    Attributes:
        container: the running container on the target engine.
        downtime: seconds from the freeze of the source to the target container running (and
            ready, when a check was given).
        steps: seconds each step took (checkpoint, export, import, restore, verify).
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
) -> Migration:
    """Move a running container to the engine of ``target_client``, under the same name.

    Args:
        container: a Container, a name or an ID on the source engine.
        target_client: the engine to move it to.
        source_client: its engine; default ``docker.from_env()``.
        ready: a check (:mod:`dolly.ready`) the moved container must pass before the source is
            removed; without one, running is enough.
        compression: of the bundle on its way (``"none"`` is fastest between engines on one host).
        drop_volumes: move a container that has volume mounts (named or anonymous) although their
            contents do not move: the container on the target gets fresh, empty volumes (named
            ones under the same names, on the target engine; a named volume that already exists
            there is used as it is, which is how to bring data along: copy it there first),
            while the source's volumes, with their data, stay on the source engine (Dolly never
            removes them; remove them yourself once they are no longer needed). Without it such
            a container is refused.

    Raises:
        ContainerNotFound, ContainerNotRunning, HostNotReady: before anything is touched.
        NameConflict: the target engine already has a container of that name.
        InvalidArgument: the target is the source engine, or the source has volume mounts and
            ``drop_volumes`` is not set (the message names them); nothing was touched.
        MigrationFailed: a step failed (``.step``); the source is running again with its state.
            When the checkpoint step failed after the dump had stopped the source, the source
            was started again from the images the checkpoint kept; if even that fails, the step
            is ``"roll back"`` and the message says where the images are kept.
    """
    source_engine = Engine.of(source_client)
    target_engine = Engine.of(target_client)
    criu.require_version()
    source_engine.require_checkpoint_support()
    target_engine.require_checkpoint_support()
    source = source_engine.container(container)
    if source_engine.identity == target_engine.identity:
        raise InvalidArgument("the target engine is the source engine: use dolly.clone or dolly.restore")
    if not source.attrs["State"].get("Running") or source.attrs["State"].get("Paused"):
        raise ContainerNotRunning(f"container {source.name} is {source.status}, not running")
    volumes = _volumes(source)
    if volumes and not drop_volumes:
        raise InvalidArgument(
            f"container {source.name} has volume mounts ({', '.join(volumes)}), whose contents a "
            "migration does not carry: pass drop_volumes=True to move it with fresh, empty volumes "
            "on the target (the source's volumes stay on the source engine)"
        )
    if source.name in target_engine.container_names():
        raise NameConflict(f"the target engine already has a container named {source.name!r}")

    steps: Dict[str, float] = {}
    step = "checkpoint"
    started = time.perf_counter()
    try:
        cp = checkpoint(source, _name(), leave_running=False, client=source_engine.client)
    except CheckpointFailed as e:
        state = _resume_after_failed_checkpoint(source_engine, source, e)
        raise MigrationFailed(f"migration of {source.name} failed at step 'checkpoint': {e}; {state}",
                              step=step) from e
    steps[step] = time.perf_counter() - started
    moved: Optional[Checkpoint] = None
    target: Optional[Container] = None
    try:
        step = "transfer"
        moved = bundle.transfer(cp, target_client, source=source_engine.client, compression=compression,
                                steps=steps)
        step = "restore"
        t = time.perf_counter()
        target = restore(moved, name=source.name, client=target_client)
        steps[step] = time.perf_counter() - t
        step = "verify"
        t = time.perf_counter()
        _ready.wait(target, ready or _running, timeout=ready_timeout)
        steps[step] = time.perf_counter() - t
        downtime = time.perf_counter() - started
    except BaseException as e:
        if step == "transfer":  # transfer records each of its steps as it ends
            step = "import" if "export" in steps else "export"
        _roll_back(source_engine, target_engine, source, cp, moved, target)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise MigrationFailed(f"migration of {source.name} failed at step '{step}': {e}; "
                              "the source is running again", step=step) from e

    # Past this point the container runs on the target: clean-up failures are only logged.
    # The source goes without its volumes: they hold the user's data (see drop_volumes).
    for what, undo in (("source container", lambda: source_engine.remove(source.id, volumes=False)),
                       ("source checkpoint", lambda: remove_checkpoint(cp)),
                       ("target checkpoint", lambda: remove_checkpoint(moved))):
        try:
            undo()
        except DollyError as e:  # pragma: no cover - logged, not raised
            log.warning("migrate: could not remove the %s: %s", what, e)
    return Migration(container=target, downtime=downtime, steps=steps)


def _roll_back(source_engine: Engine, target_engine: Engine, source: Container, cp: Checkpoint,
               moved: Optional[Checkpoint], target: Optional[Container]) -> None:
    """Undo a failed migration: the target's container and checkpoint go, the source comes back."""
    if target is not None:
        try:
            target_engine.remove(target.id)
        except DollyError as e:
            log.warning("migrate: could not remove %s on the target: %s", target.name, e)
    if moved is not None:
        try:
            remove_checkpoint(moved)
        except DollyError as e:
            log.warning("migrate: could not remove the checkpoint copied to the target: %s", e)
    try:
        resume(cp, source.id, client=source_engine.client)
    except DollyError as e:
        raise MigrationFailed(
            f"migration of {source.name} failed, and starting the source again from its checkpoint "
            f"failed too: {e}; the checkpoint is kept at {cp.path}", step="roll back"
        ) from e
    remove_checkpoint(cp)


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
        kept = Checkpoint.load(error.kept)
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
        return bool(engine.container(container.id).attrs["State"].get("Running"))
    except DollyError:
        return False


def _volumes(container: Container) -> list:
    """The volume mounts of ``container``: ``name:/destination`` (a long ID for an anonymous one)."""
    return [f"{m.get('Name') or '?'}:{m.get('Destination')}"
            for m in container.attrs.get("Mounts") or [] if m.get("Type") == "volume"]


def _running(container: Container) -> bool:
    return container.status == "running"


def _name() -> str:
    return "migrate-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
