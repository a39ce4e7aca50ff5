"""Load and leaks: checkpoint / clone / remove cycles return the engine to where it started.

`make test` runs a short version (DOLLY_SOAK_CYCLES, default 20); `make soak` runs 500 and writes
the figures to benchmarks/results/soak.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import dolly
from dolly.engine import Engine
from helpers import BUSYBOX, COUNTER, read_int

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


def test_checkpoint_clone_remove_cycles_leave_nothing(run, engine):
    source = run(BUSYBOX, ["sh", "-c", COUNTER])
    time.sleep(0.3)
    # One cycle first, so that connection pools and caches are warm before the baseline.
    cp = dolly.checkpoint(source, "warm")
    (c,) = dolly.clone(cp, 1)
    c.remove(force=True)
    dolly.remove_checkpoint(cp)

    before = state(engine)
    started = time.perf_counter()
    for i in range(CYCLES):
        cp = dolly.checkpoint(source, f"soak-{i}")
        (c,) = dolly.clone(cp, 1)
        assert read_int(c) >= 1
        c.remove(force=True)
        dolly.remove_checkpoint(cp)
    took = time.perf_counter() - started
    after = state(engine)

    exact = ("containers", "checkpoint folders", "docker checkpoint folders", "spool entries",
             "content blobs", "store and spool bytes")
    assert {k: after[k] for k in exact} == {k: before[k] for k in exact}
    # Sockets in connection pools come and go; a leak grows with the cycles.
    assert after["open files (this process)"] <= before["open files (this process)"] + 2
    assert after["open files (dockerd)"] <= before["open files (dockerd)"] + 5
    if REPORT:
        Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
        Path(REPORT).write_text(json.dumps({"cycles": CYCLES, "seconds": round(took, 1),
                                            "seconds_per_cycle": round(took / CYCLES, 3),
                                            "before": before, "after": after}, indent=1))
