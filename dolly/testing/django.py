"""pytest-django on a warm, migrated Postgres: migrations run once per run (or once per cache key
across machines), each pytest process (each xdist worker) gets its own server, and a
``transaction=True`` test is followed by the migrated state again instead of Django's flush.

    # conftest.py
    from dolly.testing.django import django_db_setup  # noqa: F401   (Dolly's Postgres 15)

    # or, with options
    from dolly.testing.django import migrated_database
    django_db_setup = migrated_database(image="postgres:16", cache="registry.ci:5000/ci/shop-db")

``django_db_setup`` is pytest-django's documented override point: the session fixture that makes
the test databases. This one, in each pytest process:

1. takes the warm checkpoint of a Postgres server on which ``migrate`` ran: the first process to
   need it starts the server, points the alias at it, runs ``migrate`` (schema and data
   migrations, then ``post_migrate``: content types, permissions) and checkpoints it, under the
   plugin's lock, so other xdist workers reuse it; with ``cache=``, it is pulled from a registry
   when one was pushed for the same migrations (see :func:`migrated_database`);
2. clones it: this process's own server, in which the migrated database becomes a template
   (:class:`dolly._databases.TemplateServer`) and the alias's database a fresh copy of it;
3. points the alias (and its test mirrors) at that copy for the session.

Tests that use Django's ``TestCase`` (``@pytest.mark.django_db``, ``db``) run in a transaction
rolled back after them, as with pytest-django. A transactional test (``transaction=True``,
``transactional_db``, ``live_server``, a ``TransactionTestCase``) is not followed by Django's
``flush``, which would empty the tables data migrations filled: its database is dropped and made
again from the template (``CREATE DATABASE ... TEMPLATE``, a copy of the migrated files), so the
next test, transactional or not, starts from the migrated state, data migrations included.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from docker.models.containers import Container

from .. import _databases, ready as _ready
from .._checkpoint import Checkpoint
from .._databases import Recipe, ServerClone
from ..errors import InvalidArgument, SchemaMigrationFailed
from .services import Cache, Plugin, ServiceSpec, _plugin_key

# The connection settings Dolly sets for the alias it serves (and puts back at the end).
_SERVED_KEYS = ("HOST", "PORT", "NAME", "USER", "PASSWORD")


@dataclass(frozen=True)
class _Options:
    image: str
    alias: str
    user: Optional[str]
    password: Optional[str]
    database: Optional[str]
    ready_timeout: float
    command: Any
    environment: Mapping[str, str]
    run_options: Mapping[str, Any]
    cache: Optional[Cache]


def migrated_database(
    *,
    image: str = "dolly/postgres:15",
    alias: str = "default",
    user: Optional[str] = None,
    password: Optional[str] = None,
    database: Optional[str] = None,
    cache: Optional[str] = None,
    cache_signer: Optional[Ed25519PrivateKey] = None,
    cache_trusted_keys: Sequence[Ed25519PublicKey] = (),
    cache_allow_unsigned: bool = False,
    cache_ca_file: Optional[str] = None,
    ready_timeout: float = 120.0,
    **run_options: Any,
) -> Any:
    """Make a ``django_db_setup`` fixture serving a Django database alias from a warm, migrated
    Postgres. Assign it to ``django_db_setup`` in a ``conftest.py``.

    Args:
        image: a Postgres image that reads POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB as
            the official one does; default Dolly's (``make host`` builds it).
        alias: the ``DATABASES`` alias served (its ``ENGINE`` must be Postgres's or PostGIS's);
            aliases whose ``TEST["MIRROR"]`` names it are pointed at the same database. Other
            aliases are left as they are and get no test database.
        user, password, database: the server's account (made a superuser: the template needs
            it) and database; by default the alias's ``USER``, ``PASSWORD`` and ``NAME``, or
            ``"test"``. ``HOST`` and ``PORT`` are always the server's.
        cache: ``HOST:PORT/REPOSITORY`` of an OCI registry sharing the migrated checkpoint
            between machines, as :func:`dolly.testing.warm_service`'s: its tag is made of the
            image and options, Dolly's and CRIU's versions, Django's version, ``INSTALLED_APPS``
            and the content of every migration file, so changing a migration migrates again.
        cache_signer, cache_trusted_keys, cache_allow_unsigned, cache_ca_file: as for
            :func:`dolly.testing.warm_service`.
        ready_timeout: seconds for the server to accept connections.
        run_options: more keyword arguments for ``client.containers.create`` (``command``,
            ``environment``, ...).

    Raises (from the fixture, failing every test that needs the database):
        InvalidArgument: the alias is missing or not a Postgres one, or a cache without keys
            (the latter raised here, at once).
        SchemaMigrationFailed: a migration failed (``.migration`` names it); its server is removed.
        NotReady: the server never accepted connections.
        Whatever :func:`dolly.checkpoint`, :func:`dolly.restore` and, with a cache,
        :func:`dolly.pull` raise.
    """
    shared = None
    if cache is not None:
        shared = Cache.of(cache, signer=cache_signer, trusted_keys=cache_trusted_keys,
                          allow_unsigned=cache_allow_unsigned, ca_file=cache_ca_file)
    environment = dict(run_options.pop("environment", None) or {})
    command = run_options.pop("command", None)
    options = _Options(image, alias, user, password, database, ready_timeout, command, environment,
                       dict(run_options), shared)

    @pytest.fixture(scope="session")
    def fixture(request: pytest.FixtureRequest, django_test_environment: None, django_db_blocker: Any,
                django_db_modify_db_settings: None) -> Iterator[None]:
        plugin: Plugin = request.config.stash[_plugin_key]
        name = request.fixturename or "django_db_setup"
        with django_db_blocker.unblock():
            served = _ServedDatabase.start(plugin, options, name)
        try:
            with _reset_instead_of_flush(served):
                yield
        finally:
            with django_db_blocker.unblock():
                served.close()

    return fixture


# pytest-django's ``django_db_setup``, the ``default`` alias served by a warm, migrated
# ``dolly/postgres:15``: ``from dolly.testing.django import django_db_setup`` in a conftest.py.
django_db_setup = migrated_database()


class _ServedDatabase:
    """The alias's database in this process's own server: a clone of the migrated checkpoint, its
    migrated database a template, the alias's database a copy of it made afresh after each
    transactional test (and a new clone when a test changed the server beyond its database)."""

    def __init__(self, plugin: Plugin, cp: Checkpoint, fixture_name: str, recipe: Recipe,
                 aliases: List[str], saved: Dict[str, Dict[str, Any]]) -> None:
        self.plugin, self.cp, self.fixture_name, self.recipe = plugin, cp, fixture_name, recipe
        self.alias = aliases[0]
        self.aliases = aliases
        self._saved = saved  # the aliases' own settings, put back at the end
        self.server: Optional[ServerClone] = None

    @classmethod
    def start(cls, plugin: Plugin, options: _Options, fixture_name: str) -> _ServedDatabase:
        from django.db import connections

        if options.alias not in connections.settings:
            raise InvalidArgument(f"DATABASES has no alias {options.alias!r} for dolly.testing.django to serve")
        settings = connections[options.alias].settings_dict
        engine = str(settings.get("ENGINE", ""))
        if "postgresql" not in engine and "postgis" not in engine:
            raise InvalidArgument(f"DATABASES[{options.alias!r}] uses {engine or 'no ENGINE'}; dolly.testing.django "
                                  "serves Postgres (django.db.backends.postgresql or PostGIS)")
        recipe = _databases.postgres(image=options.image, user=options.user or settings.get("USER") or "test",
                                     password=options.password or settings.get("PASSWORD") or "test",
                                     database=options.database or settings.get("NAME") or "test")
        aliases = [options.alias] + [a for a in connections.settings if a != options.alias
                                     and (connections.settings[a].get("TEST") or {}).get("MIRROR") == options.alias]
        saved = {a: {k: connections.settings[a].get(k) for k in _SERVED_KEYS} for a in aliases}
        spec = ServiceSpec(recipe.image, options.command, {**recipe.environment, **options.environment},
                           recipe.accepting(), options.ready_timeout, dict(options.run_options),
                           prepare=lambda source: _migrate_in(source, recipe, aliases, saved), cache=options.cache,
                           extra_key=migrations_digest(engine))
        cp = plugin.warm_checkpoint(spec, fixture_name)
        served = cls(plugin, cp, fixture_name, recipe, aliases, saved)
        served._serve()
        return served

    def _serve(self) -> None:
        """This process's server, if it has none, and the alias's database made from the template."""
        if self.server is None:
            container = self.plugin.clone(self.cp, self.fixture_name)
            # One clone per process, not one per test, which the plugin's summary would count:
            # left out of it.
            times = self.plugin.stats.clone_s.pop(self.fixture_name, [])
            if times[:-1]:
                self.plugin.stats.clone_s[self.fixture_name] = times[:-1]
            self.server = ServerClone.on(container, self.recipe, self.plugin.discard)
        self.server.templates.fresh()
        _point(self.aliases, self.recipe, self.server.templates.host)

    def reset(self) -> None:
        """The migrated state again, after a transactional test: the alias's database dropped with
        every session the test left, and made again from the template."""
        _close(self.aliases)
        if self.server is not None and not self.server.templates.reset():
            self._drop_server()
        self._serve()

    def _drop_server(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def close(self) -> None:
        _close(self.aliases)
        self._drop_server()
        _restore(self._saved)


@contextlib.contextmanager
def _reset_instead_of_flush(served: _ServedDatabase) -> Iterator[None]:
    """While the session runs, a transactional test's teardown makes the served alias's database
    afresh from the template instead of flushing it; other aliases are flushed as Django does.

    Django's ``TransactionTestCase._fixture_teardown`` is where the flush is (and ``TestCase``'s
    calls it only on databases without transactions); pytest-django runs every transactional
    test through it. Replacing it for the session, and putting it back after, is the one place
    both reach."""
    from django.test import TransactionTestCase

    original = TransactionTestCase._fixture_teardown

    def _fixture_teardown(self: Any) -> None:
        names = list(self._databases_names(include_mirrors=False))
        if served.alias in names:
            served.reset()
        if any(n != served.alias for n in names):
            every = type(self)._databases_names
            self._databases_names = lambda include_mirrors=True: [  # the others only, for Django's flush
                n for n in every(include_mirrors=include_mirrors) if n not in served.aliases]
            try:
                original(self)
            finally:
                del self._databases_names

    TransactionTestCase._fixture_teardown = _fixture_teardown
    try:
        yield
    finally:
        TransactionTestCase._fixture_teardown = original


def _migrate_in(source: Container, recipe: Recipe, aliases: List[str], saved: Dict[str, Dict[str, Any]]) -> None:
    """The warm source's preparation: ``migrate`` on the alias, pointed at the source, then no
    connection left open (CRIU cannot checkpoint one).

    Raises:
        SchemaMigrationFailed: naming the migration that failed.
    """
    from django.core.management import call_command

    _point(aliases, recipe, _ready.ip_address(source))
    out = io.StringIO()
    try:
        call_command("migrate", database=aliases[0], interactive=False, verbosity=1, stdout=out)
    except Exception as e:
        failed = _failed_migration(out.getvalue())
        what = f"migration {failed}" if failed else "migrate (after its migrations, in a post_migrate handler)"
        raise SchemaMigrationFailed(
            f"{what} failed on the warm database ({recipe.image}, alias {aliases[0]!r}): {type(e).__name__}: {e}. "
            "No checkpoint was made and its server was removed; fix the migration and run the tests again",
            migration=failed) from e
    finally:
        _close(aliases)
        _restore(saved)
    _databases.wait_without_connections(source)


def _failed_migration(output: str) -> Optional[str]:
    """The migration ``migrate`` was applying when it failed: the last "Applying X..." its
    output does not close with OK (or FAKED)."""
    for m in reversed(list(re.finditer(r"Applying (\S+?)\.\.\.([^\n]*)", output))):
        if "OK" not in m.group(2) and "FAKED" not in m.group(2):
            return m.group(1)
    return None


def migrations_digest(engine: str = "") -> str:
    """A digest of what the migrated database is made of: Django's version, ``INSTALLED_APPS``,
    the database engine, and each migration file's name and content.

    Raises:
        Whatever Django raises loading the migrations (a migration module that does not import).
    """
    import django
    from django.conf import settings
    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(None, ignore_no_migrations=True)
    digest = hashlib.sha256(json.dumps([django.get_version(), list(settings.INSTALLED_APPS), engine]).encode())
    for (app, name), migration in sorted(loader.disk_migrations.items()):
        module = sys.modules.get(type(migration).__module__)
        path = getattr(module, "__file__", None)
        digest.update(f"\0{app}\0{name}\0".encode())
        if path:
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:32]


def _point(aliases: List[str], recipe: Recipe, host: str) -> None:
    """Point the aliases at ``recipe``'s database on ``host``, their connections closed first."""
    from django.db import connections

    for a in aliases:
        connections[a].close()
        connections[a].settings_dict.update(HOST=host, PORT=str(recipe.port), NAME=recipe.database,
                                            USER=recipe.user, PASSWORD=recipe.password)


def _close(aliases: List[str]) -> None:
    from django.db import connections

    for a in aliases:
        connections[a].close()


def _restore(saved: Dict[str, Dict[str, Any]]) -> None:
    from django.db import connections

    for a, values in saved.items():
        connections[a].close()
        connections[a].settings_dict.update(values)
