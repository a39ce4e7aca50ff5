"""Warm databases for test suites: each test gets its own clone of a server warmed once, fixtures
loaded, and nothing one test writes is seen by the next. The tests of each kind run in file order:
the first writes, the second must not see it."""
from __future__ import annotations

from pathlib import Path

import docker
import pytest

import dolly
import dolly.testing
from dolly import _databases, ready
from dolly.errors import DollyError, InvalidArgument

FIXTURES = Path(__file__).parent / "fixtures"
# Postgres and MariaDB run as users other than root: their checkpoints need CRIU to read the limits
# of another user's processes (scripts/criu-patches).


def add_marker_row(conn) -> None:
    """A fixture callable: given a driver connection, adds a row the SQL files do not."""
    with conn.cursor() as cur:
        cur.execute("INSERT INTO items VALUES (0, 'from a callable')")


pg = dolly.testing.postgres(fixtures=[FIXTURES / "postgres", add_marker_row])
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


@pytest.mark.engine
def test_postgres_clone_has_the_fixtures_and_takes_writes(pg):
    assert pg.url == f"postgresql://test:test@{pg.host}:5432/test"
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM items").fetchone() == (100001, 5000050000)
        assert conn.execute("SELECT name FROM items WHERE id = 0").fetchone() == ("from a callable",)
        conn.execute("DELETE FROM items WHERE id <= 50000")
        conn.execute("INSERT INTO items VALUES (-1, 'written by a test')")
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (50001,)
    # The server runs as postgres, not root, in the clone too.
    assert pg.container.exec_run(["stat", "-c", "%U", "/proc/1"]).output.strip() == b"postgres"
    earlier["pg"] = pg.container.id


@pytest.mark.engine
def test_postgres_next_test_sees_none_of_it(pg):
    assert earlier.get("pg") and pg.container.id != earlier["pg"] and gone(earlier["pg"])
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM items").fetchone() == (100001, 5000050000)
        assert conn.execute("SELECT count(*) FROM items WHERE id = -1").fetchone() == (0,)


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
    assert earlier.get("maria") and maria.container.id != earlier["maria"] and gone(earlier["maria"])
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
    assert earlier.get("cache") and cache.container.id != earlier["cache"] and gone(earlier["cache"])
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
