"""Live migration: move a running container to another Docker Engine, memory and files.

    checkpoint (stops the source)  ->  bundle.transfer: a signed bundle imported on the target
    (image too)
        ->  restore under the same name  ->  check that it runs  ->  remove the source

Downtime runs from the start of the checkpoint, when CRIU freezes the source, to the moment the
container on the target runs (and passes ``ready``, when given). If any step fails, the container
made on the target is removed and the source is started again from the checkpoint, as itself, so
it goes on with its state; the error names the step.
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
from .errors import ContainerNotRunning, DollyError, InvalidArgument, MigrationFailed, NameConflict
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
) -> Migration:
    """Move a running container to the engine of ``target_client``, under the same name.

    Args:
        container: a Container, a name or an ID on the source engine.
        target_client: the engine to move it to.
        source_client: its engine; default ``docker.from_env()``.
        ready: a check (:mod:`dolly.ready`) the moved container must pass before the source is
            removed; without one, running is enough.
        compression: of the bundle on its way (``"none"`` is fastest between engines on one host).

    Raises:
        ContainerNotFound, ContainerNotRunning, HostNotReady: before anything is touched.
        NameConflict: the target engine already has a container of that name.
        InvalidArgument: the target is the source engine.
        MigrationFailed: a step failed (``.step``); the source is running again with its state.
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
    if source.name in target_engine.container_names():
        raise NameConflict(f"the target engine already has a container named {source.name!r}")

    steps: Dict[str, float] = {}
    step = "checkpoint"
    started = time.perf_counter()
    cp = checkpoint(source, _name(), leave_running=False, client=source_engine.client)
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
    for what, undo in (("source container", lambda: source_engine.remove(source.id)),
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


def _running(container: Container) -> bool:
    return container.status == "running"


def _name() -> str:
    return "migrate-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
