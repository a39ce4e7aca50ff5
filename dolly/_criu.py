"""CRIU itself: the installed version and build, the command runc runs, lazy pages and the page
server's network namespace (post-copy), hostnames as CRIU takes them. Its image files are
dolly._images'."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Tuple

from .errors import HostNotReady, InvalidArgument

# pycriu 4.2 calls protobuf's deprecated FieldDescriptor.label() for every field it converts.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"pycriu\.")

MIN_VERSION = (4, 2)
# Linux's __NEW_UTS_LEN; a longer nodename cannot be restored.
HOSTNAME_MAX = 64
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\Z")


def version() -> Optional[Tuple[int, ...]]:
    """The version of the ``criu`` on PATH, or None when there is none."""
    m = re.search(r"^Version:\s*([\d.]+)", _version_text(), re.M)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def build() -> Optional[str]:
    """The build of the ``criu`` on PATH as ``criu --version`` names it (``GitID: ...``): for
    the one ``make host`` builds, ``dolly-<hash of scripts/criu-patches>``; None when unnamed."""
    m = re.search(r"^GitID:\s*(\S+)", _version_text(), re.M)
    return m.group(1) if m else None


def _version_text() -> str:
    # The one on PATH is the one runc will run. Asked once per binary (a `make host` that
    # rebuilds it gives it a new inode), and once per process inside the agent, whose workers
    # each run one operation.
    command = criu_command()
    if command is None:
        return ""
    key = tuple(command)
    with contextlib.suppress(OSError):
        found = os.stat(command[0])
        key += (found.st_ino, found.st_mtime_ns)
    if key not in _versions:
        try:
            _versions[key] = subprocess.run([*command, "--version"], capture_output=True, text=True,
                                            timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return _versions[key]


_versions: dict = {}


def preload() -> None:
    """What a restore will need, loaded ahead (by a warm agent worker): CRIU's version, pycriu."""
    version()
    with contextlib.suppress(ImportError):
        import pycriu.images  # noqa: F401


def criu_command() -> Optional[list]:
    """How to run the ``criu`` that runc will run: the one on PATH; inside Dolly's agent (a
    container on the engine's host), the host's, in the namespaces of the engine's dockerd."""
    if os.environ.get("DOLLY_AGENT") == "1":
        from ._peer import peer_pid  # the engine's dockerd: runc runs CRIU in its mount namespace

        try:
            return ["nsenter", "--target", str(peer_pid("/var/run/docker.sock")), "--all", "--",
                    "env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "criu"]
        except OSError:
            return None
    exe = shutil.which("criu")
    return [exe] if exe else None


# CRIU's lazy-pages daemon listens on this socket in its work folder; a restore with
# --lazy-pages finds it there by this relative name (criu/uffd.c).
LAZY_PAGES_SOCKET = "lazy-pages.socket"

# Post-copy's two connections are reachable by Dolly alone (issue 22: on 127.0.0.1, the first
# local user to connect could read the memory, or send the close record and have the source's
# processes killed with their memory nowhere else):
#  - the lazy dump's page server listens on 127.0.0.1 of a network namespace of its own, made by
#    scripts/dolly-runc for that one dump with only loopback in it; dolly-runc records, in a
#    root-only file of the spool, the process whose namespace it is. Entering it takes
#    CAP_SYS_ADMIN (setns);
#  - the lazy-pages daemon connects to nothing: it is handed a connected socket (--ps-socket,
#    which criu/page-xfer.c's connect_to_page_server() reuses as is), the other end of which is
#    the relay's, reached through a unix socket in the target engine's root-only spool, whose
#    peers are checked (SO_PEERCRED).
#: The page server's port, inside the dump's own network namespace, where nothing else listens.
PAGE_SERVER_PORT = 7000


def lazy_netns_record(spool: Path, container_id: str) -> Path:
    """Where scripts/dolly-runc records the network namespace of a container's lazy dump: the
    line ``<pid> <start time>`` of a process in it (runc's, which lives until the dump ends)."""
    return spool / f"{container_id}.lazy-netns"


def relay_socket(spool: Path, number: int) -> Path:
    """The relay's unix socket numbered ``number`` in an engine's spool (root-only, 0700)."""
    return spool / f"pages-{number:016x}.sock"


def open_lazy_netns(record: Path) -> int:
    """A file descriptor of the network namespace a lazy dump's page server listens in, as
    ``record`` (:func:`lazy_netns_record`) names it. The caller closes it.

    Raises:
        OSError: no such record, or its process is gone (the dump ended).
    """
    text = record.read_text()
    try:
        pid, start = (int(x) for x in text.split())
    except ValueError:
        raise OSError(f"{record} names no process: {text[:80]!r}") from None
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Checked after the open: if the process still has its start time now, the namespace
        # opened is its own, not that of a process that got its pid after it ended.
        if _start_time(pid) != start:
            raise OSError(f"the process of {record} ({pid}) is gone")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (after the command name, which may hold spaces)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[19])


def connect_in_netns(netns_fd: int, port: int, *, timeout: float = 30.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` in the network namespace ``netns_fd``, ending with
    a reset when closed (:func:`reset_on_close`). The connection is made by a thread of its own
    that enters the namespace (setns moves only the calling thread; the socket keeps the
    namespace it was made in), so that no thread of the caller's leaves its namespace.

    Raises:
        OSError: it cannot enter the namespace, or nothing listens there.
    """
    import threading

    made: list = []

    def connect() -> None:
        try:
            _setns(netns_fd, _CLONE_NEWNET)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                reset_on_close(sock)  # before anything can end it: never a clean end by accident
                sock.settimeout(timeout)
                sock.connect(("127.0.0.1", port))
                sock.settimeout(None)
            except BaseException:
                sock.close()
                raise
            made.append(sock)
        except BaseException as e:
            made.append(e)

    thread = threading.Thread(target=connect, name="dolly-page-server-connect", daemon=True)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


_CLONE_NEWNET = 0x40000000


def _setns(fd: int, nstype: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12
    if setns is not None:
        setns(fd, nstype)
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def peer_uid(sock: socket.socket) -> int:
    """The user ID of the process at the other end of a unix socket (SO_PEERCRED), as the
    kernel recorded it at connect (or socketpair): not something the peer can claim."""
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                           struct.calcsize("3i")))
    return uid


def start_lazy_pages(images: Path, *, relay: int, log: Path, timeout: float = 10.0) -> subprocess.Popen:
    """Start CRIU's lazy-pages daemon for a post-copy restore from ``images`` (a folder of the
    engine's spool): it takes the restored processes' userfaultfds and fills their memory from
    the relay numbered ``relay`` (:func:`relay_socket` in the same spool, which Dolly listens on
    for this migration), first the pages they touch, then the rest; it ends by itself once every
    page is in, or when the relay goes. The daemon is handed the connection itself (--ps-socket):
    it opens none, so nothing else can take its place. Returns once its own socket is there
    (scripts/dolly-runc then restores with --lazy-pages). Its errors go to ``log``.

    Raises:
        HostNotReady: CRIU is missing, the relay's socket cannot be reached or is not root's, or
            the daemon ended or made no socket within ``timeout`` (its log's errors in the message).
    """
    command = criu_command()
    if command is None:
        raise HostNotReady("CRIU is not installed (run `make host`)")
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = relay_socket(images.parent, relay)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(timeout)
        conn.connect(str(path))
        conn.settimeout(None)
        if peer_uid(conn) != 0:  # a socket put there by anyone but root is no relay of Dolly's
            raise HostNotReady(f"the post-copy relay's socket {path} is not root's")
    except OSError as e:
        conn.close()
        raise HostNotReady(f"the post-copy relay's socket {path} cannot be reached: {e}") from e
    except BaseException:
        conn.close()
        raise
    fd = conn.fileno()
    try:
        # With --ps-socket CRIU uses the fd handed as is (no address, no TLS) and ends with
        # PS_IOV_FORCE_CLOSE, which the relay treats as the close record. A unix socket: CRIU
        # logs a warning that it cannot set TCP_CORK/TCP_NODELAY on it, once per request
        # (about 140 lines for 64 MB), harmless.
        daemon = subprocess.Popen([*command, "lazy-pages", "--page-server", "--ps-socket", str(fd),
                                   "--images-dir", str(images), "--work-dir", str(images),
                                   "--log-file", str(log), "-v2"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True, pass_fds=(fd,))
    finally:
        conn.close()  # the daemon's copy is the connection's only end here: its end is the relay's EOF
    deadline = time.monotonic() + timeout
    while not (images / LAZY_PAGES_SOCKET).is_socket():
        if daemon.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                os.killpg(daemon.pid, signal.SIGKILL)  # nsenter forks the daemon: its session goes
            daemon.wait()
            text = log.read_text(errors="replace") if log.is_file() else "(no log)"
            raise HostNotReady(f"CRIU's lazy-pages daemon did not start: {text[-1500:]}")
        time.sleep(0.005)
    return daemon


def start_local_lazy_pages(images: Path, *, log: Path, record: Optional[Tuple[Path, str]] = None,
                           timeout: float = 10.0) -> subprocess.Popen:
    """Start CRIU's lazy-pages daemon for a lazy clone restored from ``images`` (its restore folder
    in the engine's spool), serving the pages from the images there, through its keeper
    (dolly/_lazy_keeper.py, which says what it guarantees): it ends once every page is in, and
    then removes ``images``. Returns the keeper once the daemon's socket is there (then
    scripts/dolly-runc restores with --lazy-pages); the caller then hands it the clone's process
    (:func:`keep_lazy_pages`) or stops it (:func:`stop_lazy_pages`). Its errors go to ``log``.
    With ``record`` (a file and the binding of the images, see dolly._working_set), the keeper
    also writes the clone's working set there once every page is in.

    Raises:
        HostNotReady: CRIU is missing, or the daemon ended or made no socket within ``timeout``
            (its log's errors in the message).
    """
    command = criu_command()
    if command is None:
        raise HostNotReady("CRIU is not installed (run `make host`)")
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    recording = ["--record", str(record[0]), record[1]] if record is not None else []
    keeper = subprocess.Popen([sys.executable, "-I", "-S", str(Path(__file__).with_name("_lazy_keeper.py")),
                               *recording, str(images), str(log), *command],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + timeout
    while not (images / LAZY_PAGES_SOCKET).is_socket():
        if keeper.poll() is not None or time.monotonic() > deadline:
            stop_lazy_pages(keeper)
            text = log.read_text(errors="replace") if log.is_file() else "(no log)"
            raise HostNotReady(f"CRIU's lazy-pages daemon did not start: {text[-1500:]}")
        time.sleep(0.002)
    return keeper


def keep_lazy_pages(keeper: subprocess.Popen, pid: int) -> None:
    """Hand a lazy clone's first process (``pid``, in this host's PID namespace) to its keeper,
    which then runs on by itself: it kills that clone if the daemon ends before every page is in.

    Raises:
        OSError: the keeper is gone (the daemon with it: the clone cannot have its memory).
    """
    if keeper.stdin is None:
        raise OSError("the lazy-pages keeper has no stdin")
    try:
        keeper.stdin.write(f"{pid} {_start_time(pid)}\n".encode())
    finally:
        keeper.stdin.close()


def stop_lazy_pages(keeper: subprocess.Popen) -> None:
    """End a lazy clone's keeper and its daemon at once (the clone did not start)."""
    with contextlib.suppress(OSError):
        os.killpg(keeper.pid, signal.SIGKILL)  # the keeper's session: the daemon, nsenter's fork too
    keeper.wait()
    if keeper.stdin is not None:
        with contextlib.suppress(OSError):
            keeper.stdin.close()


def break_off_page_server(netns_record: Path, port: int = PAGE_SERVER_PORT) -> None:
    """Break off a lazy dump's page server on 127.0.0.1:``port`` in the dump's own network
    namespace (``netns_record``, :func:`lazy_netns_record`): a connection reset before the
    transfer's end, which CRIU takes as a failed transfer, so that it lets the dumped processes
    run on, with their memory. A clean end of the connection would not do: CRIU takes that as
    the end of a transfer and kills them."""
    with contextlib.suppress(OSError):
        fd = open_lazy_netns(netns_record)
        try:
            connect_in_netns(fd, port, timeout=5).close()
        finally:
            os.close(fd)


def reset_on_close(sock: socket.socket) -> None:
    """Have ``sock`` end with a reset, not a clean end, when closed (SO_LINGER of 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def require_version() -> Tuple[int, ...]:
    """Raises:
        HostNotReady: CRIU is missing or older than 4.2.
    """
    v = version()
    if v is None:
        raise HostNotReady("CRIU is not installed: run `make host` (builds CRIU 4.2.1)")
    if v[:2] < MIN_VERSION:
        raise HostNotReady(
            f"CRIU {'.'.join(map(str, v))} is too old: 4.2 or newer is needed on this kernel "
            "(3.17 fails on the vDSO, 4.1 on inet sockets); run `make host`"
        )
    return v


def check_hostname(hostname: str) -> str:
    """Raises:
        InvalidArgument: not a hostname the kernel and DNS accept.
    """
    if not isinstance(hostname, str) or len(hostname) > HOSTNAME_MAX or not _HOSTNAME_RE.match(hostname):
        raise InvalidArgument(f"not a valid hostname: {hostname!r}")
    return hostname

