"""Engines on other hosts: every public function through the engine's API alone.

host_b, host_c and host_tls (tests/engines.py IsolatedEngine) are dockerds in mount namespaces of
their own, with their own data roots and /etc/docker, reached only over their sockets (host_tls
over TCP with verified TLS). No test here touches their files: Dolly reaches them through its
agent, a container it keeps on each of them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
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
from dolly._archive import tarfile
from dolly._engine import Engine
from dolly._hosts import agent_image
from dolly._hosts.agent import (
    AGENT_CAPABILITIES,
    DIGEST_LABEL,
    LABEL,
    NAME as AGENT,
    PROTOCOL,
    Agent,
    AgentSpec,
    agent_name,
    agent_secret,
)
from dolly._hosts.channel import Channel
from dolly._manifest import read_manifest
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
        # One copy on each other engine, kept there: a second spread uses it, copying nothing.
        copies = {e: dolly.list_checkpoints(source.id, client=e) for e in (host_b, host_c)}
        assert all([(x.name, x.created_at, x.origin["copy"]) for x in found] == [("spread", cp.created_at, True)]
                   for found in copies.values())
        again = dolly.clone(cp, 3, engines=[client, host_b, host_c])
        clones += again
        for c in again:
            assert_counts_on(c, before)
        for e, found in copies.items():
            assert [(x.path, x.origin["imported_at"]) for x in dolly.list_checkpoints(source.id, client=e)] == \
                [(x.path, x.origin["imported_at"]) for x in found]
    finally:
        for c in clones:
            c.remove(force=True)
        for e in (host_b, host_c):
            with contextlib.suppress(errors.ContainerNotFound):  # no copy made there
                for x in dolly.list_checkpoints(source.id, client=e):
                    dolly.remove_checkpoint(x)


def test_a_spread_uses_the_original_an_engine_holds(client, host_c, run, tmp_path, keys):
    """A checkpoint taken on C, exported and imported here, then spread over here and C: C
    clones its own original (it used to be copied back to C and fail with CheckpointExists)."""
    private, public = keys
    source = host_c.containers.run(BUSYBOX, ["sh", "-c", FILE_AND_COUNTER], detach=True,
                                   labels={TEST_LABEL: RUN_ID})
    clones: list = []
    here = None
    try:
        time.sleep(0.5)
        before = read_int(source)
        original = dolly.checkpoint(source.id, "home", client=host_c)
        bundle = dolly.export(original, tmp_path / "home.dolly", signer=private)
        here = dolly.import_bundle(bundle, client=client, trusted_keys=[public], image_source=host_c)
        clones = dolly.clone(here, 4, engines=[client, host_c])
        on_c = [c for c in clones if c.client is host_c]
        assert len(on_c) == 2 and all(c.labels.get("dolly.source") == source.id for c in on_c)
        assert [x.path for x in dolly.list_checkpoints(source.id, client=host_c)] == [original.path]
        for c in clones:
            assert_counts_on(c, before)
    finally:
        for c in clones:
            c.remove(force=True)
        if here is not None:
            dolly.remove_checkpoint(here)
        source.remove(force=True)
        for x in dolly.list_checkpoints(source.id, client=host_c):
            dolly.remove_checkpoint(x)


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


# --- the agent is known, not named (issue 22) -----------------------------------------------------


def _fresh_agent(client: docker.DockerClient) -> Agent:
    """This process's Agent of that engine, made to look its container up again on next use."""
    agent = Channel.of(Engine.of(client)).agent
    agent._id = None
    return agent


def _agent_binds(agent_id: str, client: docker.DockerClient) -> list:
    return client.api.inspect_container(agent_id)["HostConfig"]["Binds"]


@pytest.mark.parametrize("label", ["none", "copied from Dolly's agent"])
def test_an_impostor_under_the_agent_s_name_is_never_used(host_b, tmp_path, label):
    """A container that anyone with access to the engine made under the agent's name, with the
    agent's image, command and environment but a host folder bound in (and, in the second case,
    the digest label of Dolly's real agent, read with `docker inspect` and copied): Dolly neither
    execs in it nor keeps it; it makes its own agent, which carries no such folder."""
    engine = Engine.of(host_b)
    real = _fresh_agent(host_b).container_id()
    real_attrs = host_b.api.inspect_container(real)
    digest = real_attrs["Config"]["Labels"][DIGEST_LABEL]
    host_b.api.remove_container(real, force=True)
    labels = {LABEL: PROTOCOL, **({DIGEST_LABEL: digest} if label != "none" else {})}
    spec = AgentSpec.of(engine.info(refresh=True), host_b.api.inspect_image(agent_image.reference()))
    impostor = host_b.containers.run(
        agent_image.reference(), ["sleep", "infinity"], detach=True, name=agent_name(), labels=labels,
        environment=dict(spec.env), cap_add=AGENT_CAPABILITIES, pid_mode="host",
        network_mode="none", runtime="runc", security_opt=list(spec.security_opt),
        volumes=[*spec.binds, f"{tmp_path}:/host-folder"])
    try:
        assert dolly.list_checkpoints(client=host_b) == []
        used = Channel.of(engine).agent.container_id()
        assert used != impostor.id, "Dolly used the impostor as its agent"
        with pytest.raises(docker.errors.NotFound):
            host_b.containers.get(impostor.id)  # replaced: this engine is the caller's to drive
        attrs = host_b.api.inspect_container(used)
        assert attrs["Name"] == "/" + agent_name()
        assert not any(m["Destination"] == "/host-folder" for m in attrs["Mounts"])
        assert attrs["Config"]["Labels"][DIGEST_LABEL] == digest  # the same spec: the same digest
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            impostor.remove(force=True)


def test_an_agent_whose_mounts_no_longer_match_is_replaced(on_host, host_b, host_b_engine):
    """Dolly's own agent, made when the engine's dolly.socket label said another socket (here
    the main engine's): its digest is good for the configuration it was made with, which is not
    what the label says now, so it is replaced before anything runs in it."""
    engine = Engine.of(host_b)
    source = on_host(host_b)
    cp = dolly.checkpoint(source.id, "mounts", client=host_b)
    agent = _fresh_agent(host_b)
    host_b.api.remove_container(agent.container_id(), force=True)
    agent._id = None
    spec = AgentSpec.of(engine.info(refresh=True), host_b.api.inspect_image(agent_image.reference()))
    old_binds = tuple(b.replace(f"{host_b_engine.socket}:", "/var/run/docker.sock:") for b in spec.binds)
    assert old_binds != spec.binds
    old = agent._start(agent_name(), dataclasses.replace(spec, binds=old_binds, socket="/var/run/docker.sock"),
                       agent_secret())
    assert "/var/run/docker.sock:/var/run/docker.sock" in _agent_binds(old["Id"], host_b)
    # On host b, through the agent: host b's checkpoint, not the main engine's list.
    assert dolly.list_checkpoints(source.id, host_b) == [cp]
    used = agent.container_id()
    assert used != old["Id"]
    with pytest.raises(docker.errors.NotFound):
        host_b.api.inspect_container(old["Id"])
    assert f"{host_b_engine.socket}:/var/run/docker.sock" in _agent_binds(used, host_b)


def test_an_engine_whose_default_socket_is_another_engine_s_is_refused(client, run):
    """An engine without the dolly.socket label, on whose host /var/run/docker.sock is another
    engine's (here: the main engine's, as in a namespace where only /run/docker is its own).
    Its agent would act on that other engine and report its checkpoints as this one's: Dolly
    refuses, says to set the label, and leaves no agent behind."""
    source = run(BUSYBOX, ["sh", "-c", COUNTER])
    time.sleep(0.5)
    here = dolly.checkpoint(source, "elsewhere")  # what the wrong engine would report
    unlabelled = IsolatedEngine(f"nolab{RUN_ID[:4]}", subnet="10.213.117.1/24", images=("dolly/python",),
                                socket_label=False)
    other = unlabelled.start()
    try:
        # (Before, this returned the main engine's checkpoints, `here` among them, as the other's.)
        with pytest.raises(errors.HostNotReady, match=r"dolly\.socket") as refused:
            dolly.list_checkpoints(client=other)
        assert "another engine" in str(refused.value)
        assert other.containers.list(all=True, filters={"label": LABEL}) == []
        report = dolly.check_host(other)
        assert not report.ok and "dolly.socket" in str(report)
    finally:
        unlabelled.stop()
    assert dolly.list_checkpoints(source) == [here]


def test_what_an_agent_sends_is_not_imported_with_more_than_its_source_has(on_host, client, host_b,
                                                                            host_b_engine, tmp_path):
    """A copy from another host's agent into this engine (clone(..., engines=[client]), as
    migrate does): the agent sends a checkpoint whose recorded configuration asks for
    SYS_ADMIN and a host folder (here its files were changed on that host; a lying agent would
    send the same), while the container it is a copy of, as that engine's API shows it, asks for
    neither. It is refused, and nothing of it stays here."""
    source = on_host(host_b)
    cp = dolly.checkpoint(source.id, "widened", client=host_b)
    meta_path = host_b_engine.data_root / cp.path.relative_to("/var/lib/docker") / "dolly.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["HostConfig"].update(CapAdd=["SYS_ADMIN", "SYS_MODULE"], Binds=[f"{tmp_path}:/host-folder"])
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(errors.PolicyRefused) as refused:  # (a clone that ran would go with the test's cleanup)
        dolly.clone(cp, 1, engines=[client])
    assert set(refused.value.items) == {"capabilities", "host-mounts"}, str(refused.value)
    assert [c for c in client.containers.list(all=True) if c.attrs["Config"]["Image"] == BUSYBOX
            and c.attrs["HostConfig"].get("CapAdd")] == []
    assert [x for x in dolly.list_checkpoints(client=client) if x.container_id == source.id] == []


def test_the_agent_secret_is_made_once_and_kept_private(tmp_path, monkeypatch):
    """No engine: the secret's folder is 0700 and its file 0600, made once; one that others can
    read is refused, never used (anyone could then make an agent that passes for Dolly's)."""
    from dolly._hosts import agent as _agent

    monkeypatch.setattr(_agent, "secret_dir", lambda: tmp_path / "agent")
    first = agent_secret()
    assert len(first) == 32 and agent_secret() == first
    folder, path = tmp_path / "agent", tmp_path / "agent" / "secret"
    assert (folder.stat().st_mode & 0o777, path.stat().st_mode & 0o777) == (0o700, 0o600)
    name = agent_name()
    path.chmod(0o644)
    with pytest.raises(errors.HostNotReady, match="not private"):
        agent_secret()
    path.unlink()
    assert agent_secret() != first and agent_name() != name  # a new secret: a new agent


# --- an agent that stops reading what is streamed to it --------------------------------------------
# The engine keeps an exec's connection open while its copy of the exec's stdin is blocked (it holds
# the stdin fifo open itself): an agent that stops reading early must not leave the caller writing
# into it for ever. Several MiB that do not compress: more than every buffer on the way holds.
BIG_FILE = "head -c 8388608 /dev/urandom > /big; " + COUNTER


def _big_bundle(run, tmp_path, signer, name: str):
    """A checkpoint of a container holding 8 MiB of random bytes, and its signed bundle (over
    8 MiB: an import of it is still being written when the agent stops reading)."""
    source = run(BUSYBOX, ["sh", "-c", BIG_FILE])
    time.sleep(1)
    cp = dolly.checkpoint(source, name)
    path = dolly.export(cp, tmp_path / f"{name}.dolly", signer=signer)
    assert path.stat().st_size > 8 << 20
    return cp, path


def _within(seconds: float, call):
    """``call()``'s result, or its exception raised here; a failure, not a hung run, when it has not
    returned after ``seconds`` (its thread is left blocked: a daemon, it ends with the run)."""
    box: dict = {}

    def go() -> None:
        try:
            box["result"] = call()
        except BaseException as e:  # handed to the test's thread
            box["error"] = e

    thread = threading.Thread(target=go, name="dolly-test-within", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still blocked after {seconds} s (writing into an agent that stopped reading?)")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _agent_processes(client) -> list:
    """The commands running in the engine's agent (if it has one yet) besides its own ``sleep``."""
    return [p[-1] for agent in client.containers.list(filters={"label": LABEL})
            for p in agent.top()["Processes"] if "sleep infinity" not in p[-1]]


def _idle_agent(client) -> None:
    """The agent of ``client``'s engine with no exec running: the channel's warm workers ended
    (again while any is still starting: a clone has one started in the background)."""
    deadline = time.monotonic() + 30
    while _agent_processes(client) and time.monotonic() < deadline:
        Channel.of(Engine.of(client)).release()
        time.sleep(0.1)
    assert _agent_processes(client) == []


def _nothing_staged(client, engine: IsolatedEngine) -> None:
    """No import staged in the isolated engine's spool (seen through its data root), nor in this
    process's engine's, and nothing left running in its agent."""
    assert not [p.name for p in (engine.data_root / "dolly" / "spool").glob("import-*")]
    assert not [p.name for p in Engine.of(client).spool_dir.glob("import-*")]
    assert _agent_processes(engine.client) == []


def test_an_import_the_agent_refuses_early_ends_with_its_error(client, run, host_b, host_b_engine, tmp_path,
                                                               keys, registry):
    """An import, then a pull, of a checkpoint the isolated engine already holds: the agent refuses
    it after the manifest, while the caller has megabytes left to send. CheckpointExists comes
    back (it used to block for ever in the socket's sendall), and nothing is staged anywhere."""
    private, public = keys
    cp, path = _big_bundle(run, tmp_path, private, "held")
    reference = f"{registry.address}/dolly-test/held-{RUN_ID}:v1"
    dolly.push(cp, reference, signer=private)
    held = dolly.import_bundle(path, client=host_b, trusted_keys=[public])
    try:
        _idle_agent(host_b)
        with pytest.raises(errors.CheckpointExists, match="held"):
            _within(60, lambda: dolly.import_bundle(path, client=host_b, trusted_keys=[public]))
        _nothing_staged(client, host_b_engine)
        with pytest.raises(errors.CheckpointExists, match="held"):
            _within(60, lambda: dolly.pull(reference, client=host_b, trusted_keys=[public]))
        _nothing_staged(client, host_b_engine)
        assert dolly.list_checkpoints(cp.container_id, host_b) == [held]
        # The one it holds is as it was: it still clones, with the file it carried.
        (clone,) = dolly.clone(held, 1)
        try:
            assert clone.exec_run(["sh", "-c", "wc -c < /big"]).output.strip() == b"8388608"
        finally:
            clone.remove(force=True)
    finally:
        dolly.remove_checkpoint(held)
