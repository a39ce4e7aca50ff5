"""Dolly's pytest plugin: warm replicas of a service, one fresh clone per test.

    # conftest.py or a test module
    import dolly.testing
    from dolly import ready

    web = dolly.testing.warm_service(image="dolly/python", command=["python3", "-m", "http.server"],
                                     ready=ready.http(8000))

    def test_home(web):            # web: a docker-py Container, already warm, this test's own
        ...

The service is started cold and warmed once per run, checkpointed, and stopped; each test that
asks for the fixture gets its own clone (own name, hostname and IP), removed after the test, pass
or fail. With pytest-xdist, workers share the one checkpoint (the first to need it makes it under a
file lock) and never share a clone. Every container is labelled with the run's ID and its owner
process, so the leftovers of a run that was killed are reaped by the next run. A failed test's
report carries its clone's log; the summary says what the clones saved over cold starts.

Registered with pytest through the ``pytest11`` entry point, so installing Dolly is enough.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import docker
import pytest
from docker.models.containers import Container
from filelock import FileLock

from . import ready as _ready
from .checkpoint import Checkpoint, checkpoint
from .engine import Engine
from .errors import ContainerNotFound
from .restore import restore

__all__ = ["warm_service"]

RUN_LABEL = "dolly.pytest.run"
OWNER_LABEL = "dolly.pytest.owner"
STATE_ROOT = Path("/run/dolly/pytest")

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

    def key(self, fixture_name: str) -> str:
        """Stable across processes, so xdist workers agree on which checkpoint is whose."""
        text = json.dumps([self.image, self.command, dict(self.environment), repr(sorted(self.run_options.items()))],
                          sort_keys=True, default=str)
        return f"{fixture_name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def warm_service(
    image: str,
    command: Optional[Union[str, Sequence[str]]] = None,
    *,
    environment: Optional[Mapping[str, str]] = None,
    ready: Optional[Callable[[Container], bool]] = None,
    ready_timeout: float = 120.0,
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
        run_options: more keyword arguments for ``client.containers.run`` (ports, volumes, ...).

    The fixture raises :class:`dolly.errors.NotReady` (with the service's last log lines) when the
    service never gets ready, and the errors of :func:`dolly.checkpoint` and :func:`dolly.restore`.
    """
    spec = ServiceSpec(image, command, dict(environment or {}), ready, ready_timeout, dict(run_options))

    @pytest.fixture
    def fixture(request: pytest.FixtureRequest) -> Iterator[Container]:
        plugin: Plugin = request.config.stash[_plugin_key]
        cp = plugin.warm_checkpoint(spec, request.fixturename)
        clone = plugin.clone(cp, request.fixturename)
        request.node.stash.setdefault(_clones_key, []).append(clone)
        try:
            yield clone
        finally:
            plugin.discard(clone)

    return fixture


@dataclass
class Stats:
    cold_s: Dict[str, float] = field(default_factory=dict)
    clone_s: Dict[str, List[float]] = field(default_factory=dict)

    def merge(self, data: Mapping[str, Any]) -> None:
        self.cold_s.update(data.get("cold_s", {}))
        for k, v in data.get("clone_s", {}).items():
            self.clone_s.setdefault(k, []).extend(v)


class Plugin:
    """One per pytest process. Under xdist the controller only cleans up and reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.is_worker = hasattr(config, "workerinput")
        self.run_id: str = config.workerinput["dolly_run_id"] if self.is_worker else uuid.uuid4().hex[:12]
        self.owner: str = config.workerinput["dolly_owner"] if self.is_worker else _owner(os.getpid())
        self.state_dir = STATE_ROOT / self.run_id
        self.stats = Stats()
        self._client: Optional[docker.DockerClient] = None
        self._checkpoints: Dict[str, Checkpoint] = {}
        self._reaped = False

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = docker.from_env()
        return self._client

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
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "owner").write_text(self.owner)
        state = self.state_dir / f"{key}.json"
        with FileLock(str(self.state_dir / f"{key}.lock")):
            if state.exists():
                saved = json.loads(state.read_text())
                cp = Checkpoint.load(Path(saved["checkpoint"]))
            else:
                cp, cold = self._make_warm(spec, key)
                state.write_text(json.dumps({"checkpoint": str(cp.path), "cold_s": cold}))
                self.stats.cold_s[fixture_name] = cold
        self._checkpoints[key] = cp
        return cp

    def _make_warm(self, spec: ServiceSpec, key: str) -> tuple[Checkpoint, float]:
        started = time.perf_counter()
        source = self.client.containers.run(
            spec.image,
            spec.command,
            environment=dict(spec.environment),
            detach=True,
            name=f"pytest-{key}-{self.run_id}",
            labels={**dict(spec.run_options.get("labels") or {}), **self.labels},
            **{k: v for k, v in spec.run_options.items() if k != "labels"},
        )
        try:
            if spec.ready is not None:
                _ready.wait(source, spec.ready, timeout=spec.ready_timeout)
            cold = time.perf_counter() - started
            # The source is not needed once checkpointed: stop it, keep it until the run ends.
            return checkpoint(source, "warm", leave_running=False, client=self.client), cold
        except BaseException:
            _remove(self.client, source.id)
            raise

    # --- a clone per test ------------------------------------------------------------------------

    def clone(self, cp: Checkpoint, fixture_name: str) -> Container:
        started = time.perf_counter()
        c = restore(cp, client=self.client)
        self.stats.clone_s.setdefault(fixture_name, []).append(time.perf_counter() - started)
        return c

    def discard(self, container: Container) -> None:
        _remove(self.client, container.id)

    # --- the end of the run ----------------------------------------------------------------------

    def finish(self) -> None:
        """Remove what this run made. Under xdist only the controller does it, after the workers."""
        if self.is_worker:
            self.config.workeroutput["dolly_stats"] = {"cold_s": self.stats.cold_s, "clone_s": self.stats.clone_s}
            return
        if self.state_dir.exists():
            remove_run(self.client, self.run_id)

    def summary(self, terminal: Any) -> None:
        if not self.stats.clone_s:
            return
        terminal.section("dolly warm replicas")
        for name, times in sorted(self.stats.clone_s.items()):
            med = statistics.median(times)
            cold = self.stats.cold_s.get(name)
            line = f"{name}: {len(times)} clone(s), median {med:.2f} s each"
            if cold is not None:
                saved = len(times) * cold - (sum(times) + cold)
                line += (f"; cold start {cold:.2f} s (paid once); a cold start per test would have "
                         f"cost {len(times) * cold:.1f} s: saved {saved:.1f} s")
            terminal.write_line(line)


def _owner(pid: int) -> str:
    """``<pid>:<start time>``: a pid alone could be reused by an unrelated process."""
    return f"{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(owner: str) -> bool:
    pid, _, start = owner.partition(":")
    return pid.isdigit() and _start_time(int(pid)) == start and start != ""


def _remove(client: docker.DockerClient, container_id: str) -> None:
    Engine.of(client).remove(container_id)


def remove_run(client: docker.DockerClient, run_id: str) -> None:
    """Remove every container of a run, the checkpoints Dolly keeps of them, and its state."""
    engine = Engine.of(client)
    for c in client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={run_id}"}):
        engine.remove(c.id)
        shutil.rmtree(engine.store_dir / c.id, ignore_errors=True)
    shutil.rmtree(STATE_ROOT / run_id, ignore_errors=True)


def reap_dead_runs(client: docker.DockerClient) -> List[str]:
    """Remove what runs whose owner process is gone left behind; returns their run IDs."""
    dead = set()
    for c in client.containers.list(all=True, filters={"label": RUN_LABEL}):
        if not _alive(c.labels.get(OWNER_LABEL, "")):
            dead.add(c.labels[RUN_LABEL])
    for state in STATE_ROOT.glob("*/owner") if STATE_ROOT.is_dir() else []:
        if not _alive(state.read_text().strip()):
            dead.add(state.parent.name)
    for run_id in sorted(dead):
        try:
            remove_run(client, run_id)
        except ContainerNotFound:
            pass
    return sorted(dead)


# --- pytest hooks ----------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
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
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    if report.failed:
        for c in item.stash.get(_clones_key, []):
            try:
                text = c.logs(tail=200).decode(errors="replace")
            except docker.errors.DockerException as e:
                text = f"(could not read the log: {e})"
            report.sections.append((f"dolly clone {c.name} log", text or "(empty)"))
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    session.config.stash[_plugin_key].finish()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    config.stash[_plugin_key].summary(terminalreporter)
