"""Warm databases: pytest fixtures giving each test its own PostgreSQL, MariaDB or Redis database.

Databases (:func:`postgres`, :func:`mariadb`, :func:`redis`) are warm services too: the server is
started once per run from Debian's packages (``make host`` builds ``dolly/postgres:15``,
``dolly/mariadb:10.11``, ``dolly/redis:7``) or from the user's own image, made ready (accepting
connections, by its own client), loaded with the fixtures (SQL or command files through its own
client, callables through a driver connection), and checkpointed. Then, per test:

- Postgres (``isolation="database"``, the default): each pytest process (each xdist worker) gets
  one clone of the warm server, in which the loaded database becomes a template nobody connects
  to; each test gets ``CREATE DATABASE <database> TEMPLATE`` it, under the configured name, and
  it is dropped after the test (see :class:`Database` for what that guarantees).
  ``isolation="server"``: a clone of the whole server per test, as MariaDB and Redis get.
- MariaDB, Redis (and Postgres with ``isolation="server"``): each test gets its own clone of the
  warm server, made ahead in the background (``ahead`` spares per process) while the test before
  runs, and removed in the background after the test.

So nothing one test writes is seen by the next. The database's log is the server's log: a failed
test's report carries it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

import pytest
from docker.models.containers import Container

from .. import _databases, ready as _ready
from .._checkpoint import Checkpoint
from .._databases import FixtureSource, Recipe, ServerClone
from ..errors import InvalidArgument
from .services import Plugin, ServiceSpec, _clone_fixture, _clones_key, _plugin_key

ISOLATIONS = ("database", "server")


@dataclass(frozen=True)
class Database:
    """A test's own database, its fixtures loaded, nothing of another test's writes in it.

    With Postgres's default ``isolation="database"``: the test's own database, made for it from
    a template of the loaded one (its rows and its sequences as at the checkpoint), in a server
    that this pytest process (this xdist worker) keeps for its tests: ``container`` is that
    server, shared by the process's tests one after another (never two at once), and ``name`` is
    the configured database's. After each test Dolly ends every session the test left (its
    connections, temporary tables, locks, LISTENs), rolls back its prepared transactions and
    drops the database; when the test changed what outlives a database (roles and their
    passwords or settings, ALTER SYSTEM, other databases or the template's flags, tablespaces,
    replication slots, objects in the ``postgres`` database) or stopped the server, the next test
    gets a new server instead. Not covered: a test that re-enables connections to the template
    (``<database>_dolly_template``), changes it and restores its flags, or that writes rows into
    ``template1``; databases other than the configured one that the fixtures made are not
    reset (a write that changes their size gets the next test a new server); transaction IDs and
    OIDs go on from the previous test's. A test that administers the server should use
    ``isolation="server"``.

    With ``isolation="server"`` (and always for MariaDB and Redis): ``container`` is the test's
    own clone of the warm server, removed after it.

    Attributes:
        container: the server (a docker-py ``Container``); its log is the server's.
        url: ``postgresql://user:password@host:5432/name``, ``mysql://...:3306/...`` or
            ``redis://:password@host:6379/0``.
        host: the server's IP address; port: the server's port there.
        user, password, name: the account and the database (None where the server has none).
    """

    container: Container
    url: str
    host: str
    port: int
    user: Optional[str]
    password: Optional[str]
    name: Optional[str]
    recipe: Recipe = field(repr=False, compare=False)

    def connect(self) -> Any:
        """A driver connection: psycopg's (a context manager that commits), PyMySQL's
        (autocommit) or redis-py's client.

        Raises:
            HostNotReady: the driver is not installed (``pip install 'dolly-checkpoint[postgres]'`` etc.).
        """
        return self.recipe.connect(self.host)


def postgres(
    *,
    fixtures: Optional[FixtureSource] = None,
    image: str = "dolly/postgres:15",
    user: str = "test",
    password: str = "test",
    database: str = "test",
    isolation: str = "database",
    ahead: int = 1,
    ready_timeout: float = 120.0,
    **run_options: Any,
) -> Any:
    """Make a pytest fixture that gives each test its own warm PostgreSQL database, fixtures loaded.

    Assign it to a module-level name; that name is the fixture's name, and the test gets a
    :class:`Database`.

    Args:
        fixtures: a ``.sql`` file (run by ``psql`` with ON_ERROR_STOP), a folder of them (in name
            order), a callable given a psycopg connection (committed and closed after it), or a
            list of these, loaded in turn once per run, before the checkpoint.
        image: any image that reads POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB as the
            official one does; default Dolly's, from Debian's postgresql-15 (``make host``).
        user, password, database: the account (a superuser, as those images make it) and the
            database made at start.
        isolation: ``"database"``: a database per test, made from a template in a server kept
            per pytest process (the fastest); ``"server"``: a clone of the whole server per test.
        ahead: with ``isolation="server"``, how many clones each process makes ahead in the
            background (0: each when its test asks, removed before the next).
        ready_timeout: seconds for the server to accept connections.
        run_options: more keyword arguments for ``client.containers.create``.

    Raises (from the fixture):
        InvalidArgument: a fixture path that does not exist, an unknown isolation, a negative
            ``ahead`` (raised here, at once).
        NotReady: the server never accepted connections (its last log lines in the message).
        DollyError: a fixture file failed to load (with the client's output).
    """
    if isolation not in ISOLATIONS:
        raise InvalidArgument(f"isolation={isolation!r}: choose 'database' (a database per test) or 'server'")
    return _database_fixture(_databases.postgres(image=image, user=user, password=password, database=database),
                             fixtures, ready_timeout, run_options, isolation=isolation, ahead=ahead)


def mariadb(
    *,
    fixtures: Optional[FixtureSource] = None,
    image: str = "dolly/mariadb:10.11",
    user: str = "test",
    password: str = "test",
    database: str = "test",
    ahead: int = 1,
    ready_timeout: float = 120.0,
    **run_options: Any,
) -> Any:
    """Make a pytest fixture that gives each test its own warm MariaDB server, fixtures loaded.

    As :func:`postgres` with ``isolation="server"`` (MariaDB has no template databases): a clone
    per test, ``ahead`` of them made in the background. ``.sql`` files are run by the ``mariadb``
    client (as root, stopping at the first error) and callables given a PyMySQL connection
    (autocommit). The image must read MARIADB_USER, MARIADB_PASSWORD, MARIADB_DATABASE and
    MARIADB_ROOT_PASSWORD (set to ``password``), as the official one does. Dolly's image turns
    native AIO off, which CRIU cannot checkpoint; with another image, pass
    ``command=["mariadbd", "--innodb-use-native-aio=0"]``.

    Raises (from the fixture): as :func:`postgres`.
    """
    return _database_fixture(_databases.mariadb(image=image, user=user, password=password, database=database),
                             fixtures, ready_timeout, run_options, isolation="server", ahead=ahead)


def redis(
    *,
    fixtures: Optional[FixtureSource] = None,
    image: str = "dolly/redis:7",
    password: Optional[str] = None,
    ahead: int = 1,
    ready_timeout: float = 60.0,
    **run_options: Any,
) -> Any:
    """Make a pytest fixture that gives each test its own warm Redis server, fixtures loaded.

    As :func:`mariadb`, with ``.redis`` (or ``.txt``) files of commands, one a line, fed to
    ``redis-cli`` (a command that fails fails the load, though redis-cli runs the lines after
    it too), and callables given a redis-py client. ``password`` is passed as REDIS_PASSWORD,
    which Dolly's image reads.

    Raises (from the fixture): as :func:`postgres`.
    """
    return _database_fixture(_databases.redis(image=image, password=password), fixtures, ready_timeout, run_options,
                             isolation="server", ahead=ahead)


def _database_fixture(recipe: Recipe, fixtures: Optional[FixtureSource], ready_timeout: float,
                      run_options: Dict[str, Any], *, isolation: str, ahead: int) -> Any:
    if ahead < 0:
        raise InvalidArgument(f"ahead={ahead}: the number of clones made ahead is 0 or more")
    items = _databases.fixture_items(fixtures, recipe)  # a wrong path fails at import, not in a test
    environment = {**recipe.environment, **dict(run_options.pop("environment", None) or {})}
    command = run_options.pop("command", None)

    def prepare(container: Container) -> None:
        _databases.load(recipe, container, items)
        _databases.wait_without_connections(container)

    spec = ServiceSpec(recipe.image, command, environment, recipe.accepting(), ready_timeout, run_options,
                       prepare=prepare)

    def database(clone: Container) -> Database:
        # The restored server was listening at the checkpoint; its clone answers at its new address.
        _ready.wait(clone, _ready.tcp(recipe.port), timeout=30)
        host = _ready.ip_address(clone)
        return Database(clone, recipe.url(host), host, recipe.port, recipe.user, recipe.password,
                        recipe.database, recipe)

    if isolation == "server":
        return _clone_fixture(spec, database, ahead=ahead)

    @pytest.fixture
    def fixture(request: pytest.FixtureRequest) -> Iterator[Database]:
        plugin: Plugin = request.config.stash[_plugin_key]
        name = request.fixturename
        if name is None:  # pytest names a fixture's own request; typed optional for the others
            raise RuntimeError("a Dolly fixture was requested without a fixture name")
        cp = plugin.warm_checkpoint(spec, name)
        server: _WorkerServer = plugin.kept(f"template server {name} {cp.path}",
                                            lambda: _WorkerServer(plugin, cp, name, recipe))
        db = server.fresh()
        request.node.stash.setdefault(_clones_key, []).append(db.container)
        try:
            yield db
        finally:
            server.reset()

    return fixture


class _WorkerServer:
    """One pytest process's Postgres server for a fixture: a clone of the warm one, whose loaded
    database is a template, replaced by a new clone when a test changed the server."""

    def __init__(self, plugin: Plugin, cp: Checkpoint, fixture_name: str, recipe: Recipe) -> None:
        self.plugin, self.cp, self.fixture_name, self.recipe = plugin, cp, fixture_name, recipe
        self.server: Optional[ServerClone] = None
        self.replaced = 0  # servers replaced after a test changed one

    def fresh(self) -> Database:
        started = time.perf_counter()
        if self.server is None:
            self.server = self._start()
        self.server.templates.fresh()
        # What the test waited for: its database (and, for a process's first test, the server).
        self.plugin.stats.clone_s.setdefault(self.fixture_name, []).append(time.perf_counter() - started)
        host = self.server.templates.host
        return Database(self.server.container, self.recipe.url(host), host, self.recipe.port, self.recipe.user,
                        self.recipe.password, self.recipe.database, self.recipe)

    def _start(self) -> ServerClone:
        container = self.plugin.clone(self.cp, self.fixture_name)
        # The clone's time is counted with the test that waits for it, in fresh().
        self.plugin.stats.clone_s[self.fixture_name].pop()
        return ServerClone.on(container, self.recipe, self.plugin.discard)

    def reset(self) -> None:
        if self.server is not None and not self.server.templates.reset():
            self.replaced += 1
            self.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
