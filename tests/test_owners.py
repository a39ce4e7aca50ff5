"""The pytest plugin's reaper removes a run only when its owner is provably dead.

Runs are made here the way the plugin makes them (its labels, its state folder), with real
processes as owners: one in another PID namespace, one that exited, one this test kills.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

import dolly
from dolly.engine import Engine
from dolly.testing import OWNER_LABEL, RUN_LABEL, STATE_ROOT, Owner, reap_dead_runs
from helpers import BUSYBOX, COUNTER, RUN_ID, TEST_LABEL, read_int

# Run in a new PID namespace (pid 1 there): a container and a state folder labelled as the plugin
# labels them, then wait until killed.
IN_OTHER_NAMESPACE = """
import sys, time
import docker
from dolly.testing import OWNER_LABEL, RUN_LABEL, STATE_ROOT, Owner
run_id, test_label, test_run = sys.argv[1:4]
owner = str(Owner.current())
(STATE_ROOT / run_id).mkdir(parents=True, exist_ok=True)
(STATE_ROOT / run_id / "owner").write_text(owner)
c = docker.from_env().containers.run("dolly/busybox", ["sleep", "600"], detach=True,
        labels={RUN_LABEL: run_id, "dolly.pytest.owner": owner, test_label: test_run})
print(c.id, owner, flush=True)
time.sleep(600)
"""


def new_run_id() -> str:
    return f"t{RUN_ID}{uuid.uuid4().hex[:8]}"


@pytest.fixture
def plugin_run(client, engine):
    """Make containers labelled as a run of the plugin; everything made goes after the test."""
    made, runs = [], []

    def start(run_id: str, owner, command=("sleep", "600")):
        labels = {RUN_LABEL: run_id, TEST_LABEL: RUN_ID}
        if owner is not None:
            labels[OWNER_LABEL] = owner
        c = client.containers.run(BUSYBOX, list(command), detach=True, labels=labels)
        made.append(c)
        runs.append(run_id)
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
    no_owner = plugin_run(new_run_id(), None)
    garbage = plugin_run(new_run_id(), "not an owner")
    old_style = plugin_run(new_run_id(), "999999:12345")  # <pid>:<start>: which machine, which namespace?
    mixed_run = new_run_id()  # one container of the run names a dead owner, the other none
    mixed_dead = plugin_run(mixed_run, dead_owner())
    mixed_none = plugin_run(mixed_run, None)

    reaped = reap_dead_runs(client)
    for c in (no_owner, garbage, old_style, mixed_dead, mixed_none):
        assert c.labels[RUN_LABEL] not in reaped
        assert exists(client, c), f"{c.labels} was reaped"


def test_a_provably_dead_owners_run_is_reaped(client, engine, plugin_run):
    run_id = new_run_id()
    owner = dead_owner()
    c = plugin_run(run_id, owner, ["sh", "-c", COUNTER])
    (STATE_ROOT / run_id).mkdir(parents=True)
    (STATE_ROOT / run_id / "owner").write_text(owner)
    time.sleep(0.5)
    cp = dolly.checkpoint(c, "warm")

    reap_dead_runs(client)
    assert not exists(client, c)
    assert not cp.path.exists() and not (engine.store_dir / c.id).exists()
    assert not (STATE_ROOT / run_id).exists()


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
