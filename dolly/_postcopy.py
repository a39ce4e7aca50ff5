"""Post-copy migration: the process runs on the target while its memory follows.

A post-copy migration (``dolly.migrate(..., post_copy=True)``) dumps everything but the memory.
CRIU's page server keeps the memory on the source, whose processes stay frozen, and CRIU's
lazy-pages daemon on the target fills the restored processes' memory from it: first the pages
they touch (userfaultfd), then the rest. The downtime no longer grows with the memory.

Only Dolly reaches either (issue 22: a local user who connected first to a page server on the
host's 127.0.0.1 could read the memory, or send the close record and have the source killed with
its memory nowhere else). The page server listens on 127.0.0.1 of a network namespace made for
that one dump (scripts/dolly-runc), which only a process with CAP_SYS_ADMIN enters
(:func:`dolly._criu.connect_in_netns`). The daemon connects to nothing: it is handed its
connection (CRIU's --ps-socket, :func:`dolly._criu.start_lazy_pages`), taken from the relay's
unix socket in the target engine's root-only spool, whose peers must be root (SO_PEERCRED).
Dolly joins the two through the engines' APIs alone, as it moves everything else: through an
exec in each engine's agent (or this process, for an engine whose files are local) and a relay
in this process::

    page server  <->  SourceLink (source host)  <->  Relay (here)  <->  Listener (target host)  <->  daemon

The relay also makes the migration's commit point. CRIU's protocol ends with the daemon's
``PS_IOV_CLOSE`` record, after which the page server ends the dump and the source's processes
end. The relay holds that record back until the moved container has passed its check
(:meth:`Relay.commit`). Until then the migration can be rolled back: :meth:`Relay.abort` breaks
the connection to the page server off with a reset, which CRIU takes as a failed transfer, and
it lets the source's processes run on with their memory. A reset is also what the page server
gets when this process or an agent dies mid-way (SO_LINGER 0): the source then runs on rather
than being lost. Only a clean end after the close record ends the source.
"""
from __future__ import annotations

import contextlib
import os
import platform
import secrets
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, List, Optional, Protocol, Tuple

from . import _criu as criu
from ._checkpoint import Checkpoint
from ._engine import ContainerRef, Engine
from ._lazy_dump import PendingDump, checkpoint_lazy
from ._store import remove
from .errors import CheckpointFailed, DollyError, HostNotReady

__all__ = ["PageSource", "PageTarget", "Relay", "open_source", "open_target"]

# struct page_server_iov (criu/page-xfer.c): u32 cmd, then three u64 (x86_64 alignment). The
# lazy-pages daemon sends nothing else, and each one whole.
RECORD = 32
PS_IOV_GET, PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE = 7, 0x1023, 0x1024
_MAX_PAGES = 1 << 30  # 4 TiB: a request for more is no daemon's
_CMD_MASK = 0xFFFF
_CHUNK = 1 << 20


def check_record(record: bytes) -> None:
    """Raises ValueError unless ``record`` is what the lazy-pages daemon sends: a request for
    pages (``PS_IOV_GET``, at least one) or its close. Anything else could have the page server
    write files or read past its tasks."""
    cmd, nr_pages = struct.unpack_from("<I4xQ", record)
    if (cmd & _CMD_MASK) == PS_IOV_GET and 0 < nr_pages <= _MAX_PAGES:
        return
    if is_close(record):
        return
    raise ValueError(f"a record the lazy-pages daemon does not send (command {cmd:#x}, {nr_pages} pages)")


def is_close(record: bytes) -> bool:
    """Whether one of the daemon's records is its last (``PS_IOV_CLOSE``)."""
    (cmd,) = struct.unpack_from("<I", record)
    return (cmd & _CMD_MASK) in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE)


class Records:
    """Splits the daemon's byte stream into whole records."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> List[bytes]:
        self._buffer += data
        whole = len(self._buffer) // RECORD * RECORD
        out = [self._buffer[i:i + RECORD] for i in range(0, whole, RECORD)]
        self._buffer = self._buffer[whole:]
        return out


class End(Protocol):
    """One side of the relay: bytes each way."""

    def send(self, data: bytes) -> None: ...  # raises OSError, ValueError or a DollyError once it ended

    def recv(self) -> bytes: ...  # b"" once it ended

    def close(self) -> None: ...


# --- on an engine's host: this process for a local engine, else the agent there -------------------


class SourceLink:
    """The connection to a lazy dump's page server. It passes the daemon's records on; after the
    ``PS_IOV_CLOSE`` record it ends cleanly (CRIU then ends the dump, and the source's
    processes). Closed before that, it ends with a reset: the source runs on.

    ``sock`` is connected already, set to end with a reset (:func:`dolly._criu.connect_in_netns`
    makes it so in the dump's own network namespace)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        try:
            criu.reset_on_close(self._sock)  # never a clean end by accident
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # requests are small and wait
        except BaseException:
            self._sock.close()
            raise
        self._records = Records()
        self.closed = False  # the daemon's close record went through

    def send(self, data: bytes) -> None:
        """Raises:
            ValueError: a record that the lazy-pages daemon does not send (nothing is sent)."""
        batch = []
        for record in self._records.feed(data):
            if self.closed:
                break
            check_record(record)
            batch.append(record)
            self.closed = is_close(record)
        if batch:
            self._sock.sendall(b"".join(batch))
        if self.closed:
            # CRIU answers, then waits for the end of the connection before it ends the dump.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)

    def recv(self) -> bytes:
        try:
            return self._sock.recv(_CHUNK)
        except OSError:
            return b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.closed:  # a clean end; else the reset set up in __init__
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))
            else:
                # Wakes a thread blocked in recv() (the close itself would wait for it) and sends
                # nothing: the reset goes with the close.
                self._sock.shutdown(socket.SHUT_RD)
        with contextlib.suppress(OSError):
            self._sock.close()


class Listener:
    """Where the lazy-pages daemon's connection comes from: a unix socket in ``spool`` (an
    engine's spool, a directory only root may enter), numbered :attr:`number`
    (:func:`dolly._criu.relay_socket`). :func:`dolly._criu.start_lazy_pages` connects to it and
    hands the connection to the daemon. The first peer that is root is taken, once; any other
    is refused (SO_PEERCRED: the uid the kernel recorded, not a claim). The socket file goes
    as soon as the peer is taken, or with :meth:`close`.

    Raises:
        HostNotReady: ``spool`` is not a directory of root's that only root may enter (another
            user could then reach the socket).
    """

    def __init__(self, spool: Path) -> None:
        spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(spool)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            raise HostNotReady(f"{spool} must be a directory of root's that only root may enter "
                               f"(mode {stat.filemode(st.st_mode)}, owner {st.st_uid}): post-copy's relay "
                               "listens there")
        self.number = secrets.randbits(63)
        self.path = criu.relay_socket(spool, self.number)
        # No timeout: the migration closes it when it ends, whatever the restore took.
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._server.bind(str(self.path))
            os.chmod(self.path, 0o600)  # before listen(): until then every connect is refused
            self._server.listen(4)
        except BaseException:
            self._server.close()
            self.path.unlink(missing_ok=True)
            raise
        self._sock: Optional[socket.socket] = None
        self.refused = 0  # peers that were not root
        self._accepted = threading.Event()
        threading.Thread(target=self._accept, name="dolly-pages-accept", daemon=True).start()

    def _accept(self) -> None:
        try:
            while True:
                sock, _ = self._server.accept()
                if criu.peer_uid(sock) == 0:
                    self._sock = sock
                    break
                self.refused += 1
                sock.close()
            self._sock.settimeout(None)
        except OSError:
            self._sock = None
        finally:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self._server.close()
            self._accepted.set()

    def send(self, data: bytes) -> None:
        self._accepted.wait()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.sendall(data)

    def recv(self) -> bytes:
        self._accepted.wait()
        if self._sock is None:
            return b""
        try:
            return self._sock.recv(_CHUNK)
        except OSError:
            return b""

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # ends a pending accept
        with contextlib.suppress(OSError):
            self._server.close()
        self._accepted.wait(5)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._sock.close()


def pump(end: End, inp: IO[bytes], out: IO[bytes]) -> None:
    """Join ``end`` to an agent's stdin and stdout until ``end`` ends; the end of stdin (the
    caller closed it, or went) closes ``end`` (for a page server before the daemon's close
    record: a reset, and the source runs on)."""

    def up() -> None:
        try:
            while True:
                data = inp.read1(_CHUNK) if hasattr(inp, "read1") else inp.read(_CHUNK)
                if not data:
                    break
                end.send(data)
        except (OSError, ValueError):
            pass  # a refused record, a broken stream: ended as below
        end.close()

    threading.Thread(target=up, name="dolly-pages-up", daemon=True).start()
    while True:
        data = end.recv()
        if not data:
            break
        try:
            out.write(data)
            out.flush()
        except (OSError, ValueError):
            break
    end.close()


def dump_lazily(engine: Engine, container: ContainerRef, name: str) -> Tuple[Checkpoint, PendingDump, SourceLink]:
    """Dump ``container`` lazily on this host (:func:`dolly._lazy_dump.checkpoint_lazy`) and
    connect to its page server, in the dump's own network namespace.

    Raises:
        as checkpoint_lazy; OSError when the page server cannot be reached (the dump is then
        broken off, so the source runs on, and its memory-less checkpoint removed).
    """
    port = criu.PAGE_SERVER_PORT
    cp, pending = checkpoint_lazy(engine, container, name, port=port)
    record = criu.lazy_netns_record(pending.engine.spool_dir, pending.container_id)
    try:
        netns = criu.open_lazy_netns(record)
        try:
            return cp, pending, SourceLink(criu.connect_in_netns(netns, port))
        finally:
            os.close(netns)
    except OSError:
        criu.break_off_page_server(record, port)
        with contextlib.suppress(Exception):
            pending.wait(60)
        _remove_quietly(engine, cp)
        raise


def serve_source(engine: Engine, container: ContainerRef, name: str, *, inp: IO[bytes], out: IO[bytes],
                 control: Callable[[dict], None], checkpoint_json: Callable[[Checkpoint], dict]) -> None:
    """The agent's side of a post-copy source: dump lazily, say ``ready``, join the page server
    to stdin and stdout, and say how the dump ended (``ended``: True when the target took every
    page and the source ended; else the error's message, and the source runs on)."""
    cp, pending, link = dump_lazily(engine, container, name)
    control({"ready": checkpoint_json(cp), "frozen_s": time.perf_counter() - pending.started_at})
    pump(link, inp, out)
    try:
        pending.wait(60)
        control({"ended": True})
    except (CheckpointFailed, TimeoutError) as e:
        control({"ended": str(e)})


def serve_target(engine: Engine, *, inp: IO[bytes], out: IO[bytes], control: Callable[[dict], None]) -> None:
    """The agent's side of a post-copy target: listen where the lazy-pages daemon's connection
    will come from (say its number, ``relay``), and join it to stdin and stdout."""
    listener = Listener(engine.spool_dir)
    control({"relay": listener.number})
    pump(listener, inp, out)


# --- in the caller ---------------------------------------------------------------------------------


@dataclass
class PageSource:
    """The source's side: its checkpoint (all but the memory), the way to its page server, and
    how its dump ends."""

    checkpoint: Checkpoint
    end: End
    wait: Callable[[float], None]  # raises CheckpointFailed when the dump failed (the source runs on)
    frozen_at: float  # time.perf_counter() here when the dump was asked for (for another host:
    # when its agent, by its own clock, asked for it, less the few ms its answer took to come)


@dataclass
class PageTarget:
    """The target's side: the number of the relay's socket its lazy-pages daemon's connection
    comes from (:func:`dolly._criu.relay_socket`), and the way to it."""

    relay: int
    end: End


def open_source(engine: Engine, container: ContainerRef, name: str) -> PageSource:
    """Dump ``container`` lazily on ``engine``, whose files are here; returns once its page
    server listens.

    Raises:
        as :func:`dolly._lazy_dump.checkpoint_lazy`.
    """
    require_64_bit()
    cp, pending, link = dump_lazily(engine, container, name)
    return PageSource(cp, link, pending.wait, pending.started_at)


def open_target(engine: Engine) -> PageTarget:
    """Listen, on ``engine``'s host (here), for the lazy-pages daemon's connection.

    Raises:
        HostNotReady: the engine's spool is not root's alone.
    """
    require_64_bit()
    listener = Listener(engine.spool_dir)
    return PageTarget(listener.number, listener)


def require_64_bit() -> None:
    """Raises HostNotReady where CRIU's records would not be :data:`RECORD` bytes long."""
    if platform.machine() not in ("x86_64", "aarch64"):
        raise HostNotReady(f"post-copy migration is built for x86_64 and aarch64, not {platform.machine()}")


def _remove_quietly(engine: Engine, cp: Checkpoint) -> None:
    """A post-copy checkpoint that will not be restored: its images lack the memory."""
    with contextlib.suppress(Exception):
        remove(engine, cp)


class Relay:
    """Joins the page server's end and the daemon's end, holding the daemon's last record back
    until :meth:`commit` (see the module's docstring)."""

    def __init__(self, source: End, target: End) -> None:
        self.source, self.target = source, target
        self._go = threading.Event()
        self._aborted = False
        self.bytes_down = 0
        self.daemon_done = threading.Event()  # the daemon sent its last record: it has every page
        self.broken = ""  # why the transfer broke off before the commit, when it did
        self._threads = [threading.Thread(target=self._up, name="dolly-relay-up", daemon=True),
                         threading.Thread(target=self._down, name="dolly-relay-down", daemon=True)]
        for t in self._threads:
            t.start()

    def _break(self, why: str) -> None:
        if not self.broken and not self._go.is_set():
            self.broken = why

    def _up(self) -> None:
        try:
            self._pass_up()
        except (OSError, ValueError, DollyError) as e:  # an agent's end that went raises its error
            self._break(f"{type(e).__name__}: {e}")

    def _pass_up(self) -> None:
        records = Records()
        while True:
            data = self.target.recv()
            if not data:
                # Without its close record the page server waits: commit or abort decides.
                self._break("the lazy-pages daemon went before it had every page")
                return
            batch = records.feed(data)
            for record in batch:
                check_record(record)
            last = next((i for i, r in enumerate(batch) if is_close(r)), None)
            if last is not None:  # the daemon's last record: held back until the commit
                if last:
                    self.source.send(b"".join(batch[:last]))
                self.daemon_done.set()
                self._go.wait()
                if self._aborted:
                    return
                batch = batch[last:]
            if batch:
                self.source.send(b"".join(batch))

    def _down(self) -> None:
        target_gone = False
        while True:
            data = self.source.recv()
            if not data:
                self._break("the page server's end went before the commit")
                break
            self.bytes_down += len(data)
            if target_gone:
                continue  # the source is still read to its end: commit or abort decides
            try:
                self.target.send(data)
            except (OSError, ValueError, DollyError) as e:
                self._break(f"the daemon's end went: {type(e).__name__}: {e}")
                target_gone = True
        self.target.close()

    def wait_for_pages(self, timeout: float) -> None:
        """Wait until the daemon has every page (its close record is held here).

        Raises:
            TimeoutError: it has not within ``timeout`` seconds (:meth:`abort` still rolls back).
        """
        deadline = time.monotonic() + timeout
        while not self.daemon_done.wait(0.05):
            if self.broken:
                raise ConnectionError(f"the memory transfer broke off: {self.broken}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the memory did not all reach the target within {timeout:.0f} s")

    def commit(self, timeout: float) -> None:
        """Let the transfer end (after :meth:`wait_for_pages`): CRIU then ends the dump on the
        source, and the source's processes."""
        self._go.set()
        for t in self._threads:
            t.join(timeout)
        self.source.close()

    def abort(self) -> None:
        """Break the transfer off: the source's processes run on, with their memory."""
        self._aborted = True
        self._go.set()
        self.source.close()
        self.target.close()
        for t in self._threads:
            t.join(10)

