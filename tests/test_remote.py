"""Engines on other hosts: every public function through the engine's API alone.

host_b, host_c and host_tls (tests/engines.py IsolatedEngine) are dockerds in mount namespaces of
their own, with their own data roots and /etc/docker, reached only over their sockets (host_tls
over TCP with verified TLS). No test here touches their files: Dolly reaches them through its
agent, a container it keeps on each of them.
"""
from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import docker
import pytest
import zstandard

import dolly
from dolly import errors, trust
from dolly._agent import NAME as AGENT
from dolly._archive import tarfile
from dolly._bundle import read_manifest
from dolly._engine import Engine
from engines import IsolatedEngine
from helpers import BUSYBOX, COUNTER, RUN_ID, TEST_LABEL, assert_counts_on, read_int

FILE_AND_COUNTER = "echo carried > /carried; " + COUNTER


@pytest.fixture
def on_host():
    """``on_host(client)``: a counter with a file in its writable layer, on that engine; what the
    test made there (containers labelled for this run, Dolly's checkpoints of them) goes after."""
    made = []

    def start(client: docker.DockerClient):
        c = client.containers.run(BUSYBOX, ["sh", "-c", FILE_AND_COUNTER], detach=True, labels={TEST_LABEL: RUN_ID})
        made.append(client)
        time.sleep(0.5)
        return c

    yield start
    for client in made:
        for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={RUN_ID}"}):
            for cp in dolly.list_checkpoints(c.id, client):
                dolly.remove_checkpoint(cp)
            c.remove(force=True)
        for cp in dolly.list_checkpoints(client=client):
            if cp.config.get("Config", {}).get("Labels", {}).get(TEST_LABEL) == RUN_ID:
                dolly.remove_checkpoint(cp)


def test_checkpoint_and_clone_on_another_host(on_host, host_b):
    assert not Engine.of(host_b).files_are_local()
    source = on_host(host_b)
    before = read_int(source)
    cp = dolly.checkpoint(source.id, "there", client=host_b)
    assert cp.client is host_b
    assert not cp.path.exists(), "the checkpoint was written on this machine, not on host b"
    assert dolly.list_checkpoints(source.id, host_b) == [cp]
    clones = dolly.clone(cp, 2)  # no client: the checkpoint knows its engine
    for clone in clones:
        assert host_b.containers.get(clone.id).status == "running"
        assert clone.exec_run(["cat", "/carried"]).output == b"carried\n"
        assert_counts_on(clone, before)
    assert len({c.attrs["Config"]["Hostname"] for c in clones}) == 2
    dolly.remove_checkpoint(cp)
    assert dolly.list_checkpoints(source.id, host_b) == []


def test_export_from_one_host_import_into_another(on_host, host_b, host_c, tmp_path):
    private, public = trust.generate_keypair()
    source = on_host(host_b)
    before = read_int(source)
    cp = dolly.checkpoint(source.id, "moving", client=host_b)
    path = dolly.export(cp, tmp_path / "b.dolly", signer=private, compression="zstd")
    manifest = read_manifest(path)
    assert manifest["signer"] == trust.key_id(public) and manifest["compression"] == "zstd"
    assert manifest["source"]["engine_id"] == Engine.of(host_b).info()["ID"]
    # A byte of a member changed on the way is refused there, and nothing of it stays.
    (tmp_path / "bad.dolly").write_bytes(_with_a_member_byte_changed(path))
    with pytest.raises(errors.BundleError):
        dolly.import_bundle(tmp_path / "bad.dolly", client=host_c, trusted_keys=[public])
    assert dolly.list_checkpoints(client=host_c) == []
    cp_c = dolly.import_bundle(path, client=host_c, trusted_keys=[public])
    try:
        assert cp_c.client is host_c and cp_c.origin["signer"] == trust.key_id(public)
        (clone,) = dolly.clone(cp_c, 1)
        assert host_c.containers.get(clone.id).exec_run(["cat", "/carried"]).output == b"carried\n"
        assert_counts_on(clone, before)
        clone.remove(force=True)
    finally:
        dolly.remove_checkpoint(cp_c)


def _with_a_member_byte_changed(path: Path) -> bytes:
    """The zstd bundle at ``path`` with one byte in the middle of its largest member flipped. Not
    a byte anywhere in the file: about 0.5 % of the compressed bytes only encode tar's padding and
    header fields Dolly does not use (mtime, owner), or zstd's frame flags, and change no member."""
    raw = bytearray(zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes())).read())
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
        largest = max((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.size)
    raw[largest.offset_data + largest.size // 2] ^= 0x01
    return zstandard.ZstdCompressor().compress(bytes(raw))


def test_migrate_around_three_engines(on_host, client, host_b, host_c, run):
    """A -> B -> C -> A, the counter going on from where it was and the file kept at each hop."""
    moving = run(BUSYBOX, ["sh", "-c", FILE_AND_COUNTER])
    time.sleep(0.5)
    on_host(host_b), on_host(host_c)  # so that what lands there is removed after the test
    for source_client, target_client in ((client, host_b), (host_b, host_c), (host_c, client)):
        before = read_int(moving)
        moved = dolly.migrate(moving.id, target_client, source_client=source_client)
        assert moved.container.client is target_client
        assert moved.container.exec_run(["cat", "/carried"]).output == b"carried\n"
        assert_counts_on(moved.container, before)
        with pytest.raises(docker.errors.NotFound):
            source_client.containers.get(moving.id)
        moving = moved.container
    assert client.containers.get(moving.id).status == "running"


def test_clone_spread_over_three_engines(client, host_b, host_c, run):
    source = run(BUSYBOX, ["sh", "-c", FILE_AND_COUNTER])
    time.sleep(0.5)
    before = read_int(source)
    cp = dolly.checkpoint(source, "spread")
    clones = dolly.clone(cp, 6, engines=[client, host_b, host_c])
    try:
        for engine_client in (client, host_b, host_c):
            mine = [c for c in clones if c.client is engine_client]
            assert len(mine) == 2
            for c in mine:
                assert engine_client.containers.get(c.id).status == "running"
                assert_counts_on(c, before)
        # The copies made on the other engines for this call are gone again.
        assert dolly.list_checkpoints(client=host_b) == [] and dolly.list_checkpoints(client=host_c) == []
    finally:
        for c in clones:
            c.remove(force=True)


def test_an_engine_over_tcp_with_tls(on_host, host_tls):
    source = on_host(host_tls)
    before = read_int(source)
    cp = dolly.checkpoint(source.id, "tls", client=host_tls)
    (clone,) = dolly.clone(cp, 1)
    assert_counts_on(clone, before)
    assert host_tls.api.base_url.startswith("https://")


def test_a_bundle_streams_into_an_engine_over_tls(on_host, client, host_tls, tmp_path, run):
    """Over TLS a half-closed stream would end the session: the import must still answer."""
    private, public = trust.generate_keypair()
    source = run(BUSYBOX, ["sh", "-c", FILE_AND_COUNTER])
    time.sleep(0.5)
    before = read_int(source)
    here = dolly.checkpoint(source, "tls-in")
    path = dolly.export(here, tmp_path / "t.dolly", signer=private)
    dolly.remove_checkpoint(here)
    source.remove(force=True)
    cp = dolly.import_bundle(path, client=host_tls, trusted_keys=[public])
    try:
        assert cp.client is host_tls and cp.origin["signer"] == trust.key_id(public)
        (clone,) = dolly.clone(cp, 1)
        assert_counts_on(clone, before)
        clone.remove(force=True)
    finally:
        dolly.remove_checkpoint(cp)


def test_an_agent_error_comes_back_as_itself(host_b, tmp_path):
    with pytest.raises(errors.ContainerNotFound, match="f" * 12):
        dolly.get_checkpoint("f" * 64, "none", host_b)
    with pytest.raises(errors.ContainerNotFound, match="no-such-container"):
        dolly.checkpoint("no-such-container", "x", client=host_b)
    with pytest.raises(errors.InvalidArgument):
        dolly.checkpoint("no-such-container", "../x", client=host_b)  # refused here, before the agent


def test_check_host_checks_another_host_completely(host_b):
    report = dolly.check_host(host_b)
    assert report.ok, str(report)
    names = [c.name for c in report.checks]
    for line in ("agent", "experimental mode", "'dolly' runtime", "CRIU version", "criu check",
                 "lazy pages (post-copy target)", "pycriu"):
        assert line in names
    (agent,) = host_b.containers.list(filters={"label": "dolly.agent"})
    assert agent.name.startswith(AGENT) and agent.status == "running"


def test_a_transfer_cut_in_the_middle_leaves_the_source_running(client, run):
    """The target engine dies while the bundle is on its way: the source goes on, with its
    memory, and nothing of the move stays on this side."""
    target = IsolatedEngine(f"cut{RUN_ID[:4]}", subnet="10.213.119.1/24")
    d = target.start()
    try:
        source = run(BUSYBOX, ["sh", "-c", FILE_AND_COUNTER])
        time.sleep(0.5)
        before = read_int(source)

        def kill_when_the_agent_starts() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if d.containers.list(filters={"label": "dolly.agent"}):
                        target.kill()
                        return
                except Exception:
                    return
                time.sleep(0.01)

        watcher = threading.Thread(target=kill_when_the_agent_starts, daemon=True)
        watcher.start()
        with pytest.raises(errors.MigrationFailed):
            dolly.migrate(source, d)
        watcher.join(timeout=10)
        source.reload()
        assert source.status == "running"
        assert_counts_on(source, before, new=False)
        assert dolly.list_checkpoints(source) == []
        assert not any(Engine.of(client).spool_dir.glob("*"))
    finally:
        target.stop()


# --- post-copy: the process runs on the target while its memory follows ---------------------------


def _checkpoints_of(container_id: str, *clients) -> list:
    return [cp for c in clients for cp in dolly.list_checkpoints(client=c) if cp.container_id == container_id]


def test_post_copy_migration_around_three_engines(on_host, client, host_b, host_c, run):
    """A -> B -> C -> A with the memory following each move: the counter goes on from where it
    was, the file is kept, and nothing of a move stays on either side."""
    moving = run(BUSYBOX, ["sh", "-c", FILE_AND_COUNTER])
    time.sleep(0.5)
    on_host(host_b), on_host(host_c)
    for source_client, target_client in ((client, host_b), (host_b, host_c), (host_c, client)):
        before = read_int(moving)
        moved = dolly.migrate(moving.id, target_client, source_client=source_client, post_copy=True)
        assert set(moved.steps) == {"checkpoint", "transfer", "restore", "verify", "memory"}
        assert moved.container.client is target_client
        assert moved.container.exec_run(["cat", "/carried"]).output == b"carried\n"
        assert_counts_on(moved.container, before)
        with pytest.raises(docker.errors.NotFound):
            source_client.containers.get(moving.id)
        assert _checkpoints_of(moving.id, source_client, target_client) == []
        moving = moved.container
    assert client.containers.get(moving.id).status == "running"
    assert not any(Engine.of(client).spool_dir.glob("*"))


@pytest.fixture
def warm_service(run):
    """The demo service holding 64 MB of random state: its memory takes a while to follow."""
    from dolly.demo import SERVICE
    from helpers import PYTHON, ask

    c = run(PYTHON, ["python3", "-c", SERVICE], environment={"STATE_MB": "64", "RANDOM_STATE": "1"})
    dolly.ready.wait(c, dolly.ready.http(8000), timeout=120)
    return c, ask


def _lazy_daemons_of(container_id: str) -> list:
    """The pids of CRIU lazy-pages daemons serving a container (their folder names it)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lazy-pages" in argv and any(container_id.encode() in a for a in argv):
            found.append(int(proc.name))
    return found


def _assert_the_source_as_it_was(source, before: dict, ask, client, target) -> None:
    """After a rolled-back move: the source runs on with its memory (the same token and table,
    one more request served), and nothing of the move is left on either engine."""
    source.reload()
    assert source.status == "running"
    after = ask(source)
    assert (after["token"], after["checksum"], after["served"]) == (before["token"], before["checksum"],
                                                                     before["served"] + 1)
    assert target.containers.list(all=True, filters={"name": source.name}) == []
    assert _checkpoints_of(source.id, client, target) == []


def test_a_post_copy_migration_that_fails_its_check_leaves_the_source_as_it_was(warm_service, client, host_b):
    source, ask = warm_service
    before = ask(source)
    with pytest.raises(errors.MigrationFailed) as info:
        dolly.migrate(source, host_b, ready=lambda c: False, ready_timeout=3, post_copy=True)
    assert info.value.step == "verify", str(info.value)
    _assert_the_source_as_it_was(source, before, ask, client, host_b)
    assert not any(Engine.of(client).spool_dir.glob("*"))


def test_a_post_copy_target_losing_its_memory_mid_way_brings_the_source_back(warm_service, client, host_b):
    """The target's lazy-pages daemon dies while the memory is on its way, after the moved
    container passed its check: the relay sees the transfer break off, the move rolls back, and
    the source, frozen with its memory until then, runs on."""
    source, ask = warm_service
    before = ask(source)
    killed: list = []

    def kill_the_daemon_and_pass(c) -> bool:
        for pid in _lazy_daemons_of(c.id):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return True

    with pytest.raises(errors.MigrationFailed) as info:
        dolly.migrate(source, host_b, ready=kill_the_daemon_and_pass, post_copy=True)
    assert killed, "no lazy-pages daemon was found to kill"
    # Either the transfer is seen to break off, or the moved process dies of it first (a fault
    # the daemon no longer serves): the move rolls back in both.
    assert (info.value.step, "broke off" in str(info.value) or "did not keep running" in str(info.value)) in (
        ("memory", True), ("verify", True)), str(info.value)
    _assert_the_source_as_it_was(source, before, ask, client, host_b)
