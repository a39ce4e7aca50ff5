"""Database recipes for the pytest plugin: how to start, load, check and reach Postgres, MariaDB
and Redis in a container, for :func:`dolly.testing.postgres`, ``mariadb`` and ``redis``.

A recipe knows its server's environment (the variables the official images and Dolly's own images,
``scripts/images/*-entrypoint``, both read), how to tell it accepts connections (its own client,
inside the container), how to load a fixture file into it (that client again, so that a file
written for ``psql`` or ``mariadb`` works as it would by hand), how to connect from Python (the
driver, imported only when asked), and its URL.

Loading goes through ``docker exec``; a callable fixture gets a driver connection over TCP, closed
afterwards. CRIU refuses to checkpoint a process holding an established TCP connection, so the
warm-up ends by waiting until the server holds none (:func:`wait_without_connections`).
"""
from __future__ import annotations

import io
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union
from urllib.parse import quote

from docker.models.containers import Container

from . import ready as _ready
from ._archive import tarfile
from .errors import DollyError, HostNotReady, InvalidArgument, NotReady

# What a fixture may be: a file, a folder of files (loaded in name order), a callable given a
# driver connection, or a sequence of these (loaded in turn).
FixtureSource = Union[str, "os.PathLike[str]", Callable[[Any], None], Sequence[Any]]

FIXTURE_DIR = "/tmp/dolly-fixtures"
# TCP states a process holds a socket in (/proc/net/tcp's hex codes) other than LISTEN (0A),
# TIME_WAIT (06) and CLOSE (07), which CRIU does not need to dump.
_BUSY_TCP_STATES = {"01", "02", "03", "04", "05", "08", "09", "0B"}


@dataclass(frozen=True)
class Recipe:
    """One kind of database server in a container."""

    kind: str  # "postgres", "mariadb" or "redis"
    image: str
    port: int
    user: Optional[str]
    password: Optional[str]
    database: Optional[str]
    suffixes: Sequence[str]  # the fixture files a folder contributes
    environment: Mapping[str, str] = field(default_factory=dict)

    def url(self, host: str) -> str:
        """The connection URL of the server at ``host``."""
        user, password, database = (quote(x or "", safe="") for x in (self.user, self.password, self.database))
        if self.kind == "postgres":
            return f"postgresql://{user}:{password}@{host}:{self.port}/{database}"
        if self.kind == "mariadb":
            return f"mysql://{user}:{password}@{host}:{self.port}/{database}"
        auth = f":{password}@" if self.password else ""
        return f"redis://{auth}{host}:{self.port}/0"

    def accepting(self) -> _ready.Exec:
        """Ready when the server's own client, inside the container, gets an answer."""
        if self.kind == "postgres":
            return _ready.exec(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)])
        if self.kind == "mariadb":
            # Over TCP: the server listens there only once its start-up (and set-up) is done.
            return _ready.exec(["mariadb-admin", "--protocol=tcp", "-h", "127.0.0.1", "-P", str(self.port),
                                "--connect-timeout=2", "ping"])
        ping = 'redis-cli -p "$1" ${REDIS_PASSWORD:+--no-auth-warning -a "$REDIS_PASSWORD"} ping | grep -qx PONG'
        return _ready.exec(["sh", "-c", ping, "sh", str(self.port)])

    def load_command(self, path: str) -> List[str]:
        """The command, run inside the container, that loads the fixture file ``path`` and exits
        non-zero when any statement fails."""
        if self.kind == "postgres":
            return ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", str(self.user), "-d", str(self.database),
                    "-f", path]
        if self.kind == "mariadb":
            # As root over the local socket (its password, which the official image requires, too).
            return ["sh", "-c", 'MYSQL_PWD="$MARIADB_ROOT_PASSWORD" mariadb -uroot --database="$1" < "$2"',
                    "sh", str(self.database), path]
        # redis-cli runs every line and exits 0 whatever fails (-e does not apply to commands read
        # from its input): with --no-raw a failed command's reply is "(error) ..." and a value is
        # always quoted, so such a line means a failure.
        feed = ('out=$(redis-cli --no-raw ${REDIS_PASSWORD:+--no-auth-warning -a "$REDIS_PASSWORD"} < "$1") '
                '|| exit 1; printf "%s\\n" "$out"; ! printf "%s\\n" "$out" | grep -q "^(error) "')
        return ["sh", "-c", feed, "sh", path]

    def connect(self, host: str) -> Any:
        """A driver connection to the server at ``host``: psycopg's, PyMySQL's (autocommit) or
        redis-py's client.

        Raises:
            HostNotReady: the driver is not installed (``pip install 'dolly-checkpoint[postgres]'`` etc.).
        """
        try:
            if self.kind == "postgres":
                import psycopg

                return psycopg.connect(self.url(host), connect_timeout=10)
            if self.kind == "mariadb":
                import pymysql

                return pymysql.connect(host=host, port=self.port, user=self.user, password=self.password,
                                       database=self.database, autocommit=True, connect_timeout=10)
            import redis

            return redis.Redis(host=host, port=self.port, password=self.password, socket_timeout=10)
        except ImportError as e:
            raise HostNotReady(f"the {self.kind} driver is not installed ({e}): "
                               f"pip install 'dolly-checkpoint[{self.kind}]'") from e


def postgres(*, image: str, user: str, password: str, database: str) -> Recipe:
    env = {"POSTGRES_USER": user, "POSTGRES_PASSWORD": password, "POSTGRES_DB": database}
    return Recipe("postgres", image, 5432, user, password, database, (".sql",), env)


def mariadb(*, image: str, user: str, password: str, database: str) -> Recipe:
    env = {"MARIADB_USER": user, "MARIADB_PASSWORD": password, "MARIADB_DATABASE": database,
           "MARIADB_ROOT_PASSWORD": password}
    return Recipe("mariadb", image, 3306, user, password, database, (".sql",), env)


def redis(*, image: str, password: Optional[str]) -> Recipe:
    env = {"REDIS_PASSWORD": password} if password else {}
    return Recipe("redis", image, 6379, None, password, None, (".redis", ".txt"), env)


def fixture_items(fixtures: Optional[FixtureSource], recipe: Recipe) -> List[Union[Path, Callable[[Any], None]]]:
    """The files and callables ``fixtures`` stands for, in loading order.

    Raises:
        InvalidArgument: a path that does not exist, a folder without fixture files, or a value
            that is none of a path, a callable or a sequence of them.
    """
    if fixtures is None:
        return []
    if callable(fixtures):
        return [fixtures]
    if isinstance(fixtures, (str, os.PathLike)):
        path = Path(fixtures)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in recipe.suffixes)
            if not files:
                raise InvalidArgument(f"{path} holds no {' or '.join(recipe.suffixes)} files for {recipe.kind}")
            return list(files)
        if path.is_file():
            return [path]
        raise InvalidArgument(f"fixture {path} does not exist")
    if isinstance(fixtures, Sequence) and not isinstance(fixtures, (bytes, bytearray)):
        return [item for part in fixtures for item in fixture_items(part, recipe)]
    raise InvalidArgument(f"a fixture is a path, a folder, a callable or a list of them, not {fixtures!r}")


def load(recipe: Recipe, container: Container, items: Sequence[Union[Path, Callable[[Any], None]]]) -> None:
    """Load fixture files and run fixture callables against the server in ``container``.

    Raises:
        DollyError: a file failed to load (the message has the client's output).
        Whatever a fixture callable raises.
    """
    for n, item in enumerate(items):
        if callable(item):
            conn = recipe.connect(_ready.ip_address(container))
            try:
                item(conn)
                if recipe.kind == "postgres":
                    conn.commit()
            finally:
                conn.close()
            continue
        inside = f"{FIXTURE_DIR}/{n:03d}-{item.name}"
        _copy_in(container, item, inside)
        res = container.exec_run(recipe.load_command(inside))
        if res.exit_code != 0:
            out = (res.output if isinstance(res.output, bytes) else b"").decode(errors="replace").strip()
            raise DollyError(f"fixture {item} failed to load into {recipe.kind} "
                             f"(`{shlex.join(recipe.load_command(inside))}` exited {res.exit_code}): {out[-2000:]}")


def wait_without_connections(container: Container, *, timeout: float = 30.0) -> None:
    """Wait until no process in the container holds a TCP connection (only listening sockets),
    as CRIU needs for a checkpoint: a client that has just closed leaves the server a moment to
    close its end.

    Raises:
        NotReady: connections remained after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        # tcp6 is missing where the kernel runs without IPv6.
        res = container.exec_run(["sh", "-c", "cat /proc/net/tcp; cat /proc/net/tcp6 2>/dev/null; true"])
        output = res.output if isinstance(res.output, bytes) else b""
        states = [line.split()[3] for line in output.decode(errors="replace").splitlines()[1:]
                  if len(line.split()) > 3 and line.split()[0].endswith(":")]
        if res.exit_code == 0 and not _BUSY_TCP_STATES & set(states):
            return
        if time.monotonic() > deadline:
            raise NotReady(f"container {container.name} still holds TCP connections after {timeout:g} s; "
                           "a fixture callable must close what it opens")
        time.sleep(0.1)


def _copy_in(container: Container, path: Path, inside: str) -> None:
    """Copy the file at ``path`` into the container at ``inside`` (readable by every user: the
    database's own client may run as another)."""
    data = path.read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(inside.lstrip("/"))
        info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
        tar.addfile(info, io.BytesIO(data))
    container.exec_run(["mkdir", "-p", FIXTURE_DIR])
    if not container.put_archive("/", buf.getvalue()):
        raise DollyError(f"could not copy {path} into container {container.name}")



# --- Postgres: a fresh database per test from a template, in one server ------------------------------

# What a test could change in a server that outlives the database it was given: roles and their
# memberships and settings, the other databases (the template's flags among them), tablespaces,
# replication slots, prepared transactions, ALTER SYSTEM's file, and the objects of the maintenance
# database the template server's own connection uses. Taken once the server is set up; after each
# test a different answer means the server is replaced, not repaired.
_PG_SERVER_STATE = """
SELECT md5(string_agg(x, E'\\n' ORDER BY x)) FROM (
    SELECT 'role ' || a::text FROM pg_authid a
    UNION ALL SELECT 'member ' || m::text FROM pg_auth_members m
    UNION ALL SELECT 'setting ' || s::text FROM pg_db_role_setting s
    UNION ALL SELECT concat_ws(' ', 'database', oid, datname, datdba, datistemplate, datallowconn,
                               datconnlimit, datacl, pg_database_size(oid))
        FROM pg_database WHERE datname <> %(test)s
    UNION ALL SELECT 'tablespace ' || t::text FROM pg_tablespace t
    UNION ALL SELECT 'slot ' || slot_name FROM pg_replication_slots
    UNION ALL SELECT 'prepared ' || gid FROM pg_prepared_xacts
    UNION ALL SELECT 'auto.conf ' || coalesce(pg_read_file('postgresql.auto.conf', 0, 1048576, true), '')
    UNION ALL SELECT 'object ' || c.oid || ' ' || c.relname FROM pg_class c WHERE c.oid >= 16384
    UNION ALL SELECT 'function ' || p.oid FROM pg_proc p WHERE p.oid >= 16384
) AS state(x)
"""


class TemplateServer:
    """A Postgres server (a clone of the warm one) that hands out its loaded database afresh, test
    after test: the loaded database is renamed to a template nobody may connect to, and each test
    gets ``CREATE DATABASE <name> TEMPLATE <template>`` under the original name (so the URL is the
    one the fixture was configured with), dropped after it with every connection and prepared
    transaction of the test's.

    The template is never connected to: a database made from it is a copy of the files at the
    checkpoint (its rows, sequences and statistics), without any other test's writes.
    """

    def __init__(self, recipe: Recipe, host: str) -> None:
        if recipe.kind != "postgres":
            raise InvalidArgument(f"a template server is for Postgres, not {recipe.kind}")
        self.recipe, self.host = recipe, host
        self.name = str(recipe.database)
        self.template = f"{self.name}_dolly_template"
        self._admin = self._connect("postgres")
        self._admin.execute(f"ALTER DATABASE {_ident(self.name)} RENAME TO {_ident(self.template)}")
        self._admin.execute(f"ALTER DATABASE {_ident(self.template)} WITH ALLOW_CONNECTIONS false IS_TEMPLATE true")
        self._state = self.state()

    def _connect(self, database: str) -> Any:
        import psycopg

        return psycopg.connect(host=self.host, port=self.recipe.port, user=self.recipe.user,
                               password=self.recipe.password, dbname=database, autocommit=True, connect_timeout=10)

    def state(self) -> str:
        """A digest of what the server keeps outside the tests' database (see _PG_SERVER_STATE)."""
        row = self._admin.execute(_PG_SERVER_STATE, {"test": self.name}).fetchone()
        return str(row[0])

    def fresh(self) -> None:
        """Make the test's database from the template."""
        self._admin.execute(f"CREATE DATABASE {_ident(self.name)} TEMPLATE {_ident(self.template)}")

    def reset(self) -> bool:
        """Drop the test's database with whatever the test left (connections, prepared
        transactions); True when the server is as it was set up, False when it must be replaced
        (the test changed what outlives its database, or stopped the server, or locked Dolly out)."""
        try:
            admin = self._admin
            if admin.closed or admin.broken:
                admin = self._admin = self._connect("postgres")
            # Every other client's session ends here: its locks, temporary tables, advisory locks,
            # LISTENs and settings with it.
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
            for gid, database in admin.execute("SELECT gid, database FROM pg_prepared_xacts").fetchall():
                if database == "postgres":
                    admin.execute(f"ROLLBACK PREPARED {_literal(gid)}")
                    continue
                with self._connect(database) as there:  # it must be ended in its own database
                    there.execute(f"ROLLBACK PREPARED {_literal(gid)}")
            admin.execute(f"DROP DATABASE IF EXISTS {_ident(self.name)} WITH (FORCE)")
            return self.state() == self._state
        except Exception:  # whatever the test did to the server, a new one is the answer
            return False

    def close(self) -> None:
        try:
            self._admin.close()
        except Exception:  # the server may be gone with its container
            pass



@dataclass
class ServerClone:
    """One pytest process's Postgres server for a fixture: a clone of the warm one, the
    :class:`TemplateServer` on it, and how the clone goes (``discard``: the test plugin's, which
    recorded it). What dolly.testing's database fixtures and its Django plugin keep per process."""

    container: Container
    templates: TemplateServer
    discard: Callable[[Container], None]

    @classmethod
    def on(cls, container: Container, recipe: Recipe, discard: Callable[[Container], None], *,
           timeout: float = 30.0) -> ServerClone:
        """The template server on ``container`` once it accepts connections; the clone discarded
        when it does not.

        Raises:
            NotReady: the server did not accept connections within ``timeout``; and the errors
                of :class:`TemplateServer`.
        """
        try:
            _ready.wait(container, _ready.tcp(recipe.port), timeout=timeout)
            return cls(container, TemplateServer(recipe, _ready.ip_address(container)), discard)
        except BaseException:
            discard(container)
            raise

    def close(self) -> None:
        """The server's connection closed, and its clone discarded."""
        try:
            self.templates.close()
        finally:
            self.discard(self.container)

def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
