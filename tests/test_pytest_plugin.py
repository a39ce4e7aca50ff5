"""The pytest plugin, run the way users run it: pytest in a subprocess, plain and with xdist."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest

import dolly.testing
from dolly.testing import RUN_LABEL, STATE_ROOT, recorded_containers

ROOT = Path(__file__).resolve().parents[1]

# A quick service: it writes a token into its writable layer, says "ready", then ticks.
SUITE_HEADER = '''
import os
import dolly.testing
from dolly import ready

svc = dolly.testing.warm_service(
    image="dolly/busybox",
    command=["sh", "-c", "echo $RANDOM$RANDOM > /tmp/token; echo ready; while true; do echo tick; sleep 0.2; done"],
    ready=ready.log("ready"),
)

def token(c):
    return c.exec_run(["cat", "/tmp/token"]).output.decode().strip()
'''


def pytest_run(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


# This session's own plugin run (tests/test_databases.py's warm sources live until it ends): the
# runs started here in subprocesses are the others.
OUTER_RUN: list = []


@pytest.fixture(autouse=True)
def outer_run(pytestconfig: pytest.Config) -> None:
    OUTER_RUN[:] = [pytestconfig.stash[dolly.testing._plugin_key].run_id]


def run_containers(client: docker.DockerClient) -> list:
    """The containers of plugin runs other than this session's own."""
    return [c for c in client.containers.list(all=True, filters={"label": RUN_LABEL})
            if c.labels.get(RUN_LABEL) not in OUTER_RUN]


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_the_example_suite_gets_warm_clones(client, xdist):
    res = pytest_run("examples/test_warm_web.py", "-q", *xdist, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 passed" in res.stdout
    assert "dolly warm replicas" in res.stdout and "web: 3 clone(s)" in res.stdout
    assert "saved" in res.stdout
    assert run_containers(client) == []
    assert not STATE_ROOT.exists() or not [p for p in STATE_ROOT.iterdir() if p.name not in OUTER_RUN]


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_the_database_example_gets_a_database_per_test(client, xdist):
    res = pytest_run("examples/test_warm_postgres.py", "-q", *xdist, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 passed" in res.stdout and "db: 3 clone(s)" in res.stdout
    assert run_containers(client) == []


def test_xdist_workers_share_one_warm_checkpoint(client, tmp_path):
    log = tmp_path / "seen.txt"
    suite = tmp_path / "test_share.py"
    suite.write_text(SUITE_HEADER + "\n".join(
        f"def test_{i}(svc):\n"
        f"    with open(os.environ['SEEN'], 'a') as f:\n"
        f"        f.write(os.environ.get('PYTEST_XDIST_WORKER', '-') + ' ' + token(svc) + ' ' + svc.id + '\\n')\n"
        f"    import time; time.sleep(0.5)\n"
        for i in range(6)
    ))
    res = pytest_run(str(suite), "-q", "-n", "2", cwd=tmp_path, env={"SEEN": str(log)})
    assert res.returncode == 0, res.stdout + res.stderr
    # A user's suite (no pyproject of Dolly's around it) sees no warning from Dolly's dependencies.
    assert "warnings summary" not in res.stdout and "DeprecationWarning" not in res.stdout, res.stdout
    rows = [line.split() for line in log.read_text().splitlines()]
    assert len(rows) == 6
    assert len({r[1] for r in rows}) == 1, "workers warmed the service more than once"
    assert len({r[2] for r in rows}) == 6, "two tests shared a clone"
    assert {r[0] for r in rows} == {"gw0", "gw1"}
    assert run_containers(client) == []


def test_a_failed_test_shows_its_clone_log(client, tmp_path):
    suite = tmp_path / "test_fail.py"
    suite.write_text(SUITE_HEADER + "\ndef test_fails(svc):\n    import time; time.sleep(0.5)\n    assert False\n")
    res = pytest_run(str(suite), "-q", cwd=tmp_path)
    assert res.returncode == 1
    assert "dolly clone" in res.stdout and "tick" in res.stdout, res.stdout
    assert run_containers(client) == []


def test_a_killed_run_is_reaped_by_the_next(client, tmp_path):
    suite = tmp_path / "test_hang.py"
    suite.write_text(SUITE_HEADER + "\ndef test_hangs(svc):\n    import time; time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(suite)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def recorded_clones() -> list:
        # The plugin's clone, once its run has recorded it (as the engine answers its create).
        return [c for c in run_containers(client) if "dolly.source" in c.labels
                and c.id in recorded_containers(STATE_ROOT / c.labels[RUN_LABEL])]

    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not recorded_clones():
            time.sleep(0.5)
        clones = recorded_clones()
        assert clones, "the clone never appeared"
        killed_run = clones[0].labels[RUN_LABEL]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    left = run_containers(client)
    assert left, "nothing was left to reap"
    assert {c.id for c in left if c.labels[RUN_LABEL] == killed_run} <= recorded_containers(STATE_ROOT / killed_run)

    ok = tmp_path / "test_ok.py"
    ok.write_text(SUITE_HEADER + "\ndef test_ok(svc):\n    assert token(svc)\n")
    res = pytest_run(str(ok), "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert run_containers(client) == []
    assert not (STATE_ROOT / killed_run).exists()


def test_a_database_test_that_fails_shows_the_database_log(client, tmp_path):
    # A user's own image: here Dolly's under another name, with another account and database.
    client.images.get("dolly/postgres:15").tag("dolly-test/own-postgres", "1")
    try:
        suite = tmp_path / "test_db.py"
        suite.write_text(
            "import dolly.testing\n"
            "db = dolly.testing.postgres(image='dolly-test/own-postgres:1', user='u', password='p', database='d',\n"
            "                            fixtures=lambda conn: conn.execute('CREATE TABLE t (i int)'))\n"
            "def test_writes_then_fails(db):\n"
            "    assert db.url == f'postgresql://u:p@{db.host}:5432/d'\n"
            "    with db.connect() as conn:\n"
            "        conn.execute('INSERT INTO t VALUES (1)')\n"
            "    with db.connect() as conn:\n"
            "        conn.execute('SELECT * FROM nope')\n"
        )
        res = pytest_run(str(suite), "-q", cwd=tmp_path)
    finally:
        client.images.remove("dolly-test/own-postgres:1")
    assert res.returncode == 1 and "1 failed" in res.stdout, res.stdout + res.stderr
    assert 'relation "nope" does not exist' in res.stdout
    # The report carries the server's log: from its warm start, and from the test's own clone.
    source = res.stdout.split("dolly warm source of ", 1)[1].split("dolly clone ", 1)[0]
    assert "database system is ready to accept connections" in source
    clone = res.stdout.split("dolly clone ", 1)[1]
    assert 'ERROR:  relation "nope" does not exist' in clone
    assert "warnings summary" not in res.stdout
    assert run_containers(client) == []


DATABASE_SUITE = '''
import os
import dolly.testing

pg = dolly.testing.postgres(fixtures=lambda conn: conn.execute(
    "CREATE TABLE marks (who text); INSERT INTO marks VALUES ('fixture')"))
maria = dolly.testing.mariadb(fixtures=lambda conn: (conn.cursor().execute("CREATE TABLE marks (who text)"),
                                                     conn.cursor().execute("INSERT INTO marks VALUES ('fixture')")))
cache = dolly.testing.redis(fixtures=lambda r: r.rpush("marks", "fixture"))


def seen(kind, db):
    with open(os.environ["SEEN"], "a") as f:
        f.write(f"{kind} {db.container.labels['dolly.source']} {db.container.id}\\n")


def marks_sql(conn):
    cur = conn.cursor()
    cur.execute("SELECT who FROM marks ORDER BY who")
    return [row[0] for row in cur.fetchall()]
'''


def test_database_fixtures_under_xdist_share_one_warm_server_and_no_writes(client, tmp_path):
    log = tmp_path / "seen.txt"
    tests = []
    for i in range(3):
        tests.append(
            f"def test_pg_{i}(pg):\n"
            f"    seen('pg', pg)\n"
            f"    with pg.connect() as conn:\n"
            f"        assert marks_sql(conn) == ['fixture']\n"
            f"        conn.execute(\"INSERT INTO marks VALUES ('test {i}')\")\n"
            f"def test_maria_{i}(maria):\n"
            f"    seen('maria', maria)\n"
            f"    conn = maria.connect()\n"
            f"    assert marks_sql(conn) == ['fixture']\n"
            f"    conn.cursor().execute(\"INSERT INTO marks VALUES ('test {i}')\")\n"
            f"    conn.close()\n"
            f"def test_cache_{i}(cache):\n"
            f"    seen('cache', cache)\n"
            f"    r = cache.connect()\n"
            f"    assert r.lrange('marks', 0, -1) == [b'fixture']\n"
            f"    r.rpush('marks', 'test {i}')\n"
            f"    r.close()\n"
        )
    suite = tmp_path / "test_dbs.py"
    suite.write_text(DATABASE_SUITE + "\n".join(tests))
    res = pytest_run(str(suite), "-q", "-n", "2", cwd=tmp_path, env={"SEEN": str(log)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "9 passed" in res.stdout
    rows = [line.split() for line in log.read_text().splitlines()]
    for kind in ("pg", "maria", "cache"):
        mine = [r for r in rows if r[0] == kind]
        assert len(mine) == 3
        assert len({r[1] for r in mine}) == 1, f"{kind} was warmed more than once"
        if kind == "pg":  # a database per test, in one server per worker (2 workers)
            assert len({r[2] for r in mine}) <= 2, "a worker's pg tests had more than one server"
        else:
            assert len({r[2] for r in mine}) == 3, f"two {kind} tests shared a clone"
    assert run_containers(client) == []
