"""The two checkpoint paths side by side: a W128 demo service under Dolly's runtime against the same
service under runc (the engine's own checkpoint, with Dolly pausing the container around its
writable layer and the dump). Interleaved, medians of --repeats; writes
benchmarks/results/runtimes.json.

    .venv/bin/python benchmarks/runtimes.py [--repeats 5] [--state-mb 128] [--clones 3]

Checkpoint: the call, with the source left running. Clone: ``dolly.clone(cp, N)`` until every
clone answers HTTP with the source's state. Both paths clone under Dolly's runtime.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import docker

import dolly
from dolly import ready
from dolly.demo import SERVICE

RESULTS = Path(__file__).resolve().parent / "results" / "runtimes.json"


def median(xs):
    return round(statistics.median(xs), 3)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--state-mb", type=int, default=128)
    parser.add_argument("--clones", type=int, default=3)
    args = parser.parse_args()
    client = docker.from_env()
    runtimes = ["dolly", "runc"]
    out = {"state_mb": args.state_mb, "repeats": args.repeats, "clones": args.clones,
           **{rt: {"checkpoint": [], "clone": []} for rt in runtimes}}
    sources = {
        rt: client.containers.run("dolly/python", ["python3", "-c", SERVICE], detach=True, runtime=rt,
                                  environment={"STATE_MB": str(args.state_mb), "RANDOM_STATE": "1"},
                                  labels={"dolly.bench": "runtimes"})
        for rt in runtimes
    }
    try:
        for c in sources.values():
            ready.wait(c, ready.http(8000), timeout=120)
        for i in range(args.repeats):
            for rt in (runtimes if i % 2 == 0 else runtimes[::-1]):
                t = time.monotonic()
                cp = dolly.checkpoint(sources[rt], f"bench-{i}")
                out[rt]["checkpoint"].append(time.monotonic() - t)
                t = time.monotonic()
                clones = dolly.clone(cp, args.clones)
                for k in clones:
                    ready.wait(k, ready.http(8000), timeout=60)
                out[rt]["clone"].append(time.monotonic() - t)
                for k in clones:
                    k.remove(force=True)
                dolly.remove_checkpoint(cp)
        for rt in runtimes:
            out[rt]["median"] = {k: median(v) for k, v in out[rt].items()}
            print(f"{rt:>6}: checkpoint {out[rt]['median']['checkpoint']} s, "
                  f"clone x{args.clones} {out[rt]['median']['clone']} s (medians of {args.repeats})")
    finally:
        for c in sources.values():
            for cp in dolly.list_checkpoints(c):
                dolly.remove_checkpoint(cp)
            c.remove(force=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
