"""Established TCP connections, which CRIU dumps only when asked (``dolly.checkpoint(...,
tcp_established=True)``): how many a container holds, and Dolly's words for CRIU's refusal of a
container that holds some.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from docker.models.containers import Container

from . import _criu_log as criu_log
from ._engine import RUNTIME
from .errors import CheckpointFailed

__all__ = ["refusal", "connected_sockets", "open_in"]


def refusal(error: CheckpointFailed, container_name: str, connections: Optional[int], *,
                runtime: Optional[str] = None) -> Optional[CheckpointFailed]:
    """Dolly's words for CRIU's refusal of a container holding established TCP connections,
    ``connections`` of them open now (None: not known), with CRIU's own lines after; None when
    ``error`` is another failure. ``runtime``: the container's when it is not Dolly's, which
    alone can ask CRIU for them (Docker's API cannot); Docker deletes CRIU's log of such a
    dump, so connections open after it failed stand for CRIU's line. CRIU refuses while it
    collects what to dump, before anything is written: the container runs on, whatever
    ``leave_running`` said."""
    lines = list(error.log_lines or ())
    if not criu_log.refuses_tcp_connections([str(error), *lines]) and not (runtime is not None and connections):
        return None
    count = f" ({connections})" if connections else ""
    untouched = "Nothing was dumped: the container is untouched and keeps running."
    if runtime is not None:
        fix = (f"Only Dolly's runtime can dump them, and the container runs under {runtime!r}: create it "
               f"with --runtime {RUNTIME} and pass tcp_established=True (CLI: --tcp-established), or "
               "checkpoint it once its clients have disconnected.")
    else:
        fix = ("Pass tcp_established=True (CLI: --tcp-established): the dump then carries them and the "
               "container keeps serving them, while clones and restores start with them closed (a clone "
               "has an address of its own, and the clients stay with the source).")
    return CheckpointFailed(
        f"container {container_name} was not checkpointed: it has established TCP connections{count}, "
        f"which a checkpoint carries only when asked. {fix} {untouched}",
        log_lines=lines, log_path=error.log_path)


# The TCP states in which CRIU calls a socket connected (criu/sk-inet.c, can_dump_inet_sk),
# as /proc/net/tcp writes them: ESTABLISHED, SYN_SENT, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT,
# LAST_ACK, CLOSING.
_CONNECTED_STATES = {"01", "02", "04", "05", "08", "09", "0B"}


def connected_sockets(proc_net_tcp: str) -> int:
    """How many sockets of a ``/proc/<pid>/net/tcp`` (or ``tcp6``) text a process holds in a
    state CRIU calls connected. A TIME_WAIT or half-open entry (inode 0) is the kernel's alone:
    no process holds it, and CRIU never sees it."""
    n = 0
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[3] in _CONNECTED_STATES and fields[9] != "0":
            n += 1
    return n


def open_in(source: Container) -> Optional[int]:
    """The connected TCP sockets of ``source``'s network namespace now (None: not readable)."""
    pid = source.attrs["State"].get("Pid")
    if not pid:
        return None
    try:
        return sum(connected_sockets(Path(f"/proc/{pid}/net/{table}").read_text())
                   for table in ("tcp", "tcp6"))
    except OSError:
        return None
