"""Docker's network hook beside CRIU's memory restore (scripts/dolly-runc), against the runtime of
an earlier revision that let runc run it while CRIU waited: the two runtimes installed in turn
(A B A B ..., pair by pair, from one checkpoint per workload), `dolly.clone(cp, 1)` to the first
correct answer, CRIU's own restore time (its statistics) and the host's CPU seconds a clone (all
processes: what density pays). The working tree's runtime is installed again at the end.

    flock /tmp/dolly-tests.lock .venv/bin/python benchmarks/hook.py [--before 94dde9a] [--repeats 9]

Writes benchmarks/results/hook.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import docker

import dolly

sys.path.insert(0, str(Path(__file__).resolve().parent))
from density import host_cpu_seconds

from bench import RESULTS, WORKLOADS, DollyRunner, all_answer, criu_logs_kept, docker_ip, stats

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = Path("/usr/local/sbin/dolly-runc")


def install(runtime: Path) -> None:
    shutil.copyfile(runtime, INSTALLED.with_suffix(".new"))
    INSTALLED.with_suffix(".new").chmod(0o755)
    INSTALLED.with_suffix(".new").replace(INSTALLED)


def clone_once(runner: DollyRunner, cp, expected: object, name: str, raw: Dict[str, list]) -> None:
    cpu, t = host_cpu_seconds(), time.perf_counter()
    (clone,) = dolly.clone(cp, 1)
    all_answer([lambda: docker_ip(clone)], expected)
    raw.setdefault(f"{name}_clone_s", []).append(time.perf_counter() - t)
    raw.setdefault(f"{name}_cpu_s", []).append(host_cpu_seconds() - cpu)
    try:
        criu_s = runner.criu_restore_s([clone])
        if criu_s is not None:
            raw.setdefault(f"{name}_criu_restore_s", []).append(criu_s)
    finally:
        runner.remove([clone])


def measure(runner: DollyRunner, name: str, runtimes: Dict[str, Path], repeats: int) -> dict:
    """Workload ``name``'s clones under the two runtimes in turn, from one checkpoint."""
    _, source, state = runner.start(WORKLOADS[name])
    raw: Dict[str, list] = {}
    try:
        cp = dolly.checkpoint(source, f"hook-bench-{name.lower()}")
        try:
            for i in range(repeats):
                for which in ("before", "after") if i % 2 == 0 else ("after", "before"):
                    install(runtimes[which])
                    clone_once(runner, cp, state, which, raw)
        finally:
            dolly.remove_checkpoint(cp)
    finally:
        runner.remove([source])
    result = {k: stats(v) for k, v in raw.items()}
    ratios = [a / b for a, b in zip(raw["after_clone_s"], raw["before_clone_s"], strict=True)]
    result["after_over_before_clone"] = stats(ratios)
    for k in ("clone_s", "criu_restore_s", "cpu_s"):
        b, a = result.get(f"before_{k}"), result.get(f"after_{k}")
        if a and b:
            print(f"{name} {k}: before {b['median']:.3f} (p90 {b['p90']:.3f}), "
                  f"after {a['median']:.3f} (p90 {a['p90']:.3f}), n={a['n']}", flush=True)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="94dde9a", help="the revision whose scripts/dolly-runc is 'before'")
    ap.add_argument("--workloads", default="W128,busybox")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    runner = DollyRunner(docker.from_env())
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, criu_logs_kept():
        runtimes = {"before": Path(tmp) / "dolly-runc.before", "after": ROOT / "scripts" / "dolly-runc"}
        runtimes["before"].write_bytes(subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{args.before}:scripts/dolly-runc"], check=True,
            capture_output=True).stdout)
        try:
            for name in args.workloads.split(","):
                results[name] = measure(runner, name, runtimes, args.repeats)
        finally:
            install(runtimes["after"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hook.json").write_text(json.dumps({"before": args.before, "repeats": args.repeats,
                                                    "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
