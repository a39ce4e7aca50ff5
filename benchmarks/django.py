"""pytest-django on a real project's migrations: a `wagtail start` site (wagtail from PyPI), a
handful of database tests added to it, run whole (`python -m pytest`, wall time from start to
exit) in these ways, interleaved, --repeats times each:

- plain:        pytest-django as it comes, its own test database on one Postgres server (Dolly's
                dolly/postgres:15 image, started once for the benchmark): creates the test
                database and runs every migration, per run and per xdist worker;
- dolly:        ``from dolly.testing.django import django_db_setup`` in the site's conftest.py:
                a warm Postgres migrated once per run, checkpointed, a clone per worker;
- dolly-cache:  the same with ``cache=`` a local registry (Debian's docker-registry, as the tests
                start it), pushed once before the timed runs: each run pulls the migrated
                checkpoint and runs no migration;

each plainly and with ``-n 2``. Prints and writes benchmarks/results/django.json (median, p90, n).
Take the engine lock, as the tests do:

    flock /tmp/dolly-tests.lock .venv/bin/python benchmarks/django.py [--repeats 5]

Wagtail goes into a virtual environment of the benchmark's own (removed at the end; --venv PATH
keeps one to reuse), which sees this project's environment after its own packages (a .pth file),
so Dolly, pytest, pytest-xdist and psycopg are this project's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import docker

from dolly import ready, trust

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "django.json"
sys.path.insert(0, str(ROOT / "tests"))
from registries import Registry  # noqa: E402  (the tests' registry, started the same way)

MODES = ["plain", "dolly", "dolly-cache"]

SETTINGS = '''
import os

from .dev import *  # noqa: F403

# The benchmark's Postgres: the plain server's address (dolly.testing.django sets its own).
DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "mysite", "USER": "test",
                         "PASSWORD": "test", "HOST": os.environ.get("BENCH_DB_HOST", ""), "PORT": "5432"}}
'''

CONFTEST = '''
import os

if os.environ.get("BENCH_MODE", "plain").startswith("dolly"):
    from dolly.testing.django import django_db_setup, migrated_database  # noqa: F401

    if os.environ.get("BENCH_CACHE"):
        django_db_setup = migrated_database(cache=os.environ["BENCH_CACHE"])
'''

TESTS = '''
import pytest
from django.contrib.auth.models import User
from wagtail.models import Locale, Page, Site


@pytest.mark.django_db
def test_the_root_page_is_there():
    assert Page.objects.filter(depth=1).count() == 1


@pytest.mark.django_db
def test_the_default_site_serves_the_home_page():
    assert Site.objects.get(is_default_site=True).root_page.title


@pytest.mark.django_db
def test_the_home_page_renders(client):
    assert client.get("/").status_code == 200


@pytest.mark.django_db
def test_a_user_is_made():
    User.objects.create_user("editor", password="x")
    assert User.objects.count() == 1


@pytest.mark.django_db
def test_a_child_page_is_added():
    root = Page.objects.get(depth=1)
    root.add_child(instance=Page(title="About", slug="about"))
    assert Page.objects.filter(slug="about").exists()


@pytest.mark.django_db(transaction=True)
def test_a_committed_user():
    User.objects.create_user("committed", password="x")
    assert User.objects.filter(username="committed").exists()


@pytest.mark.django_db(transaction=True)
def test_a_committed_page():
    # Under plain pytest-django the flush after the previous transactional test emptied what
    # wagtail's data migrations made (the locale, the root page): made again here, so that both
    # ways run the same passing suite.
    Locale.objects.get_or_create(language_code="en")
    root = Page.objects.get(depth=1) if Page.objects.exists() else Page.add_root(instance=Page(title="Root", slug="r"))
    root.add_child(instance=Page(title="News", slug="news"))
    assert Page.objects.filter(slug="news").exists()


@pytest.mark.django_db(transaction=True)
def test_another_committed_user():
    User.objects.create_user("another", password="x")
    assert User.objects.count() >= 1
'''


def stats(xs: list) -> dict:
    xs = sorted(xs)
    return {"median": round(statistics.median(xs), 2), "p90": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))], 2),
            "n": len(xs), "all": [round(x, 2) for x in xs]}


def make_venv(path: Path) -> Path:
    """A venv with wagtail, which sees this project's packages after its own."""
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "dolly-project.pth").write_text(f"{ROOT}\n{sysconfig.get_paths()['purelib']}\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "wagtail"], check=True)
    return python


def make_site(python: Path, folder: Path) -> Path:
    site = folder / "mysite"
    site.mkdir(parents=True)
    subprocess.run([str(python.parent / "wagtail"), "start", "mysite", str(site)], check=True, capture_output=True)
    (site / "mysite" / "settings" / "bench.py").write_text(SETTINGS)
    (site / "conftest.py").write_text(CONFTEST)
    (site / "tests").mkdir()
    (site / "tests" / "test_site.py").write_text(TESTS)
    (site / "pytest.ini").write_text("[pytest]\nDJANGO_SETTINGS_MODULE = mysite.settings.bench\ntestpaths = tests\n")
    return site


def run(python: Path, site: Path, mode: str, xdist: bool, env: dict) -> float:
    args = [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", *(["-n", "2"] if xdist else [])]
    started = time.perf_counter()
    res = subprocess.run(args, cwd=site, capture_output=True, text=True, timeout=900,
                         env={**os.environ, **env, "BENCH_MODE": mode})
    took = time.perf_counter() - started
    if res.returncode != 0 or "8 passed" not in res.stdout:
        raise SystemExit(f"{mode}{' -n 2' if xdist else ''} failed:\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--venv", type=Path, help="a venv to make or reuse for wagtail (kept)")
    args = parser.parse_args()
    client = docker.from_env()
    scratch = Path(tempfile.mkdtemp(prefix="dolly-bench-django-"))
    server = None
    registry = None
    try:
        python = make_venv(args.venv or scratch / "venv")
        site = make_site(python, scratch)
        count = ("import django, os, wagtail; os.environ['DJANGO_SETTINGS_MODULE'] = 'mysite.settings.bench'; "
                 "django.setup(); from django.db.migrations.loader import MigrationLoader; "
                 "print(wagtail.__version__, django.get_version(), "
                 "len(MigrationLoader(None, ignore_no_migrations=True).disk_migrations))")
        *version, migrations = subprocess.run([str(python), "-c", count], cwd=site, capture_output=True, text=True,
                                              check=True).stdout.split()
        print(f"wagtail {version[0]}, Django {version[1]}, {migrations} migrations")

        server = client.containers.run("dolly/postgres:15", detach=True, name=f"dolly-bench-django-{os.getpid()}",
                                       environment={"POSTGRES_USER": "test", "POSTGRES_PASSWORD": "test",
                                                    "POSTGRES_DB": "mysite"})
        ready.wait(server, ready.exec(["pg_isready", "-q", "-h", "127.0.0.1"]), timeout=60)
        registry = Registry(scratch / "registry").start()
        private, _ = trust.generate_keypair()
        trust.save_private_key(private, scratch / "signer.pem")
        envs = {
            "plain": {"BENCH_DB_HOST": ready.ip_address(server)},
            "dolly": {},
            "dolly-cache": {"BENCH_CACHE": f"{registry.address}/bench/wagtail-db",
                            "DOLLY_CACHE_SIGNER": str(scratch / "signer.pem")},
        }
        # One untimed run of each: the cache's is the first CI run's, which migrates and pushes.
        first = {mode: round(run(python, site, mode, False, envs[mode]), 2) for mode in MODES}
        times: dict = {f"{m}{' -n 2' if x else ''}": [] for m in MODES for x in (False, True)}
        for i in range(args.repeats):
            for mode in MODES:
                for xdist in (False, True):
                    took = run(python, site, mode, xdist, envs[mode])
                    times[f"{mode}{' -n 2' if xdist else ''}"].append(took)
                    print(f"  {i + 1}/{args.repeats} {mode:12s}{' -n 2' if xdist else '     '} {took:6.2f} s",
                          flush=True)
        results = {"wagtail": version[0], "django": version[1], "migrations": int(migrations), "tests": 8,
                   "transactional_tests": 3, "first_run_s": first,
                   "wall_s": {k: stats(v) for k, v in times.items()}}
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print("\n| suite run | median | p90 | n |\n|---|---|---|---|")
        for k, v in results["wall_s"].items():
            print(f"| {k} | {v['median']:.2f} s | {v['p90']:.2f} s | {v['n']} |")
    finally:
        if registry is not None:
            registry.stop()
        if server is not None:
            server.remove(force=True, v=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
