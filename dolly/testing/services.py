"""Warm services: a fixture per service, its warm checkpoint made once per run (or pulled from a
registry cache), and a clone of it for each test that asks; :class:`Plugin` does the work, one per
pytest process, and says in the summary what the clones saved.
"""
from __future__ import annotations

import hashlib
import json
import os
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

from .. import _criu as criu, ready as _ready, trust
from .._catalog import checkpoint
from .._checkpoint import Checkpoint
from .._cloning import restore
from .._engine import Engine, id_of
from .._hosts import host_of
from .._oci import Reference
from .._registry import pull_annotated, push
from .._version import __version__
from ..errors import BundleExpired, CheckpointExists, InvalidArgument, RegistryError
from .pools import ClonePool
from .runs import (
    OWNER_LABEL,
    RUN_LABEL,
    STATE_ROOT,
    Owner,
    open_run_state,
    reap_dead_runs,
    record_checkpoint,
    record_container,
    remove_run,
)

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
    # What else the warm checkpoint depends on, beyond the container's own settings (a digest of a
    # Django project's migrations): part of the key and of the cache's tag when given.
    extra_key: str = ""

    def key(self, fixture_name: str) -> str:
        """Stable across processes, so xdist workers agree on which checkpoint is whose."""
        made_of = [self.image, self.command, dict(self.environment), repr(sorted(self.run_options.items()))]
        text = json.dumps(made_of + ([self.extra_key] if self.extra_key else []), sort_keys=True, default=str)
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


def _clone_fixture(spec: ServiceSpec, value: Callable[[Container], Any], *, ahead: int = 0) -> Any:
    """A fixture giving each test ``value(clone)`` for its own clone of the warm ``spec``; with
    ``ahead``, that many clones are made ahead in the background (see :mod:`.pools`)."""

    @pytest.fixture
    def fixture(request: pytest.FixtureRequest) -> Iterator[Any]:
        plugin: Plugin = request.config.stash[_plugin_key]
        name = request.fixturename
        if name is None:  # pytest names a fixture's own request; typed optional for the others
            raise RuntimeError("a Dolly fixture was requested without a fixture name")
        cp = plugin.warm_checkpoint(spec, name)
        pool = plugin.clone_pool(cp, name, ahead) if ahead > 0 else None
        clone = plugin.clone(cp, name) if pool is None else plugin.take_clone(pool, name)
        request.node.stash.setdefault(_clones_key, []).append(clone)
        try:
            yield value(clone)
        finally:
            if pool is None:
                plugin.discard(clone)
            else:
                pool.give_back(clone)

    return fixture


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
        # What this process keeps for the run's tests (clone pools, per-worker servers), closed
        # at its end, by key.
        self._kept: Dict[str, Any] = {}

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
                              repr(sorted(spec.run_options.items())), __version__,
                              criu.version(), criu.build()] + ([spec.extra_key] if spec.extra_key else []),
                             sort_keys=True, default=str)
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
        host_of(Engine.of(self.client)).shared_layer(cp)
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
            host_of(Engine.of(self.client)).shared_layer(cp)
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

    def kept(self, key: str, make: Callable[[], Any]) -> Any:
        """The object this process keeps under ``key`` (made by ``make`` the first time), closed
        (its ``close()``) when the process's session ends."""
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]

    def clone_pool(self, cp: Checkpoint, fixture_name: str, ahead: int) -> ClonePool:
        """This process's pool of clones of ``cp``; its threads have docker clients of their own."""

        def make_pool() -> ClonePool:
            maker, remover = docker.from_env(), docker.from_env()
            return ClonePool(lambda: restore(cp, labels=self.labels, on_create=self.record, client=maker),
                             lambda c: _remove(remover, id_of(c)), ahead=ahead)

        pool: ClonePool = self.kept(f"pool {fixture_name} {cp.path}", make_pool)
        return pool

    def take_clone(self, pool: ClonePool, fixture_name: str) -> Container:
        """A clone from ``pool``; the stats count what the test waited for it."""
        started = time.perf_counter()
        c = pool.take()
        self.stats.clone_s.setdefault(fixture_name, []).append(time.perf_counter() - started)
        return c

    # --- the end of the run ----------------------------------------------------------------------

    def finish(self) -> None:
        """Remove what this run made. Under xdist only the controller does it, after the workers."""
        for kept in reversed(list(self._kept.values())):
            kept.close()  # each process's own pools and servers: their threads stop here
        self._kept.clear()
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


def _remove(client: docker.DockerClient, container_id: str) -> None:
    Engine.of(client).remove(container_id)


def _float(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
