"""Who is at the other end of an engine's unix socket (SO_PEERCRED), and whether that process sees
the engine's data root as the very folder this process does: how Dolly tells an engine whose files
are here from one on another host or in another mount namespace."""
from __future__ import annotations

import grp
import os
import socket
import stat
import struct
from typing import Optional

import docker


def socket_path_of(client: docker.DockerClient) -> Optional[str]:
    """The path of the unix socket ``client`` talks to its engine over; None over TCP or SSH."""
    return getattr(getattr(client.api, "_custom_adapter", None), "socket_path", None)


def peer_pid(socket_path: str) -> int:
    """The process at the other end of a unix socket (SO_PEERCRED): for an engine's socket,
    its dockerd.

    Raises:
        OSError: no such socket, or nobody answers on it.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(socket_path)
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(pid)


def peer_shares_our_files(socket_path: Optional[str], data_root: str) -> bool:
    """Whether ``data_root`` here is the very folder that the process at the other end of the
    socket (the engine's dockerd) calls ``data_root``: the same device and inode, looked up in
    its own mount namespace through ``/proc/<pid>/root``."""
    if not socket_path:
        return False
    try:
        pid = peer_pid(socket_path)
        ours, theirs = os.stat(data_root), os.stat(f"/proc/{pid}/root{data_root}")
    except OSError:
        return False
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)


def socket_refused(e: Exception) -> str:
    """What to say when the engine's unix socket refuses this user (EACCES on connect): which
    socket, whose, and what access it takes. Not retried: waiting does not change it."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    path = host.removeprefix("unix://")
    try:
        st = os.stat(path)
        group = grp.getgrgid(st.st_gid).gr_name
        whose = f" ({stat.filemode(st.st_mode)}, owner uid {st.st_uid}, group {group})"
    except (OSError, KeyError):
        whose = ""
    return (f"this user (uid {os.geteuid()}) may not use the Docker Engine's socket {path}{whose}: Dolly, like "
            "docker's own CLI, needs root or a user in the socket's group (the docker group): `usermod -aG docker "
            f"USER`, then log in again ({e})")
