"""The post-copy relay's logic, against a stand-in for CRIU's page server on loopback.

The stand-in answers as criu/page-xfer.c's page_server_serve() does for a lazy dump: a record of
32 bytes per request, pages for PS_IOV_GET, a 4-byte status for PS_IOV_CLOSE and then a wait for
the end of the connection. It records how the connection ended, which is what decides the
source's fate in CRIU: a clean end after the close record ends the dump (the source's processes
die), a reset fails it (they run on), and a clean end *without* the close record counts as a
finished transfer too, which must never happen while the target lacks pages.
"""
from __future__ import annotations

import socket
import struct
import threading

import pytest

from dolly._postcopy import PS_IOV_CLOSE, RECORD, Records, Relay, SourceLink, is_close

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
    link = SourceLink(server.port)
    link.send(record(PS_IOV_GET, 1, 0x5000)[:10])
    link.send(record(PS_IOV_GET, 1, 0x5000)[10:])
    assert len(link.recv()) > 0
    link.send(record(PS_IOV_CLOSE))
    link.close()
    assert server.ended.wait(5)
    assert server.outcome == "clean end" and server.seen == [PS_IOV_GET, PS_IOV_CLOSE]


def test_a_link_closed_before_the_close_record_resets_the_connection():
    server = PageServer()
    link = SourceLink(server.port)
    link.send(record(PS_IOV_GET, 1, 0x5000))
    link.close()
    assert server.ended.wait(5)
    assert server.outcome == "reset", "a clean end here would make CRIU end the source's processes"


@pytest.fixture
def relayed():
    """A page server, a relay to it, and the daemon's socket at the relay's other end."""
    server = PageServer()
    daemon, relay_side = socket.socketpair()
    relay = Relay(SourceLink(server.port), Pipe(relay_side))
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
    link = SourceLink(server.port)
    with pytest.raises(ValueError, match="does not send"):
        link.send(record(PS_IOV_GET, 0, 0x5000))  # no pages
    link.close()
    assert server.ended.wait(5)
    assert server.outcome == "reset" and server.seen == []
