"""Warm databases: what dolly.testing's postgres(), mariadb() and redis() fixtures cost and save.
Per kind, with the fixtures of tests/fixtures/<kind> (Postgres 100,000 rows, MariaDB 10,000, Redis
a few keys): the cold start (start, accepting connections, fixtures loaded), the checkpoint, the
clones' shared layer image (once per checkpoint, when the layer is 16 MiB or more), and a clone
until its first query answers (what each test pays: a checkpoint's first clone, then
--next-clones more, one after another as tests take them), medians of --repeats; then 3 clones at
once. Writes
benchmarks/results/databases.json.

    .venv/bin/python benchmarks/databases.py [--repeats 5] [--kinds postgres,mariadb,redis]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import docker

import dolly
from dolly import _databases as databases, ready
from dolly._engine import Engine
from dolly._start import shared_layer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "databases.json"
RECIPES = {
    "postgres": databases.postgres(image="dolly/postgres:15", user="test", password="test", database="test"),
    "mariadb": databases.mariadb(image="dolly/mariadb:10.11", user="test", password="test", database="test"),
    "redis": databases.redis(image="dolly/redis:7", password=None),
}
QUERY = {"postgres": lambda c: c.execute("SELECT count(*) FROM items").fetchone()[0],
         "mariadb": lambda c: (c.cursor().execute("SELECT count(*) FROM items"), 1)[1],
         "redis": lambda c: c.get("greeting")}


def median(xs):
    return round(statistics.median(xs), 3)


def first_answer(recipe, container) -> float:
    """Seconds from now until the clone answers a query."""
    t = time.perf_counter()
    ready.wait(container, ready.tcp(recipe.port), timeout=30, interval=0.01)
    conn = recipe.connect(ready.ip_address(container))
    QUERY[recipe.kind](conn)
    conn.close()
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", default="postgres,mariadb,redis", help="which servers, comma-separated")
    parser.add_argument("--next-clones", type=int, default=3, help="clones per checkpoint after its first")
    args = parser.parse_args()
    client = docker.from_env()
    out: dict = {"repeats": args.repeats}
    for kind in args.kinds.split(","):
        recipe = RECIPES[kind]
        row: dict = {"cold": [], "checkpoint": [], "shared_layer": [], "first_clone_to_answer": [],
                     "clone_to_answer": [], "three_clones": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            source = client.containers.run(recipe.image, detach=True, environment=dict(recipe.environment),
                                           labels={"dolly.bench": "databases"})
            try:
                ready.wait(source, recipe.accepting(), timeout=120, interval=0.05)
                databases.load(recipe, source, databases.fixture_items(ROOT / "tests" / "fixtures" / kind, recipe))
                databases.wait_without_connections(source)
                row["cold"].append(time.perf_counter() - t)
                t = time.perf_counter()
                cp = dolly.checkpoint(source, "bench")
                row["checkpoint"].append(time.perf_counter() - t)
                # Once per checkpoint, as the pytest plugin does it while warming: a large writable
                # layer becomes the clones' shared image layer.
                t = time.perf_counter()
                shared_layer(Engine.of(client), cp)
                row["shared_layer"].append(time.perf_counter() - t)
                # One clone per test, as a suite takes them: the first of a checkpoint (its files
                # and the shared layer not yet in the kernel's caches), then the tests after it.
                for i in range(1 + args.next_clones):
                    t = time.perf_counter()
                    (one,) = dolly.clone(cp, 1)
                    took = time.perf_counter() - t + first_answer(recipe, one)
                    row["clone_to_answer" if i else "first_clone_to_answer"].append(took)
                    one.remove(force=True)
                t = time.perf_counter()
                three = dolly.clone(cp, 3)
                for c in three:
                    first_answer(recipe, c)
                row["three_clones"].append(time.perf_counter() - t)
                for c in three:
                    c.remove(force=True)
                dolly.remove_checkpoint(cp)
            finally:
                source.remove(force=True)
        out[kind] = {"median": {k: median(v) for k, v in row.items()}, "runs": row}
        m = out[kind]["median"]
        m["cold_over_clone"] = round(m["cold"] / m["clone_to_answer"], 2)
        print(f"{kind:>8}: cold {m['cold']} s, checkpoint {m['checkpoint']} s, clone to first answer "
              f"{m['clone_to_answer']} s ({m['cold_over_clone']}x; a checkpoint's first clone "
              f"{m['first_clone_to_answer']} s), 3 clones {m['three_clones']} s (medians of {args.repeats})")
    RESULTS.parent.mkdir(exist_ok=True)
    if RESULTS.exists():  # a run of some kinds keeps the others' figures
        out = {**json.loads(RESULTS.read_text()), **out}
    RESULTS.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
