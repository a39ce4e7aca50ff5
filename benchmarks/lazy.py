"""Lazy clones against plain ones: `dolly.clone(cp, 1)`, `dolly.clone(cp, 1, lazy=True)` without a
working set and `dolly.clone(cp, 1, lazy=True)` with the working set its first lazy clone recorded,
of the W128 and W1G workloads (benchmarks/bench.py's), clone to first correct answer, the three
modes in a rotated order in each round, from one checkpoint. The first lazy clone of the checkpoint
records its working set (timed apart, as "recording"); then a "lazy" clone runs with an empty
working set in place of it (nothing prefetched, nothing recorded: the lazy clone as it was before
working sets) and a "working set" clone with the recorded one. For lazy clones also: until every
page is in (the restore folder gone), and CRIU's own restore time and the pages its restore wrote
(its statistics, kept while /var/log/dolly/criu/.keep exists), the time from the call's return to
the answer, and the working-set step of the call (reading the record, rewriting the clone's
pagemaps). Medians and p90s (bench.py's `stats`).

    flock /tmp/dolly-tests.lock .venv/bin/python benchmarks/lazy.py [--repeats 7] [--workloads W128,W1G]

Writes benchmarks/results/lazy.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import docker
import pycriu.images

import dolly
import dolly._start
from dolly import _working_set as working_set
from dolly._criu_log import CRIU_LOG_DIR
from dolly._engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import RESULTS, WORKLOADS, DollyRunner, all_answer, criu_logs_kept, docker_ip, stats

MODES = ("plain", "lazy", "ws")


def restored_pages(clone) -> Optional[int]:
    path = CRIU_LOG_DIR / f"{clone.id}.stats-restore"
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return int(pycriu.images.load(f)["entries"][0]["restore"]["pages_restored"])


def put_record(cp, text: str) -> None:
    """The checkpoint's working set, replaced by ``text`` (written beside it, renamed over it)."""
    path = working_set.path_of(cp.path)
    tmp = path.with_name(f".bench-{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


prefetch_s: List[float] = []


def _timed_prefetch(cp, folder):
    """dolly._start's working-set step, timed (the clones start in this process: a local engine)."""
    t = time.perf_counter()
    try:
        return _prefetch(cp, folder)
    finally:
        prefetch_s.append(time.perf_counter() - t)


_prefetch = dolly._start._prefetch_working_set
dolly._start._prefetch_working_set = _timed_prefetch


def clone_once(runner: DollyRunner, engine: Engine, cp, expected: object, mode: str, raw: Dict[str, list]) -> None:
    lazy = mode != "plain"
    prefetch_s.clear()
    t = time.perf_counter()
    (clone,) = dolly.clone(cp, 1, lazy=lazy)
    returned = time.perf_counter() - t
    all_answer([lambda: docker_ip(clone)], expected)
    answered = time.perf_counter() - t
    try:
        raw.setdefault(f"{mode}_clone_s", []).append(answered)
        raw.setdefault(f"{mode}_call_s", []).append(returned)
        raw.setdefault(f"{mode}_answer_after_call_s", []).append(answered - returned)
        if prefetch_s:
            raw.setdefault(f"{mode}_prefetch_s", []).append(prefetch_s.pop())
        criu_s = runner.criu_restore_s([clone])
        if criu_s is not None:
            raw.setdefault(f"{mode}_criu_restore_s", []).append(criu_s)
        pages = restored_pages(clone)
        if pages is not None:
            raw.setdefault(f"{mode}_criu_pages_restored", []).append(pages)
        if lazy:
            folder = engine.spool_dir / f"{clone.id}.restore"
            while folder.exists():
                time.sleep(0.005)
            raw.setdefault(f"{mode}_all_pages_in_s", []).append(time.perf_counter() - t)
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
    results: Dict[str, dict] = {}
    with criu_logs_kept():
        for name in args.workloads.split(","):
            w = WORKLOADS[name]
            _, source, state = runner.start(w)
            raw: Dict[str, list] = {}
            try:
                cp = dolly.checkpoint(source, f"lazy-bench-{name.lower()}")
                try:
                    # The first lazy clone records the working set.
                    clone_once(runner, engine, cp, state, "recording", raw)
                    record = working_set.path_of(cp.path).read_text()
                    doc = json.loads(record)
                    ws_pages = sum(n for runs in doc["processes"].values() for _, n in runs)
                    ws_runs = sum(len(runs) for runs in doc["processes"].values())
                    empty = json.dumps({**doc, "processes": {}})
                    for i in range(args.repeats):
                        for mode in MODES[i % 3:] + MODES[:i % 3]:
                            if mode != "plain":
                                put_record(cp, record if mode == "ws" else empty)
                            clone_once(runner, engine, cp, state, mode, raw)
                finally:
                    dolly.remove_checkpoint(cp)
            finally:
                runner.remove([source])
            results[name] = {k: stats(v) for k, v in raw.items()}
            mib = round(ws_pages * working_set.PAGE_SIZE / 2**20, 1)
            results[name]["working_set"] = {"pages": ws_pages, "mib": mib, "runs": ws_runs}
            print(f"{name:<5} working set: {ws_pages} pages in {ws_runs} runs", flush=True)
            for k, v in results[name].items():
                if k != "working_set":
                    unit = "" if k.endswith("pages_restored") else " s"
                    print(f"{name:<5} {k:<30} median {v['median']:.3f}{unit}  p90 {v['p90']:.3f}{unit}  n={v['n']}",
                          flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lazy.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
