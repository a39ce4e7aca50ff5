"""The channel to an engine's agent (:mod:`dolly._hosts.agent`): each operation is one ``exec`` in
the agent's container, which runs ``/usr/bin/python3 -m dolly._hosts.serve OP ARGS`` there (the
Python of the agent's own image, :mod:`dolly._hosts.agent_image`). Arguments go as base64 JSON on
the command line; the result comes back as one JSON line on stdout, or a Dolly error by its class
name and message, raised here as the same class. Bundles travel over the exec's stdout
(:meth:`Channel.stream_out`) and stdin (:meth:`Channel.stream_in`) as plain tar streams;
post-copy's pages over both at once (:meth:`Channel.duplex`).
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import queue
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple, cast

from docker.utils.socket import consume_socket_output, demux_adaptor, frames_iter

from .. import errors
from .._engine import Engine, translate_errors
from ..errors import ContainerNotFound, DollyError, EngineError, HostNotReady
from .agent import Agent, cannot_exec, exit_code as _exit_code
from .agent_image import PYTHON

SERVE = "dolly._hosts.serve"
_CHUNK = 1 << 20
# A write into an agent that takes no bytes for this long asks the engine whether the agent still
# runs; an agent that ended has this long for the rest of its output to arrive (see _Exchange).
_STALL_S = 0.5
_GRACE_S = 2.0


class Channel:
    """Operations run in one engine's agent. Get one with :meth:`of`."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.engine = agent.engine
        self._warm: List[Tuple[str, Any]] = []  # workers waiting for an operation (prewarm)
        self._starting = 0  # workers being started
        self._lock = threading.Lock()

    @classmethod
    def of(cls, engine: Engine) -> Channel:
        """The channel to ``engine``'s agent (one per engine object)."""
        channel = getattr(engine, "_channel", None)
        if channel is None:
            channel = engine._channel = cls(Agent(engine))  # type: ignore[attr-defined]
        return channel

    def prewarm(self, n: int = 1) -> Callable[[float], None]:
        """Start ``n`` workers in the background: execs of the agent that have loaded Dolly and
        wait for one operation on their stdin, so that the next calls skip Python's start (about
        0.2 s of CPU each; :func:`dolly.migrate` has them ready before it freezes its container).
        Returns a function that waits, up to the seconds it is given, until they are ready. A
        worker left unused ends with this process, or with :meth:`release`."""
        threads = []

        def start() -> None:
            try:
                exec_id = self._exec_create("--serve", None, stdin=True)
                with translate_errors():
                    sock = self.engine.api.exec_start(exec_id, socket=True)
                # Ready once it has loaded Dolly: it says so on stderr.
                header = _read_exactly(sock, 8)
                if header is None or header[0] != 2:
                    raise OSError("no readiness line")
            except (DollyError, OSError):
                with self._lock:
                    self._starting -= 1
                return
            with self._lock:
                self._starting -= 1
                self._warm.append((exec_id, sock))

        with self._lock:
            self._starting += n
        for _ in range(n):
            t = threading.Thread(target=start, name="dolly-agent-warm", daemon=True)
            t.start()
            threads.append(t)

        def wait(timeout: float) -> None:
            deadline = time.monotonic() + timeout
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))

        return wait

    def keep_warm(self) -> None:
        """Have one worker ready for the next operation, unless one is ready or being started:
        a spread's next clone there skips Python's start (about 0.25 s) and pycriu's import. An
        unused worker ends with this process, with :meth:`release`, or after
        :data:`dolly._hosts.serve.WARM_IDLE_S` idle in the agent."""
        with self._lock:
            if self._warm or self._starting:
                return
        self.prewarm(1)

    def release(self) -> None:
        """End the workers :meth:`prewarm` started that were not used."""
        with self._lock:
            warm, self._warm = self._warm, []
        for _, sock in warm:
            _hang_up(sock)

    def _open(self, op: str, args: Dict[str, Any], *, stdin: bool) -> Tuple[str, Any]:
        """An exec of ``op`` and its attached socket: a warm worker when one waits (the operation
        sent on its stdin as its first line), else a new exec."""
        while True:
            with self._lock:
                if not self._warm:
                    break
                exec_id, sock = self._warm.pop()
            try:
                with translate_errors():
                    running = self.engine.api.exec_inspect(exec_id)["Running"]
                if running:
                    raw: Any = getattr(sock, "_sock", sock)
                    raw.sendall(" ".join(_command(op, args)[3:]).encode() + b"\n")
                    return exec_id, sock
            except (DollyError, OSError):
                pass
            with contextlib.suppress(OSError):
                sock.close()
        exec_id = self._exec_create(op, args, stdin=stdin)
        with translate_errors():
            return exec_id, self.engine.api.exec_start(exec_id, socket=True)

    def _exec_create(self, op: str, args: Optional[Dict[str, Any]], *, stdin: bool = False, stdout: bool = True,
                     stderr: bool = True) -> str:
        """An exec of ``op`` in the agent; once more with a new agent when the engine lost it
        (a restart, a removal)."""
        for again in (True, False):
            try:
                with translate_errors():
                    command = _command(op, args) if args is not None else [PYTHON, "-m", SERVE, op]
                    made = self.engine.api.exec_create(self.agent.container_id(), command, stdin=stdin,
                                                       stdout=stdout, stderr=stderr)
                    return str(made["Id"])
            except (ContainerNotFound, EngineError):
                if not again:
                    raise
                self.agent.forget()
        raise AssertionError("unreachable")  # pragma: no cover

    # --- calls -----------------------------------------------------------------------------------

    def call(self, op: str, **args: Any) -> Any:
        """Run ``op`` in the agent and return its JSON result.

        Raises:
            the Dolly error the operation raised there, as the same class.
        """
        api = self.engine.api
        exec_id, sock = self._open(op, args, stdin=False)
        try:
            with translate_errors():
                out, err = consume_socket_output([demux_adaptor(*f) for f in frames_iter(sock, tty=False)],
                                                 demux=True)
        finally:
            sock.close()
        return _result(out or b"", err or b"", _exit_code_or_none(api, exec_id))

    @contextlib.contextmanager
    def stream_out(self, op: str, **args: Any) -> Iterator[IO[bytes]]:
        """Run ``op`` and read its stdout (a bundle) as a stream, as it comes.

        Raises:
            the Dolly error the operation raised there, in preference to what reading its
            stream raised (a stream that ended early because the operation failed).
        """
        api = self.engine.api
        exec_id, sock = self._open(op, args, stdin=False)
        err = bytearray()

        def stdout() -> Iterator[bytes]:
            for stream, data in frames_iter(sock, tty=False):
                if stream == 1:
                    yield data
                else:
                    err.extend(data)

        chunks = stdout()
        try:
            try:
                yield io.BufferedReader(_ChunkReader(chunks), _CHUNK)
            except BaseException:
                for _ in chunks:
                    pass
                code = _exit_code_or_none(api, exec_id)
                if code:
                    _result(b"", bytes(err), code)  # raises the agent's own error
                raise
            for _ in chunks:  # what the reader left (a tar's padding): the exec ends with its output
                pass
        finally:
            sock.close()
        code = _exit_code_or_none(api, exec_id)
        if code != 0:
            _result(b"", bytes(err), code)

    def stream_in(self, op: str, produce: Callable[[IO[bytes]], None], **args: Any) -> Any:
        """Run ``op`` with what ``produce(sink)`` writes (a bundle) on its stdin; returns its JSON
        result. The agent's output is read as it comes (no deadlock when it writes while reading),
        and when it stops reading early, its own error is raised, promptly, not the broken pipe
        (see :class:`_Exchange`).

        Raises:
            the Dolly error the operation raised there, as the same class, in preference to what
            writing its stdin raised; HostNotReady when it ended without one.
        """
        api = self.engine.api
        exec_id, sock = self._open(op, args, stdin=True)
        raw: Any = getattr(sock, "_sock", sock)  # the socket itself, under docker-py's wrapper
        exchange = _Exchange(api, exec_id, sock)
        try:
            try:
                produce(cast(IO[bytes], _SocketWriter(raw, exchange)))  # a raw stream: written to like a file
                if not isinstance(raw, ssl.SSLSocket):
                    # Over TLS a half-close ends the TLS session for reading too; the agent does not
                    # need the end of its stdin anyway: the tar marks its own end.
                    raw.shutdown(socket.SHUT_WR)
            except OSError:  # the connection was cut: the agent ended (see _Exchange), or it broke
                exchange.join(timeout=30)
            else:
                exchange.join()
        finally:
            exchange.stop()
            _hang_up(sock)  # an agent still reading (the producer failed) sees its stdin end
        # Its own error when it wrote one, else how it ended; a result despite a write cut short is
        # the agent's to give (it had read all it needed: a tar's padding may be left).
        return _result(bytes(exchange.out), bytes(exchange.err), _exit_code_or_none(api, exec_id))

    def duplex(self, op: str, **args: Any) -> Duplex:
        """Run ``op`` with a byte stream each way (its stdin and stdout) and its JSON lines on
        stderr as controls (:meth:`Duplex.control`), for as long as it runs."""
        exec_id, sock = self._open(op, args, stdin=True)
        return Duplex(self.engine.api, exec_id, sock)


def _shut(raw: Any) -> None:
    """Shut ``raw`` both ways (it wakes a thread blocked on it) and leave its closing to its owner.
    socket.socket's own shutdown: an SSLSocket's drops its TLS state under the other thread."""
    with contextlib.suppress(OSError):
        if isinstance(raw, socket.socket):
            socket.socket.shutdown(raw, socket.SHUT_RDWR)
        else:
            raw.shutdown(socket.SHUT_RDWR)


def _hang_up(sock: Any) -> None:
    """End an exec's connection. Closing docker-py's wrapper alone does not: the socket under it
    stays open as long as its HTTP response is referenced, and so the exec's stdin (a warm worker
    waits on it, :meth:`Channel.release`)."""
    _shut(getattr(sock, "_sock", sock))
    with contextlib.suppress(OSError):
        sock.close()


def _read_exactly(sock: Any, n: int) -> Optional[bytes]:
    """``n`` bytes of an exec's socket: one frame's header and its payload (one byte here)."""
    raw: Any = getattr(sock, "_sock", sock)
    data = b""
    while len(data) < n:
        chunk = raw.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    size = int.from_bytes(data[4:8], "big")
    while size > 0:
        chunk = raw.recv(size)
        if not chunk:
            return None
        size -= len(chunk)
    return data


class _ChunkReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks, self._buffer = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buffer:
            self._buffer = next(self._chunks, b"")
            if not self._buffer:
                return 0
        n = min(len(b), len(self._buffer))
        b[:n], self._buffer = self._buffer[:n], self._buffer[n:]
        return n


class _Exchange:
    """An exec's connection that this process writes (the agent's stdin) while a thread of its own
    reads the agent's output frames, cut as soon as the agent has ended.

    The engine does not end it then (Docker 20.10, checked with an agent killed mid-import): it
    copies the connection into the exec's stdin fifo, which it holds open itself, so once the agent
    stops reading (it failed early: CheckpointExists, a digest, the policy; or it died) the fifo
    fills, that copy blocks, and the engine reads the connection no more, for ever. The agent's end
    ends the other way only: its output, at once, or 2 s after it when a child of the agent still
    held it; but when the agent's container stops, the engine forgets the exec (ExecInspect: 404)
    and ends neither way. So a write into it would block for ever, the agent long gone. The
    connection is cut here (shut down, which wakes a blocked write with EPIPE) when the agent's
    error line arrives, its last word (:func:`dolly._hosts.serve.main`); when its output ends; and
    once the engine says the exec ended, or knows it no more, and its output had :data:`_GRACE_S`
    to end. The engine is asked only while the connection takes no bytes (:meth:`_stalled`)."""

    def __init__(self, api: Any, exec_id: str, sock: Any) -> None:
        self._api, self._exec_id, self._sock = api, exec_id, sock
        self._raw: Any = getattr(sock, "_sock", sock)
        self.out, self.err = bytearray(), bytearray()
        self.written = 0  # bytes the writer handed to the connection: its progress
        self._ended = threading.Event()  # the reader saw the connection's end
        self._stopped = threading.Event()
        self._reader = threading.Thread(target=self._read, name="dolly-agent-out", daemon=True)
        self._reader.start()
        threading.Thread(target=self._watch, name="dolly-agent-watch", daemon=True).start()

    def _read(self) -> None:
        pending = b""
        try:
            with contextlib.suppress(OSError, ValueError):  # a connection that breaks ends the output
                for stream, data in frames_iter(self._sock, tty=False):
                    if stream == 1:
                        self._stdout(bytes(data))
                        continue
                    self.err += data
                    *lines, pending = (pending + bytes(data)).split(b"\n")
                    for line in lines:
                        self._line(line)
        finally:
            self._cut()  # the agent ended: it reads no more either
            self._ended.set()
            self._finish()

    def _stdout(self, data: bytes) -> None:
        self.out += data

    def _line(self, line: bytes) -> None:
        """One whole line of the agent's stderr."""
        if line.startswith(b'{"error"'):
            self._cut()  # it reads no more, and writes no more after this line

    def _finish(self) -> None:
        """The output ended."""

    def _watch(self) -> None:
        seen, ended_at = -1, None
        while not self._stopped.wait(_STALL_S) and not self._ended.is_set():
            if ended_at is not None:
                if time.monotonic() - ended_at >= _GRACE_S:
                    self._cut()
                    return
            elif self._stalled(seen) and not self._running():
                ended_at = time.monotonic()
            seen = self.written

    def _stalled(self, seen: int) -> bool:
        """Whether the connection took no bytes since the writer had written ``seen``."""
        return self.written == seen

    def _running(self) -> bool:
        try:
            with translate_errors():
                return bool(self._api.exec_inspect(self._exec_id)["Running"])
        except ContainerNotFound:
            return False  # the engine forgot it: its container stopped, or was removed
        except DollyError:
            return True  # the engine does not answer: its connection ends with it

    def _cut(self) -> None:
        _shut(self._raw)

    def join(self, timeout: Optional[float] = None) -> None:
        """Until the agent's output ended (or was cut, the agent having ended), or ``timeout``."""
        self._reader.join(timeout)

    def stop(self) -> None:
        self._stopped.set()


class Duplex(_Exchange):
    """An agent operation's streams: :meth:`send` to its stdin, :meth:`recv` from its stdout,
    :meth:`control` for the JSON lines it writes on stderr (an error line raises its error). Cut
    once the operation ends or fails (see :class:`_Exchange`): a send then raises, never blocks."""

    def __init__(self, api: Any, exec_id: str, sock: Any) -> None:
        self._data: queue.Queue[bytes] = queue.Queue()
        self._controls: List[Dict[str, Any]] = []
        self._changed = threading.Condition()
        self._closed = False
        self._sending = 0  # sends under way: idle between them is the exchange's normal state
        super().__init__(api, exec_id, sock)

    def _stdout(self, data: bytes) -> None:
        self._data.put(data)

    def _line(self, line: bytes) -> None:
        super()._line(line)
        if line.startswith(b"{"):
            with contextlib.suppress(ValueError), self._changed:
                self._controls.append(json.loads(line))
                self._changed.notify_all()

    def _finish(self) -> None:
        self._data.put(b"")
        with self._changed:
            self._changed.notify_all()

    def _stalled(self, seen: int) -> bool:
        return self._sending > 0 and super()._stalled(seen)

    def send(self, data: bytes) -> None:
        """Raises:
            the operation's own error when it failed; HostNotReady when it had ended (killed, its
            container stopped, or done: it reads no more), or this side closed it.
        """
        if not self._ended.is_set() and not self._closed:
            self._sending += 1
            try:
                self._raw.sendall(data)
                self.written += len(data)
                return
            except OSError as e:  # cut: the operation ended (or closed, or the connection broke)
                raise self._failure() from e
            finally:
                self._sending -= 1
        raise self._failure()

    def _failure(self) -> DollyError:
        if self._closed:
            return HostNotReady("the exchange with Dolly's agent was closed on this side")
        self.join(10)  # a cut connection ends its reader at once
        return _ended_early(bytes(self.err), _exit_code_or_none(self._api, self._exec_id) if self._ended.is_set()
                            else None)

    def recv(self) -> bytes:
        data = self._data.get()
        if not data:
            self._data.put(b"")  # every later call sees the end too
        return data

    def control(self, key: str, timeout: float) -> Any:
        """The value of the first control line holding ``key``, waiting up to ``timeout``.

        Raises:
            the operation's own error when it failed; HostNotReady when it ended without the
            line, or did not send it in time.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for c in self._controls:
                    if "error" in c:
                        raise _error_of(c)
                    if key in c:
                        return c[key]
                left = deadline - time.monotonic()
                if self._ended.is_set() or left <= 0:
                    break
                self._changed.wait(left)
        code = _exit_code_or_none(self._api, self._exec_id) if self._ended.is_set() else None
        raise HostNotReady(f"Dolly's agent sent no {key!r} (exit {code})")

    def close(self) -> None:
        self._closed = True
        self.stop()
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()


class _SocketWriter(io.RawIOBase):
    def __init__(self, sock: Any, exchange: Optional[_Exchange] = None) -> None:
        super().__init__()
        self._sock, self._exchange = sock, exchange

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        if self._exchange is not None:
            self._exchange.written += len(data)
        return len(data)


def _command(op: str, args: Dict[str, Any]) -> List[str]:
    encoded = base64.b64encode(json.dumps(args).encode()).decode()
    return [PYTHON, "-m", SERVE, op, encoded]


def _reply(stream: bytes) -> Optional[Dict[str, Any]]:
    """The last JSON line of ``stream``, the operation's answer, if it wrote one."""
    lines = [line for line in stream.decode(errors="replace").splitlines() if line.startswith("{")]
    try:
        reply = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


def _result(out: bytes, err: bytes, code: Optional[int]) -> Any:
    """The operation's result (its JSON line on stdout, written last, once it succeeded).

    Raises:
        what :func:`_ended_early` says it stands for, when it did not succeed.
    """
    reply = _reply(out) if code in (0, None) else None  # None: the engine no longer knows the exec
    if reply is not None and "result" in reply:
        return reply["result"]
    raise _ended_early(err, code)


def _ended_early(err: bytes, code: Optional[int]) -> DollyError:
    """What an operation that ended before it answered stands for: its own error when it wrote one
    (its last word on stderr), else how it ended."""
    reply = _reply(err)
    if reply is not None and "error" in reply:
        return _error_of(reply)
    if code in (126, 127):  # the exec did not start: say what did not run, and why
        return HostNotReady(cannot_exec("Dolly's agent", code, [PYTHON, "-m", SERVE], err))
    said = err.decode(errors="replace")[-2000:]
    tail = f": {said}" if said.strip() else ""
    if code is None or code > 128:  # killed (128 + the signal), or gone with its container
        how = (f"killed by signal {code - 128}, exit {code}" if code is not None
               else "its exit is unknown: its container stopped, or was removed")
        return HostNotReady(f"Dolly's agent ended before it answered ({how}): its process was killed or its "
                            "container stopped on the engine's host. Run "
                            f"the operation again (Dolly starts the agent again if it has to){tail}")
    if code == 0:
        return HostNotReady(f"Dolly's agent's operation has ended (exit 0): it reads and answers no more{tail}")
    return HostNotReady(f"Dolly's agent failed (exit {code}): {said}")


def _error_of(reply: Dict[str, Any]) -> DollyError:
    """The Dolly error an agent's error line names: the same class, with its message and the
    attributes callers use (``kept`` is a path on the engine's host), set as they were: the
    constructors would write the message again."""
    cls = getattr(errors, str(reply["error"]), DollyError)
    if not (isinstance(cls, type) and issubclass(cls, DollyError)):
        cls = DollyError
    exc = cls.__new__(cls)
    Exception.__init__(exc, str(reply.get("message")))
    attrs = reply.get("attrs")
    for key, value in (attrs.items() if isinstance(attrs, dict) else ()):
        if key in errors.CARRIED:
            if key in ("kept", "log_path"):
                if not isinstance(value, str):
                    continue  # not a path: the caller gets the error without it, not a TypeError
                value = Path(value)
            setattr(exc, key, value)
    return exc


def _exit_code_or_none(api: Any, exec_id: str) -> Optional[int]:
    """The exec's exit code; None when the engine cannot tell (the agent's container is gone)."""
    try:
        return _exit_code(api, exec_id)
    except DollyError:
        return None
