"""The keeper of a lazy clone's memory (``dolly.clone(..., lazy=True)``): run as a script, by
``dolly._criu.start_local_lazy_pages``, with the standard library alone (``python -I -S``: it
starts in milliseconds, not in the time importing Dolly takes), in a session of its own and in
the root cgroups (not its caller's), so that it outlives the call that started the clone, and
that call's cgroup being killed.

    python -I -S _lazy_keeper.py [--record <file> <binding>] <images folder> <log> <criu command...>

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

With ``--record`` (a checkpoint's first lazy clone, see dolly._working_set) it also records the
clone's working set: the daemon then logs at CRIU's debug level, where uffd.c writes a line for
every page fault (``<pid>-<uffd>: #PF at 0x<address>``) and pagemap.c one for every read of the
images (``pr<pid>-<n> Read <address> <pages> pages``), the background transfer's too. A fault's
read is the line right after it (the daemon is single-threaded and logs nothing between); a fault
followed by anything else was served otherwise (a page already on its way, or a zero page for an
address no image holds) and is not recorded. The address recorded is the read's, the one in the
images (a region the clone moved with mremap is read from where it was). After success, the first
MAX_PAGES pages faulted, in at most MAX_RANGES runs, go to ``<file>`` (JSON, root-only, written
beside it and renamed over it; nothing is written when its folder is gone: the checkpoint was
removed), with ``<binding>``, the digest of the images they were recorded from.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

# Linux's pidfd_getfd; the same number on every architecture (the unified syscall table).
_SYS_PIDFD_GETFD = 438

# What a working set holds at most: the pages a clone faulted in first (256 MiB), in runs of
# contiguous pages (each run splits a pagemap entry in up to three, and the daemon walks the
# pagemap from its start on every fault: more runs make every later fault slower).
MAX_PAGES = 65536
MAX_RANGES = 4096
WORKING_SET_FORMAT = 1
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# The daemon's log lines (CRIU 4.2's uffd.c and pagemap.c): "(00.221284) uffd: 1-8: #PF at
# 0x7f9cd4a79000" and "(00.221293) pr1-1 Read 7f9cd4a79000 1 pages" (timestamp, uffd.c's prefix).
_FAULT = re.compile(rb"^\([\d.]+\) (?:uffd: )?(\d+)-\d+: #PF at 0x([0-9a-f]+)$")
_READ = re.compile(rb"^\([\d.]+\) (?:uffd: )?pr(\d+)-\d+ Read ([0-9a-f]+) (\d+) pages$")


def _leave_callers_cgroups() -> None:
    """Move this process (and so the daemon it starts) into the root cgroup of every cgroup
    hierarchy mounted here: killing the cgroup of whoever started the clone (a CI job's, a login
    session's, an agent's being replaced) must not end the keeper and its daemon together while the
    clone still needs pages, for the clone would then run on with zeros where they were. Best
    effort: a hierarchy that refuses (read-only inside a container) is left as it is."""
    roots: Dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in ("cgroup", "cgroup2") and fields[3] == "/":
                # A v1 hierarchy is named by its super options (its controllers); mounted twice,
                # either mount point reaches it.
                hierarchy = fields[-1] if fstype == "cgroup" else fstype
                roots.setdefault(hierarchy, fields[4].replace("\\040", " "))
    for mountpoint in roots.values():
        try:
            with open(os.path.join(mountpoint, "cgroup.procs"), "w") as procs:
                procs.write("0")
        except OSError:
            pass


def main(argv: List[str]) -> int:
    _leave_callers_cgroups()
    record: Optional[Tuple[str, str]] = None
    if argv[1] == "--record":
        record = (argv[2], argv[3])
        argv = [argv[0], *argv[4:]]
    images, log, command = argv[1], argv[2], argv[3:]
    # The folder's identity: a later restore of the same container (a resume) makes its folder
    # anew under the same name, which must not go with this clone's.
    made = os.stat(images)
    daemon = subprocess.Popen([*command, "lazy-pages", "--images-dir", images, "--work-dir", images,
                               "--log-file", log, "-v4" if record else "-v1"],
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
        if succeeded and record is not None:
            _record_working_set(log, *record)
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


def faulted_pages(lines) -> Dict[int, List[int]]:
    """The pages (addresses in the images) that the daemon read because the clone faulted on
    them, per process (its ID in the images), in the order they were faulted in, each once,
    from the daemon's debug log ``lines`` (bytes, one line each); MAX_PAGES at most in all."""
    pages: Dict[int, Dict[int, None]] = {}
    count = 0
    fault: Optional[int] = None  # the process whose fault the previous line was
    for line in lines:
        line = line.rstrip(b"\n")
        m = _READ.match(line)
        if m is not None and fault is not None and int(m.group(1)) == fault and m.group(3) == b"1":
            seen = pages.setdefault(fault, {})
            address = int(m.group(2), 16)
            if address not in seen:
                seen[address] = None
                count += 1
                if count >= MAX_PAGES:
                    break
        m = _FAULT.match(line)
        fault = int(m.group(1)) if m is not None else None
    return {pid: list(seen) for pid, seen in pages.items()}


def runs(pages: Dict[int, List[int]]) -> Dict[int, List[List[int]]]:
    """``pages`` as runs of contiguous pages per process, ``[address, pages]`` in address order,
    MAX_RANGES in all at most: when there are more, the pages faulted last are left out."""
    def of(taken: Dict[int, List[int]]) -> Dict[int, List[List[int]]]:
        out: Dict[int, List[List[int]]] = {}
        for pid, addresses in taken.items():
            merged: List[List[int]] = []
            for a in sorted(addresses):
                if merged and merged[-1][0] + merged[-1][1] * PAGE_SIZE == a:
                    merged[-1][1] += 1
                else:
                    merged.append([a, 1])
            out[pid] = merged
        return out

    keep = 1.0
    while True:
        taken = {pid: addresses[:int(len(addresses) * keep)] for pid, addresses in pages.items()}
        found = of(taken)
        if sum(len(r) for r in found.values()) <= MAX_RANGES:
            return {pid: r for pid, r in found.items() if r}
        keep /= 2


def _record_working_set(log: str, path: str, binding: str) -> None:
    """Write the working set the daemon's log shows to ``path``; a failure only loses the record
    (the next lazy clone records again)."""
    try:
        with open(log, "rb") as f:
            pages = faulted_pages(f)
    except OSError:
        return
    text = json.dumps({"format": WORKING_SET_FORMAT, "binding": binding, "page_size": PAGE_SIZE,
                       "processes": {str(pid): r for pid, r in runs(pages).items()}})
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f".working-set-{os.getpid()}-{time.monotonic_ns()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:  # the checkpoint was removed meanwhile
        return
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _note(log: str, text: str) -> None:
    try:
        with open(log, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv))
