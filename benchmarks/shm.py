"""How long a checkpoint freezes a container whose data is in /dev/shm, against one whose data is
ordinary memory: CRIU's own ``frozen_time`` from its dump statistics (``stats-dump``, which
scripts/dolly-runc keeps in the checkpoint), and the checkpoint's wall time.

Take the engine lock, as the tests do:

    flock /tmp/dolly-tests.lock .venv/bin/python benchmarks/shm.py [--repeats 7] [--label after]

Workloads (dolly/python, /dev/shm sized 128 MiB for both):
  shm64   a process holding 64 MiB of random bytes in a POSIX shared memory segment
          (multiprocessing.shared_memory: a file in /dev/shm, mapped), as a numpy service's
          shared arrays are; CRIU dumps it with the tmpfs (criu/filesystems.c, tmpfs_dump)
  shm64f  the same, the 64 MiB float64s in [0, 100) (numbers, as a numpy array holds them)
  mem256  a process holding 256 MiB of random bytes in ordinary (anonymous) memory

Each round is one ``dolly.checkpoint(..., leave_running=True)`` of the one source, removed after.
Medians and p90s (nearest rank). Writes benchmarks/results/shm-<label>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List

import docker
import pycriu.images

import dolly
from dolly import ready

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import stats

RESULTS = Path(__file__).resolve().parent / "results"
LABEL = "dolly.bench"
IMAGE = "dolly/python"
MIB = 1 << 20

# Both write a file once their data is in place; the checkpoint waits for it.
SHM = """
import os, time
from multiprocessing import shared_memory
seg = shared_memory.SharedMemory(name="payload", create=True, size={size})
for off in range(0, {size}, 1 << 20):
    seg.buf[off:off + (1 << 20)] = os.urandom(1 << 20)
open("/tmp/ready", "w").close()
while True:
    time.sleep(3600)
"""
# Numbers as a numpy service holds them: float64s (random mantissas, few exponents), which gzip
# works hardest on.
SHM_FLOATS = """
import os, random, struct, time
from multiprocessing import shared_memory
seg = shared_memory.SharedMemory(name="payload", create=True, size={size})
for off in range(0, {size}, 1 << 20):
    seg.buf[off:off + (1 << 20)] = struct.pack("131072d", *(random.random() * 100 for _ in range(131072)))
open("/tmp/ready", "w").close()
while True:
    time.sleep(3600)
"""
MEM = """
import os, time
data = bytearray(os.urandom({size}))
open("/tmp/ready", "w").close()
while True:
    time.sleep(3600)
"""
WORKLOADS = {"shm64": SHM.format(size=64 * MIB), "shm64f": SHM_FLOATS.format(size=64 * MIB),
             "mem256": MEM.format(size=256 * MIB)}


def dump_stats(checkpoint: dolly.Checkpoint) -> Dict[str, float]:
    """CRIU's dump statistics of a checkpoint, in seconds (CRIU keeps microseconds)."""
    with open(checkpoint.path / "stats-dump", "rb") as f:
        entry = pycriu.images.load(f)["entries"][0]["dump"]
    return {k: int(v) / 1e6 for k, v in entry.items() if k.endswith("_time")}


def tmpfs_image_bytes(checkpoint: dolly.Checkpoint) -> int:
    return sum(p.stat().st_size for p in (checkpoint.path / "criu").glob("tmpfs-*.img"))


def run(client: docker.DockerClient, name: str, repeats: int) -> Dict[str, object]:
    source = client.containers.run(IMAGE, ["python3", "-c", WORKLOADS[name]], detach=True, shm_size="128m",
                                   labels={LABEL: "shm"}, name=f"dolly-bench-shm-{uuid.uuid4().hex[:8]}")
    frozen: List[float] = []
    wall: List[float] = []
    image: List[int] = []
    try:
        ready.wait(source, ready.exec(["test", "-e", "/tmp/ready"]), timeout=120)
        for i in range(repeats):
            started = time.perf_counter()
            cp = dolly.checkpoint(source, f"shm-{name}-{i}", leave_running=True)
            wall.append(time.perf_counter() - started)
            try:
                frozen.append(dump_stats(cp)["frozen_time"])
                image.append(tmpfs_image_bytes(cp))
            finally:
                dolly.remove_checkpoint(cp)
            print(f"{name} round {i}: frozen {frozen[-1]:.3f} s, checkpoint {wall[-1]:.3f} s, "
                  f"tmpfs image {image[-1] / MIB:.1f} MiB", flush=True)
    finally:
        source.remove(force=True)
    return {"frozen_s": stats(frozen), "checkpoint_s": stats(wall), "tmpfs_image_bytes": image}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--label", default="latest", help="the results file: results/shm-<label>.json")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    client = docker.from_env()
    criu = subprocess.run(["criu", "--version"], capture_output=True, text=True).stdout.split()
    results = {"criu": " ".join(criu), "kernel": platform.release(), "repeats": args.repeats, "workloads": {}}
    for name in args.workloads.split(","):
        results["workloads"][name] = run(client, name, args.repeats)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"shm-{args.label}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    for name, row in results["workloads"].items():
        f, w = row["frozen_s"], row["checkpoint_s"]
        print(f"{name}: frozen {f['median']} s (p90 {f['p90']}), "
              f"checkpoint {w['median']} s (p90 {w['p90']}), n={f['n']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
