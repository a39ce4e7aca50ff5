"""Live migration and clones spread over two real engines on this machine."""
from __future__ import annotations

import pytest

import dolly
from dolly import errors, ready
from dolly.engine import Engine
from helpers import BUSYBOX, PYTHON, ask, kernel_hostname

# A counter in memory and a file written at start-up: both must survive the move.
STATEFUL = """
import http.server, json, os, socket
token = os.urandom(4).hex()
with open("/var/tmp/born", "w") as f:
    f.write(token)
hits = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global hits
        hits += 1
        body = json.dumps({"hits": hits, "token": token, "host": socket.gethostname()}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("", 8000), H).serve_forever()
"""


@pytest.fixture
def stateful(run):
    c = run(PYTHON, ["python3", "-c", STATEFUL])
    ready.wait(c, ready.http(8000), timeout=60)
    for _ in range(5):
        ask(c)
    return c


def test_migrate_keeps_memory_and_files(stateful, client, engine_b):
    before = ask(stateful)
    name = stateful.name
    moved = dolly.migrate(stateful, engine_b)
    try:
        assert moved.container.name == name and moved.container.status == "running"
        assert 0 < moved.downtime < 60
        assert set(moved.steps) == {"checkpoint", "export", "import", "restore", "verify"}
        after = ask(moved.container)
        assert after["token"] == before["token"]
        assert after["hits"] == before["hits"] + 1, "the in-memory counter did not survive"
        assert moved.container.exec_run(["cat", "/var/tmp/born"]).output.decode() == before["token"]
        with pytest.raises(errors.ContainerNotFound):
            Engine.of(client).container(stateful.id)
        assert dolly.list_checkpoints(None, engine_b) == []
    finally:
        moved.container.remove(force=True)


def test_migrate_refuses_before_touching_anything(stateful, client, engine_b):
    busybox = client.images.get(BUSYBOX)
    Engine.of(engine_b).ensure_image(busybox.id, BUSYBOX, source=Engine.of(client))
    other = engine_b.containers.run(BUSYBOX, ["sleep", "60"], name=stateful.name, detach=True)
    try:
        with pytest.raises(errors.NameConflict):
            dolly.migrate(stateful, engine_b)
        with pytest.raises(errors.InvalidArgument):
            dolly.migrate(stateful, client)
        stateful.reload()
        assert stateful.status == "running" and ask(stateful)["hits"] >= 6
        assert dolly.list_checkpoints(stateful) == []
    finally:
        other.remove(force=True)


def test_clones_spread_over_two_engines(stateful, client, engine_b):
    cp = dolly.checkpoint(stateful, "spread")
    clones = dolly.clone(cp, 4, engines=[client, engine_b])
    try:
        on_a = [c for c in clones if c.client is client]
        on_b = [c for c in clones if c.client is engine_b]
        assert len(on_a) == len(on_b) == 2
        tokens = {ask(c)["token"] for c in clones}
        assert tokens == {ask(stateful)["token"]}
        assert len({kernel_hostname(c) for c in clones}) == 4
        assert dolly.list_checkpoints(None, engine_b) == [], "the copy on engine b was not removed"
    finally:
        for c in clones:
            c.remove(force=True)
