"""Warm databases: what dolly.testing's postgres(), mariadb() and redis() fixtures cost and save.
Per kind, with the fixtures of tests/fixtures/<kind> (Postgres 100,000 rows, MariaDB 10,000, Redis
a few keys): the cold start (start, accepting connections, fixtures loaded), the checkpoint, the
clones' shared layer image (once per checkpoint, when the layer is 16 MiB or more), and a clone
until its first query answers (what each test pays: a checkpoint's first clone, then
--next-clones more, one after another as tests take them), medians of --repeats; then 3 clones at
once. Writes
benchmarks/results/databases.json.

    .venv/bin/python benchmarks/databases.py [--repeats 5] [--kinds postgres,mariadb,redis]

With --isolation, what a test waits for its own fresh database instead, each way side by side on
the same fixture and the same checkpoint (see isolation()); writes results/isolation.json:

    .venv/bin/python benchmarks/databases.py --isolation [--tests 15] [--body 0,0.3]
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


def stats(xs) -> dict:
    """Median, p90 and n of seconds."""
    xs = sorted(xs)
    return {"median": round(statistics.median(xs), 3), "p90": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))], 3),
            "n": len(xs)}


def loaded_source(client, kind):
    """A server with tests/fixtures/<kind> loaded and no connection open, ready for a checkpoint."""
    recipe = RECIPES[kind]
    source = client.containers.run(recipe.image, detach=True, environment=dict(recipe.environment),
                                   labels={"dolly.bench": "databases"})
    ready.wait(source, recipe.accepting(), timeout=120, interval=0.05)
    databases.load(recipe, source, databases.fixture_items(ROOT / "tests" / "fixtures" / kind, recipe))
    databases.wait_without_connections(source)
    return source


def a_test(recipe, container, body: float) -> float:
    """A test: the first query, a write, then ``body`` seconds of its own work; returns the
    seconds until the first query answered."""
    t = time.perf_counter()
    conn = recipe.connect(ready.ip_address(container))
    QUERY[recipe.kind](conn)
    first = time.perf_counter() - t
    if recipe.kind == "postgres":
        conn.execute("DELETE FROM items WHERE id <= 10")
        conn.commit()
    elif recipe.kind == "mariadb":
        conn.cursor().execute("DELETE FROM items WHERE id <= 10")
    else:
        conn.set("written", "by a test")
    conn.close()
    time.sleep(body)
    return first


def isolation(client, tests: int, bodies) -> dict:
    """Per test: what it waits for before its first query answers ("setup": its database made,
    the connection, the first query), what it waits for after ("teardown"), and the whole suite
    of ``tests`` such tests with ``body`` seconds of work each (two cores shared by all of it).

    Postgres (100,000 rows): (a) the template reset testcontainers users do, in a plain server:
    DROP DATABASE, CREATE DATABASE ... TEMPLATE, first query; (b) Dolly's clone per test; (c) the
    fixture's mechanism now, dolly._databases.TemplateServer in a clone of the warm server:
    CREATE DATABASE from the never-connected template, first query, and after the test every
    session ended, the database dropped, the server's shared state compared. MariaDB and Redis: a
    clone per test made when the test asks and removed after it (before), and the fixture's pool
    (dolly.testing.pools.ClonePool, one clone made ahead, removal in the background)."""
    out: dict = {}

    def suite(name, setup, teardown, body):
        waits, afters = [], []
        t0 = time.perf_counter()
        for _ in range(tests):
            t = time.perf_counter()
            kind_recipe, container = setup()
            waits.append(time.perf_counter() - t + a_test(kind_recipe, container, body))
            t = time.perf_counter()
            teardown(container)
            afters.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        row = {"setup_to_first_answer": stats(waits), "teardown": stats(afters), "suite_s": round(total, 3),
               "tests": tests, "body_s": body}
        out.setdefault(name, []).append(row)
        print(f"{name:>34} body {body:.1f} s: setup+first query {row['setup_to_first_answer']}, "
              f"teardown {row['teardown']}, suite of {tests} {total:.2f} s")

    for body in bodies:
        postgres_suites(client, suite, body)
    for kind in ("mariadb", "redis"):
        pool_suites(client, suite, kind, bodies, out)
    return out


def answering(recipe, c):
    ready.wait(c, ready.tcp(recipe.port), timeout=30, interval=0.01)
    return c


def postgres_suites(client, suite, body: float) -> None:
    from psycopg import connect

    pg = RECIPES["postgres"]
    # (a) the template reset in a plain server, as testcontainers users write it.
    plain = loaded_source(client, "postgres")
    try:
        admin = connect(pg.url(ready.ip_address(plain)).rsplit("/", 1)[0] + "/postgres", autocommit=True)
        admin.execute("ALTER DATABASE test RENAME TO tpl")

        def reset_setup():
            admin.execute("DROP DATABASE IF EXISTS test WITH (FORCE)")
            admin.execute("CREATE DATABASE test TEMPLATE tpl")
            return pg, plain

        suite("postgres template reset", reset_setup, lambda c: None, body)
        admin.close()
    finally:
        plain.remove(force=True)
    source = loaded_source(client, "postgres")
    cp = dolly.checkpoint(source, "bench")
    try:
        shared_layer(Engine.of(client), cp)
        # (b) Dolly's clone per test, removed after it.
        suite("postgres dolly clone per test", lambda: (pg, answering(pg, dolly.restore(cp))),
              lambda c: c.remove(force=True), body)
        # (c) the fixtures' mechanism: a database per test from a template in a clone.
        server = answering(pg, dolly.restore(cp))
        templates = databases.TemplateServer(pg, ready.ip_address(server))
        replaced = []

        def template_setup():
            templates.fresh()
            return pg, server

        suite("postgres template server (now)", template_setup,
              lambda c: replaced.append(not templates.reset()), body)
        if any(replaced):
            print(f"  the server would have been replaced after {sum(replaced)} test(s)")
        templates.close()
        server.remove(force=True)
    finally:
        dolly.remove_checkpoint(cp)
        source.remove(force=True)


def pool_suites(client, suite, kind: str, bodies, out: dict) -> None:
    from dolly.testing.pools import ClonePool

    recipe = RECIPES[kind]
    source = loaded_source(client, kind)
    cp = dolly.checkpoint(source, "bench")
    try:
        shared_layer(Engine.of(client), cp)
        for body in bodies:
            suite(f"{kind} clone per test (before)", lambda: (recipe, answering(recipe, dolly.restore(cp))),
                  lambda c: c.remove(force=True), body)
            bg = docker.from_env()  # the pool's thread has a client of its own, as in the plugin
            pool = ClonePool(lambda bg=bg: dolly.restore(cp, client=bg), lambda c: c.remove(force=True), ahead=1)
            try:
                suite(f"{kind} clone pool, 1 ahead (now)", lambda pool=pool: (recipe, answering(recipe, pool.take())),
                      pool.give_back, body)
            finally:
                t = time.perf_counter()
                pool.close()
                out.setdefault(f"{kind} pool close_s", []).append(round(time.perf_counter() - t, 3))
    finally:
        dolly.remove_checkpoint(cp)
        source.remove(force=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--isolation", action="store_true", help="a fresh database per test, each way")
    parser.add_argument("--tests", type=int, default=15, help="with --isolation: tests per suite")
    parser.add_argument("--body", default="0,0.3", help="with --isolation: seconds of each test's own work")
    parser.add_argument("--kinds", default="postgres,mariadb,redis", help="which servers, comma-separated")
    parser.add_argument("--next-clones", type=int, default=3, help="clones per checkpoint after its first")
    args = parser.parse_args()
    client = docker.from_env()
    if args.isolation:
        result = isolation(client, args.tests, [float(b) for b in args.body.split(",")])
        (RESULTS.parent / "isolation.json").write_text(json.dumps(result, indent=2))
        return 0
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
