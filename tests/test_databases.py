"""Warm databases for test suites: each test gets its own clone of a server warmed once, fixtures
loaded, and nothing one test writes is seen by the next. The tests of each kind run in file order:
the first writes, the second must not see it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import psycopg
import pytest

import dolly
import dolly.testing
from dolly import _databases, ready
from dolly.errors import DollyError, InvalidArgument
from dolly.testing import RUN_LABEL

FIXTURES = Path(__file__).parent / "fixtures"
# Postgres and MariaDB run as users other than root: their checkpoints need CRIU to read the limits
# of another user's processes (scripts/criu-patches).


def add_marker_row(conn) -> None:
    """A fixture callable: given a driver connection, adds a row the SQL files do not."""
    with conn.cursor() as cur:
        cur.execute("INSERT INTO items VALUES (0, 'from a callable')")


def add_notes(conn) -> None:
    """A fixture callable: a table whose ids come from a sequence, 3 taken."""
    conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes (body) VALUES ('a'), ('b'), ('c')")


# notes_id_seq at the checkpoint: 3 ids taken; and the server's work_mem there (the default).
NOTES_SEQ = (3, True)
WORK_MEM = "4MB"

pg = dolly.testing.postgres(fixtures=[FIXTURES / "postgres", add_marker_row, add_notes])
pg_server = dolly.testing.postgres(fixtures=[FIXTURES / "postgres", add_marker_row, add_notes], isolation="server")
maria = dolly.testing.mariadb(fixtures=[FIXTURES / "mariadb", add_marker_row], user="app", password="s3cret",
                              database="shop")
cache = dolly.testing.redis(fixtures=[FIXTURES / "redis" / "01-data.redis", lambda r: r.set("from", "callable")],
                            password="pw")

# The clone each first test had, so that the second can show it got another, and that the first
# one was removed.
earlier: dict = {}


def gone(container_id: str) -> bool:
    try:
        docker.from_env().containers.get(container_id)
    except docker.errors.NotFound:
        return True
    return False


def eventually(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.1)


@pytest.mark.engine
def test_postgres_database_has_the_fixtures_and_takes_writes(pg):
    assert pg.url == f"postgresql://test:test@{pg.host}:5432/test" and pg.name == "test"
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM items").fetchone() == (100001, 5000050000)
        assert conn.execute("SELECT name FROM items WHERE id = 0").fetchone() == ("from a callable",)
        assert conn.execute("SELECT last_value, is_called FROM notes_id_seq").fetchone() == NOTES_SEQ
        conn.execute("DELETE FROM items WHERE id <= 50000")
        conn.execute("INSERT INTO items VALUES (-1, 'written by a test')")
        conn.execute("INSERT INTO notes (body) SELECT 'more' FROM generate_series(1, 5)")
        conn.execute("CREATE TABLE written_by_a_test (i int)")
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (50001,)
    # Left open, in a transaction holding a lock, for the next test to find ended.
    lingering = pg.connect()
    lingering.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
    earlier["pg lingering"] = lingering
    # The server runs as postgres, not root, in the clone too.
    assert pg.container.exec_run(["stat", "-c", "%U", "/proc/1"]).output.strip() == b"postgres"
    earlier["pg"] = pg.container.id


@pytest.mark.engine
def test_postgres_next_test_sees_none_of_it(pg):
    # The same server (this process's), a new database: the rows, the sequence as at the checkpoint.
    assert earlier.get("pg") and pg.container.id == earlier["pg"]
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM items").fetchone() == (100001, 5000050000)
        assert conn.execute("SELECT count(*) FROM items WHERE id = -1").fetchone() == (0,)
        assert conn.execute("SELECT last_value, is_called FROM notes_id_seq").fetchone() == NOTES_SEQ
        assert conn.execute("SELECT nextval('notes_id_seq')").fetchone() == (NOTES_SEQ[0] + 1,)
        assert conn.execute("SELECT to_regclass('written_by_a_test')").fetchone() == (None,)
        # The first test's session was ended with its lock: only this one is a client here.
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                            "AND datname = 'test'").fetchone() == (1,)
        # The template: not to be connected to, nor dropped.
        assert conn.execute("SELECT datallowconn, datistemplate FROM pg_database "
                            "WHERE datname = 'test_dolly_template'").fetchone() == (False, True)
    assert earlier["pg lingering"].broken or earlier["pg lingering"].closed or not _alive(earlier["pg lingering"])


def _alive(conn) -> bool:
    try:
        conn.execute("SELECT 1")
        return True
    except Exception:
        return False


# What tests do to the server itself, outside their database: each is undone for the next test
# (a new server where the state that outlives a database changed).
SERVER_CHANGES = {
    "alter system": ["ALTER SYSTEM SET work_mem = '7MB'", "SELECT pg_reload_conf()"],
    "a role": ["CREATE ROLE intruder LOGIN PASSWORD 'x'"],
    "the account's password": ["ALTER ROLE test PASSWORD 'changed'"],
    "a role setting": ["ALTER ROLE test SET work_mem = '7MB'"],
    "the template dropped": ["ALTER DATABASE test_dolly_template IS_TEMPLATE false",
                             "DROP DATABASE test_dolly_template"],
    "another database": ["CREATE DATABASE other"],
    "an object in postgres": [],  # done through a connection to the postgres database, below
}


@pytest.mark.engine
@pytest.mark.parametrize("change", list(SERVER_CHANGES))
def test_postgres_what_a_test_does_to_the_server_is_gone_for_the_next(pg, change):
    previous = earlier.get("pg change")
    with pg.connect() as conn:
        conn.autocommit = True
        # The state a previous parametrized test changed is as at the checkpoint here.
        assert conn.execute("SELECT current_setting('work_mem')").fetchone() == (WORK_MEM,)
        assert conn.execute("SELECT rolname FROM pg_roles WHERE rolname = 'intruder'").fetchone() is None
        assert conn.execute("SELECT count(*) FROM pg_db_role_setting").fetchone() == (0,)
        assert conn.execute("SELECT datname FROM pg_database WHERE datname NOT LIKE 'template%' "
                            "ORDER BY 1").fetchall() == [("postgres",), ("test",), ("test_dolly_template",)]
        assert conn.execute("SELECT count(*), sum(id) FROM items").fetchone() == (100001, 5000050000)
        conn.execute("DELETE FROM items")
        for statement in SERVER_CHANGES[change]:
            conn.execute(statement)
    if change == "an object in postgres":
        with psycopg.connect(pg.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as other:
            other.execute("CREATE TABLE left_in_postgres (i int)")
    if previous is not None:
        # The previous test changed the server's shared state: this test has a new server.
        assert pg.container.id != previous
        REPLACED.append(previous)
    earlier["pg change"] = pg.container.id


@pytest.mark.engine
def test_postgres_after_the_changes_a_test_gets_the_fixtures_on_a_clean_server(pg):
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM items").fetchone() == (100001, 5000050000)
        assert conn.execute("SELECT current_setting('work_mem')").fetchone() == (WORK_MEM,)
    with psycopg.connect(pg.url.rsplit("/", 1)[0] + "/postgres") as other:
        assert other.execute("SELECT to_regclass('left_in_postgres')").fetchone() == (None,)
    # The servers replaced along the way were removed.
    assert len(REPLACED) == len(SERVER_CHANGES) - 1 and all(gone(cid) for cid in REPLACED)
    assert pg.container.id != earlier["pg change"]


REPLACED: list = []


@pytest.mark.engine
def test_postgres_a_server_per_test_on_request(pg_server):
    assert pg_server.url == f"postgresql://test:test@{pg_server.host}:5432/test"
    with pg_server.connect() as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM items").fetchone() == (100001, 5000050000)
        # No template: the server is the test's own.
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE '%dolly%'").fetchone() == (0,)
        conn.execute("DELETE FROM items")
        conn.execute("CREATE ROLE intruder")
    earlier["pg_server"] = pg_server.container.id


@pytest.mark.engine
def test_postgres_a_server_per_test_next(pg_server):
    assert earlier.get("pg_server") and pg_server.container.id != earlier["pg_server"]
    with pg_server.connect() as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM items").fetchone() == (100001, 5000050000)
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = 'intruder'").fetchone() == (0,)
    eventually(lambda: gone(earlier["pg_server"]))  # removed in the background


@pytest.mark.engine
def test_mariadb_clone_has_the_fixtures_and_takes_writes(maria):
    assert maria.url == f"mysql://app:s3cret@{maria.host}:3306/shop"
    conn = maria.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*), sum(id) FROM items")
            assert cur.fetchone() == (10001, 50005000)
            cur.execute("SELECT name FROM items WHERE id = 0")
            assert cur.fetchone() == ("from a callable",)
            cur.execute("DELETE FROM items WHERE id > 10")
            cur.execute("SELECT count(*) FROM items")
            assert cur.fetchone() == (11,)
    finally:
        conn.close()
    earlier["maria"] = maria.container.id


@pytest.mark.engine
def test_mariadb_next_test_sees_none_of_it(maria):
    assert earlier.get("maria") and maria.container.id != earlier["maria"]
    eventually(lambda: gone(earlier["maria"]))  # removed in the background
    conn = maria.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*), sum(id) FROM items")
            assert cur.fetchone() == (10001, 50005000)
    finally:
        conn.close()


@pytest.mark.engine
def test_redis_clone_has_the_fixtures_and_takes_writes(cache):
    assert cache.url == f"redis://:pw@{cache.host}:6379/0"
    r = cache.connect()
    assert r.get("greeting") == b"hello" and r.lrange("queue", 0, -1) == [b"a", b"b", b"c"]
    assert r.hgetall("user:1") == {b"name": b"Ada", b"lang": b"en"} and r.get("from") == b"callable"
    r.flushall()
    assert r.dbsize() == 0
    r.close()
    earlier["cache"] = cache.container.id


@pytest.mark.engine
def test_redis_next_test_sees_none_of_it(cache):
    assert earlier.get("cache") and cache.container.id != earlier["cache"]
    eventually(lambda: gone(earlier["cache"]))  # removed in the background
    r = cache.connect()
    assert r.dbsize() == 4 and r.get("greeting") == b"hello"
    r.close()


def test_a_fixture_path_that_does_not_exist_is_refused_at_once(tmp_path):
    with pytest.raises(InvalidArgument, match="does not exist"):
        dolly.testing.postgres(fixtures=tmp_path / "nowhere.sql")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgument, match=r"no \.sql files"):
        dolly.testing.mariadb(fixtures=tmp_path / "empty")
    with pytest.raises(InvalidArgument):
        dolly.testing.redis(fixtures=42)


def test_an_unknown_isolation_or_a_negative_ahead_is_refused_at_once():
    with pytest.raises(InvalidArgument, match="isolation='table'"):
        dolly.testing.postgres(isolation="table")
    with pytest.raises(InvalidArgument, match="ahead=-1"):
        dolly.testing.redis(ahead=-1)


# The servers as the fixtures above start them, for tests that drive one by hand.
RECIPES = {
    "postgres": _databases.postgres(image="dolly/postgres:15", user="test", password="test", database="test"),
    "mariadb": _databases.mariadb(image="dolly/mariadb:10.11", user="test", password="test", database="test"),
    "redis": _databases.redis(image="dolly/redis:7", password="pw"),
}


@pytest.mark.parametrize("kind, bad, says", [
    ("postgres", "CREATE TABLE a (i int);\nINSERT INTO nowhere VALUES (1);\nCREATE TABLE b (i int);\n",
     'relation "nowhere" does not exist'),
    ("redis", "SET a 1\nLPUSH a 2\nSET b \"(error) is a value\"\n", "WRONGTYPE"),
])
def test_a_fixture_file_that_fails_fails_the_load_and_says_why(run, tmp_path, kind, bad, says):
    recipe = RECIPES[kind]
    server = run(recipe.image, None, environment=dict(recipe.environment))
    ready.wait(server, recipe.accepting(), timeout=60)
    fixture = tmp_path / f"bad{recipe.suffixes[0]}"
    fixture.write_text(bad)
    with pytest.raises(DollyError, match=says):
        _databases.load(recipe, server, _databases.fixture_items(fixture, recipe))
    if kind == "postgres":  # psql stops at the failing line: nothing after it ran
        query = "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        tables = server.exec_run(["psql", "-U", "test", "-d", "test", "-Atc", query]).output.decode().split()
        assert tables == ["a"]
    else:  # redis-cli runs every line: only the failing one fails the load, not a value that looks like it
        value = server.exec_run(["redis-cli", "--no-auth-warning", "-a", "pw", "GET", "b"]).output.strip()
        assert value == b"(error) is a value"


# A server under a write load: a client inside the container inserts numbered rows, one statement
# and one connection (over the server's own socket) at a time, while the checkpoint is taken.
PG_UNDER_LOAD = """
/usr/local/bin/dolly-entrypoint &
until pg_isready -q -h 127.0.0.1; do sleep 0.1; done
psql -q -U test -d test -c 'CREATE TABLE seq (n integer PRIMARY KEY, at timestamptz DEFAULT now())'
i=0
while true; do i=$((i+1)); psql -q -U test -d test -c "INSERT INTO seq (n) VALUES ($i)" || exit 1; done
"""
MARIA_UNDER_LOAD = """
/usr/local/bin/dolly-entrypoint &
until mariadb-admin --protocol=tcp -h 127.0.0.1 ping >/dev/null 2>&1; do sleep 0.1; done
mariadb -uroot test -e 'CREATE TABLE seq (n INT PRIMARY KEY) ENGINE=InnoDB'
i=0
while true; do i=$((i+1)); mariadb -uroot test -e "INSERT INTO seq VALUES ($i)" || exit 1; done
"""


@pytest.mark.parametrize("kind", ["postgres", "mariadb"])
def test_a_database_under_a_write_load_clones_to_a_consistent_state(run, kind):
    recipe = RECIPES[kind]
    script = PG_UNDER_LOAD if kind == "postgres" else MARIA_UNDER_LOAD
    server = run(recipe.image, ["-c", script], entrypoint=["sh"], environment=dict(recipe.environment))

    def rows(container) -> tuple:
        conn = recipe.connect(ready.ip_address(container))
        try:
            cur = conn.cursor()
            cur.execute("SELECT count(*), count(DISTINCT n), min(n), max(n) FROM seq")
            return tuple(int(x or 0) for x in cur.fetchone())
        finally:
            conn.close()

    ready.wait(server, recipe.accepting(), timeout=60)
    def loaded(c) -> bool:  # the load is well under way (its table may not be there yet)
        try:
            return rows(c)[0] >= 200
        except Exception:
            return False

    ready.wait(server, loaded, timeout=60)
    _databases.wait_without_connections(server)  # our own query's connection, not the load's socket
    cp = dolly.checkpoint(server, "under-load")
    (clone,) = dolly.clone(cp, 1)
    ready.wait(clone, recipe.accepting(), timeout=30)
    # Every committed row, numbered without a gap or a double, and the load goes on in the clone.
    count, distinct, low, high = rows(clone)
    assert count == distinct == high and low == 1 and count >= 200
    ready.wait(clone, lambda c: rows(c)[0] > count, timeout=30)
    # The server's own consistency check over every table and index.
    if kind == "postgres":
        amcheck = ("psql -q -U test -d test -c 'CREATE EXTENSION IF NOT EXISTS amcheck' && "
                   "/usr/lib/postgresql/15/bin/pg_amcheck -U test -d test --heapallindexed")
        check = clone.exec_run(["sh", "-c", amcheck])
        assert check.exit_code == 0, check.output.decode()
    else:
        check = clone.exec_run(["mariadb", "-uroot", "test", "-N", "-e", "CHECK TABLE seq EXTENDED"])
        assert check.exit_code == 0 and check.output.decode().split()[-1] == "OK", check.output.decode()


# --- the fixtures as users run them: pytest in a subprocess, under xdist, and killed -----------------

ISOLATION_SUITE = '''
import os
import dolly.testing

def fixture(conn):
    conn.execute("CREATE TABLE marks (id serial PRIMARY KEY, who text)")
    conn.execute("INSERT INTO marks (who) VALUES ('fixture a'), ('fixture b')")

pg = dolly.testing.postgres(fixtures=fixture)
cache = dolly.testing.redis(fixtures=lambda r: r.rpush("marks", "fixture"))

def seen(kind, db):
    with open(os.environ["SEEN"], "a") as f:
        f.write(f"{kind} {os.environ.get('PYTEST_XDIST_WORKER', '-')} {db.container.id}\\n")
'''


def pytest_run(*args: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


def other_runs(client, pytestconfig) -> list:
    """The plugin's containers of runs other than this session's own."""
    mine = pytestconfig.stash[dolly.testing._plugin_key].run_id
    return [c for c in client.containers.list(all=True, filters={"label": dolly.testing.RUN_LABEL})
            if c.labels.get(dolly.testing.RUN_LABEL) != mine]


def test_under_xdist_each_test_gets_a_fresh_database_and_nothing_is_left(client, pytestconfig, tmp_path):
    log = tmp_path / "seen.txt"
    tests = "".join(
        f"def test_pg_{i}(pg):\n"
        f"    seen('pg', pg)\n"
        f"    with pg.connect() as conn:\n"
        # The fixture's rows and its sequence (2 ids taken), none of another test's.
        f"        assert conn.execute('SELECT who FROM marks ORDER BY id').fetchall() == "
        f"[('fixture a',), ('fixture b',)]\n"
        f"        assert conn.execute('SELECT last_value FROM marks_id_seq').fetchone() == (2,)\n"
        f"        new = conn.execute(\"INSERT INTO marks (who) VALUES ('test {i}') RETURNING id\").fetchone()\n"
        f"        assert new == (3,)\n"
        f"def test_cache_{i}(cache):\n"
        f"    seen('cache', cache)\n"
        f"    r = cache.connect()\n"
        f"    assert r.lrange('marks', 0, -1) == [b'fixture']\n"
        f"    r.rpush('marks', 'test {i}')\n"
        f"    r.close()\n"
        for i in range(6))
    suite = tmp_path / "test_isolation.py"
    suite.write_text(ISOLATION_SUITE + tests)
    res = pytest_run(str(suite), "-q", "-n", "2", cwd=tmp_path, env={"SEEN": str(log)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "12 passed" in res.stdout
    rows = [line.split() for line in log.read_text().splitlines()]
    pg_rows = [r for r in rows if r[0] == "pg"]
    assert {r[1] for r in pg_rows} == {"gw0", "gw1"}
    # One Postgres server per worker, its tests one after another in it; a Redis clone per test.
    assert len({r[2] for r in pg_rows}) == 2
    assert all(len({r[2] for r in pg_rows if r[1] == w}) == 1 for w in ("gw0", "gw1"))
    assert len({r[2] for r in rows if r[0] == "cache"}) == 6
    # Nothing left: the workers' servers (with their templates), the pools' spares, the sources.
    assert other_runs(client, pytestconfig) == []


def test_a_killed_run_leaves_no_pooled_clone_behind(client, pytestconfig, tmp_path):
    suite = tmp_path / "test_hang.py"
    suite.write_text(ISOLATION_SUITE + "def test_hangs(cache):\n    import time; time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(suite)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "SEEN": str(tmp_path / "seen.txt")})

    def recorded_clones() -> list:
        return [c for c in other_runs(client, pytestconfig) if "dolly.source" in c.labels
                and c.id in dolly.testing.recorded_containers(dolly.testing.STATE_ROOT / c.labels[RUN_LABEL])]

    try:
        # The test's clone and the spare made ahead while it runs.
        eventually(lambda: len(recorded_clones()) == 2, timeout=120)
        killed_run = recorded_clones()[0].labels[RUN_LABEL]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len([c for c in other_runs(client, pytestconfig) if c.labels[RUN_LABEL] == killed_run]) == 3
    assert killed_run in dolly.testing.reap_dead_runs(client)
    assert [c for c in other_runs(client, pytestconfig) if c.labels[RUN_LABEL] == killed_run] == []
