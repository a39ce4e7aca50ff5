"""The lazy (post-copy) dump: :func:`checkpoint_lazy` takes everything but a container's memory,
which CRIU's page server keeps serving while the dump goes on (:class:`PendingDump`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import types
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from docker.models.containers import Container

from . import _criu as criu, _images as criu_images
from ._checkpoint import METADATA, RUNTIME_ROOTFS_DIFF, Checkpoint
from ._dump import DEFAULT_MAX_LAYER_BYTES, RUNTIME_REQUEST, _claimed, _settle_images
from ._engine import RUNTIME, ContainerRef, Engine, id_of, name_of
from ._store import _write_private
from .errors import CheckpointFailed, ContainerNotRunning, DollyError, HostNotReady

__all__ = ["PendingDump", "checkpoint_lazy"]


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


def checkpoint_lazy(engine: Engine, container: ContainerRef, name: str, *, port: int,
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
                        created_at=created_at, hostname=criu_images.read_hostname(staging / "criu"),
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
