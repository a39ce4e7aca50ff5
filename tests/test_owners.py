"""The pytest plugin's reaper removes a run only when its owner is provably dead, and of that run
only the containers it recorded in its state folder.

Runs are made here the way the plugin makes them (its labels, its state folder and record), with
real processes as owners: one in another PID namespace, one that exited, one this test kills.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
import uuid

import pytest

import dolly
from dolly._engine import Engine
from dolly.testing import (
    CONTAINERS_FILE,
    OWNER_LABEL,
    RUN_LABEL,
    STATE_ROOT,
    Owner,
    open_run_state,
    reap_dead_runs,
    record_container,
    recorded_containers,
)
from helpers import BUSYBOX, COUNTER, RUN_ID, TEST_LABEL, read_int

# Run in a new PID namespace (pid 1 there): a container labelled and recorded as the plugin does
# it, with its state folder, then wait until killed.
IN_OTHER_NAMESPACE = """
import sys, time
import docker
from dolly.testing import OWNER_LABEL, RUN_LABEL, Owner, open_run_state, record_container
run_id, test_label, test_run = sys.argv[1:4]
owner = str(Owner.current())
state = open_run_state(run_id, owner)
c = docker.from_env().containers.run("dolly/busybox", ["sleep", "600"], detach=True,
        labels={RUN_LABEL: run_id, "dolly.pytest.owner": owner, test_label: test_run})
record_container(state, c.id)
print(c.id, owner, flush=True)
time.sleep(600)
"""

_SAME = object()


def new_run_id() -> str:
    return f"t{RUN_ID}{uuid.uuid4().hex[:8]}"


@pytest.fixture
def plugin_run(client, engine):
    """Make containers labelled as a run of the plugin and, unless ``record=False``, recorded in
    the run's state folder, whose owner file names ``state_owner`` (default: the label's owner;
    the first container of a run makes the folder). Everything made goes after the test."""
    made, runs = [], []

    def start(run_id: str, owner, command=("sleep", "600"), *, state_owner=_SAME, record=True):
        labels = {RUN_LABEL: run_id, TEST_LABEL: RUN_ID}
        if owner is not None:
            labels[OWNER_LABEL] = owner
        runs.append(run_id)
        state_owner = owner if state_owner is _SAME else state_owner
        if state_owner is not None:
            open_run_state(run_id, state_owner)
        c = client.containers.run(BUSYBOX, list(command), detach=True, labels=labels)
        made.append(c)
        if record:
            record_container(STATE_ROOT / run_id, c.id)
        return c

    yield start
    for c in made:
        Engine.of(client).remove(c.id)
        shutil.rmtree(engine.store_dir / c.id, ignore_errors=True)
    for run_id in runs:
        shutil.rmtree(STATE_ROOT / run_id, ignore_errors=True)


def exists(client, container) -> bool:
    # The low-level list: the engine is shared, and containers.list() inspects each container,
    # which fails when another run removes one meanwhile.
    return bool(client.api.containers(all=True, quiet=True, filters={"id": container.id}))


def dead_owner() -> str:
    """The owner name of a process of this PID namespace that has exited."""
    out = subprocess.run([sys.executable, "-c", "import dolly.testing as t; print(t.Owner.current())"],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert Owner.parse(out) is not None, out
    return out


def test_a_run_owned_in_another_pid_namespace_survives(client, engine):
    run_id = new_run_id()
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", IN_OTHER_NAMESPACE,
         run_id, TEST_LABEL, RUN_ID],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    cid = None
    try:
        line = proc.stdout.readline().split()
        assert len(line) == 2, proc.stderr.read() if proc.poll() is not None else line
        cid, owner_text = line
        owner = Owner.parse(owner_text)
        # The owner is pid 1 of another PID namespace: that pid here is someone else entirely.
        assert owner.pid == 1 and owner.pid_ns != os.stat("/proc/self/ns/pid").st_ino

        reaped = reap_dead_runs(client)
        assert run_id not in reaped
        assert client.containers.get(cid).status == "running"
        assert (STATE_ROOT / run_id / "owner").read_text() == owner_text

        # Even once that owner is gone, nothing here can prove it: the run is left alone.
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        assert run_id not in reap_dead_runs(client)
        assert client.containers.get(cid).status == "running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
        if cid is not None:
            Engine.of(client).remove(cid)
        shutil.rmtree(STATE_ROOT / run_id, ignore_errors=True)


def test_runs_without_a_readable_owner_survive(client, plugin_run):
    dead = dead_owner()
    # Recorded containers whose owner label says nothing provable, in runs whose state folder
    # names a dead owner.
    no_owner = plugin_run(new_run_id(), None, state_owner=dead)
    garbage = plugin_run(new_run_id(), "not an owner", state_owner=dead)
    # <pid>:<start>: which machine, which namespace?
    old_style = plugin_run(new_run_id(), "999999:12345", state_owner=dead)
    mixed_run = new_run_id()  # one container of the run names a dead owner, the other none
    mixed_dead = plugin_run(mixed_run, dead)
    mixed_none = plugin_run(mixed_run, None)
    # A dead owner on the container, an unreadable one in the state folder.
    bad_state = plugin_run(new_run_id(), dead, state_owner="not an owner")
    # A dead owner, but no state folder on this machine (another machine's run, as far as the
    # reaper can tell): never reaped.
    no_state = plugin_run(new_run_id(), dead, state_owner=None, record=False)

    reaped = reap_dead_runs(client)
    for c in (no_owner, garbage, old_style, mixed_dead, mixed_none, bad_state, no_state):
        assert c.labels[RUN_LABEL] not in reaped
        assert exists(client, c), f"{c.labels} was reaped"


def test_a_provably_dead_owners_run_is_reaped(client, engine, plugin_run):
    run_id = new_run_id()
    owner = dead_owner()
    c = plugin_run(run_id, owner, ["sh", "-c", COUNTER])
    time.sleep(0.5)
    cp = dolly.checkpoint(c, "warm")

    assert run_id in reap_dead_runs(client)
    assert not exists(client, c)
    assert not cp.path.exists() and not (engine.store_dir / c.id).exists()
    assert not (STATE_ROOT / run_id).exists()


def test_only_the_containers_a_dead_run_recorded_are_reaped(client, engine, plugin_run):
    """Someone commits a plugin clone to keep a failed test's state; the image carries the run's
    labels, and so does every container started from it. The run's owner dies: its recorded
    containers go, the user's containers with its labels stay, with their volumes and checkpoints."""
    run_id = new_run_id()
    owner = dead_owner()
    state = STATE_ROOT / run_id
    source = plugin_run(run_id, owner, ["sh", "-c", COUNTER])  # as the plugin's warm source
    time.sleep(0.5)
    cp = dolly.checkpoint(source, "warm", leave_running=False)
    clone = dolly.restore(cp, labels={RUN_LABEL: run_id, OWNER_LABEL: owner})  # as the plugin's clone
    record_container(state, clone.id)
    assert recorded_containers(state) == {source.id, clone.id}
    st = os.stat(state)
    assert stat.S_IMODE(st.st_mode) == 0o700 and stat.S_IMODE(os.stat(state / CONTAINERS_FILE).st_mode) == 0o600

    image = client.api.commit(clone.id, repository=f"dolly-test-kept-{RUN_ID}", tag=uuid.uuid4().hex[:8],
                              changes=["VOLUME /data"])["Id"]
    kept = None
    try:
        assert client.images.get(image).labels[RUN_LABEL] == run_id
        # A service started from the committed image: it inherits the run's labels, and gets an
        # anonymous volume holding the user's data.
        kept = client.containers.run(image, ["sh", "-c", "echo precious > /data/f; " + COUNTER], detach=True)
        assert kept.labels[RUN_LABEL] == run_id and kept.labels[OWNER_LABEL] == owner
        volume = next(m["Name"] for m in kept.attrs["Mounts"] if m["Destination"] == "/data")
        # A container given the run's labels by hand, with a checkpoint of its own.
        copied = client.containers.run(BUSYBOX, ["sh", "-c", COUNTER], detach=True, labels=dict(clone.labels))
        assert copied.labels[OWNER_LABEL] == owner
        time.sleep(0.5)
        mine = dolly.checkpoint(copied, "mine")

        assert run_id in reap_dead_runs(client)
        assert not exists(client, source) and not exists(client, clone)
        assert not cp.path.exists() and not (engine.store_dir / source.id).exists()
        assert not state.exists()

        for c in (kept, copied):
            c.reload()
            assert c.status == "running", f"{c.name} was touched by the reaper"
        assert client.volumes.get(volume).name == volume
        assert kept.exec_run(["cat", "/data/f"]).output.decode().strip() == "precious"
        assert mine.path.exists() and (engine.store_dir / copied.id).exists()
        # Nothing of the run is left to reap, and the next reaping leaves them alone too.
        assert run_id not in reap_dead_runs(client)
        assert exists(client, kept) and exists(client, copied)
    finally:
        if kept is not None:
            Engine.of(client).remove(kept.id)  # the test made it: with its anonymous volume
        client.images.remove(image, force=True)


def test_concurrent_records_are_whole_lines(tmp_path):
    """xdist workers append to one record at once: no line is torn or lost."""
    state = tmp_path / "run"
    state.mkdir(mode=0o700)
    script = ("import sys, uuid; from pathlib import Path; from dolly.testing import record_container\n"
              "for _ in range(200): record_container(Path(sys.argv[1]), uuid.uuid4().hex + uuid.uuid4().hex)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(state)]) for _ in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = (state / CONTAINERS_FILE).read_text().split("\n")
    assert lines[-1] == "" and len(lines) == 801
    assert len(recorded_containers(state)) == 800
    assert stat.S_IMODE(os.stat(state / CONTAINERS_FILE).st_mode) == 0o600
    # A record that anyone else could have written is not trusted.
    os.chmod(state / CONTAINERS_FILE, 0o622)
    assert recorded_containers(state) == set()


def test_a_users_clone_of_a_plugin_checkpoint_outlives_the_run(client, engine, plugin_run):
    holder = subprocess.Popen(["sleep", "600"])
    try:
        owner = str(Owner.of(holder.pid))
        run_id = new_run_id()
        source = plugin_run(run_id, owner, ["sh", "-c", COUNTER])
        time.sleep(1)
        at_checkpoint = read_int(source)
        cp = dolly.checkpoint(source, "warm", leave_running=False)  # as the plugin warms a service
        mine = dolly.restore(cp)  # a user's clone, not the plugin's
        assert not [k for k in mine.labels if k.startswith("dolly.pytest.")], mine.labels

        assert run_id not in reap_dead_runs(client), "a run whose owner lives was reaped"
        assert exists(client, source)

        holder.kill()
        holder.wait(timeout=30)
        assert run_id in reap_dead_runs(client)
        assert not exists(client, source) and not cp.path.exists()
        mine.reload()
        assert mine.status == "running"
        first = read_int(mine)
        assert first >= at_checkpoint
        deadline = time.monotonic() + 10
        while read_int(mine) <= first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert read_int(mine) > first, "the clone's counter stopped"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
