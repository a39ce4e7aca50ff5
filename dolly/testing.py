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

Each run has a state folder on this machine, ``STATE_ROOT/<run-id>/`` (0700, root's own), naming
its owner process and recording the full ID of every container the run creates (the warm source,
each clone), appended as the engine creates it, before it starts. Containers are also labelled
with the run's ID and owner, but labels are data anyone can set or copy: ``docker commit`` of a
clone hands them to every container started from the image. So the reaper removes only recorded
containers whose labels still name the run, and deletes only the checkpoints of recorded IDs; a
container that merely carries a run's labels is never touched. A run with no state folder here
(another machine's, sharing the engine) is never reaped. A container whose create the engine
carried out but never answered before the run was killed is not recorded, so it is left behind
(labelled, for ``docker ps --filter label=dolly.pytest.run``), never guessed at.

The owner is named so that it is unique across machines and PID namespaces: the kernel's boot ID,
the inode of the owner's PID namespace, its pid and its start time. A run is reaped only when its
owner is provably dead: same boot, same PID namespace as the reaper, and that pid with that start
time gone. Runs of other machines, of containers and of other PID namespaces sharing the engine,
and runs with a recorded container whose owner label is missing or unreadable, are never touched.
Clones made from the plugin's checkpoints by anyone else (``dolly.restore``) do not inherit the
run's labels and are not recorded, so they are never reaped either.

Databases (:func:`postgres`, :func:`mariadb`, :func:`redis`) are warm services too: the server is
started once per run from Debian's packages (``make host`` builds ``dolly/postgres:15``,
``dolly/mariadb:10.11``, ``dolly/redis:7``) or from the user's own image, made ready (accepting
connections, by its own client), loaded with the fixtures (SQL or command files through its own
client, callables through a driver connection), and checkpointed; each test gets its own clone
with its own URL, so nothing one test writes is seen by the next. The database's log is the
clone's log: a failed test's report carries it.

Registered with pytest through the ``pytest11`` entry point, so installing Dolly is enough.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import stat
import statistics
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Union

import docker
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from docker.models.containers import Container
from filelock import FileLock

from . import _criu as criu, _databases, ready as _ready, trust
from ._checkpoint import Checkpoint, checkpoint, get_checkpoint, remove_all_of, remove_checkpoint
from ._databases import FixtureSource, Recipe
from ._engine import Engine, id_of
from ._names import CHECKPOINT_NAME
from ._registry import Reference, pull_annotated, push
from ._restore import LABEL_SOURCE, restore, shared_layer
from .errors import (
    BundleExpired,
    CheckpointExists,
    CheckpointNotFound,
    ContainerNotFound,
    DollyError,
    InvalidArgument,
    RegistryError,
)

__all__ = ["Database", "mariadb", "postgres", "redis", "warm_service"]

RUN_LABEL = "dolly.pytest.run"
OWNER_LABEL = "dolly.pytest.owner"
STATE_ROOT = Path("/run/dolly/pytest")
# In a run's state folder: the owner's name, and the full IDs of the containers the run created,
# one a line, appended as each is created.
OWNER_FILE = "owner"
CONTAINERS_FILE = "containers"
# And the checkpoints the run pulled from a cache, ``<container-id>/<name>`` a line: the pulled
# source's folder in the store may hold checkpoints the run did not make (another run's pull of
# the same tag, the user's own), and only the pulled one is the run's to remove.
CHECKPOINTS_FILE = "checkpoints"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
_CONTAINER_ID_RE = re.compile(r"^[0-9a-f]{64}\Z")

# The pusher's cold start and checkpoint seconds, on a cached checkpoint's manifest.
COLD_ANNOTATION = "io.dolly.pytest.cold_s"
WARM_ANNOTATION = "io.dolly.pytest.warm_s"

_plugin_key = pytest.StashKey["Plugin"]()
_clones_key = pytest.StashKey[List[Container]]()


@dataclass(frozen=True)
class ServiceSpec:
    image: str
    command: Optional[Union[str, Sequence[str]]]
    environment: Mapping[str, str]
    ready: Optional[Callable[[Container], bool]]
    ready_timeout: float
    run_options: Mapping[str, Any] = field(default_factory=dict)
    # Run once the service is ready, before the checkpoint (a database's fixtures).
    prepare: Optional[Callable[[Container], None]] = None
    cache: Optional[Cache] = None

    def key(self, fixture_name: str) -> str:
        """Stable across processes, so xdist workers agree on which checkpoint is whose."""
        text = json.dumps([self.image, self.command, dict(self.environment), repr(sorted(self.run_options.items()))],
                          sort_keys=True, default=str)
        return f"{fixture_name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class Cache:
    """Where warm checkpoints are shared between machines: a repository of an OCI registry."""

    repository: str
    signer: Optional[Ed25519PrivateKey] = None
    trusted_keys: Sequence[Ed25519PublicKey] = ()
    allow_unsigned: bool = False
    ca_file: Optional[str] = None

    @classmethod
    def of(cls, repository: str, *, signer: Optional[Ed25519PrivateKey], trusted_keys: Sequence[Ed25519PublicKey],
           allow_unsigned: bool, ca_file: Optional[str]) -> Cache:
        """Keys given, or else read from ``DOLLY_CACHE_SIGNER`` (a private PEM file) and
        ``DOLLY_CACHE_TRUST`` (public PEM files, ``os.pathsep``-separated), as CI passes secrets.

        Raises:
            InvalidArgument: a repository with a tag or digest, or no key and no
                ``allow_unsigned``.
        """
        ref = Reference.parse(repository)
        if ref.tag != "latest" or ref.digest or repository.endswith(":latest"):
            raise InvalidArgument(f"cache={repository!r}: name a repository; the plugin picks the tags")
        if signer is None and os.environ.get("DOLLY_CACHE_SIGNER"):
            signer = trust.load_private_key(os.environ["DOLLY_CACHE_SIGNER"])
        trusted = list(trusted_keys) or [trust.load_public_key(p) for p in
                                         filter(None, os.environ.get("DOLLY_CACHE_TRUST", "").split(os.pathsep))]
        if signer is not None:
            trusted.append(signer.public_key())
        if not trusted and not allow_unsigned:
            raise InvalidArgument("a cache needs keys: cache_signer (pushes are signed, pulls checked), "
                                  "cache_trusted_keys, DOLLY_CACHE_SIGNER/DOLLY_CACHE_TRUST, or cache_allow_unsigned")
        return cls(ref.name, signer, tuple(trusted), allow_unsigned, ca_file)


def warm_service(
    image: str,
    command: Optional[Union[str, Sequence[str]]] = None,
    *,
    environment: Optional[Mapping[str, str]] = None,
    ready: Optional[Callable[[Container], bool]] = None,
    ready_timeout: float = 120.0,
    cache: Optional[str] = None,
    cache_signer: Optional[Ed25519PrivateKey] = None,
    cache_trusted_keys: Sequence[Ed25519PublicKey] = (),
    cache_allow_unsigned: bool = False,
    cache_ca_file: Optional[str] = None,
    **run_options: Any,
) -> Any:
    """Make a pytest fixture that gives each test its own warm clone of a service.

    Assign it to a module-level name; that name is the fixture's name.

    Args:
        image, command, environment: as ``docker run``.
        ready: a check from :mod:`dolly.ready` (``http``, ``log``, ``exec``) or any callable
            taking the container; the service is checkpointed once it passes. Without one, as
            soon as the container runs.
        ready_timeout: seconds to wait for ``ready``.
        cache: ``HOST:PORT/REPOSITORY`` of an OCI registry that shares the warm checkpoint between
            machines (CI runners, a notebook server and its workers). The first run that needs
            the fixture pulls the checkpoint tagged with what made it (the image's ID, command,
            environment, run options, Dolly's and CRIU's versions) when the registry has a fresh
            one, and otherwise warms the service, checkpoints it and pushes it there. The summary
            says which happened and the time saved.
        cache_signer: the key pushes are signed with (pulls are then checked against it);
            cache_trusted_keys: keys a pulled checkpoint may be signed by (a runner that only
            pulls); else from ``DOLLY_CACHE_SIGNER`` / ``DOLLY_CACHE_TRUST``.
        cache_allow_unsigned: push unsigned and accept unsigned pulls (a registry you trust).
        cache_ca_file: the CA that signs the registry's TLS certificate.
        run_options: more keyword arguments for ``client.containers.run`` (ports, volumes, ...).

    The fixture raises :class:`dolly.errors.NotReady` (with the service's last log lines) when the
    service never gets ready, and the errors of :func:`dolly.checkpoint` and :func:`dolly.restore`;
    with a cache, those of :func:`dolly.pull` for a checkpoint that fails its checks there
    (tampered, signed by another key, a rolled-back tag): an expired one, or none, is warmed and
    pushed again, and a registry that cannot be reached is only warned about.
    """
    shared = None
    if cache is not None:
        shared = Cache.of(cache, signer=cache_signer, trusted_keys=cache_trusted_keys,
                          allow_unsigned=cache_allow_unsigned, ca_file=cache_ca_file)
    spec = ServiceSpec(image, command, dict(environment or {}), ready, ready_timeout, dict(run_options),
                       cache=shared)
    return _clone_fixture(spec, lambda clone: clone)


def _clone_fixture(spec: ServiceSpec, value: Callable[[Container], Any]) -> Any:
    """A fixture giving each test ``value(clone)`` for its own clone of the warm ``spec``."""

    @pytest.fixture
    def fixture(request: pytest.FixtureRequest) -> Iterator[Any]:
        plugin: Plugin = request.config.stash[_plugin_key]
        name = request.fixturename
        if name is None:  # pytest names a fixture's own request; typed optional for the others
            raise RuntimeError("a Dolly fixture was requested without a fixture name")
        cp = plugin.warm_checkpoint(spec, name)
        clone = plugin.clone(cp, name)
        request.node.stash.setdefault(_clones_key, []).append(clone)
        try:
            yield value(clone)
        finally:
            plugin.discard(clone)

    return fixture


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
            HostNotReady: the driver is not installed (``pip install 'dolly[postgres]'`` etc.).
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


@dataclass
class Stats:
    cold_s: Dict[str, float] = field(default_factory=dict)
    # The checkpoint and the clones' shared layer, after the cold start: paid once too.
    warm_s: Dict[str, float] = field(default_factory=dict)
    clone_s: Dict[str, List[float]] = field(default_factory=dict)
    # The registry cache: what each fixture did there ("pulled" or "pushed"), the reference, its
    # seconds, and for a pull the pusher's cold start and checkpoint seconds (its annotations).
    cache: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def merge(self, data: Mapping[str, Any]) -> None:
        self.cold_s.update(data.get("cold_s", {}))
        self.warm_s.update(data.get("warm_s", {}))
        self.cache.update(data.get("cache", {}))
        for k, v in data.get("clone_s", {}).items():
            self.clone_s.setdefault(k, []).extend(v)


class Plugin:
    """One per pytest process. Under xdist the controller only cleans up and reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.is_worker = hasattr(config, "workerinput")
        # workerinput (and workeroutput): what pytest-xdist adds to a worker's config
        self.run_id: str = config.workerinput["dolly_run_id"] if self.is_worker else uuid.uuid4().hex[:12]  # type: ignore[attr-defined]
        self.owner: str = config.workerinput["dolly_owner"] if self.is_worker else str(Owner.current())  # type: ignore[attr-defined]
        self.state_dir = STATE_ROOT / self.run_id
        self.stats = Stats()
        self._client: Optional[docker.DockerClient] = None
        self._checkpoints: Dict[str, Checkpoint] = {}
        self._reaped = False
        # Fixtures whose cached checkpoint another run on this engine holds: warmed here, not pushed.
        self._pull_taken: Set[str] = set()

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = docker.from_env()
        return self._client

    def record(self, container_id: str) -> None:
        """Write a container this run made into its state folder, before it is started: the
        reaper removes only recorded containers."""
        record_container(self.state_dir, container_id)

    @property
    def labels(self) -> Dict[str, str]:
        return {RUN_LABEL: self.run_id, OWNER_LABEL: self.owner}

    # --- the warm checkpoint, once per run -------------------------------------------------------

    def warm_checkpoint(self, spec: ServiceSpec, fixture_name: str) -> Checkpoint:
        key = spec.key(fixture_name)
        if key in self._checkpoints:
            return self._checkpoints[key]
        if not self._reaped:
            reap_dead_runs(self.client)
            self._reaped = True
        open_run_state(self.run_id, self.owner)
        state = self.state_dir / f"{key}.json"
        with FileLock(str(self.state_dir / f"{key}.lock")):
            if state.exists():
                saved = json.loads(state.read_text())
                cp = Checkpoint.load(Path(saved["checkpoint"]))
            else:
                pulled = self._pull(spec, spec.cache, fixture_name) if spec.cache is not None else None
                if pulled is not None:
                    cp = pulled
                else:
                    cp, cold, warm = self._make_warm(spec, key)
                    self.stats.cold_s[fixture_name] = cold
                    self.stats.warm_s[fixture_name] = warm
                    if spec.cache is not None and fixture_name not in self._pull_taken:
                        self._push(spec, spec.cache, fixture_name, cp, cold, warm)
                state.write_text(json.dumps({"checkpoint": str(cp.path)}))
        self._checkpoints[key] = cp
        return cp

    # --- the registry cache ----------------------------------------------------------------------

    def _cache_ref(self, spec: ServiceSpec, cache: Cache) -> str:
        """The cache's tag for ``spec``: what made the warm checkpoint."""
        engine = Engine.of(self.client)
        made_by = json.dumps([engine.image_id(spec.image), spec.command, dict(spec.environment),
                              repr(sorted(spec.run_options.items())), importlib.metadata.version("dolly"),
                              criu.version(), criu.build()], sort_keys=True, default=str)
        return f"{cache.repository}:warm-{hashlib.sha256(made_by.encode()).hexdigest()[:32]}"

    def _pull(self, spec: ServiceSpec, cache: Cache, fixture_name: str) -> Optional[Checkpoint]:
        """The cache's warm checkpoint, or None when it has no fresh one (or cannot be reached)."""
        ref = self._cache_ref(spec, cache)
        started = time.perf_counter()
        try:
            cp, notes = pull_annotated(ref, client=self.client, trusted_keys=cache.trusted_keys,
                                       allow_unsigned=cache.allow_unsigned, ca_file=cache.ca_file)
        except RegistryError as e:
            if e.status != 404:
                warnings.warn(f"dolly: the cache {ref} could not be used ({e}): warming here", stacklevel=1)
            return None
        except BundleExpired:
            return None  # warmed and pushed again
        except CheckpointExists:
            # Another run on this engine pulled the same tag and still has it (or the user
            # imported it): it is theirs to remove, not this run's to use. Warm here instead.
            self._pull_taken.add(fixture_name)
            return None
        # Recorded as this run's own checkpoint, that one alone (not its source's whole folder),
        # once it is there: a record made before could name another run's checkpoint.
        record_checkpoint(self.state_dir, cp.container_id, cp.name)
        shared_layer(Engine.of(self.client), cp)
        self.stats.cache[fixture_name] = {
            "action": "pulled", "reference": ref, "seconds": time.perf_counter() - started,
            "cold_s": _float(notes.get(COLD_ANNOTATION)), "warm_s": _float(notes.get(WARM_ANNOTATION))}
        return cp

    def _push(self, spec: ServiceSpec, cache: Cache, fixture_name: str, cp: Checkpoint, cold: float,
              warm: float) -> None:
        ref = self._cache_ref(spec, cache)
        try:
            report = push(cp, ref, signer=cache.signer, ca_file=cache.ca_file, client=self.client,
                          annotations={COLD_ANNOTATION: f"{cold:.3f}", WARM_ANNOTATION: f"{warm:.3f}"})
        except (RegistryError, OSError) as e:
            warnings.warn(f"dolly: could not push the warm checkpoint to {ref}: {e}", stacklevel=1)
            return
        self.stats.cache[fixture_name] = {"action": "pushed", "reference": report.reference,
                                          "seconds": report.seconds, "bytes_uploaded": report.bytes_uploaded}

    def _make_warm(self, spec: ServiceSpec, key: str) -> tuple[Checkpoint, float, float]:
        """The warm checkpoint, the cold start's seconds, and the seconds after it (checkpoint,
        shared layer)."""
        started = time.perf_counter()
        source = self.client.containers.create(
            spec.image,
            spec.command,  # type: ignore[arg-type]  # any sequence does; the stubs say list
            environment=dict(spec.environment),
            detach=True,
            name=f"pytest-{key}-{self.run_id}",
            labels={**dict(spec.run_options.get("labels") or {}), **self.labels},
            **{k: v for k, v in spec.run_options.items() if k != "labels"},
        )
        try:
            self.record(id_of(source))
            source.start()
            if spec.ready is not None:
                _ready.wait(source, spec.ready, timeout=spec.ready_timeout)
            if spec.prepare is not None:
                spec.prepare(source)
            cold = time.perf_counter() - started
            # The source is not needed once checkpointed: stop it, keep it until the run ends.
            cp = checkpoint(source, "warm", leave_running=False, client=self.client)
            # A large writable layer (a database's files) becomes the clones' shared image layer
            # now, once, rather than in the first test (paid once, so counted with the cold start).
            shared_layer(Engine.of(self.client), cp)
            return cp, cold, time.perf_counter() - started - cold
        except BaseException:
            _remove(self.client, id_of(source))
            raise

    # --- a clone per test ------------------------------------------------------------------------

    def clone(self, cp: Checkpoint, fixture_name: str) -> Container:
        started = time.perf_counter()
        # Clones do not inherit the run's labels from the checkpoint's source: they are given here,
        # and each clone is recorded as soon as it is created, so that a killed run's clones are
        # reaped with the rest of it.
        c = restore(cp, labels=self.labels, on_create=self.record, client=self.client)
        self.stats.clone_s.setdefault(fixture_name, []).append(time.perf_counter() - started)
        return c

    def discard(self, container: Container) -> None:
        _remove(self.client, id_of(container))

    # --- the end of the run ----------------------------------------------------------------------

    def finish(self) -> None:
        """Remove what this run made. Under xdist only the controller does it, after the workers."""
        if self.is_worker:
            self.config.workeroutput["dolly_stats"] = {  # type: ignore[attr-defined]
                "cold_s": self.stats.cold_s, "warm_s": self.stats.warm_s, "clone_s": self.stats.clone_s,
            "cache": self.stats.cache}
            return
        if self.state_dir.exists():
            remove_run(self.client, self.run_id)

    def summary(self, terminal: Any) -> None:
        if not self.stats.clone_s:
            return
        terminal.section("dolly warm replicas")
        for name, did in sorted(self.stats.cache.items()):
            if did["action"] == "pulled":
                line = f"{name}: pulled the warm checkpoint {did['reference']} in {did['seconds']:.2f} s"
                if did.get("cold_s") is not None:
                    spent = did["cold_s"] + (did.get("warm_s") or 0.0)
                    line += (f" instead of warming it here (cold start and checkpoint took {spent:.2f} s where it "
                             f"was pushed): saved {spent - did['seconds']:.1f} s")
            else:
                line = (f"{name}: warmed here and pushed to {did['reference']} in {did['seconds']:.2f} s "
                        f"({did['bytes_uploaded'] / 2**20:.1f} MiB uploaded)")
            terminal.write_line(line)
        for name, times in sorted(self.stats.clone_s.items()):
            med = statistics.median(times)
            cold = self.stats.cold_s.get(name)
            line = f"{name}: {len(times)} clone(s), median {med:.2f} s each"
            if cold is not None:
                warm = self.stats.warm_s.get(name, 0.0)
                saved = len(times) * cold - (sum(times) + cold + warm)
                line += (f"; cold start {cold:.2f} s and checkpoint {warm:.2f} s (paid once); a cold start "
                         f"per test would have cost {len(times) * cold:.1f} s: saved {saved:.1f} s")
            terminal.write_line(line)


@dataclass(frozen=True)
class Owner:
    """The process that owns a run, named so that no other process anywhere has the same name.

    ``boot_id``: the kernel's random boot ID (another machine, or this one rebooted, differs);
    ``pid_ns``: the inode of the process's PID namespace (containers and ``unshare --pid`` differ);
    ``pid`` in that namespace, and ``start``: its start time in clock ticks since boot, since a
    pid alone is reused. As a label: ``<boot_id>:<pid_ns>:<pid>:<start>``.
    """

    boot_id: str
    pid_ns: int
    pid: int
    start: int

    def __str__(self) -> str:
        return f"{self.boot_id}:{self.pid_ns}:{self.pid}:{self.start}"

    @classmethod
    def current(cls) -> Owner:
        """This process.

        Raises:
            OSError: /proc is not readable.
        """
        return cls.of(os.getpid())

    @classmethod
    def of(cls, pid: int) -> Owner:
        """The process ``pid`` as this process numbers it (in this process's PID namespace).

        Raises:
            OSError: no such process, or /proc is not this PID namespace's.
        """
        if os.readlink("/proc/self") != str(os.getpid()):
            raise OSError("/proc belongs to another PID namespace than this process")
        start = _start_time(Path(f"/proc/{pid}/stat"))
        if start is None:
            raise OSError(f"process {pid} has exited")
        return cls(_boot_id(), os.stat("/proc/self/ns/pid").st_ino, pid, start)

    @classmethod
    def parse(cls, text: Optional[str]) -> Optional[Owner]:
        """The owner a label names, or None for a missing or malformed one (never reaped)."""
        parts = (text or "").strip().split(":")
        if len(parts) != 4 or not parts[0] or not all(p.isdigit() for p in parts[1:]):
            return None
        return cls(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _start_time(stat_file: Path) -> Optional[int]:
    """The start time in a ``/proc/<pid>/stat``; None for a zombie, which never runs again.

    Raises:
        OSError: it cannot be read (FileNotFoundError: no such process).
    """
    stat = stat_file.read_text()
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def provably_dead(owner_text: Optional[str]) -> bool:
    """Whether the owner a label names is certainly gone: it ran on this boot of this machine, in
    this process's PID namespace (whose /proc this is), and its pid is gone or belongs to a process
    that started at another time. Anything else (a missing or malformed owner, another machine,
    another PID namespace, a /proc that cannot be read) is not proof: False."""
    owner = Owner.parse(owner_text)
    if owner is None:
        return False
    try:
        if owner.boot_id != _boot_id() or owner.pid_ns != os.stat("/proc/self/ns/pid").st_ino:
            return False
        if os.readlink("/proc/self") != str(os.getpid()):
            return False  # this /proc belongs to another PID namespace: its pids are not ours
    except OSError:
        return False
    try:
        start = _start_time(Path(f"/proc/{owner.pid}/stat"))
    except FileNotFoundError:
        return True  # no such pid
    except (OSError, ValueError, IndexError):
        return False
    return start != owner.start


def _remove(client: docker.DockerClient, container_id: str) -> None:
    Engine.of(client).remove(container_id)


# --- a run's state folder ----------------------------------------------------------------------------
#
# STATE_ROOT/<run-id>/ (0700) holds ``owner`` and ``containers`` (0600). Labels are data anyone can
# set (``docker commit`` of a clone hands them to every container started from the image): only
# these files, which only this user can write, say which containers are a run's.


def open_run_state(run_id: str, owner: str) -> Path:
    """Make the run's state folder (0700) and its owner file (0600), unless made already (xdist
    workers share the controller's run ID and folder); returns the folder.

    Raises:
        OSError: they cannot be made, or the folder is not this user's own.
    """
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"not a run ID: {run_id!r}")
    STATE_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = STATE_ROOT / run_id
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    if not _private(folder, stat.S_ISDIR):
        raise PermissionError(f"{folder} is not a folder of this user's own that only it can write")
    try:
        fd = os.open(folder / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return folder
    try:
        _write_all(fd, owner.encode())
    finally:
        os.close(fd)
    return folder


def record_container(state_dir: Path, container_id: str) -> None:
    """Append a container's full ID to the run's record (``containers``, 0600). Safe from many
    processes at once: one ``write`` of the whole line with O_APPEND, under an exclusive lock.

    Raises:
        ValueError: not a full container ID.
        OSError: it cannot be written (FileNotFoundError: the state folder is not made yet).
    """
    if not _CONTAINER_ID_RE.match(container_id):
        raise ValueError(f"not a full container ID: {container_id!r}")
    fd = os.open(state_dir / CONTAINERS_FILE,
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _write_all(fd, f"{container_id}\n".encode())
    finally:
        os.close(fd)  # releases the lock


def record_checkpoint(state_dir: Path, container_id: str, name: str) -> None:
    """Append a checkpoint the run pulled (``<container-id>/<name>``) to the run's record
    (``checkpoints``, 0600), as :func:`record_container` does.

    Raises:
        ValueError: not a full container ID or not a checkpoint name.
        OSError: it cannot be written.
    """
    if not _CONTAINER_ID_RE.match(container_id) or not CHECKPOINT_NAME.match(name):
        raise ValueError(f"not a checkpoint of Dolly's store: {container_id!r}/{name!r}")
    fd = os.open(state_dir / CHECKPOINTS_FILE,
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _write_all(fd, f"{container_id}/{name}\n".encode())
    finally:
        os.close(fd)  # releases the lock


def recorded_checkpoints(state_dir: Path) -> Set[tuple[str, str]]:
    """The checkpoints (container ID, name) recorded in a run's state folder; trusted as
    :func:`recorded_containers` says."""
    text = _read_private(state_dir, CHECKPOINTS_FILE)
    if text is None:
        return set()
    found = set()
    for line in text.split("\n")[:-1]:
        cid, _, name = line.partition("/")
        if _CONTAINER_ID_RE.match(cid) and CHECKPOINT_NAME.match(name):
            found.add((cid, name))
    return found


def recorded_containers(state_dir: Path) -> Set[str]:
    """The container IDs recorded in a run's state folder: none when the folder or the record
    is missing, or is not this user's own, only writable by it (then nothing in it is trusted).
    A line not ended yet (a write under way) does not count."""
    text = _read_private(state_dir, CONTAINERS_FILE)
    if text is None:
        return set()
    return {line for line in text.split("\n")[:-1] if _CONTAINER_ID_RE.match(line)}


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _private(path: Path, kind: Callable[[int], bool], st: Optional[os.stat_result] = None) -> bool:
    """Whether ``path`` (not followed if a link) is of ``kind``, owned by this user and writable
    by no one else."""
    try:
        st = st or os.lstat(path)
    except OSError:
        return False
    return kind(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _read_private(state_dir: Path, name: str) -> Optional[str]:
    """A file of a state folder, or None when it or its folder is missing, a link, or not private
    (see :func:`_private`)."""
    if not _private(state_dir, stat.S_ISDIR):
        return None
    try:
        fd = os.open(state_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _private(state_dir / name, stat.S_ISREG, os.fstat(fd)):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


# --- removing runs -----------------------------------------------------------------------------------


def remove_run(client: docker.DockerClient, run_id: str) -> None:
    """Remove the containers a run recorded in its state folder, the checkpoints Dolly keeps of
    them, and its state folder.

    Only recorded containers whose labels still name the run are removed (with their anonymous
    volumes: the plugin made them), and only the store folders of recorded IDs are deleted. A
    container that merely carries the run's labels (one started from an image committed from a
    clone, say) is never touched. A run without a state folder here has nothing to remove.
    """
    # The run ID may come from a folder name: it names a folder under STATE_ROOT only when it is a
    # plain name.
    if not _RUN_ID_RE.match(run_id):
        return
    folder = STATE_ROOT / run_id
    recorded = recorded_containers(folder)
    engine = Engine.of(client)
    keep: Set[str] = set()
    if recorded:
        # The low-level list: containers.list() inspects each container, and fails when another
        # user of the shared engine removes one meanwhile. Unfiltered, so that a recorded container
        # whose labels do not name the run is seen too (and kept, with its checkpoints).
        for row in client.api.containers(all=True):
            if row["Id"] not in recorded:
                continue
            if (row.get("Labels") or {}).get(RUN_LABEL) != run_id:
                keep.add(row["Id"])
                continue
            engine.remove(row["Id"])
    for cid in recorded - keep:
        # IDs are 64 hex digits (checked as read): a plain name under the store.
        remove_all_of(engine, cid)
    for cid, name in recorded_checkpoints(folder):
        _remove_pulled(engine, cid, name)
    if os.path.lexists(folder):
        shutil.rmtree(folder, ignore_errors=True)


def _remove_pulled(engine: Engine, container_id: str, name: str) -> None:
    """Remove one checkpoint a run pulled, and its shared layer image unless in use; only an
    imported one (never a checkpoint taken on this engine, whatever the record says)."""
    try:
        # Through the engine's agent where its files are not this process's (a run on another host).
        cp = get_checkpoint(container_id, name, client=engine.client)
    except DollyError:
        return  # gone already
    if cp.origin is None:
        return
    with contextlib.suppress(CheckpointNotFound):
        remove_checkpoint(cp, engine.client)


def reap_dead_runs(client: docker.DockerClient) -> List[str]:
    """Remove what runs whose owner is provably dead left behind; returns their run IDs.

    Runs are found by their state folders on this machine (a run without one, another machine's
    say, is never reaped), and a run's containers are only those it recorded there: labels alone,
    which anyone can set or copy, never make a container a run's. A run is reaped only when every
    owner that its state folder and its recorded containers name is provably dead (see
    :func:`provably_dead`): a recorded container without an owner label, or with one from another
    machine or PID namespace, keeps the whole run; so does a state folder without a readable owner
    file, or not private to this user.
    """
    if not STATE_ROOT.is_dir():
        return []
    runs: Dict[str, Set[str]] = {}
    owners: Dict[str, List[Optional[str]]] = {}
    for folder in STATE_ROOT.iterdir():
        if not _RUN_ID_RE.match(folder.name):
            continue
        owner = _read_private(folder, OWNER_FILE)
        if owner is None:
            continue
        runs[folder.name] = recorded_containers(folder)
        owners[folder.name] = [owner]
    if not runs:
        return []
    for row in client.api.containers(all=True, filters={"label": RUN_LABEL}):
        labels = row.get("Labels") or {}
        run_id = labels.get(RUN_LABEL)
        if run_id in runs and row["Id"] in runs[run_id]:
            owners[run_id].append(labels.get(OWNER_LABEL))
    dead = sorted(run_id for run_id, seen in owners.items() if all(provably_dead(o) for o in seen))
    for run_id in dead:
        try:
            remove_run(client, run_id)
        except ContainerNotFound:
            pass
    return dead


# --- pytest hooks ----------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    # pycriu 4.2 calls protobuf's deprecated FieldDescriptor.label() for every field it reads:
    # Dolly's dependency, not the user's code, so it stays out of the user's test report (a
    # filter set at import would be undone by pytest's per-test warning capture).
    config.addinivalue_line("filterwarnings", r"ignore:label\(\) is deprecated:DeprecationWarning")
    config.stash[_plugin_key] = Plugin(config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: hand the controller's run ID and owner to each worker."""
    plugin: Plugin = node.config.stash[_plugin_key]
    node.workerinput["dolly_run_id"] = plugin.run_id
    node.workerinput["dolly_owner"] = plugin.owner


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist: collect a worker's timings."""
    data = getattr(node, "workeroutput", {}).get("dolly_stats")
    if data:
        node.config.stash[_plugin_key].stats.merge(data)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for c in item.stash.get(_clones_key, []):
            # The warm source's log first (a server's start-up, its fixtures), then the clone's own:
            # what the service said during this test.
            source_id = (c.labels or {}).get(LABEL_SOURCE)
            if source_id:
                report.sections.append((f"dolly warm source of {c.name}, log until its checkpoint",
                                        _log_text(c.client, source_id)))
            report.sections.append((f"dolly clone {c.name} log", _log_text(c.client, id_of(c))))
    return report


def _log_text(client: Any, container_id: str) -> str:
    try:
        text = client.containers.get(container_id).logs(tail=200).decode(errors="replace")
    except docker.errors.DockerException as e:
        return f"(could not read the log: {e})"
    return text or "(empty)"


def pytest_sessionfinish(session: pytest.Session) -> None:
    session.config.stash[_plugin_key].finish()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    config.stash[_plugin_key].summary(terminalreporter)


def _float(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
