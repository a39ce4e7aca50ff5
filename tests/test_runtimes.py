"""Containers that do not run under Dolly's runtime (created with ``runtime="runc"``, or on a host
whose default runtime was left alone): checkpointed by the engine's own path, with the writable
layer taken while Dolly holds the container paused, and cloned under Dolly's runtime."""
from __future__ import annotations

import json
import time

import pytest

import dolly
from dolly._archive import tarfile  # the one Dolly reads with: 3.12's, backported to 3.11
from dolly.errors import CheckpointFailed
from helpers import BUSYBOX, COUNTER, FILES, read_int


def layer_count(cp: dolly.Checkpoint) -> int:
    """The counter's file as the checkpoint's writable layer holds it."""
    with tarfile.open(cp.rootfs_diff) as tar:
        return int(tar.extractfile("./tmp/count").read())


def test_a_container_under_runc_is_checkpointed_and_its_clones_continue(run, client):
    source = run(BUSYBOX, ["sh", "-c", FILES], runtime="runc")
    time.sleep(1.5)
    cp = dolly.checkpoint(source, "under-runc")
    at = layer_count(cp)
    assert at >= 5

    # Dolly paused the source around the dump and resumed it.
    source.reload()
    assert source.status == "running" and not source.attrs["State"]["Paused"]
    now = read_int(source)
    time.sleep(0.4)
    assert read_int(source) > now

    clones = dolly.clone(cp, 2)
    time.sleep(0.5)
    for c in clones:
        # Files and memory were taken at one instant: the process had written `at` (or was about
        # to), so its next line is at+1 or at+2, never a restart from 1 nor a jump.
        logged = [int(x) for x in c.logs().decode().split()]
        assert logged and min(logged) in (at + 1, at + 2), (at, logged[:3])
        assert c.exec_run(["cat", "/greeting"]).output == b"hello\n"
        assert c.exec_run(["test", "-e", "/etc/group"]).exit_code == 1, "a deleted file came back"
        assert c.attrs["HostConfig"]["Runtime"] == "dolly"
    # Docker's own checkpoint folder was taken into Dolly's store, not left behind.
    assert not any((cp.path.parents[3] / "containers" / source.id / "checkpoints").glob("*"))


def test_a_checkpoint_that_stops_a_runc_container_keeps_its_spec(run):
    command = ["sh", "-c", FILES]
    source = run(BUSYBOX, command, runtime="runc")
    time.sleep(1)
    cp = dolly.checkpoint(source, "stopped", leave_running=False)
    source.reload()
    assert source.status == "exited"
    spec = json.loads((cp.path / "spec.dump").read_text())
    assert spec["process"]["args"] == command

    at = layer_count(cp)
    (clone,) = dolly.clone(cp, 1)
    time.sleep(0.5)
    logged = [int(x) for x in clone.logs().decode().split()]
    assert logged and min(logged) in (at + 1, at + 2), (at, logged[:3])


def test_a_runc_container_whose_layer_is_over_the_cap_is_left_running(run, engine):
    source = run(BUSYBOX, ["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=2 2>/dev/null; " + COUNTER],
                 runtime="runc")
    time.sleep(1)
    with pytest.raises(CheckpointFailed, match="over the cap") as refused:
        dolly.checkpoint(source, "capped", max_layer_bytes=1 << 20)
    assert "max_layer_bytes=" in str(refused.value)

    assert dolly.list_checkpoints(source) == []
    assert not list(engine.checkpoints_dir(source.id).glob("*"))
    source.reload()
    assert source.status == "running" and not source.attrs["State"]["Paused"]
    now = read_int(source)
    time.sleep(0.4)
    assert read_int(source) > now
