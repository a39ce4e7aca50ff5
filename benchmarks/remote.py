"""Engines that share no files: migration downtime of the demo service (the memory moved with the
checkpoint, and after it: post-copy), and clones spread over two engines against clones on one.
Medians of --repeats runs; writes benchmarks/results/remote.json.

    .venv/bin/python benchmarks/remote.py [--repeats 5] [--state-mb 128] [--big-mb 1024]

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
    parser.add_argument("--big-mb", type=int, default=1024, help="post-copy with this state too (0: skip)")
    parser.add_argument("--big-repeats", type=int, default=3)
    args = parser.parse_args()
    a = docker.from_env()
    host_b = IsolatedEngine("bench", subnet="10.213.191.1/24")
    b = host_b.start()
    out = {"state_mb": args.state_mb, "repeats": args.repeats}
    try:
        # Migration A -> B -> A: each hop's downtime and steps, the memory moved with the
        # checkpoint (pre-copy) and after it (post-copy), the two interleaved.
        moving = service(a, args.state_mb)
        hops: dict = {}
        steps: dict = {}
        here, there = a, b
        for _ in range(args.repeats):
            for mode, post_copy in (("pre-copy", False), ("post-copy", True)):
                for _ in range(2):
                    key = f"{mode} {'A->B' if here is a else 'B->A'}"
                    m = dolly.migrate(moving.id, there, source_client=here, ready=ready.http(8000),
                                      post_copy=post_copy)
                    hops.setdefault(key, []).append(m.downtime)
                    steps.setdefault(key, []).append(m.steps)
                    moving, here, there = m.container, there, here
                    print(f"{key} downtime {m.downtime:.2f} s "
                          f"{json.dumps({k: round(v, 2) for k, v in m.steps.items()})}", flush=True)
        moving.remove(force=True)
        out["migration_downtime_s"] = {k: median(v) for k, v in hops.items()}
        out["migration_steps_s"] = {k: {s: median([x[s] for x in v]) for s in v[0]} for k, v in steps.items()}

        # Post-copy with a larger state: the downtime should not grow with it.
        if args.big_mb:
            moving = service(a, args.big_mb)
            big: dict = {}
            here, there = a, b
            for _ in range(2 * args.big_repeats):
                key = f"post-copy {'A->B' if here is a else 'B->A'}"
                m = dolly.migrate(moving.id, there, source_client=here, ready=ready.http(8000), post_copy=True)
                big.setdefault(key, []).append((m.downtime, m.steps["memory"]))
                moving, here, there = m.container, there, here
                print(f"{args.big_mb} MB {key} downtime {m.downtime:.2f} s, memory in after "
                      f"{m.steps['memory']:.2f} s", flush=True)
            moving.remove(force=True)
            out[f"post_copy_{args.big_mb}mb"] = {k: {"downtime_s": median([d for d, _ in v]),
                                                    "memory_s": median([x for _, x in v])}
                                                for k, v in big.items()}

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
