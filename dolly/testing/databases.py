"""Warm databases: pytest fixtures giving each test its own PostgreSQL, MariaDB or Redis server.

Databases (:func:`postgres`, :func:`mariadb`, :func:`redis`) are warm services too: the server is
started once per run from Debian's packages (``make host`` builds ``dolly/postgres:15``,
``dolly/mariadb:10.11``, ``dolly/redis:7``) or from the user's own image, made ready (accepting
connections, by its own client), loaded with the fixtures (SQL or command files through its own
client, callables through a driver connection), and checkpointed; each test gets its own clone
with its own URL, so nothing one test writes is seen by the next. The database's log is the
clone's log: a failed test's report carries it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from docker.models.containers import Container

from .. import _databases, ready as _ready
from .._databases import FixtureSource, Recipe
from .services import ServiceSpec, _clone_fixture


@dataclass(frozen=True)
class Database:
    """A test's own database server: a clone of the warm one, its fixtures loaded.

    Attributes:
        container: the clone (a docker-py ``Container``); its log is the server's.
        url: ``postgresql://user:password@host:5432/name``, ``mysql://...:3306/...`` or
            ``redis://:password@host:6379/0``.
        host: the clone's IP address; port: the server's port there.
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
    ready_timeout: float = 120.0,
    **run_options: Any,
) -> Any:
    """Make a pytest fixture that gives each test its own warm PostgreSQL, fixtures loaded.

    Assign it to a module-level name; that name is the fixture's name, and the test gets a
    :class:`Database`.

    Args:
        fixtures: a ``.sql`` file (run by ``psql`` with ON_ERROR_STOP), a folder of them (in name
            order), a callable given a psycopg connection (committed and closed after it), or a
            list of these, loaded in turn once per run, before the checkpoint.
        image: any image that reads POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB as the
            official one does; default Dolly's, from Debian's postgresql-15 (``make host``).
        user, password, database: the account and the database made at start.
        ready_timeout: seconds for the server to accept connections.
        run_options: more keyword arguments for ``client.containers.create``.

    Raises (from the fixture):
        InvalidArgument: a fixture path that does not exist (raised here, at once).
        NotReady: the server never accepted connections (its last log lines in the message).
        DollyError: a fixture file failed to load (with the client's output).
    """
    return _database_fixture(_databases.postgres(image=image, user=user, password=password, database=database),
                             fixtures, ready_timeout, run_options)


def mariadb(
    *,
    fixtures: Optional[FixtureSource] = None,
    image: str = "dolly/mariadb:10.11",
    user: str = "test",
    password: str = "test",
    database: str = "test",
    ready_timeout: float = 120.0,
    **run_options: Any,
) -> Any:
    """Make a pytest fixture that gives each test its own warm MariaDB, fixtures loaded.

    As :func:`postgres`, with ``.sql`` files run by the ``mariadb`` client (as root, stopping at
    the first error) and callables given a PyMySQL connection (autocommit). The image must read
    MARIADB_USER, MARIADB_PASSWORD, MARIADB_DATABASE and MARIADB_ROOT_PASSWORD (set to
    ``password``), as the official one does. Dolly's image turns native AIO off, which CRIU cannot
    checkpoint; with another image, pass ``command=["mariadbd", "--innodb-use-native-aio=0"]``.
    """
    return _database_fixture(_databases.mariadb(image=image, user=user, password=password, database=database),
                             fixtures, ready_timeout, run_options)


def redis(
    *,
    fixtures: Optional[FixtureSource] = None,
    image: str = "dolly/redis:7",
    password: Optional[str] = None,
    ready_timeout: float = 60.0,
    **run_options: Any,
) -> Any:
    """Make a pytest fixture that gives each test its own warm Redis, fixtures loaded.

    As :func:`postgres`, with ``.redis`` (or ``.txt``) files of commands, one a line, fed to
    ``redis-cli`` (a command that fails fails the load, though redis-cli runs the lines after
    it too), and callables given a redis-py client. ``password`` is passed as REDIS_PASSWORD, which Dolly's image reads.
    """
    return _database_fixture(_databases.redis(image=image, password=password), fixtures, ready_timeout, run_options)


def _database_fixture(recipe: Recipe, fixtures: Optional[FixtureSource], ready_timeout: float,
                      run_options: Dict[str, Any]) -> Any:
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

    return _clone_fixture(spec, database)
