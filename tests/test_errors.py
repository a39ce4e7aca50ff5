"""Bad input and failures: a clear dolly.errors exception, and nothing lost or left behind."""
from __future__ import annotations

import stat
import time

import pytest

import dolly
from dolly import errors, ready
from engines import SecondEngine
from helpers import BUSYBOX, COUNTER, PYTHON, RUN_ID, assert_counts_on, read_int


def clones_of(client, source) -> list:
    return client.containers.list(all=True, filters={"label": f"dolly.source={source.id}"})


@pytest.fixture
def counter(run):
    source = run(BUSYBOX, ["sh", "-c", COUNTER])
    time.sleep(0.5)
    return source


def assert_untouched(source) -> None:
    source.reload()
    assert source.status == "running"
    first = read_int(source)
    time.sleep(0.3)
    assert read_int(source) > first


def test_unknown_container(client):
    with pytest.raises(errors.ContainerNotFound):
        dolly.checkpoint(f"no-such-container-{RUN_ID}")
    with pytest.raises(errors.ContainerNotFound):
        dolly.list_checkpoints(f"no-such-container-{RUN_ID}")


def test_stopped_and_paused_containers(run, engine):
    stopped = run(BUSYBOX, ["true"])
    stopped.wait(timeout=10)
    with pytest.raises(errors.ContainerNotRunning) as info:
        dolly.checkpoint(stopped)
    # What to do about it (issue 24): start it, or resume it from its own checkpoint.
    assert f"docker start {stopped.name}" in str(info.value) and "dolly.resume(" in str(info.value)
    paused = run(BUSYBOX, ["sh", "-c", COUNTER])
    paused.pause()
    with pytest.raises(errors.ContainerNotRunning):
        dolly.checkpoint(paused)
    paused.unpause()
    assert not (engine.store_dir / stopped.id).exists() and not (engine.store_dir / paused.id).exists()


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 200, 42])
def test_bad_checkpoint_names(counter, engine, name):
    with pytest.raises(errors.InvalidArgument):
        dolly.checkpoint(counter, name)
    assert not list(engine.checkpoints_dir(counter.id).glob("*"))
    assert_untouched(counter)


def test_unknown_checkpoint(counter):
    with pytest.raises(errors.CheckpointNotFound):
        dolly.get_checkpoint(counter, "never-taken")
    with pytest.raises(errors.InvalidArgument):
        dolly.restore("not a checkpoint")


def test_duplicate_checkpoint_name_keeps_the_first(counter, client):
    before = read_int(counter)
    first = dolly.checkpoint(counter, "once")
    with pytest.raises(errors.CheckpointExists):
        dolly.checkpoint(counter, "once")
    assert dolly.list_checkpoints(counter) == [first]
    assert_untouched(counter)
    (clone,) = dolly.clone(first, 1)
    assert_counts_on(clone, before)


@pytest.mark.parametrize("n", [0, -1, "3", 2.5, True, None])
def test_bad_clone_counts(busybox_checkpoint, client, n):
    before = len(client.containers.list(all=True))
    with pytest.raises(errors.InvalidArgument):
        dolly.clone(busybox_checkpoint, n)
    assert len(client.containers.list(all=True)) == before


def test_a_taken_or_invalid_name(busybox_checkpoint, client, run):
    other = run(BUSYBOX, ["sleep", "60"])
    before = len(client.containers.list(all=True))
    with pytest.raises(errors.NameConflict):
        dolly.restore(busybox_checkpoint, name=other.name)
    with pytest.raises(errors.InvalidArgument):
        dolly.restore(busybox_checkpoint, name="no/slashes")
    with pytest.raises(errors.InvalidArgument):
        dolly.clone(busybox_checkpoint, 2, name_prefix="-bad")
    assert len(client.containers.list(all=True)) == before


@pytest.mark.engine  # starts a dockerd of its own
def test_engine_without_experimental_mode():
    second = SecondEngine("noexp", experimental=False, subnet="10.213.100.1/24")
    client = second.start()
    try:
        report = dolly.check_host(client)
        assert not report.ok
        (line,) = [c for c in report.checks if c.name == "experimental mode"]
        assert not line.ok and "daemon.json" in line.fix
        (runtime,) = [c for c in report.checks if c.name == "'dolly' runtime"]
        assert not runtime.ok and runtime.detail == "not registered" and "make host" in runtime.fix
        with pytest.raises(errors.HostNotReady, match="experimental"):
            dolly.checkpoint("anything", client=client)
    finally:
        second.stop()


def test_criu_too_old_refuses_before_touching_the_source(counter, engine, tmp_path, monkeypatch):
    exe = tmp_path / "criu"  # prints a version only: this is the version gate, not CRIU
    exe.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(errors.HostNotReady, match="too old"):
        dolly.checkpoint(counter)
    assert not (engine.store_dir / counter.id).exists()
    assert_untouched(counter)


def test_criu_dump_failure_carries_its_log(run, network, engine):
    net = network("10.213.9.0/24")
    server = run(PYTHON, ["python3", "-c",
                          ("import socket,time\nl=socket.socket(); l.bind(('0.0.0.0', 9000)); l.listen()\n"
                           "print('listening', flush=True); c,_=l.accept(); time.sleep(1e6)")], network=net.name)
    ready.wait(server, ready.log("listening"), timeout=30)
    server.reload()
    ip = ready.ip_address(server)
    client_c = run(PYTHON, ["python3", "-c",
                            (f"import socket,time\ns=socket.create_connection(({ip!r}, 9000)); "
                             "print('up', flush=True); time.sleep(1e6)")],
                   network=net.name)
    ready.wait(client_c, ready.log("up"), timeout=30)

    with pytest.raises(errors.CheckpointFailed) as info:
        dolly.checkpoint(client_c, "tcp")
    err = info.value
    assert err.log_path is not None and err.log_path.exists()
    assert any("TCP" in line or "tcp" in line for line in err.log_lines), err.log_lines
    client_c.reload()
    assert client_c.status == "running"
    assert not (engine.store_dir / client_c.id / "tcp").exists()
    assert not list(engine.checkpoints_dir(client_c.id).glob("*"))


def test_criu_restore_failure_leaves_no_clone_and_the_checkpoint_usable(run, client, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "held").write_text("x" * 100)
    source = run(BUSYBOX, ["sh", "-c", "exec 3</data/held; " + COUNTER],
                 volumes={str(data): {"bind": "/data", "mode": "rw"}})
    time.sleep(0.5)
    before = read_int(source)
    cp = dolly.checkpoint(source, "bind")
    (data / "held").unlink()  # the file the process holds open is gone from the host

    with pytest.raises(errors.RestoreFailed) as info:
        dolly.clone(cp, 3)
    assert info.value.log_lines, "the CRIU log was not kept"
    assert any("held" in line for line in info.value.log_lines), info.value.log_lines
    assert clones_of(client, source) == []
    assert_untouched(source)

    (data / "held").write_text("x" * 100)
    (clone,) = dolly.clone(cp, 1)  # the checkpoint is still usable
    assert_counts_on(clone, before)


def test_clone_failing_part_way_removes_every_clone(run, client, network):
    net = network("10.213.10.0/29")  # the gateway, the source and four more addresses
    source = run(BUSYBOX, ["sh", "-c", COUNTER], network=net.name)
    time.sleep(0.3)
    cp = dolly.checkpoint(source, "tiny")
    with pytest.raises(errors.DollyError, match="address"):
        dolly.clone(cp, 7)
    assert clones_of(client, source) == []
    assert_untouched(source)
    assert len(dolly.clone(cp, 2)) == 2


def test_missing_image_is_named(run, client, engine):
    base = run(BUSYBOX, ["true"])
    base.wait(timeout=10)
    image = base.commit(repository="dolly-test-gone", tag=RUN_ID)
    source = run(image.id, ["sh", "-c", COUNTER])
    time.sleep(0.3)
    cp = dolly.checkpoint(source, "img", leave_running=False)
    source.remove()
    client.images.remove(image.id, force=True)
    try:
        with pytest.raises(errors.ImageNotFound, match=image.id):
            dolly.clone(cp, 1)
    finally:
        dolly.remove_checkpoint(cp)
