"""Lazy clones against plain ones: `dolly.clone(cp, 1)` and `dolly.clone(cp, 1, lazy=True)` of the
W128 and W1G workloads (benchmarks/bench.py's), clone to first correct answer, the two modes
alternated in each round from one checkpoint. For a lazy clone also: until every page is in (its
restore folder gone), and CRIU's own restore time (its statistics, kept while
/var/log/dolly/criu/.keep exists). Medians and p90s (bench.py's `stats`).

    flock /tmp/dolly-tests.lock .venv/bin/python benchmarks/lazy.py [--repeats 7] [--workloads W128,W1G]

Writes benchmarks/results/lazy.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import docker

import dolly
from dolly._criu_log import CRIU_LOG_DIR
from dolly._engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import RESULTS, WORKLOADS, DollyRunner, all_answer, docker_ip, stats


def clone_once(runner: DollyRunner, engine: Engine, cp, expected: object, lazy: bool, raw: Dict[str, list]) -> None:
    mode = "lazy" if lazy else "plain"
    t = time.perf_counter()
    (clone,) = dolly.clone(cp, 1, lazy=lazy)
    returned = time.perf_counter() - t
    all_answer([lambda: docker_ip(clone)], expected)
    answered = time.perf_counter() - t
    try:
        raw.setdefault(f"{mode}_clone_s", []).append(answered)
        raw.setdefault(f"{mode}_call_s", []).append(returned)
        criu_s = runner.criu_restore_s([clone])
        if criu_s is not None:
            raw.setdefault(f"{mode}_criu_restore_s", []).append(criu_s)
        if lazy:
            folder = engine.spool_dir / f"{clone.id}.restore"
            while folder.exists():
                time.sleep(0.005)
            raw.setdefault("lazy_all_pages_in_s", []).append(time.perf_counter() - t)
    finally:
        runner.remove([clone])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="W128,W1G")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    client = docker.from_env()
    engine = Engine.of(client)
    runner = DollyRunner(client)
    keep = CRIU_LOG_DIR / ".keep"
    kept_before = keep.exists()
    CRIU_LOG_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    keep.touch()
    results: Dict[str, dict] = {}
    try:
        for name in args.workloads.split(","):
            w = WORKLOADS[name]
            _, source, state = runner.start(w)
            raw: Dict[str, list] = {}
            try:
                cp = dolly.checkpoint(source, f"lazy-bench-{name.lower()}")
                try:
                    for i in range(args.repeats):
                        for lazy in ((False, True) if i % 2 == 0 else (True, False)):
                            clone_once(runner, engine, cp, state, lazy, raw)
                finally:
                    dolly.remove_checkpoint(cp)
            finally:
                runner.remove([source])
            results[name] = {k: stats(v) for k, v in raw.items()}
            for k, v in results[name].items():
                print(f"{name:<5} {k:<24} median {v['median']:.3f} s  p90 {v['p90']:.3f} s  n={v['n']}", flush=True)
    finally:
        if not kept_before:
            keep.unlink(missing_ok=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lazy.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
