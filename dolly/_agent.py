"""The agent: Dolly's host-side steps, run beside the files of an engine on another host.

Dolly reaches an engine's host through that engine's API only: no SSH of its own, no shared
filesystem. When an engine's files are not this process's to see (``Engine.files_are_local``:
another host, or another mount namespace), Dolly keeps one small container on that engine, the
agent, and runs its own functions there with ``exec`` (``python -m dolly._agent OP``), where the
engine's data root is mounted at its own path and the engine's socket is at hand:

    name        dolly-agent, labelled dolly.agent=<protocol>; started on demand, kept warm
    image       dolly/python (Debian's userland), with Dolly's Python, virtualenv and source
                mounted read-only from the same paths on that host (``make host`` there puts
                them there, as here)
    mounts      the data root (same path), the engine's socket (the engine's label
                ``dolly.socket``, else /var/run/docker.sock), /var/log/dolly, /run/dolly
    runs as     root with the capabilities file work needs (not privileged), the host's PID
                namespace, no network, runtime runc: what Dolly does as root on a local engine's
                host, no more

Results come back as one JSON line on stdout; a Dolly error comes back by its class name and
message and is raised here as the same class. Bundles travel over the exec's stdout (export) and
stdin (import) as plain tar streams: signing, verifying, compression and encryption happen in the
calling process, so no key leaves it (see :mod:`dolly._bundle`).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import queue
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple, cast

import docker
from docker.utils.socket import consume_socket_output, demux_adaptor, frames_iter

from . import _retry as retry, errors
from ._engine import Engine, translate_errors
from .errors import ContainerNotFound, DollyError, EngineError, HostNotReady

PROTOCOL = "1"
NAME = "dolly-agent"
LABEL = "dolly.agent"
IMAGE = "dolly/python"
SOCKET_LABEL = "dolly.socket"
_CHUNK = 1 << 20
# What root has on the engine's host, as Dolly does there: files (DAC_*, FOWNER, CHOWN, FSETID),
# overlay whiteouts (MKNOD) and trusted.* attributes (SYS_ADMIN), other processes (SYS_PTRACE)
# and what `criu check` looks for. Not CAP_SYS_RESOURCE: some hosts' root lacks it (VMs, CI
# sandboxes), and a container that asks for it (as privileged ones do) is refused there. Only
# names Docker 20.10 knows (not BPF, PERFMON, CHECKPOINT_RESTORE).
AGENT_CAPABILITIES = ["AUDIT_CONTROL", "AUDIT_READ", "AUDIT_WRITE", "BLOCK_SUSPEND", "CHOWN",
                      "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "IPC_LOCK",
                      "IPC_OWNER", "KILL", "LEASE", "LINUX_IMMUTABLE", "MAC_ADMIN", "MAC_OVERRIDE",
                      "MKNOD", "NET_ADMIN", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_RAW",
                      "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_ADMIN", "SYS_BOOT",
                      "SYS_CHROOT", "SYS_MODULE", "SYS_NICE", "SYS_PACCT", "SYS_PTRACE",
                      "SYS_RAWIO", "SYS_TIME", "SYS_TTY_CONFIG", "SYSLOG", "WAKE_ALARM"]


class Agent:
    """The agent of one engine. Get one with :meth:`of`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._id: Optional[str] = None
        self._warm: List[Tuple[str, Any]] = []  # workers waiting for an operation (prewarm)
        self._lock = threading.Lock()
        self._starting = threading.Lock()

    @classmethod
    def of(cls, engine: Engine) -> Agent:
        agent = getattr(engine, "_agent", None)
        if agent is None:
            agent = engine._agent = cls(engine)  # type: ignore[attr-defined]
        return agent

    # --- the container ---------------------------------------------------------------------------

    def container_id(self) -> str:
        """The running agent's ID, started on demand. Each Dolly (its Python and source paths)
        has its own agent, ``dolly-agent-<fingerprint>``: two installs never replace each
        other's; two processes starting it at once share the one the engine made first.

        Raises:
            HostNotReady: the engine lacks the image, or the agent does not start.
        """
        if self._id is not None:
            return self._id
        with self._starting:  # this process's threads (prewarm's among them) start it once
            if self._id is not None:
                return self._id
            return self._find_or_start()

    def _find_or_start(self) -> str:
        api = self.engine.api
        name = f"{NAME}-{_fingerprint()}"
        with translate_errors():
            try:
                found = api.inspect_container(name)
            except docker.errors.NotFound:
                found = None
            if found is not None and not found["State"]["Running"]:
                api.remove_container(found["Id"], force=True)
                found = None
            if found is None:
                found = self._start(name)
        self._id = str(found["Id"])
        return self._id

    def _start(self, name: str) -> Dict[str, Any]:
        api = self.engine.api
        if not self.engine.has_image(IMAGE):
            raise HostNotReady(f"the engine at {api.base_url} has no image {IMAGE}, which Dolly's agent runs "
                               "in: run `make host` on that host (or copy the image there)")
        info = self.engine.info()
        root = info["DockerRootDir"]
        engine_socket = _label(info, SOCKET_LABEL) or "/var/run/docker.sock"
        binds = [f"{root}:{root}", f"{engine_socket}:/var/run/docker.sock", "/var/log/dolly:/var/log/dolly",
                 "/run/dolly:/run/dolly"]
        binds += [f"{p}:{p}:ro" for p in _runtime_paths()]
        # Not privileged: a privileged container asks for every capability, and hosts whose root
        # lacks one (CAP_SYS_RESOURCE, on some VMs and CI sandboxes) refuse to start it.
        host_config = api.create_host_config(binds=binds, cap_add=AGENT_CAPABILITIES, pid_mode="host",
                                             security_opt=["seccomp=unconfined", "apparmor=unconfined"],
                                             network_mode="none", runtime="runc",
                                             restart_policy={"Name": "unless-stopped"})
        try:
            created = api.create_container(
                IMAGE, ["sleep", "infinity"], name=name, labels={LABEL: PROTOCOL}, host_config=host_config,
                environment={"DOLLY_AGENT": "1", "PYTHONPATH": str(_source_root()), "PYTHONDONTWRITEBYTECODE": "1"})
        except docker.errors.APIError as e:
            if e.status_code != 409:
                raise
            return api.inspect_container(name)  # another process made it first: share it
        try:
            api.start(created["Id"])
        except docker.errors.APIError:
            api.remove_container(created["Id"], force=True)
            raise
        return api.inspect_container(created["Id"])

    def remove(self) -> None:
        """Stop and remove the agent (it is started again when needed)."""
        self._id = None
        with contextlib.suppress(docker.errors.NotFound):
            self.engine.api.remove_container(f"{NAME}-{_fingerprint()}", force=True)

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
                return
            with self._lock:
                self._warm.append((exec_id, sock))

        for _ in range(n):
            t = threading.Thread(target=start, name="dolly-agent-warm", daemon=True)
            t.start()
            threads.append(t)

        def wait(timeout: float) -> None:
            deadline = time.monotonic() + timeout
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))

        return wait

    def release(self) -> None:
        """End the workers :meth:`prewarm` started that were not used."""
        with self._lock:
            warm, self._warm = self._warm, []
        for _, sock in warm:
            with contextlib.suppress(OSError):
                sock.close()

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
                    command = _command(op, args) if args is not None else [sys.executable, "-m", "dolly._agent", op]
                    made = self.engine.api.exec_create(self.container_id(), command, stdin=stdin,
                                                       stdout=stdout, stderr=stderr)
                    return str(made["Id"])
            except (ContainerNotFound, EngineError):
                if not again:
                    raise
                self._id = None
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
        return _result(out or b"", err or b"", _exit_code(api, exec_id))

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
                code = _exit_code(api, exec_id)
                if code:
                    _result(b"", bytes(err), code)  # raises the agent's own error
                raise
            for _ in chunks:  # what the reader left (a tar's padding): the exec ends with its output
                pass
        finally:
            sock.close()
        code = _exit_code(api, exec_id)
        if code != 0:
            _result(b"", bytes(err), code)

    def stream_in(self, op: str, produce: Callable[[IO[bytes]], None], **args: Any) -> Any:
        """Run ``op`` with what ``produce(sink)`` writes (a bundle) on its stdin; returns its JSON
        result. The agent's output is read as it comes (no deadlock when it writes while reading),
        and when it stops reading early, its own error is raised, not the broken pipe."""
        api = self.engine.api
        exec_id, sock = self._open(op, args, stdin=True)
        raw: Any = getattr(sock, "_sock", sock)  # the socket itself, under docker-py's wrapper
        frames: List[Any] = []

        def read() -> None:
            with contextlib.suppress(OSError, ValueError):  # a connection that breaks ends the output
                frames.extend(frames_iter(sock, tty=False))

        reader = threading.Thread(target=read, name="dolly-agent-out", daemon=True)
        reader.start()
        try:
            try:
                produce(cast(IO[bytes], _SocketWriter(raw)))  # a raw stream: written to like a file
                if not isinstance(raw, ssl.SSLSocket):
                    # Over TLS a half-close ends the TLS session for reading too; the agent does not
                    # need the end of its stdin anyway: the tar marks its own end.
                    raw.shutdown(socket.SHUT_WR)
            except OSError:
                reader.join(timeout=30)
                code = _exit_code(api, exec_id)
                out, err = consume_socket_output([demux_adaptor(*f) for f in frames], demux=True)
                if code:
                    _result(out or b"", err or b"", code)
                raise
            reader.join()
        finally:
            sock.close()
        out, err = consume_socket_output([demux_adaptor(*f) for f in frames], demux=True)
        return _result(out or b"", err or b"", _exit_code(api, exec_id))


    def duplex(self, op: str, **args: Any) -> Duplex:
        """Run ``op`` with a byte stream each way (its stdin and stdout) and its JSON lines on
        stderr as controls (:meth:`Duplex.control`), for as long as it runs."""
        exec_id, sock = self._open(op, args, stdin=True)
        return Duplex(self.engine.api, exec_id, sock)


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


class Duplex:
    """An agent operation's streams: :meth:`send` to its stdin, :meth:`recv` from its stdout,
    :meth:`control` for the JSON lines it writes on stderr (an error line raises its error)."""

    def __init__(self, api: Any, exec_id: str, sock: Any) -> None:
        self._api, self._exec_id, self._sock = api, exec_id, sock
        self._raw: Any = getattr(sock, "_sock", sock)
        self._data: queue.Queue[bytes] = queue.Queue()
        self._controls: List[Dict[str, Any]] = []
        self._changed = threading.Condition()
        self._ended = False
        threading.Thread(target=self._read, name="dolly-agent-duplex", daemon=True).start()

    def _read(self) -> None:
        err = b""
        with contextlib.suppress(OSError, ValueError):
            for stream, data in frames_iter(self._sock, tty=False):
                if stream == 1:
                    self._data.put(bytes(data))
                    continue
                err += bytes(data)
                while b"\n" in err:
                    line, err = err.split(b"\n", 1)
                    if line.startswith(b"{"):
                        with contextlib.suppress(ValueError), self._changed:
                            self._controls.append(json.loads(line))
                            self._changed.notify_all()
        self._data.put(b"")
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self._raw.sendall(data)

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
                        _result(b"", json.dumps(c).encode(), 1)
                    if key in c:
                        return c[key]
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    break
                self._changed.wait(left)
        code = _exit_code(self._api, self._exec_id) if self._ended else None
        raise HostNotReady(f"Dolly's agent sent no {key!r} (exit {code})")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()


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


class _SocketWriter(io.RawIOBase):
    def __init__(self, sock: Any) -> None:
        super().__init__()
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        return len(data)


def _exit_code(api: Any, exec_id: str) -> Optional[int]:
    """The exec's exit code, once the engine has seen it end (its output ends a moment before)."""
    try:
        for attempt in retry.exec_end():
            with attempt:
                with translate_errors():
                    state = api.exec_inspect(exec_id)
                if state["Running"]:
                    raise retry.StillRunning(exec_id)
                return state["ExitCode"]
    except retry.StillRunning:
        return None
    return None  # pragma: no cover


def _command(op: str, args: Dict[str, Any]) -> List[str]:
    encoded = base64.b64encode(json.dumps(args).encode()).decode()
    return [sys.executable, "-m", "dolly._agent", op, encoded]


def _result(out: bytes, err: bytes, code: Optional[int]) -> Any:
    stream = err if code != 0 else out
    lines = [line for line in stream.decode(errors="replace").splitlines() if line.startswith("{")]
    try:
        reply = json.loads(lines[-1]) if lines else None
    except ValueError:
        reply = None
    if reply is None:
        raise HostNotReady(f"Dolly's agent failed (exit {code}): {err.decode(errors='replace')[-2000:]}")
    if "error" in reply:
        cls = getattr(errors, str(reply["error"]), DollyError)
        if not (isinstance(cls, type) and issubclass(cls, DollyError)):
            cls = DollyError
        # The same class, with its message and the attributes callers use (``kept`` is a path on
        # the engine's host), set as they were: the constructors would write the message again.
        exc = cls.__new__(cls)
        Exception.__init__(exc, str(reply["message"]))
        for key, value in (reply.get("attrs") or {}).items():
            if key in _CARRIED:
                setattr(exc, key, Path(value) if key in ("kept", "log_path") else value)
        raise exc
    return reply["result"]


# What a Dolly error carries besides its message (errors.py), sent back from the agent.
_CARRIED = ("kept", "log_lines", "log_path", "items", "status_code", "step", "logs")


def _label(info: Dict[str, Any], key: str) -> Optional[str]:
    for label in info.get("Labels") or []:
        k, _, v = str(label).partition("=")
        if k == key:
            return v
    return None


def _source_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _runtime_paths() -> List[str]:
    """What the agent needs to run this very Dolly: the Python it runs on, its virtualenv and
    Dolly's source, at the same paths on the engine's host."""
    paths = {os.path.realpath(sys.base_prefix), sys.prefix, str(_source_root())}
    return sorted(p for p in paths if p and p != "/")


def _fingerprint() -> str:
    """Which Dolly an agent runs: its protocol, Python and source paths, as a short name part."""
    return hashlib.sha256(f"{PROTOCOL}:{sys.executable}:{_source_root()}".encode()).hexdigest()[:12]


# --- inside the agent ------------------------------------------------------------------------------


def main(argv: List[str]) -> int:
    """``python -m dolly._agent OP ARGS``: run one operation against the engine beside us."""
    from . import _operations

    if argv == ["--serve"]:  # a warm worker: the operation comes as the first line of stdin
        from . import _criu

        _criu.preload()
        sys.stderr.buffer.write(b"\n")  # ready: one frame on stderr, read by Agent.prewarm
        sys.stderr.buffer.flush()
        line = sys.stdin.buffer.readline().split()
        if len(line) != 2:
            return 0  # ended unused
        argv = [part.decode() for part in line]
    op, args = argv[0], json.loads(base64.b64decode(argv[1]))
    stdout = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print() must not land in a stream on stdout
    try:
        result = _operations.run(op, args, stdin=sys.stdin.buffer, stdout=stdout)
    except DollyError as e:
        # On stderr: stdout may already carry part of a bundle. With the attributes callers use.
        attrs = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(e).items()
                 if k in _CARRIED and v is not None}
        print(json.dumps({"error": type(e).__name__, "message": str(e), "attrs": attrs}), file=sys.stderr,
              flush=True)
        return 1
    if result is not _operations.STREAMED:
        stdout.write(json.dumps({"result": result}).encode() + b"\n")
        stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
