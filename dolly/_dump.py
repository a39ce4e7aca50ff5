"""Taking a checkpoint: :func:`checkpoint` and its dump sequence (the container's checkpoint
lock, the runtime's request, the dump, the writable layer of a container under another runtime,
the images' settling into the store, the translation of the runtime's refusals, the keeping of
images after a late failure) and the reaping of the spool. The checkpoint folder's layout is in
dolly._checkpoint; the post-copy dump is dolly._lazy_dump's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import time
import types
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from docker.models.containers import Container
from filelock import FileLock

from . import (
    _connections as connections,
    _criu as criu,
    _images as criu_images,
    _retry as retry,
    _rootfs as rootfs,
)
from ._checkpoint import METADATA, ROOTFS_DIFF, RUNTIME_EXTRAS, RUNTIME_ROOTFS_DIFF, Checkpoint, User, folder_size
from ._engine import RUNTIME, ContainerRef, Engine, id_of, name_of
from ._store import _make_private_dir, _write_private
from .errors import (
    CheckpointExists,
    CheckpointFailed,
    ContainerNotFound,
    ContainerNotRunning,
    DollyError,
)

log = logging.getLogger("dolly")

__all__ = ["take", "DEFAULT_MAX_LAYER_BYTES"]


# The cap on a checkpoint's writable layer (its allocated bytes: sparse files count what they
# hold) unless the caller passes another; scripts/dolly-runc has the same default for a plain
# `docker checkpoint create`.
DEFAULT_MAX_LAYER_BYTES = 8 << 30
# What Dolly asks of its runtime for one checkpoint: a file in the spool folder, which the runtime
# reads and removes before it dumps (scripts/dolly-runc).
RUNTIME_REQUEST = "dolly-request"
# The runtime's shell compares in 64-bit arithmetic.
MAX_LAYER_LIMIT = 10**18 - 1


def take(engine: Engine, container: ContainerRef, name: str, *, leave_running: bool,
         max_layer_bytes: int, tcp_established: bool = False, made_by: Optional[User] = None) -> Checkpoint:
    """Checkpoint ``container`` of ``engine``, whose files this process sees, into its store (the
    steps :func:`dolly.checkpoint` documents; its arguments already checked).

    Raises:
        the errors of :func:`dolly.checkpoint`.
    """
    criu.require_version()
    engine.require_checkpoint_support()
    source = engine.container(container)
    if not source.attrs["State"].get("Running"):
        raise ContainerNotRunning(
            f"container {source.name} is {source.status}, not running: start it (docker start {source.name}) and "
            "checkpoint it then; one stopped by a checkpoint (leave_running=False) goes on from that checkpoint "
            f"with dolly.resume(dolly.get_checkpoint({source.name!r}, NAME))")
    with _claimed(engine, source, name) as (source, final):
        return _checkpoint_locked(engine, source, name, final, leave_running, max_layer_bytes, tcp_established,
                                  made_by)


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
    engine: Engine, source: Container, name: str, final: Path, leave_running: bool, max_layer_bytes: int,
    tcp_established: bool = False, made_by: Optional[User] = None,
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
                _collect_content_garbage(engine, id_of(source))
                staging.mkdir(mode=0o700)
                # A marker beside the container's lock: if this process dies while the container is
                # paused, the next checkpoint of it (under the same lock) resumes it.
                _write_private(_paused_marker(engine, id_of(source)), f"{os.getpid()}\n")
                engine.pause(id_of(source))
                paused = True
                _take_files_paused(engine, source, staging, max_layer_bytes)
            _dump(engine, source, docker_name, spool if own_runtime else None, leave_running, max_layer_bytes,
                  tcp_established)
        except CheckpointFailed as e:
            refused = _refusal(e, source, engine)
            if refused is None:
                runtime = None if own_runtime else str(source.attrs["HostConfig"].get("Runtime") or "runc")
                refused = connections.refusal(e, name_of(source), connections.open_in(source), runtime=runtime)
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
            hostname=criu_images.read_hostname(staging / "criu"),
            config=types.MappingProxyType(source.attrs),
            path=final,
            client=engine.client,
            tcp_established=tcp_established,
            made_by=made_by,
        )
        _write_private(staging / METADATA, json.dumps(cp._metadata()))
        try:
            os.rename(staging, final)
        except OSError as e:  # another caller took the same name meanwhile
            raise CheckpointExists(f"container {source.name} already has a checkpoint named {name!r}") from e
        return dataclasses.replace(cp, size=folder_size(final))
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
          max_layer_bytes: int, tcp_established: bool = False) -> None:
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
                    request = f"max_layer_bytes={max_layer_bytes}\n"
                    if tcp_established:
                        request += "tcp_established=1\n"
                    _write_private(spool / RUNTIME_REQUEST, request)
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


def _shim(engine: Engine, container_id: str) -> Optional[int]:
    """The pid of the container's runtime shim, or None when it cannot be found for certain. The
    shim is the parent of the container's first process (its pid as the engine says it now) and
    its working folder is the bundle, which is named after the container: anything else (a pid
    reused by another process, say) is not taken."""
    try:
        pid = int(engine.container(container_id).attrs["State"].get("Pid") or 0)
        if pid <= 0:
            return None
        with open(f"/proc/{pid}/stat") as f:
            shim = int(f.read().rsplit(")", 1)[1].split()[1])
        if os.path.basename(os.readlink(f"/proc/{shim}/cwd")) != container_id:
            return None
        return shim
    except (OSError, ValueError, IndexError, DollyError):
        return None


def _collect_content_garbage(engine: Engine, container_id: str) -> None:
    """Have the engine's containerd collect its garbage now, before a checkpoint of a container
    under another runtime (Dolly's runtime does the same itself: scripts/dolly-runc).

    containerd (before 2.0) stores each checkpoint's OCI spec as a blob of its content store and
    fails the checkpoint when it holds that blob already ("content sha256:...: already exists";
    containerd#8401). The blob is the container's spec, the same for every checkpoint of it, and
    the previous checkpoint's copy stays, unreferenced, until containerd's next collection: moments
    later on a containerd that has run for long, seconds later on one started lately. A lease's
    synchronous delete collects at once. containerd's address and namespace are on the command line
    of the container's shim; without them, or without ``ctr``, nothing is done."""
    shim = _shim(engine, container_id)
    ctr = shutil.which("ctr")
    if shim is None or ctr is None:
        return
    try:
        args = Path(f"/proc/{shim}/cmdline").read_bytes().decode().split("\0")
        leases = [ctr, "--address", args[args.index("-address") + 1], "-n", args[args.index("-namespace") + 1],
                  "leases"]
        made = subprocess.run([*leases, "create", "-x", "1m"], capture_output=True, text=True, check=True,
                              timeout=30)
        subprocess.run([*leases, "delete", "--sync", made.stdout.split()[0]], capture_output=True, check=True,
                       timeout=30)
    except (OSError, ValueError, IndexError, subprocess.SubprocessError) as e:
        log.debug("containerd's garbage was not collected before the checkpoint of %s: %s", container_id, e)


def _runtime_spec(engine: Engine, container_id: str, *, limit: int = 1 << 20) -> Optional[str]:
    """The OCI spec (config.json) in the bundle of the container's runtime shim (:func:`_shim`,
    with the container paused), or None when it cannot be found for certain. The file is opened
    without following a link or blocking, and must be a regular file of JSON under ``limit``
    bytes."""
    try:
        shim = _shim(engine, container_id)
        if shim is None:
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
    `docker start --checkpoint`, Podman from an export: see criu_images.without_network_lock), and
    make every file root-only. A ``rescue`` of images after a failure leaves the inventory as
    CRIU wrote it: nothing that might fail again may stand between the images and the keeping
    of them (a clone's own inventory skips the lock anyway)."""
    images = staging / "criu"
    if not rescue:
        criu_images.without_network_lock(images / "inventory.img", images / "inventory.img")
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
            hostname = criu_images.read_hostname(staging / "criu")
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
