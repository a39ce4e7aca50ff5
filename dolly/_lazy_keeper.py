"""The keeper of a lazy clone's memory (``dolly.clone(..., lazy=True)``): run as a script, by
``dolly._criu.start_local_lazy_pages``, with the standard library alone (``python -I -S``: it
starts in milliseconds, not in the time importing Dolly takes), in a session of its own, so that
it outlives the call that started the clone.

    python -I -S _lazy_keeper.py <images folder> <log> <criu command...>

It runs CRIU's lazy-pages daemon on the clone's restore folder in the engine's spool, which
serves the pages from the checkpoint's own images there (no page server: criu/uffd.c reads the
local pagemap and pages images): first those the clone touches, then the rest in the
background. On its stdin it gets one line, ``<pid> <start time>`` of the clone's first process
once the clone has started (nothing: the start failed). Then:

- it holds a copy of every userfaultfd the daemon holds (pidfd_getfd). Without them, a daemon
  that dies closes the last copies, the kernel unregisters the clone's memory from
  userfaultfd, and the clone's next touch of a page not yet in gets a page of zeros, silently
  (fs/userfaultfd.c, userfaultfd_release). Held here, such a touch waits instead;
- when the daemon ends other than by success (every page in, exit status 0), it kills the
  clone (SIGKILL to the first process of its PID namespace: every process of the clone goes)
  before letting the copies go, and says so in the log: a clone is never left running on
  memory that did not arrive;
- in every case it removes the restore folder (the images' hard links), and, after success,
  the daemon's log.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import List, Optional

# Linux's pidfd_getfd; the same number on every architecture (the unified syscall table).
_SYS_PIDFD_GETFD = 438


def main(argv: List[str]) -> int:
    images, log, command = argv[1], argv[2], argv[3:]
    # The folder's identity: a later restore of the same container (a resume) makes its folder
    # anew under the same name, which must not go with this clone's.
    made = os.stat(images)
    daemon = subprocess.Popen([*command, "lazy-pages", "--images-dir", images, "--work-dir", images,
                               "--log-file", log, "-v1"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    held: List[int] = []
    succeeded = False
    try:
        line = sys.stdin.readline().split()
        if len(line) != 2:
            return 1  # the clone did not start: its caller removes it
        clone = _open_process(int(line[0]), int(line[1]))
        held = _take_uffds(daemon.pid)
        status = daemon.wait()
        succeeded = status == 0
        if not succeeded:
            # Before the copies go: a touch waiting on a page now never gets zeros.
            if clone is not None:
                try:
                    signal.pidfd_send_signal(clone, signal.SIGKILL)
                except ProcessLookupError:  # the clone was gone already (removed meanwhile)
                    pass
            _note(log, f"dolly: the lazy-pages daemon ended (status {status}) before every page of the "
                       f"clone had arrived: the clone (process {line[0]}) was killed")
        return 0 if succeeded else 1
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        for fd in held:
            os.close(fd)
        try:
            now = os.stat(images)
        except OSError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (made.st_dev, made.st_ino):
            shutil.rmtree(images, ignore_errors=True)
        if succeeded:
            try:
                os.unlink(log)
            except OSError:
                pass


def _open_process(pid: int, start: int) -> Optional[int]:
    """A pidfd of ``pid`` if it is still the process that started at ``start``, else None."""
    if pid <= 0:
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    if _start_time(pid) != start:  # checked after the open: the pidfd is of the process checked
        os.close(fd)
        return None
    return fd


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[19])


def _criu_pid(pid: int) -> int:
    """The daemon's own process: ``pid``, or its child when ``pid`` is nsenter's (in Dolly's agent,
    CRIU runs in the namespaces of the engine's dockerd)."""
    for _ in range(3):
        try:
            if os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "criu":
                return pid
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = f.read().split()
        except OSError:
            return pid
        if len(children) != 1:
            return pid
        pid = int(children[0])
    return pid


def _take_uffds(daemon_pid: int) -> List[int]:
    """Copies of the userfaultfds the daemon holds now (it got them during the restore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pid = _criu_pid(daemon_pid)
    taken: List[int] = []
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return taken
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[userfaultfd]":
                    continue
            except OSError:
                continue
            fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue
            # The number may have been reused between the look and the copy: keep a uffd only.
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]":
                os.set_inheritable(fd, False)
                taken.append(fd)
            else:
                os.close(fd)
    except OSError:
        pass
    finally:
        os.close(pidfd)
    return taken


def _note(log: str, text: str) -> None:
    try:
        with open(log, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv))
