"""Live migration and clones spread over two real engines on this machine."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest

import dolly
from dolly import errors, ready
from dolly.engine import Engine
from helpers import BUSYBOX, COUNTER, ENGINE_B_URL, PYTHON, RUN_ID, ask, assert_counts_on, kernel_hostname, read_int

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
        before = ask(stateful)
        with pytest.raises(errors.NameConflict):
            dolly.migrate(stateful, engine_b)
        with pytest.raises(errors.InvalidArgument):
            dolly.migrate(stateful, client)
        stateful.reload()
        assert stateful.status == "running"
        after = ask(stateful)
        assert after["token"] == before["token"] and after["hits"] == before["hits"] + 1
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


def volume_file(client, name: str, path: str) -> str:
    return (Path(client.volumes.get(name).attrs["Mountpoint"]) / path).read_text()


@pytest.fixture
def counter_with_volumes(run, client, engine_b):
    """A counter with a named and an anonymous volume, each holding a file it wrote."""
    named = f"dolly-test-vol-{RUN_ID}"
    source = run(BUSYBOX, ["sh", "-c", "echo kept > /named/f; echo anon > /anon/f; " + COUNTER],
                 mounts=[docker.types.Mount("/named", named, type="volume"),
                         docker.types.Mount("/anon", None, type="volume")])
    time.sleep(1)
    source.reload()
    anonymous = next(m["Name"] for m in source.attrs["Mounts"] if m["Destination"] == "/anon")
    yield source, named, anonymous
    for engine_client in (client, engine_b):
        for c in engine_client.containers.list(all=True, filters={"name": source.name}):
            c.remove(force=True, v=True)
    for engine_client in (client, engine_b):
        for v in (named, anonymous):
            try:
                engine_client.volumes.get(v).remove(force=True)
            except docker.errors.NotFound:
                pass


def test_migrate_refuses_a_source_with_volumes(counter_with_volumes, engine_b):
    source, named, anonymous = counter_with_volumes
    before = read_int(source)
    with pytest.raises(errors.InvalidArgument, match="drop_volumes") as info:
        dolly.migrate(source, engine_b)
    assert named in str(info.value) and anonymous in str(info.value)
    source.reload()
    assert source.status == "running"
    assert_counts_on(source, before, new=False)
    assert source.exec_run(["cat", "/named/f", "/anon/f"]).output == b"kept\nanon\n"
    assert dolly.list_checkpoints(source) == []
    assert engine_b.containers.list(all=True, filters={"name": source.name}) == []


def test_migrate_with_drop_volumes_leaves_the_volumes_on_the_source_engine(counter_with_volumes, client, engine_b):
    source, named, anonymous = counter_with_volumes
    before = read_int(source)
    moved = dolly.migrate(source, engine_b, drop_volumes=True).container
    assert_counts_on(moved, before)
    # On the target: fresh, empty volumes.
    assert moved.exec_run(["ls", "-A", "/named", "/anon"]).output.decode().split() == ["/anon:", "/named:"]
    # On the source engine: the source is gone, its volumes and their files are not.
    with pytest.raises(errors.ContainerNotFound):
        Engine.of(client).container(source.id)
    assert volume_file(client, named, "f") == "kept\n"
    assert volume_file(client, anonymous, "f") == "anon\n"


# Migrate in a process where pycriu cannot be imported: the dump stops the source, then reading
# the hostname from the UTS image fails, so the checkpoint fails after the dump.
WITHOUT_PYCRIU = """
import sys
sys.modules["pycriu"] = None
sys.modules["pycriu.images"] = None
import docker, dolly
from dolly import errors
try:
    dolly.migrate(sys.argv[1], docker.DockerClient(base_url=sys.argv[2]))
except errors.MigrationFailed as e:
    print("failed at", e.step)
    print(e)
else:
    print("moved")
"""


def test_a_checkpoint_failing_after_the_dump_leaves_the_source_running_on(run, client, engine_b, engine):
    source = run(BUSYBOX, ["sh", "-c", COUNTER])
    time.sleep(2)
    before = read_int(source)
    res = subprocess.run([sys.executable, "-c", WITHOUT_PYCRIU, source.name, ENGINE_B_URL],
                         capture_output=True, text=True, timeout=300)
    assert res.stdout.startswith("failed at checkpoint\n"), res.stdout + res.stderr
    assert "running again" in res.stdout
    source.reload()
    assert source.status == "running", res.stdout + res.stderr
    assert_counts_on(source, before, new=False)
    assert dolly.list_checkpoints(source) == [], "the kept images were not removed"
    assert not [p for p in engine.spool_dir.glob(f"{source.id}*") if p.is_dir()], "a spool folder was left"
    assert not (engine.store_dir / source.id).exists() or not any((engine.store_dir / source.id).iterdir())
    assert engine_b.containers.list(all=True, filters={"name": source.name}) == []
