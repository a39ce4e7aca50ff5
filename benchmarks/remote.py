"""Engines that share no files: migration downtime of the demo service, and clones spread over two
engines against clones on one. Medians of --repeats runs; writes benchmarks/results/remote.json.

    .venv/bin/python benchmarks/remote.py [--repeats 5] [--state-mb 128]

Engine A is this host's; engine B is a dockerd in its own mount namespace (tests/engines.py
IsolatedEngine), reached only over its socket, through Dolly's agent.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import docker

import dolly
from dolly import ready
from dolly.demo import SERVICE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from engines import IsolatedEngine

RESULTS = Path(__file__).resolve().parent / "results" / "remote.json"


def median(xs):
    return round(statistics.median(xs), 3)


def service(client, mb: int):
    c = client.containers.run("dolly/python", ["python3", "-c", SERVICE], detach=True,
                              environment={"STATE_MB": str(mb), "RANDOM_STATE": "1"})
    ready.wait(c, ready.http(8000), timeout=120)
    return c


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--state-mb", type=int, default=128)
    args = parser.parse_args()
    a = docker.from_env()
    host_b = IsolatedEngine("bench", subnet="10.213.191.1/24")
    b = host_b.start()
    out = {"state_mb": args.state_mb, "repeats": args.repeats}
    try:
        # Migration A -> B -> A: each hop's downtime and steps.
        moving = service(a, args.state_mb)
        hops = {"A->B": [], "B->A": []}
        steps = {"A->B": [], "B->A": []}
        here, there = a, b
        for _ in range(2 * args.repeats):
            key = "A->B" if here is a else "B->A"
            m = dolly.migrate(moving.id, there, source_client=here, ready=ready.http(8000))
            hops[key].append(m.downtime)
            steps[key].append(m.steps)
            moving, here, there = m.container, there, here
            print(f"{key} downtime {m.downtime:.2f} s {json.dumps({k: round(v, 2) for k, v in m.steps.items()})}",
                  flush=True)
        moving.remove(force=True)
        out["migration_downtime_s"] = {k: median(v) for k, v in hops.items()}
        out["migration_steps_s"] = {k: {s: median([x[s] for x in v]) for s in v[0]} for k, v in steps.items()}

        # Clones: 4 on A against 2 on A and 2 on B.
        source = service(a, args.state_mb)
        cp = dolly.checkpoint(source, "bench")
        one, two = [], []
        for _ in range(args.repeats):
            for runs, engines in ((one, None), (two, [a, b])):
                t = time.perf_counter()
                clones = dolly.clone(cp, 4, engines=engines) if engines else dolly.clone(cp, 4)
                for c in clones:
                    ready.wait(c, ready.http(8000), timeout=60)
                runs.append(time.perf_counter() - t)
                for c in clones:
                    c.remove(force=True)
        print(f"clone 4 on A: {[round(x, 2) for x in one]}; 2 on A + 2 on B: {[round(x, 2) for x in two]}")
        out["clone4_one_engine_s"] = median(one)
        out["clone4_two_engines_s"] = median(two)
        dolly.remove_checkpoint(cp)
        source.remove(force=True)
    finally:
        host_b.stop()
    RESULTS.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
