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

