"""dolly.testing.django: a real Django project (tests/fixtures/django_shop) run with real
pytest-django in a subprocess, plainly and with xdist, with and without a registry cache."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import docker
import pytest
import requests

import dolly.testing
from dolly import trust
from dolly.errors import InvalidArgument
from dolly.testing import RUN_LABEL
from dolly.testing.django import _failed_migration, migrated_database

SHOP = Path(__file__).resolve().parent / "fixtures" / "django_shop"
SHOP_TESTS = 8


def shop_copy(tmp_path: Path) -> Path:
    project = tmp_path / "django_shop"
    shutil.copytree(SHOP, project, ignore=shutil.ignore_patterns("__pycache__"))
    return project


def run_shop(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=project,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def migrations_ran(log: Path) -> int:
    """How many times the shop's data migration ran (it appends a line each time)."""
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def other_runs(client: docker.DockerClient, pytestconfig: pytest.Config):
    """The containers of Dolly plugin runs other than this session's own (its warm sources live
    until it ends): those the shop's runs made, which must all be gone after each."""
    own = pytestconfig.stash[dolly.testing._plugin_key].run_id

    def containers() -> list:
        return [c for c in client.containers.list(all=True, filters={"label": RUN_LABEL})
                if c.labels.get(RUN_LABEL) != own]

    assert containers() == []
    return containers


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_the_shop_migrates_once_and_every_test_sees_the_migrated_state(tmp_path, other_runs, xdist):
    project = shop_copy(tmp_path)
    migrated, servers = tmp_path / "migrations.log", tmp_path / "servers.log"
    res = run_shop(project, *xdist, env={"SHOP_MIGRATION_LOG": str(migrated), "SHOP_SERVERS_LOG": str(servers)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{SHOP_TESTS} passed" in res.stdout, res.stdout
    # Once for the run, whatever the workers: the first migrated under the plugin's lock.
    assert migrations_ran(migrated) == 1
    rows = [line.split() for line in servers.read_text().splitlines()]
    assert len(rows) == SHOP_TESTS  # every test checked the migrated state and recorded its server
    assert {r[3] for r in rows} == {"shop"}  # the settings' database name, served by Dolly
    by_worker: dict = {}
    for _test, worker, addr, _db in rows:
        by_worker.setdefault(worker, set()).add(addr)
    if xdist:
        assert set(by_worker) == {"gw0", "gw1"}
        # A server per worker, the same one all along (transactional tests reset its database).
        assert all(len(addrs) == 1 for addrs in by_worker.values()), by_worker
        assert by_worker["gw0"] != by_worker["gw1"]
    else:
        assert set(by_worker) == {"-"} and len(by_worker["-"]) == 1
    assert other_runs() == []


def test_a_cached_migrated_database_is_pulled_until_a_migration_changes(tmp_path, other_runs, registry):
    project = shop_copy(tmp_path)
    private, _public = trust.generate_keypair()
    trust.save_private_key(private, tmp_path / "signer.pem")
    migrated = tmp_path / "migrations.log"
    env = {"SHOP_MIGRATION_LOG": str(migrated), "SHOP_DB_CACHE": f"{registry.address}/ci/shop-db",
           "DOLLY_CACHE_SIGNER": str(tmp_path / "signer.pem")}

    def tags() -> list:
        """The warm checkpoints' tags (their signatures' tags left out)."""
        r = requests.get(f"http://{registry.address}/v2/ci/shop-db/tags/list", timeout=10)
        return sorted(t for t in (r.json().get("tags") or []) if t.startswith("warm-")) if r.ok else []

    first = run_shop(project, env=env)
    assert first.returncode == 0 and f"{SHOP_TESTS} passed" in first.stdout, first.stdout + first.stderr
    assert migrations_ran(migrated) == 1
    pushed = tags()
    assert len(pushed) == 1

    second = run_shop(project, "-n", "2", env=env)
    assert second.returncode == 0 and f"{SHOP_TESTS} passed" in second.stdout, second.stdout + second.stderr
    assert migrations_ran(migrated) == 1, "the cached run migrated again"
    assert tags() == pushed

    # A changed migration file is another database: migrated again, pushed under another tag.
    data_migration = project / "shop" / "migrations" / "0002_catalogue.py"
    data_migration.write_text(data_migration.read_text() + "\n# reviewed\n")
    third = run_shop(project, env=env)
    assert third.returncode == 0 and f"{SHOP_TESTS} passed" in third.stdout, third.stdout + third.stderr
    assert migrations_ran(migrated) == 2
    assert len(tags()) == 2 and pushed[0] in tags()
    assert other_runs() == []


def test_a_failed_migration_names_it_and_leaves_no_container(tmp_path, other_runs):
    project = shop_copy(tmp_path)
    (project / "shop" / "migrations" / "0003_unpriced.py").write_text(
        "from django.db import migrations\n\n\n"
        "class Migration(migrations.Migration):\n"
        "    dependencies = (('shop', '0002_catalogue'),)\n"
        "    operations = (migrations.RunSQL(\"INSERT INTO shop_product (name) VALUES ('unpriced')\"),)\n")
    res = run_shop(project)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"{SHOP_TESTS} errors" in res.stdout, res.stdout
    assert "dolly.errors.SchemaMigrationFailed: migration shop.0003_unpriced failed" in res.stdout, res.stdout
    assert 'null value in column "price_cents"' in res.stdout
    assert other_runs() == []


# --- no engine ------------------------------------------------------------------------------------

def test_the_failed_migration_is_the_last_one_not_ok():
    out = ("Operations to perform:\n  Apply all migrations: shop\nRunning migrations:\n"
           "  Applying shop.0001_initial... OK\n  Applying shop.0002_catalogue... OK\n  Applying shop.0003_unpriced...")
    assert _failed_migration(out) == "shop.0003_unpriced"
    assert _failed_migration(out.rsplit("\n", 1)[0]) is None  # all OK: the failure came after them
    assert _failed_migration("  Applying a.0001_x... FAKED\n  Applying b.0002_y...") == "b.0002_y"


def test_a_cache_without_keys_is_refused_at_once(monkeypatch):
    monkeypatch.delenv("DOLLY_CACHE_SIGNER", raising=False)
    monkeypatch.delenv("DOLLY_CACHE_TRUST", raising=False)
    with pytest.raises(InvalidArgument, match="a cache needs keys"):
        migrated_database(cache="127.0.0.1:5000/ci/shop-db")
    with pytest.raises(InvalidArgument, match="name a repository"):
        migrated_database(cache="127.0.0.1:5000/ci/shop-db:v1", cache_allow_unsigned=True)
