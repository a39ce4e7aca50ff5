"""CRIU: the installed version, and rewriting CRIU images (with pycriu) before a restore.

CRIU restores a container's UTS namespace from ``utsns-<id>.img``, so without a rewrite every clone
comes up with the kernel hostname of the container it was cloned from (``uname -n`` and
``/proc/sys/kernel/hostname``), even though Docker gives it its own ``/etc/hostname``.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

from .errors import HostNotReady, ImageRewriteError, InvalidArgument

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
        from ._engine import peer_pid  # the engine's dockerd: runc runs CRIU in its mount namespace

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


def uts_images(images_dir: Path) -> list[Path]:
    return sorted(Path(images_dir).glob("utsns-*.img"))


def read_hostname(images_dir: Path) -> str:
    """The kernel hostname recorded in a checkpoint's UTS namespace image.

    Raises:
        ImageRewriteError: no UTS image, or one pycriu cannot read.
    """
    images = uts_images(images_dir)
    if not images:
        raise ImageRewriteError(f"no utsns-*.img in {images_dir}")
    return hostname_in(images[0])


def hostname_in(image: Path) -> str:
    """The nodename in one UTS namespace image.

    Raises:
        ImageRewriteError: not a UTS image pycriu can read.
    """
    img = _load(image)
    try:
        nodename = img["entries"][0]["nodename"]
    except (KeyError, IndexError, TypeError) as e:
        raise ImageRewriteError(f"{image} is not a UTS namespace image ({type(e).__name__})") from e
    if img.get("magic") != "UTSNS" or not isinstance(nodename, str):
        raise ImageRewriteError(f"{image} is not a UTS namespace image")
    return nodename


def rewrite_hostname(src: Path, dst: Union[str, Path], hostname: str) -> None:
    """Write ``dst``, a copy of the UTS image ``src`` whose nodename is ``hostname``.

    A new file, never an edit in place: the other files of a clone's checkpoint folder are hard
    links into the shared checkpoint, and this one must not be.

    Raises:
        InvalidArgument: ``hostname`` is not a valid hostname.
        ImageRewriteError: ``src`` is not a UTS image pycriu can read, or ``dst`` cannot be written.
    """
    check_hostname(hostname)
    hostname_in(src)  # it is a UTS image
    img = _load(src)
    entries = img["entries"]
    if len(entries) != 1:
        raise ImageRewriteError(f"{src} is not a UTS namespace image")
    entries[0]["nodename"] = hostname
    _replace_image(img, Path(dst))


# CRIU's enum NETWORK_LOCK_METHOD (criu/include/cr_options.h), as the inventory records it.
NETWORK_LOCK_SKIP = 2


def without_network_lock(src: Path, dst: Union[str, Path]) -> None:
    """Write ``dst``, a copy of the inventory image ``src`` that has CRIU restore without its
    network lock.

    A restore takes its network-lock method from the dump's inventory, not from its own options:
    with iptables (CRIU's default) it locks the new network namespace with iptables-restore at
    the start and unlocks it with four more at the end, about 0.1 s of a restore here, each
    waiting on an nf_tables commit. The lock guards TCP connections restored mid-flight; a
    Docker checkpoint carries none (runc is not asked for --tcp-established), and the namespace
    is a new one that nothing reaches before the restore is done. A new file, as for the UTS image.

    Raises:
        ImageRewriteError: ``src`` is not an inventory image pycriu can read, or ``dst`` cannot
            be written.
    """
    img = _load(src)
    entries = img.get("entries")
    if img.get("magic") != "INVENTORY" or not isinstance(entries, list) or len(entries) != 1:
        raise ImageRewriteError(f"{src} is not a CRIU inventory image")
    entries[0]["network_lock_method"] = NETWORK_LOCK_SKIP
    _replace_image(img, Path(dst))


def processes(images_dir: Path) -> list[dict]:
    """What each task of a checkpoint will hold when restored: its capability sets (64-bit
    masks ``cap_prm``, ``cap_eff``, ``cap_bnd``, ``cap_inh``, ``cap_amb``) and seccomp mode, from
    its ``core-<tid>.img``, with ``name`` = ``comm (tid)``.

    Raises:
        ImageRewriteError: a core image pycriu cannot read, or one without credentials.
    """
    found = []
    for image in sorted(Path(images_dir).glob("core-*.img")):
        try:
            entry0 = _load(image)["entries"][0]
            if is_zombie(entry0):
                continue  # a zombie holds no credentials, and CRIU restores it as one: it never runs
            core = entry0["thread_core"]
            creds = core["creds"]
            entry: dict[str, object] = {key: _mask(creds.get(key))
                                        for key in ("cap_prm", "cap_eff", "cap_bnd", "cap_inh", "cap_amb")}
            entry["seccomp_mode"] = core.get("seccomp_mode", "disabled")
            entry["name"] = f"{core.get('comm', '?')} ({image.stem.removeprefix('core-')})"
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ImageRewriteError(f"{image} holds no task credentials ({type(e).__name__})") from e
        found.append(entry)
    return found


# CRIU's TASK_DEAD (criu/include/pid.h): a zombie, dumped without thread state. pycriu maps only
# some task states to names (and names 3, CRIU's TASK_STOPPED, "Zombie"): this one it leaves a number.
TASK_DEAD = 2


def is_zombie(core: dict) -> bool:
    """Whether a core image's entry is a zombie's: it has no thread state, credentials or
    seccomp filter of its own, and CRIU restores it as a zombie, never running."""
    return "thread_core" not in core and (core.get("tc") or {}).get("task_state") == TASK_DEAD


def mountpoints(images_dir: Path) -> set[str]:
    """Where the checkpoint's mount tree has mounts, from its ``mountpoints-*.img``.

    Raises:
        ImageRewriteError: a mount image pycriu cannot read.
    """
    points = set()
    for image in sorted(Path(images_dir).glob("mountpoints-*.img")):
        try:
            points |= {str(m["mountpoint"]) for m in _load(image)["entries"]}
        except (KeyError, TypeError) as e:
            raise ImageRewriteError(f"{image} is not a mount image ({type(e).__name__})") from e
    return points


def _mask(words: object) -> int:
    """CRIU keeps a capability set as 32-bit words, low first."""
    if words is None:
        return 0
    if not isinstance(words, list) or not all(isinstance(w, int) and 0 <= w < 1 << 32 for w in words):
        raise ValueError(f"not a capability set: {words!r:.60}")
    return sum(w << (32 * i) for i, w in enumerate(words))


# The largest CRIU image Dolly parses. pycriu holds an image as Python objects at about seven
# times its size: a crafted 74 MiB core image took 525 MiB of the importing root process before
# any policy decision. The images Dolly reads (cores, mounts, cgroups, seccomp filters, ids,
# inventory, UTS, files) are a few KiB to a few MiB for any real container; pages are never parsed.
MAX_IMAGE_BYTES = 16 << 20


def load_image(path: Path) -> dict:
    """A CRIU image as pycriu decodes it, read only if it is at most :data:`MAX_IMAGE_BYTES`.

    Raises:
        ImageRewriteError: too large, or not an image pycriu can read.
    """
    return _load(path)


def replace_image(img: dict, path: Path) -> None:
    """Write ``img`` over ``path`` as :func:`_replace_image` does (beside it, then renamed).

    Raises:
        ImageRewriteError: pycriu cannot write ``img``, or ``path`` cannot be replaced.
    """
    _replace_image(img, path)


def _load(path: Path) -> dict:
    try:
        import pycriu.images
    except ImportError as e:
        raise HostNotReady(f"pycriu is not importable ({e}): run `make host`") from e
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_IMAGE_BYTES:
                raise ImageRewriteError(f"CRIU image {path} is {size} bytes, more than the {MAX_IMAGE_BYTES} "
                                        "Dolly reads: no real container's is that large")
            return pycriu.images.load(f)
    except ImageRewriteError:
        raise
    except Exception as e:  # pycriu raises bare Exceptions, KeyErrors and protobuf DecodeErrors
        raise ImageRewriteError(f"cannot read CRIU image {path}: {type(e).__name__}: {e}") from e


# --- images for another engine (dolly._formats) ---------------------------------------------------


def root_task_ids(images_dir: Path) -> dict:
    """The namespace IDs of the checkpoint's first task (``ids-<pid>.img``).

    Raises:
        ImageRewriteError: no pstree or ids image pycriu can read.
    """
    try:
        root = int(_load(Path(images_dir) / "pstree.img")["entries"][0]["pid"])
        ids = dict(_load(Path(images_dir) / f"ids-{root}.img")["entries"][0])
        for key in ("mnt_ns_id", "net_ns_id"):
            ids[key] = int(ids[key])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ImageRewriteError(f"the checkpoint's first task has no readable ids ({type(e).__name__})") from e
    return ids


def external_netns_image(images_dir: Path, out: Path, *, key: str) -> Optional[str]:
    """Write ``out`` (named ``netns-<id>.img`` by the caller from the returned name) marking the
    first task's network namespace as external under ``key``: a restore then joins the namespace
    the runtime hands CRIU under that key (runc: ``extRootNetNS``, the spec's netns path) instead
    of making an empty one. Docker's checkpoints leave the namespace out (its engine makes a new
    one and sets it up in a hook); Podman names the one its network made. Returns the image's
    file name, or None when the checkpoint has its own network namespace image already.

    Raises:
        ImageRewriteError: images pycriu cannot read or write.
    """
    name = f"netns-{root_task_ids(images_dir)['net_ns_id']}.img"
    if (Path(images_dir) / name).exists():
        return None
    _dump({"magic": "NETNS", "entries": [{"ext_key": key}]}, out)
    return name


def root_mode_rewritten(images_dir: Path, out: Optional[Path], *, mode: int) -> int:
    """Write ``out`` (None: ``files.img`` itself), a copy of ``files.img`` whose entries for the
    container's root directory (``/``, a directory) have ``mode``'s permission bits: CRIU checks
    that a reopened directory has the mode it had, and engines give the same image's root
    different modes (Docker 0755, Podman 0555). Returns how many entries changed.

    Raises:
        ImageRewriteError: an image pycriu cannot read or write.
    """
    img = _load(Path(images_dir) / "files.img")
    changed = 0
    for entry in img["entries"]:
        reg = entry.get("reg") or {}
        if reg.get("name") == "/" and isinstance(reg.get("mode"), int) and reg["mode"] & 0o170000 == 0o040000:
            reg["mode"] = (reg["mode"] & ~0o7777) | mode
            changed += 1
    if out is None:
        _replace_image(img, Path(images_dir) / "files.img")
    else:
        _dump(img, out)
    return changed


def without_external_netns(images_dir: Path) -> bool:
    """Remove the first task's network namespace image when it only names an external namespace
    (Podman's and the kubelet's, joined by path): Docker's checkpoints have none, and a Docker
    container's namespace is made by runc and set up by the engine's hook. Returns whether one
    was removed.

    Raises:
        ImageRewriteError: images pycriu cannot read.
    """
    path = Path(images_dir) / f"netns-{root_task_ids(images_dir)['net_ns_id']}.img"
    if not path.exists():
        return False
    entries = _load(path)["entries"]
    if not (len(entries) == 1 and entries[0].get("ext_key")):
        return False
    path.unlink()
    return True


TMPFS = 5  # CRIU's fstype of a tmpfs (images/mnt.proto)


def external_tmpfs_inlined(images_dir: Path, key: str) -> Optional[Path]:
    """Rewrite the first task's ``mountpoints-<id>.img`` in place so that the external tmpfs
    mount under ``key`` (Podman's ``/dev/shm``, a bind of a tmpfs the engine made) is the
    container's own tmpfs, as Docker makes it. Returns where CRIU will look for its files (a
    gzipped tar, ``tmpfs-dev-<device>.tar.gz.img``, for the caller to write), or None when
    there is no such mount.

    Raises:
        ImageRewriteError: images pycriu cannot read or write.
    """
    path = Path(images_dir) / f"mountpoints-{root_task_ids(images_dir)['mnt_ns_id']}.img"
    img = _load(path)
    found = [e for e in img["entries"] if e.get("ext_key") == key and e.get("fstype") == TMPFS]
    if len(found) != 1 or found[0].get("root") != "/" or not isinstance(found[0].get("root_dev"), int):
        return None
    del found[0]["ext_key"]
    _replace_image(img, path)
    return Path(images_dir) / f"tmpfs-dev-{found[0]['root_dev']}.tar.gz.img"


def mount_types(images_dir: Path) -> list:
    """``(mountpoint, fstype, external)`` of every mount in the checkpoint's mount images.

    Raises:
        ImageRewriteError: a mount image pycriu cannot read.
    """
    found = []
    for image in sorted(Path(images_dir).glob("mountpoints-*.img")):
        try:
            found += [(str(m["mountpoint"]), int(m.get("fstype", 0)), bool(m.get("ext_key")))
                      for m in _load(image)["entries"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ImageRewriteError(f"{image} is not a mount image ({type(e).__name__})") from e
    return found


def without_mounts(images_dir: Path, *, keep) -> list:
    """Rewrite the first task's ``mountpoints-<id>.img`` in place without the external (bind)
    mounts whose key ``keep(key)`` refuses, and the mounts below them: what the engine of the
    restore will not hand CRIU (runc maps only its spec's mounts). A restore that finds a file
    open on a dropped mount fails. Returns the dropped mounts' paths.

    Raises:
        ImageRewriteError: images pycriu cannot read or write.
    """
    path = Path(images_dir) / f"mountpoints-{root_task_ids(images_dir)['mnt_ns_id']}.img"
    img = _load(path)
    dropped = {e["mnt_id"] for e in img["entries"] if e.get("ext_key") and not keep(e["ext_key"])}
    while True:
        below = {e["mnt_id"] for e in img["entries"] if e.get("parent_mnt_id") in dropped} - dropped
        if not below:
            break
        dropped |= below
    if not dropped:
        return []
    paths = [e["mountpoint"] for e in img["entries"] if e["mnt_id"] in dropped]
    img["entries"] = [e for e in img["entries"] if e["mnt_id"] not in dropped]
    _replace_image(img, path)
    return paths


def _replace_image(img: dict, path: Path) -> None:
    """Write ``img`` to ``path``, whether an image is there or not: beside it, then renamed over
    it, so that a hard link at ``path`` (into a shared checkpoint) is replaced, never written
    through, and a reader sees the old file or the new one.

    Raises:
        ImageRewriteError: pycriu cannot write ``img``, or ``path`` cannot be replaced.
    """
    new = path.with_name(path.name + ".new")
    new.unlink(missing_ok=True)
    try:
        _dump(img, new)
        os.replace(new, path)
    except OSError as e:
        raise ImageRewriteError(f"cannot write CRIU image {path}: {e}") from e
    finally:
        new.unlink(missing_ok=True)


def _dump(img: dict, out: Path) -> None:
    import pycriu.images

    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            pycriu.images.dump(img, f)
    except Exception as e:  # pycriu raises bare Exceptions
        raise ImageRewriteError(f"cannot write CRIU image {out}: {type(e).__name__}: {e}") from e
