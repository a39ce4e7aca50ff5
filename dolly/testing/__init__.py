"""Dolly's pytest plugin: warm replicas of a service, one fresh clone per test.

    # conftest.py or a test module
    import dolly.testing
    from dolly import ready

    web = dolly.testing.warm_service(image="dolly/python", command=["python3", "-m", "http.server"],
                                     ready=ready.http(8000))
    db = dolly.testing.postgres(fixtures="tests/fixtures/schema-and-rows")   # also mariadb(), redis()

    def test_home(web):            # web: a docker-py Container, already warm, this test's own
        ...

    def test_orders(db):           # db: a Database (url, host, port, connect(), container), its own
        with db.connect() as conn:
            ...

The service is started cold and warmed once per run, checkpointed, and stopped; each test that
asks for the fixture gets its own clone (own name, hostname and IP), removed after the test, pass
or fail. With pytest-xdist, workers share the one checkpoint (the first to need it makes it under a
file lock) and never share a clone. The leftovers of a run that was killed are reaped by the next
run. A failed test's report carries its clone's log; the summary says what the clones saved over
cold starts.

Registered with pytest through the ``pytest11`` entry point, so installing Dolly is enough.

One module per concern: :mod:`dolly.testing.services` (warm services, their registry cache, and
the :class:`~dolly.testing.services.Plugin` that warms and clones them in each pytest process),
:mod:`dolly.testing.databases` (the database fixtures), :mod:`dolly.testing.pools` (clones made
ahead in the background), :mod:`dolly.testing.django` (pytest-django's ``django_db_setup`` on a
warm, migrated Postgres; import it from there: it needs Django), :mod:`dolly.testing.runs` (a run's
state folder, its owner, and the reaper of dead runs) and :mod:`dolly.testing.plugin` (the pytest
hooks: the module the entry point names). This package re-exports their public API.
"""
from __future__ import annotations

from .databases import Database, mariadb, postgres, redis
from .runs import (
    _CONTAINER_ID_RE,
    _RUN_ID_RE,
    CONTAINERS_FILE,
    OWNER_LABEL,
    RUN_LABEL,
    STATE_ROOT,
    Owner,
    open_run_state,
    reap_dead_runs,
    record_checkpoint,
    record_container,
    recorded_containers,
)
from .services import _plugin_key, warm_service

__all__ = [
    "Database", "mariadb", "postgres", "redis", "warm_service",
    # Also imported by Dolly's tests: the run state and its reaper, and the plugin's stash key.
    "RUN_LABEL", "OWNER_LABEL", "STATE_ROOT", "CONTAINERS_FILE", "Owner", "open_run_state", "record_container",
    "record_checkpoint", "recorded_containers", "reap_dead_runs", "_RUN_ID_RE", "_CONTAINER_ID_RE", "_plugin_key",
]
