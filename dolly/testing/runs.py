"""A run's state folder on this machine, its owner, and the reaper of runs whose owner is dead.

Each run has a state folder on this machine, ``STATE_ROOT/<run-id>/`` (0700, root's own), naming
its owner process and recording the full ID of every container the run creates (the warm source,
each clone), appended as the engine creates it, before it starts. Containers are also labelled
with the run's ID and owner, but labels are data anyone can set or copy: ``docker commit`` of a
clone hands them to every container started from the image. So the reaper removes only recorded
containers whose labels still name the run, and deletes only the checkpoints of recorded IDs; a
container that merely carries a run's labels is never touched. A run with no state folder here
(another machine's, sharing the engine) is never reaped. A container whose create the engine
carried out but never answered before the run was killed is not recorded, so it is left behind
(labelled, for ``docker ps --filter label=dolly.pytest.run``), never guessed at.

The owner is named so that it is unique across machines and PID namespaces: the kernel's boot ID,
the inode of the owner's PID namespace, its pid and its start time. A run is reaped only when its
owner is provably dead: same boot, same PID namespace as the reaper, and that pid with that start
time gone. Runs of other machines, of containers and of other PID namespaces sharing the engine,
and runs with a recorded container whose owner label is missing or unreadable, are never touched.
Clones made from the plugin's checkpoints by anyone else (``dolly.restore``) do not inherit the
run's labels and are not recorded, so they are never reaped either.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set

import docker

from .._catalog import get_checkpoint, remove_checkpoint
from .._engine import Engine
from .._hosts import host_of
from .._names import CHECKPOINT_NAME
from ..errors import CheckpointNotFound, ContainerNotFound, DollyError

RUN_LABEL = "dolly.pytest.run"
OWNER_LABEL = "dolly.pytest.owner"
STATE_ROOT = Path("/run/dolly/pytest")
# In a run's state folder: the owner's name, and the full IDs of the containers the run created,
# one a line, appended as each is created.
OWNER_FILE = "owner"
CONTAINERS_FILE = "containers"
# And the checkpoints the run pulled from a cache, ``<container-id>/<name>`` a line: the pulled
# source's folder in the store may hold checkpoints the run did not make (another run's pull of
# the same tag, the user's own), and only the pulled one is the run's to remove.
CHECKPOINTS_FILE = "checkpoints"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
_CONTAINER_ID_RE = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class Owner:
    """The process that owns a run, named so that no other process anywhere has the same name.

    ``boot_id``: the kernel's random boot ID (another machine, or this one rebooted, differs);
    ``pid_ns``: the inode of the process's PID namespace (containers and ``unshare --pid`` differ);
    ``pid`` in that namespace, and ``start``: its start time in clock ticks since boot, since a
    pid alone is reused. As a label: ``<boot_id>:<pid_ns>:<pid>:<start>``.
    """

    boot_id: str
    pid_ns: int
    pid: int
    start: int

    def __str__(self) -> str:
        return f"{self.boot_id}:{self.pid_ns}:{self.pid}:{self.start}"

    @classmethod
    def current(cls) -> Owner:
        """This process.

        Raises:
            OSError: /proc is not readable.
        """
        return cls.of(os.getpid())

    @classmethod
    def of(cls, pid: int) -> Owner:
        """The process ``pid`` as this process numbers it (in this process's PID namespace).

        Raises:
            OSError: no such process, or /proc is not this PID namespace's.
        """
        if os.readlink("/proc/self") != str(os.getpid()):
            raise OSError("/proc belongs to another PID namespace than this process")
        start = _start_time(Path(f"/proc/{pid}/stat"))
        if start is None:
            raise OSError(f"process {pid} has exited")
        return cls(_boot_id(), os.stat("/proc/self/ns/pid").st_ino, pid, start)

    @classmethod
    def parse(cls, text: Optional[str]) -> Optional[Owner]:
        """The owner a label names, or None for a missing or malformed one (never reaped)."""
        parts = (text or "").strip().split(":")
        if len(parts) != 4 or not parts[0] or not all(p.isdigit() for p in parts[1:]):
            return None
        return cls(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _start_time(stat_file: Path) -> Optional[int]:
    """The start time in a ``/proc/<pid>/stat``; None for a zombie, which never runs again.

    Raises:
        OSError: it cannot be read (FileNotFoundError: no such process).
    """
    stat = stat_file.read_text()
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def provably_dead(owner_text: Optional[str]) -> bool:
    """Whether the owner a label names is certainly gone: it ran on this boot of this machine, in
    this process's PID namespace (whose /proc this is), and its pid is gone or belongs to a process
    that started at another time. Anything else (a missing or malformed owner, another machine,
    another PID namespace, a /proc that cannot be read) is not proof: False."""
    owner = Owner.parse(owner_text)
    if owner is None:
        return False
    try:
        if owner.boot_id != _boot_id() or owner.pid_ns != os.stat("/proc/self/ns/pid").st_ino:
            return False
        if os.readlink("/proc/self") != str(os.getpid()):
            return False  # this /proc belongs to another PID namespace: its pids are not ours
    except OSError:
        return False
    try:
        start = _start_time(Path(f"/proc/{owner.pid}/stat"))
    except FileNotFoundError:
        return True  # no such pid
    except (OSError, ValueError, IndexError):
        return False
    return start != owner.start


# --- a run's state folder ----------------------------------------------------------------------------
#
# STATE_ROOT/<run-id>/ (0700) holds ``owner`` and ``containers`` (0600). Labels are data anyone can
# set (``docker commit`` of a clone hands them to every container started from the image): only
# these files, which only this user can write, say which containers are a run's.


def open_run_state(run_id: str, owner: str) -> Path:
    """Make the run's state folder (0700) and its owner file (0600), unless made already (xdist
    workers share the controller's run ID and folder); returns the folder.

    Raises:
        OSError: they cannot be made, or the folder is not this user's own.
    """
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"not a run ID: {run_id!r}")
    STATE_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = STATE_ROOT / run_id
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    if not _private(folder, stat.S_ISDIR):
        raise PermissionError(f"{folder} is not a folder of this user's own that only it can write")
    try:
        fd = os.open(folder / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return folder
    try:
        _write_all(fd, owner.encode())
    finally:
        os.close(fd)
    return folder


def record_container(state_dir: Path, container_id: str) -> None:
    """Append a container's full ID to the run's record (``containers``, 0600). Safe from many
    processes at once: one ``write`` of the whole line with O_APPEND, under an exclusive lock.

    Raises:
        ValueError: not a full container ID.
        OSError: it cannot be written (FileNotFoundError: the state folder is not made yet).
    """
    if not _CONTAINER_ID_RE.match(container_id):
        raise ValueError(f"not a full container ID: {container_id!r}")
    _append_line(state_dir / CONTAINERS_FILE, container_id)


def record_checkpoint(state_dir: Path, container_id: str, name: str) -> None:
    """Append a checkpoint the run pulled (``<container-id>/<name>``) to the run's record
    (``checkpoints``, 0600), as :func:`record_container` does.

    Raises:
        ValueError: not a full container ID or not a checkpoint name.
        OSError: it cannot be written.
    """
    if not _CONTAINER_ID_RE.match(container_id) or not CHECKPOINT_NAME.match(name):
        raise ValueError(f"not a checkpoint of Dolly's store: {container_id!r}/{name!r}")
    _append_line(state_dir / CHECKPOINTS_FILE, f"{container_id}/{name}")


def _append_line(path: Path, line: str) -> None:
    """Append ``line`` to a run's record at ``path`` (0600, never through a symlink), under an
    exclusive lock, so that concurrent workers' lines never interleave.

    Raises:
        OSError: it cannot be written.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _write_all(fd, f"{line}\n".encode())
    finally:
        os.close(fd)  # releases the lock


def recorded_checkpoints(state_dir: Path) -> Set[tuple[str, str]]:
    """The checkpoints (container ID, name) recorded in a run's state folder; trusted as
    :func:`recorded_containers` says."""
    text = _read_private(state_dir, CHECKPOINTS_FILE)
    if text is None:
        return set()
    found = set()
    for line in text.split("\n")[:-1]:
        cid, _, name = line.partition("/")
        if _CONTAINER_ID_RE.match(cid) and CHECKPOINT_NAME.match(name):
            found.add((cid, name))
    return found


def recorded_containers(state_dir: Path) -> Set[str]:
    """The container IDs recorded in a run's state folder: none when the folder or the record
    is missing, or is not this user's own, only writable by it (then nothing in it is trusted).
    A line not ended yet (a write under way) does not count."""
    text = _read_private(state_dir, CONTAINERS_FILE)
    if text is None:
        return set()
    return {line for line in text.split("\n")[:-1] if _CONTAINER_ID_RE.match(line)}


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _private(path: Path, kind: Callable[[int], bool], st: Optional[os.stat_result] = None) -> bool:
    """Whether ``path`` (not followed if a link) is of ``kind``, owned by this user and writable
    by no one else."""
    try:
        st = st or os.lstat(path)
    except OSError:
        return False
    return kind(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _read_private(state_dir: Path, name: str) -> Optional[str]:
    """A file of a state folder, or None when it or its folder is missing, a link, or not private
    (see :func:`_private`)."""
    if not _private(state_dir, stat.S_ISDIR):
        return None
    try:
        fd = os.open(state_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _private(state_dir / name, stat.S_ISREG, os.fstat(fd)):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


# --- removing runs -----------------------------------------------------------------------------------


def remove_run(client: docker.DockerClient, run_id: str) -> None:
    """Remove the containers a run recorded in its state folder, the checkpoints Dolly keeps of
    them, and its state folder.

    Only recorded containers whose labels still name the run are removed (with their anonymous
    volumes: the plugin made them), and only the store folders of recorded IDs are deleted. A
    container that merely carries the run's labels (one started from an image committed from a
    clone, say) is never touched. A run without a state folder here has nothing to remove.
    """
    # The run ID may come from a folder name: it names a folder under STATE_ROOT only when it is a
    # plain name.
    if not _RUN_ID_RE.match(run_id):
        return
    folder = STATE_ROOT / run_id
    recorded = recorded_containers(folder)
    engine = Engine.of(client)
    keep: Set[str] = set()
    if recorded:
        # The low-level list: containers.list() inspects each container, and fails when another
        # user of the shared engine removes one meanwhile. Unfiltered, so that a recorded container
        # whose labels do not name the run is seen too (and kept, with its checkpoints).
        for row in client.api.containers(all=True):
            if row["Id"] not in recorded:
                continue
            if (row.get("Labels") or {}).get(RUN_LABEL) != run_id:
                keep.add(row["Id"])
                continue
            engine.remove(row["Id"])
    for cid in recorded - keep:
        # IDs are 64 hex digits (checked as read): a plain name under the store.
        host_of(engine).remove_all_of(cid)
    for cid, name in recorded_checkpoints(folder):
        _remove_pulled(engine, cid, name)
    if os.path.lexists(folder):
        shutil.rmtree(folder, ignore_errors=True)


def _remove_pulled(engine: Engine, container_id: str, name: str) -> None:
    """Remove one checkpoint a run pulled, and its shared layer image unless in use; only an
    imported one (never a checkpoint taken on this engine, whatever the record says)."""
    try:
        # Through the engine's agent where its files are not this process's (a run on another host).
        cp = get_checkpoint(container_id, name, client=engine.client)
    except DollyError:
        return  # gone already
    if cp.origin is None:
        return
    with contextlib.suppress(CheckpointNotFound):
        remove_checkpoint(cp, engine.client)


def reap_dead_runs(client: docker.DockerClient) -> List[str]:
    """Remove what runs whose owner is provably dead left behind; returns their run IDs.

    Runs are found by their state folders on this machine (a run without one, another machine's
    say, is never reaped), and a run's containers are only those it recorded there: labels alone,
    which anyone can set or copy, never make a container a run's. A run is reaped only when every
    owner that its state folder and its recorded containers name is provably dead (see
    :func:`provably_dead`): a recorded container without an owner label, or with one from another
    machine or PID namespace, keeps the whole run; so does a state folder without a readable owner
    file, or not private to this user.
    """
    if not STATE_ROOT.is_dir():
        return []
    runs: Dict[str, Set[str]] = {}
    owners: Dict[str, List[Optional[str]]] = {}
    for folder in STATE_ROOT.iterdir():
        if not _RUN_ID_RE.match(folder.name):
            continue
        owner = _read_private(folder, OWNER_FILE)
        if owner is None:
            continue
        runs[folder.name] = recorded_containers(folder)
        owners[folder.name] = [owner]
    if not runs:
        return []
    for row in client.api.containers(all=True, filters={"label": RUN_LABEL}):
        labels = row.get("Labels") or {}
        run_id = labels.get(RUN_LABEL)
        if run_id in runs and row["Id"] in runs[run_id]:
            owners[run_id].append(labels.get(OWNER_LABEL))
    dead = sorted(run_id for run_id, seen in owners.items() if all(provably_dead(o) for o in seen))
    for run_id in dead:
        try:
            remove_run(client, run_id)
        except ContainerNotFound:
            pass
    return dead
