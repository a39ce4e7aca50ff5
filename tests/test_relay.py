"""The post-copy relay's logic, against a stand-in for CRIU's page server on loopback, and who
may connect to post-copy's two ends (issue 22): the relay's unix socket on the target's host and
a lazy dump's page server on the source's.

The stand-in answers as criu/page-xfer.c's page_server_serve() does for a lazy dump: a record of
32 bytes per request, pages for PS_IOV_GET, a 4-byte status for PS_IOV_CLOSE and then a wait for
the end of the connection. It records how the connection ended, which is what decides the
source's fate in CRIU: a clean end after the close record ends the dump (the source's processes
die), a reset fails it (they run on), and a clean end *without* the close record counts as a
finished transfer too, which must never happen while the target lacks pages.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from dolly import _criu as criu
from dolly._postcopy import PS_IOV_CLOSE, RECORD, Listener, Records, Relay, SourceLink, is_close
from dolly.errors import CheckpointFailed, HostNotReady

PS_IOV_GET = 7
PAGE = 4096


def record(cmd: int, nr_pages: int = 0, vaddr: int = 0, dst_id: int = 0) -> bytes:
    return struct.pack("<IxxxxQQQ", cmd, nr_pages, vaddr, dst_id)


class PageServer:
    """A lazy dump's page server, on 127.0.0.1, for one connection."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.seen: list = []
        self.ended = threading.Event()
        self.outcome = ""
        threading.Thread(target=self._serve, daemon=True).start()

    def _recv_exactly(self, sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def _serve(self) -> None:
        sock, _ = self._server.accept()
        try:
            while True:
                data = self._recv_exactly(sock, RECORD)
                if not data:
                    self.outcome = "clean end without the close record"
                    return
                if len(data) < RECORD:
                    self.outcome = "short record"
                    return
                cmd, nr_pages, vaddr, _ = struct.unpack("<IxxxxQQQ", data)
                self.seen.append(cmd & 0xFFFF)
                if cmd & 0xFFFF == PS_IOV_CLOSE:
                    sock.sendall(struct.pack("<i", 0))
                    self.outcome = "clean end" if sock.recv(1) == b"" else "data after the close record"
                    return
                sock.sendall(data + bytes([vaddr & 0xFF]) * (nr_pages * PAGE))
        except ConnectionResetError:
            self.outcome = "reset"
        finally:
            sock.close()
            self._server.close()
            self.ended.set()


class Pipe:
    """One end of a socketpair as a relay end (the daemon's side of the relay, say)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes:
        try:
            return self.sock.recv(1 << 16)
        except OSError:
            return b""

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def link_to(server: PageServer) -> SourceLink:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.settimeout(None)
    return SourceLink(sock)


def read_answer(sock: socket.socket, nr_pages: int) -> bytes:
    want, data = RECORD + nr_pages * PAGE, b""
    while len(data) < want:
        chunk = sock.recv(want - len(data))
        assert chunk, "the relay ended the answer early"
        data += chunk
    return data


def test_records_come_out_whole_however_the_bytes_arrive():
    stream = record(PS_IOV_GET, 1, 0x1000) + record(PS_IOV_GET, 2, 0x2000) + record(PS_IOV_CLOSE)
    records, out = Records(), []
    for i in range(0, len(stream), 7):
        out += records.feed(stream[i:i + 7])
    assert out == [stream[i:i + RECORD] for i in range(0, len(stream), RECORD)]
    assert [is_close(r) for r in out] == [False, False, True]
    assert is_close(record(PS_IOV_CLOSE | (1 << 16)))  # flags above the command's 16 bits


def test_a_link_ends_cleanly_only_after_the_close_record():
    server = PageServer()
    link = link_to(server)
    link.send(record(PS_IOV_GET, 1, 0x5000)[:10])
    link.send(record(PS_IOV_GET, 1, 0x5000)[10:])
    assert len(link.recv()) > 0
    link.send(record(PS_IOV_CLOSE))
    link.close()
    assert server.ended.wait(5)
    assert server.outcome == "clean end" and server.seen == [PS_IOV_GET, PS_IOV_CLOSE]


def test_a_link_closed_before_the_close_record_resets_the_connection():
    server = PageServer()
    link = link_to(server)
    link.send(record(PS_IOV_GET, 1, 0x5000))
    link.close()
    assert server.ended.wait(5)
    assert server.outcome == "reset", "a clean end here would make CRIU end the source's processes"


@pytest.fixture
def relayed():
    """A page server, a relay to it, and the daemon's socket at the relay's other end."""
    server = PageServer()
    daemon, relay_side = socket.socketpair()
    relay = Relay(link_to(server), Pipe(relay_side))
    yield server, relay, daemon
    daemon.close()


def test_the_relay_holds_the_close_record_until_the_commit(relayed):
    server, relay, daemon = relayed
    daemon.sendall(record(PS_IOV_GET, 3, 0x7000))
    answer = read_answer(daemon, 3)
    assert answer[:RECORD] == record(PS_IOV_GET, 3, 0x7000) and set(answer[RECORD:]) == {0x00}
    daemon.sendall(record(PS_IOV_CLOSE))
    relay.wait_for_pages(5)
    assert not server.ended.wait(0.3) and server.seen == [PS_IOV_GET], "the close record went through early"
    relay.commit(5)
    assert daemon.recv(4) == struct.pack("<i", 0)
    daemon.close()
    assert server.ended.wait(5)
    assert server.outcome == "clean end"


def test_an_abort_after_the_close_record_still_resets(relayed):
    server, relay, daemon = relayed
    daemon.sendall(record(PS_IOV_GET, 1, 0x7000) + record(PS_IOV_CLOSE))
    read_answer(daemon, 1)
    relay.wait_for_pages(5)
    relay.abort()
    assert server.ended.wait(5)
    assert server.outcome == "reset" and PS_IOV_CLOSE not in server.seen


def test_a_daemon_that_goes_without_its_close_record_leaves_the_source_waiting(relayed):
    server, relay, daemon = relayed
    daemon.sendall(record(PS_IOV_GET, 1, 0x7000))
    read_answer(daemon, 1)
    daemon.close()  # the target died
    assert not server.ended.wait(0.5), f"the page server saw the end: {server.outcome}"
    with pytest.raises(ConnectionError, match="broke off"):
        relay.wait_for_pages(5)
    relay.abort()
    assert server.ended.wait(5)
    assert server.outcome == "reset"


def test_a_record_the_daemon_never_sends_is_not_passed_on(relayed):
    """PS_IOV_ADD would have a page server write pages: the relay breaks the transfer off."""
    server, relay, daemon = relayed
    daemon.sendall(record(1, 1, 0x7000))
    with pytest.raises(ConnectionError, match="broke off"):
        relay.wait_for_pages(5)
    relay.abort()
    assert server.ended.wait(5)
    assert server.outcome == "reset" and server.seen == []


def test_a_link_refuses_a_record_the_daemon_never_sends():
    server = PageServer()
    link = link_to(server)
    with pytest.raises(ValueError, match="does not send"):
        link.send(record(PS_IOV_GET, 0, 0x5000))  # no pages
    link.close()
    assert server.ended.wait(5)
    assert server.outcome == "reset" and server.seen == []


# --- who may connect -------------------------------------------------------------------------------

NOBODY = 65534

# Run as root, drops to nobody, then tries to connect to the unix socket argv[1] and send a
# request for pages; prints what came of it as one JSON line.
AS_NOBODY = r"""
import json, os, socket, struct, sys
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
out = {"uid": os.getuid()}
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(sys.argv[1])
    out["connected"] = True
    s.sendall(struct.pack("<IxxxxQQQ", 7, 1, 0x5000, 0))
    out["answer"] = s.recv(64).hex()
except OSError as e:
    out["error"] = type(e).__name__
print(json.dumps(out))
"""


def as_nobody(path: Path) -> dict:
    """What a process of the unprivileged user ``nobody`` gets when it connects to ``path``."""
    done = subprocess.run([sys.executable, "-c", AS_NOBODY, str(path)], capture_output=True, text=True,
                          timeout=30, check=True)
    return json.loads(done.stdout)


@pytest.fixture
def root_only() -> Iterator[Path]:
    """A folder like an engine's spool: root's, 0700, in /tmp (pytest's own tmp_path is below a
    folder only root enters: the tests that open the spool up must let nobody get that far)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a spool is root's, and the peers' users are root and nobody)")
    spool = Path(tempfile.mkdtemp(prefix="dolly-relay-test-", dir="/tmp"))
    assert stat.S_IMODE(os.lstat(spool).st_mode) == 0o700
    yield spool
    shutil.rmtree(spool, ignore_errors=True)


def test_the_relay_listens_on_a_root_only_unix_socket_that_nobody_else_reaches(root_only: Path):
    listener = Listener(root_only)
    try:
        assert listener.path == criu.relay_socket(root_only, listener.number)
        st = os.lstat(listener.path)
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
        # Even with the spool made passable (a mistake), the socket itself is root's alone.
        os.chmod(root_only, 0o711)
        assert as_nobody(listener.path) == {"uid": NOBODY, "error": "PermissionError"}
        assert listener.refused == 0
    finally:
        listener.close()
    assert not listener.path.exists()


def test_the_relay_takes_only_a_root_peer(root_only: Path):
    """SO_PEERCRED: with the spool and the socket opened to all (two mistakes), a peer that is
    not root is still turned away, gets nothing, and the root peer after it is the one joined."""
    listener = Listener(root_only)
    server = PageServer()
    relay = None
    try:
        os.chmod(root_only, 0o711)
        os.chmod(listener.path, 0o666)
        got = as_nobody(listener.path)
        assert got["uid"] == NOBODY and got.get("answer", "") == "", got
        deadline = time.monotonic() + 5
        while listener.refused < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener.refused == 1
        daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        daemon.connect(str(listener.path))
        relay = Relay(link_to(server), listener)
        daemon.sendall(record(PS_IOV_GET, 1, 0x7000))
        assert read_answer(daemon, 1)[:RECORD] == record(PS_IOV_GET, 1, 0x7000)
        assert not listener.path.exists(), "the socket stays once its peer is taken"
        daemon.close()
    finally:
        if relay is not None:
            relay.abort()
        listener.close()
    assert server.ended.wait(5) and server.seen == [PS_IOV_GET]


def test_the_relay_refuses_a_spool_that_others_may_enter(root_only: Path):
    os.chmod(root_only, 0o755)
    with pytest.raises(HostNotReady, match="only root may enter"):
        Listener(root_only)
    assert list(root_only.iterdir()) == []


# Run as root, drops to nobody, then listens on the unix socket argv[1] (in a folder root made
# passable) until killed, answering nothing.
LISTEN_AS_NOBODY = r"""
import os, socket, sys, time
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(4)
print("listening", flush=True)
while True:
    s.accept()
"""


def test_the_lazy_pages_daemon_is_never_handed_a_socket_of_someone_else(root_only: Path):
    """start_lazy_pages hands CRIU's daemon the connection it made to the relay: a socket at the
    relay's path put there by another user is refused before any daemon starts."""
    if criu.criu_command() is None:
        pytest.skip("no CRIU")
    os.chmod(root_only, 0o777)  # the mistake that would let another user put a socket there
    path = criu.relay_socket(root_only, 1234)
    fake = subprocess.Popen([sys.executable, "-c", LISTEN_AS_NOBODY, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None and fake.stdout.readline() == "listening\n"
        images = root_only / "x.restore"
        images.mkdir()
        with pytest.raises(HostNotReady, match="is not root's"):
            criu.start_lazy_pages(images, relay=1234, log=root_only / "lazy.log")
        assert not (images / criu.LAZY_PAGES_SOCKET).exists()
    finally:
        fake.kill()
        fake.wait()


def _listening_tcp(pid: int) -> list:
    """``(address, port)`` of the TCP sockets of process ``pid`` that listen, as its own network
    namespace has them (/proc/<pid>/net/tcp is that namespace's table)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # TCP_LISTEN
            addr, port = fields[1].split(":")
            found.append((socket.inet_ntoa(bytes.fromhex(addr)[::-1]), int(port, 16)))
    return found


def _criu_pids() -> list:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "criu":
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


# Run as root, drops to nobody, then connects to 127.0.0.1:argv[1] and, if it gets in, sends the
# close record a lazy-pages daemon ends with.
CLOSE_AS_NOBODY = r"""
import encodings.idna, json, os, socket, struct, sys  # idna: imported by connect(), unreadable to nobody here
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
out = {}
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
    out["connected"] = True
    s.sendall(struct.pack("<IxxxxQQQ", 0x1023, 0, 0, 0))
    out["answer"] = s.recv(4).hex()
    s.close()
except OSError as e:
    out["error"] = type(e).__name__
print(json.dumps(out))
"""


def test_a_lazy_dump_s_page_server_is_out_of_reach_of_other_users(client, run):
    """The page server of a post-copy dump listens in a network namespace of its own: a user on
    the host finds nothing to connect to on 127.0.0.1, while Dolly reaches it (and here breaks
    the dump off, so the source runs on with its memory)."""
    from dolly._engine import Engine
    from dolly._lazy_dump import checkpoint_lazy
    from helpers import BUSYBOX

    source = run(BUSYBOX, ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /n; sleep 0.1; done"])
    time.sleep(0.5)
    before = int(source.exec_run(["cat", "/n"]).output)
    cp, pending = checkpoint_lazy(Engine.of(client), source, f"lazy-{uuid.uuid4().hex[:8]}", port=criu.PAGE_SERVER_PORT)
    try:
        listeners = {pid: _listening_tcp(pid) for pid in _criu_pids()}
        serving = [pid for pid, found in listeners.items() if ("127.0.0.1", criu.PAGE_SERVER_PORT) in found]
        assert serving, f"no CRIU process listens on the page server's port: {listeners}"
        own = os.stat("/proc/self/ns/net").st_ino
        for pid in serving:
            assert os.stat(f"/proc/{pid}/ns/net").st_ino != own, "the page server listens in the host's namespace"
        got = json.loads(subprocess.run([sys.executable, "-c", CLOSE_AS_NOBODY, str(criu.PAGE_SERVER_PORT)],
                                        capture_output=True, text=True, timeout=30, check=True).stdout)
        assert got == {"error": "ConnectionRefusedError"}, got
        record_file = criu.lazy_netns_record(Engine.of(client).spool_dir, source.id)
        st = os.lstat(record_file)
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
        fd = criu.open_lazy_netns(record_file)
        try:
            link = SourceLink(criu.connect_in_netns(fd, criu.PAGE_SERVER_PORT))
        finally:
            os.close(fd)
        link.close()  # before any close record: a reset, and the source runs on
        with pytest.raises(CheckpointFailed):
            pending.wait(60)
    finally:
        if not pending.done():  # a failed assertion above: the source must still run on
            criu.break_off_page_server(criu.lazy_netns_record(Engine.of(client).spool_dir, source.id))
            with contextlib.suppress(CheckpointFailed):
                pending.wait(60)
        from dolly._catalog import remove_checkpoint

        remove_checkpoint(cp)
    source.reload()
    assert source.status == "running"
    time.sleep(0.3)
    assert int(source.exec_run(["cat", "/n"]).output) > before
    assert not record_file.exists()
