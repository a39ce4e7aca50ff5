"""Load and leaks: checkpoint / clone / remove cycles return the engine to where it started.

`make test` runs a short version (DOLLY_SOAK_CYCLES, default 20); `make soak` runs 500 and writes
the figures to benchmarks/results/soak.json.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import time
from pathlib import Path

import dolly
from dolly._engine import Engine
from helpers import BUSYBOX, COUNTER

CYCLES = int(os.environ.get("DOLLY_SOAK_CYCLES", "20"))
REPORT = os.environ.get("DOLLY_SOAK_REPORT")
MAIN_CONTAINERD = "/var/run/docker/containerd/containerd.sock"


def du_bytes(*paths: Path) -> int:
    total = 0
    for path in paths:
        for p in path.rglob("*") if path.exists() else []:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def dockerd_fds() -> int:
    pid = Path("/var/run/docker.pid").read_text().strip()
    return len(os.listdir(f"/proc/{pid}/fd"))


def state(engine: Engine) -> dict:
    blobs = subprocess.run(["ctr", "--address", MAIN_CONTAINERD, "-n", "moby", "content", "ls", "-q"],
                           capture_output=True, text=True, check=True).stdout.split()
    return {
        "containers": len(engine.client.containers.list(all=True)),
        "checkpoint folders": len(list(engine.store_dir.glob("*/*"))) + len(list(engine.store_dir.glob("*/.*"))),
        "docker checkpoint folders": len(list((engine.root_dir / "containers").glob("*/checkpoints/*"))),
        "spool entries": len(list(engine.spool_dir.glob("*"))) if engine.spool_dir.exists() else 0,
        "content blobs": len(blobs),
        "open files (this process)": len(os.listdir("/proc/self/fd")),
        "open files (dockerd)": dockerd_fds(),
        "store and spool bytes": du_bytes(engine.store_dir, engine.spool_dir),
    }


def cycle(source, i: int) -> None:
    cp = dolly.checkpoint(source, f"soak-{i}")
    (c,) = dolly.clone(cp, 1)
    # (No exec_run here: docker-py keeps each exec's socket until it is garbage collected,
    # which would count against the open files measured below.)
    assert c.status == "running" and c.attrs["State"]["Pid"] > 0
    c.remove(force=True)
    dolly.remove_checkpoint(cp)


def test_checkpoint_clone_remove_cycles_leave_nothing(run, engine):
    source = run(BUSYBOX, ["sh", "-c", COUNTER])
    time.sleep(0.3)
    gc.collect()
    before = state(engine)
    started = time.perf_counter()
    half = max(1, CYCLES // 2)
    for i in range(half):
        cycle(source, i)
    gc.collect()
    # Connection pools (docker-py keeps up to 10 connections per client) are full by now: from
    # here on, a leak shows as growth.
    middle = state(engine)
    for i in range(half, CYCLES):
        cycle(source, i)
    took = time.perf_counter() - started
    gc.collect()
    after = state(engine)

    exact = ("containers", "checkpoint folders", "docker checkpoint folders", "spool entries",
             "content blobs", "store and spool bytes")
    assert {k: after[k] for k in exact} == {k: before[k] for k in exact}
    assert after["open files (this process)"] <= middle["open files (this process)"] + 2
    assert after["open files (dockerd)"] <= middle["open files (dockerd)"] + 4
    if REPORT:
        Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
        Path(REPORT).write_text(json.dumps({"cycles": CYCLES, "seconds": round(took, 1),
                                            "seconds_per_cycle": round(took / CYCLES, 3),
                                            "before": before, "after half": middle, "after": after}, indent=1))
