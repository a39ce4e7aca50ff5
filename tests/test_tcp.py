"""Checkpoints of servers holding established TCP connections: a real HTTP server with a real
keep-alive client (this test, over the engine's bridge), refused without ``tcp_established``
in Dolly's words, taken with it while the server keeps serving the client, and cloned and
migrated with the connections closed."""
from __future__ import annotations

import http.client
import ipaddress
import json
import struct
from typing import Iterator, List, Tuple

import pytest
from click.testing import CliRunner

import dolly
from dolly import errors, ready
from dolly._connections import connected_sockets, refusal as tcp_refusal
from dolly.cli import cli
from helpers import PYTHON

# Every request answers the in-memory counter and the token made at start-up; /hit counts one.
# HTTP/1.1 with a length: the connection stays open between requests (keep-alive), each held
# by a thread of its own, as a real server holds its clients.
SERVER = """
import http.server, json, os
token = os.urandom(4).hex()
hits = 0
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        global hits
        if self.path == "/hit":
            hits += 1
        body = json.dumps({"hits": hits, "token": token}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("", 8000), H).serve_forever()
"""

ESTABLISHED = "01"


class KeepAlive:
    """One client connection to a container's server, kept open across requests."""

    def __init__(self, container, *, timeout: float = 10.0) -> None:
        container.reload()
        self.conn = http.client.HTTPConnection(ready.ip_address(container), 8000, timeout=timeout)
        self.conn.connect()
        self.sock = self.conn.sock
        self.local = self.sock.getsockname()

    def get(self, path: str = "/hit") -> dict:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        assert resp.status == 200
        body = json.loads(resp.read())
        # http.client opens a new connection by itself only once its socket is gone: the same
        # socket object, at the same local port, is the same connection.
        assert self.conn.sock is self.sock and self.sock.getsockname() == self.local
        return body

    def close(self) -> None:
        self.conn.close()


def _request_on(conn: http.client.HTTPConnection) -> bytes:
    conn.request("GET", "/hit")
    return conn.getresponse().read()


def fresh(container, path: str = "/") -> dict:
    """An answer on a new connection."""
    container.reload()
    conn = http.client.HTTPConnection(ready.ip_address(container), 8000, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def tcp_table(container) -> List[Tuple[str, int, str, int, str]]:
    """(local address, port, remote address, port, state) of every IPv4 TCP socket of the
    container's network namespace, read in it (/proc/net/tcp)."""
    res = container.exec_run(["cat", "/proc/net/tcp"])
    assert res.exit_code == 0, res.output

    def addr(text: str) -> Tuple[str, int]:
        ip, port = text.split(":")
        return str(ipaddress.IPv4Address(struct.pack("<I", int(ip, 16)))), int(port, 16)

    rows = []
    for line in res.output.decode().splitlines()[1:]:
        f = line.split()
        rows.append((*addr(f[1]), *addr(f[2]), f[3]))
    return rows


@pytest.fixture
def server(run):
    c = run(PYTHON, ["python3", "-c", SERVER], runtime="dolly")
    ready.wait(c, ready.http(8000), timeout=60)
    return c


@pytest.fixture
def client_of(server) -> Iterator[KeepAlive]:
    client = KeepAlive(server)
    yield client
    client.close()


# --- unit: the error translation ------------------------------------------------------------------

CRIU_LINES = [
    "(00.011742) Error (criu/sk-inet.c:199): inet: Connected TCP socket, consider using --tcp-established option.",
    "(00.011790) Error (criu/cr-dump.c:1645): Dump files (pid: 3001) failed with -1",
    "(00.012655) Error (criu/cr-dump.c:2063): Dumping FAILED.",
]


def test_tcp_refusal_says_the_cause_and_the_fix_then_criu_lines():
    cause = errors.CheckpointFailed("checkpoint of container 1a2b failed: runc did not terminate successfully",
                                    log_lines=CRIU_LINES, log_path=None)
    e = tcp_refusal(cause, "web", 2)
    assert isinstance(e, errors.CheckpointFailed)
    text = str(e)
    assert text.startswith("container web was not checkpointed: it has established TCP connections (2)")
    assert "Pass tcp_established=True (CLI: --tcp-established)" in text
    assert "keeps running" in text
    assert e.log_lines == CRIU_LINES
    assert text.index("--tcp-established)") < text.index("consider using --tcp-established option")


def test_tcp_refusal_names_the_runtime_when_it_is_not_dollys():
    cause = errors.CheckpointFailed("failed", log_lines=CRIU_LINES)
    text = str(tcp_refusal(cause, "web", None, runtime="runc"))
    assert "established TCP connections," in text  # no count when unknown
    assert "runs under 'runc'" in text and "--runtime dolly" in text


def test_tcp_refusal_leaves_other_failures_alone():
    other = errors.CheckpointFailed("failed", log_lines=["(00.1) Error (criu/cr-dump.c:389): Can't get rlimit 0"])
    assert tcp_refusal(other, "web", 1) is None
    # Under another runtime Docker keeps no CRIU log: connections open are the evidence, or nothing.
    assert tcp_refusal(errors.CheckpointFailed("failed"), "web", 0, runtime="runc") is None
    assert "(3)" in str(tcp_refusal(errors.CheckpointFailed("failed"), "web", 3, runtime="runc"))


def test_connected_sockets_counts_what_criu_refuses():
    table = "\n".join([
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
        "   0: 00000000:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1",  # listen
        "   1: 020011AC:1F40 010011AC:9C40 01 00000000:00000000 00:00000000 00000000     0        0 1002 1",  # est.
        "   2: 020011AC:1F40 010011AC:9C42 08 00000000:00000000 00:00000000 00000000     0        0 1003 1",  # c-wait
        "   3: 020011AC:1F40 010011AC:9C44 06 00000000:00000000 03:00001000 00000000     0        0 0 3",  # t-wait
        "   4: 020011AC:1F40 010011AC:9C46 01 00000000:00000000 00:00000000 00000000     0        0 0 1",  # no owner
    ])
    assert connected_sockets(table) == 2


def test_cli_checkpoint_offers_tcp_established():
    out = CliRunner().invoke(cli, ["checkpoint", "--help"])
    assert out.exit_code == 0 and "--tcp-established" in out.output


# --- engine ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("leave_running", [True, False])
def test_open_connection_refused_with_the_fix_and_the_source_serves_on(server, client_of, leave_running):
    before = client_of.get()
    with pytest.raises(errors.CheckpointFailed) as caught:
        dolly.checkpoint(server, "with-client", leave_running=leave_running)
    text = str(caught.value)
    assert f"container {server.name} was not checkpointed: it has established TCP connections (1)" in text
    assert "tcp_established=True (CLI: --tcp-established)" in text
    assert any("Connected TCP socket" in line for line in caught.value.log_lines)
    assert caught.value.kept is None
    server.reload()
    assert server.status == "running"
    after = client_of.get()  # the same connection, served
    assert after == {"hits": before["hits"] + 1, "token": before["token"]}
    assert dolly.list_checkpoints(server) == []


def test_checkpoint_with_connections_keeps_serving_and_clones_hold_none(server, client_of):
    client_of.get()
    at_checkpoint = client_of.get()
    cp = dolly.checkpoint(server, "with-client", tcp_established=True)
    assert cp.tcp_established is True
    assert dolly.get_checkpoint(server.name, "with-client").tcp_established is True

    # The source goes on serving the client it had, on the same connection.
    assert client_of.get() == {"hits": at_checkpoint["hits"] + 1, "token": at_checkpoint["token"]}
    source_ip, source_port = server.attrs["NetworkSettings"]["IPAddress"], 8000
    client_ip, client_port = client_of.local
    assert any(row == (source_ip, source_port, client_ip, client_port, ESTABLISHED) for row in tcp_table(server))

    clone = dolly.restore(cp)
    try:
        clone.reload()
        assert clone.attrs["NetworkSettings"]["IPAddress"] != source_ip
        # Read before any new connection: the connection the checkpoint carried was restored
        # closed, and no other is open.
        table = tcp_table(clone)
        assert not [row for row in table if row[3] == client_port], table
        assert not [row for row in table if row[4] == ESTABLISHED], table
        # New connections get the memory of the checkpoint.
        assert fresh(clone) == at_checkpoint
        assert fresh(clone, "/hit") == {"hits": at_checkpoint["hits"] + 1, "token": at_checkpoint["token"]}
    finally:
        clone.remove(force=True)
    # And the source still serves its client, its own count untouched by the clone's.
    assert client_of.get() == {"hits": at_checkpoint["hits"] + 2, "token": at_checkpoint["token"]}


def test_connections_need_dollys_runtime(run):
    c = run(PYTHON, ["python3", "-c", SERVER], runtime="runc")
    ready.wait(c, ready.http(8000), timeout=60)
    client = KeepAlive(c)
    try:
        client.get()
        with pytest.raises(errors.CheckpointFailed) as caught:
            dolly.checkpoint(c, "with-client", tcp_established=True)
        assert "runs under 'runc'" in str(caught.value) and "--runtime dolly" in str(caught.value)
        c.reload()
        assert c.status == "running"
        assert client.get()["hits"] == 2
    finally:
        client.close()


def test_migrate_closes_the_connections_the_address_does_not_move(server, client_of, engine_b):
    client_of.get()
    at_move = client_of.get()
    source_ip = server.attrs["NetworkSettings"]["IPAddress"]
    client_of.sock.settimeout(3)
    moved = dolly.migrate(server, engine_b)
    target = moved.container
    try:
        target.reload()
        # Separate engines, separate bridges: the address does not move with the container.
        assert ready.ip_address(target) != source_ip
        table = tcp_table(target)
        assert not [row for row in table if row[3] == client_of.local[1]], table
        assert not [row for row in table if row[4] == ESTABLISHED], table
        assert fresh(target) == at_move
        # The old connection's peer is gone with the source.
        with pytest.raises((OSError, http.client.HTTPException)):
            _request_on(client_of.conn)
    finally:
        target.remove(force=True)
