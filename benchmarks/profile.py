"""Where a clone's time goes: each phase of one clone, timed, with CRIU's own share from its log.

    .venv/bin/python benchmarks/profile.py [--state-mb 128] [--warmup 0] [--repeats 5]

Phases: create (Engine API), writable layer (tar into the upper dir), images (hard links and the
rewritten UTS image in the spool), start (the Engine API call: Docker, containerd, runc, CRIU),
first answer (until HTTP answers). CRIU's restore time is read from its log, which dolly-runc keeps
while /var/log/dolly/criu/.keep exists. Medians are printed.
"""
from __future__ import annotations

import argparse
import importlib
import re
import statistics
import sys
import time
from pathlib import Path

import docker

import dolly
from dolly import _rootfs as rootfs
from dolly._criu_log import CRIU_LOG_DIR
from dolly._engine import Engine
from dolly.demo import SERVICE

# The module, not the function of the same name that `dolly` re-exports.
_restore = importlib.import_module("dolly._start")
sys.path.insert(0, str(Path(__file__).parent))
from bench import docker_ip, fetch  # noqa: E402 - once sys.path holds this folder


def criu_seconds(container_id: str) -> float:
    """The last timestamp in CRIU's restore log: CRIU's own time, start to finish."""
    log = CRIU_LOG_DIR / f"{container_id}.restore.log"
    stamps = re.findall(r"^\((\d+\.\d+)\)", log.read_text(errors="replace"), re.M) if log.exists() else []
    return float(stamps[-1]) if stamps else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-mb", type=int, default=128)
    ap.add_argument("--warmup", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--keep-logs", action="store_true", help="leave CRIU's restore logs in " + str(CRIU_LOG_DIR))
    args = ap.parse_args()

    client = docker.from_env()
    engine = Engine.of(client)
    keep = CRIU_LOG_DIR / ".keep"
    CRIU_LOG_DIR.mkdir(parents=True, exist_ok=True)
    keep.touch()
    source = client.containers.run("dolly/python", ["python3", "-c", SERVICE], detach=True,
                                   environment={"STATE_MB": str(args.state_mb), "WARMUP_S": str(args.warmup),
                                                "RANDOM_STATE": "1"})
    phases: dict = {k: [] for k in ("create", "writable layer", "images", "start", "of which CRIU", "first answer",
                                    "total")}
    try:
        while not (docker_ip(source) and fetch(docker_ip(source))):
            time.sleep(0.05)
        cp = dolly.checkpoint(source, "profile")
        image = engine.image_ref(cp.image_id, cp.config["Config"].get("Image"))
        for i in range(args.repeats):
            t0 = time.perf_counter()
            config, _ = _restore.clone_config(cp.config, image=image, labels={"dolly.profile": "1"})
            cid = engine.create(config, f"profile-{i}-{int(t0 * 1000)}")
            t1 = time.perf_counter()
            created = engine.container(cid)
            rootfs.apply_diff(cp.rootfs_diff, engine.upper_dir(created))
            t2 = time.perf_counter()
            images = engine.spool_dir / f"{cid}.restore"
            _restore._place_images(cp, images, hostname=created.attrs["Config"]["Hostname"],
                                   hook_beside=_restore._memory_bytes(cp) >= _restore.HOOK_BESIDE_BYTES)
            folder = engine.checkpoints_dir(cid) / cp.name
            folder.mkdir(parents=True)
            (folder / "dolly-images").write_text(str(images))
            t3 = time.perf_counter()
            engine.start_from_checkpoint(cid, cp.name)
            t4 = time.perf_counter()
            c = client.containers.get(cid)
            while not fetch(docker_ip(c)):
                time.sleep(0.005)
            t5 = time.perf_counter()
            took = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, criu_seconds(cid), t5 - t4, t5 - t0)
            for k, v in zip(phases, took, strict=True):
                phases[k].append(v)
            c.remove(force=True)
            import shutil

            shutil.rmtree(images, ignore_errors=True)
            if not args.keep_logs:
                (CRIU_LOG_DIR / f"{cid}.restore.log").unlink(missing_ok=True)
        dolly.remove_checkpoint(cp)
    finally:
        keep.unlink(missing_ok=True)
        source.remove(force=True)
    print(f"one clone of a {args.state_mb} MB service (warm-up {args.warmup:g} s), medians of {args.repeats}:")
    for k, v in phases.items():
        print(f"  {k:<16} {statistics.median(v):6.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
