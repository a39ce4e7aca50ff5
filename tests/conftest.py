"""Fixtures for Dolly's own tests: a real engine, real CRIU, and nothing left behind.

Every container a test starts carries the label ``dolly.test=<run id>``; clones copy their
source's labels, so they carry it too. After each test, the containers that appeared during it are
removed with their checkpoints; after the session, the engine must look as it did before. Tests
that ask for no engine fixture (pure logic, formats, policies) run without one, and without root.
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Iterator, List

import docker
import pytest
from registries import Registry

import dolly
import dolly.testing
from dolly import ready, trust
from dolly._checkpoint import LAYER_IMAGE_REPOSITORY
from dolly._engine import Engine
from dolly._store import remove_all_of, remove_unused_layer_images  # the main engine's files are here
from engines import IsolatedEngine, SecondEngine, isolated
from helpers import BUSYBOX, COUNTER, ENGINE_B, ENGINE_B_SUBNET, FILES, PYTHON, RUN_ID, STATEFUL, TEST_LABEL, ask

# A Django project with tests of its own, run in a subprocess by tests/test_django.py.
collect_ignore = ["fixtures/django_shop"]

# The fixtures that start or reach a Docker Engine. A test that asks for one of them, directly or
# through the fixtures it asks for, is marked `engine`; the others are `make unit`: no engine, no
# root. A test that reaches an engine some other way is marked by hand.
ENGINE_FIXTURES = frozenset({
    "client", "engine_b", "host_b", "host_c", "host_tls",
    "host_b_engine", "host_c_engine", "host_tls_engine",  # what host_b, host_c and host_tls are clients of
})


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        if ENGINE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)


@pytest.fixture(scope="session")
def client(pytestconfig: pytest.Config) -> Iterator[docker.DockerClient]:
    """The main engine, and at the end of the session a check that the suite left nothing behind
    on it (no containers, networks or checkpoints). Tests that need no engine never start one.
    The warm sources of this session's own Dolly fixtures (tests/test_databases.py) are left out:
    the plugin removes them when the session finishes, after this check."""
    report = dolly.check_host()
    if not report.ok:
        pytest.exit(f"the host is not ready (run `make host`):\n{report}", returncode=3)
    client = docker.from_env()
    engine = Engine.of(client)
    plugin_run = pytestconfig.stash[dolly.testing._plugin_key].run_id
    LAYER_IMAGES_BEFORE.update(engine.image_tags(LAYER_IMAGE_REPOSITORY))
    before = _engine_state(client, engine, plugin_run)
    yield client
    _remove_made(client, engine, set())
    after = _engine_state(client, engine, plugin_run)
    assert after == before, "the test suite left things behind on the engine"


@pytest.fixture(scope="session")
def engine(client: docker.DockerClient) -> Engine:
    return Engine.of(client)


def _engine_state(client: docker.DockerClient, engine: Engine, plugin_run: str) -> dict:
    store = engine.store_dir
    mine = {"label": f"{dolly.testing.RUN_LABEL}={plugin_run}"}
    plugins = {c["Id"] for c in client.api.containers(all=True, filters=mine)}
    return {
        # The low-level list: containers.list() inspects each one, and fails when the plugin's
        # clone pools remove a used clone meanwhile.
        "containers": sorted(c["Id"] for c in client.api.containers(all=True) if c["Id"] not in plugins),
        "networks": sorted(n.id for n in client.networks.list()),
        "checkpoints": sorted(str(p.relative_to(store)) for p in store.glob("*/*")
                              if p.parent.name not in plugins) if store.is_dir() else [],
        "layer images": sorted(set(engine.image_tags(LAYER_IMAGE_REPOSITORY)) - _layer_images_of(engine, plugins)),
        "docker checkpoint folders": sorted(
            str(p) for p in (engine.root_dir / "containers").glob("*/checkpoints/*")
            if p.parent.parent.name not in plugins  # a clone the plugin's pools are restoring
        ),
    }


def _layer_images_of(engine: Engine, container_ids: set) -> set:
    """The shared layer images of the checkpoints of these containers."""
    return {dolly.Checkpoint.load(p).layer_image for cid in container_ids
            for p in (engine.store_dir / cid).glob("*") if (p / "dolly.json").exists()}


def _made(client: docker.DockerClient) -> List[docker.models.containers.Container]:
    return client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={RUN_ID}"})


def _remove_made(client: docker.DockerClient, engine: Engine, keep: set) -> None:
    for c in _made(client):
        if c.id not in keep:
            discard(c, engine)
    _sweep_layer_images(engine)


def discard(container, engine: Engine) -> None:
    """Remove a container and the checkpoints Dolly keeps of it (with their clones' shared layer
    images, once no container uses them)."""
    container.remove(force=True, v=True)
    remove_all_of(engine, container.id)


# The layer images there were before the session: never removed by its clean-ups.
LAYER_IMAGES_BEFORE: set = set()


def _sweep_layer_images(engine: Engine) -> None:
    """Remove the unused layer images this session made (one kept while a clone ran on it when
    its checkpoint was removed)."""
    made = set(engine.image_tags(LAYER_IMAGE_REPOSITORY)) - LAYER_IMAGES_BEFORE
    if made:
        remove_unused_layer_images(engine, only=made)


@pytest.fixture(autouse=True)
def cleanup(request: pytest.FixtureRequest) -> Iterator[None]:
    """Remove what the test made (containers it started, their clones and checkpoints)."""
    if "client" not in request.fixturenames:
        yield
        return
    client = request.getfixturevalue("client")
    engine = request.getfixturevalue("engine")
    before = {c.id for c in _made(client)}
    yield
    _remove_made(client, engine, before)


@pytest.fixture
def run(client: docker.DockerClient):
    """Start a container labelled for cleanup: ``run(image, command, **docker_run_kwargs)``."""

    def start(image: str, command, **kwargs):
        labels = {**kwargs.pop("labels", {}), TEST_LABEL: RUN_ID}
        return client.containers.run(image, command, detach=True, labels=labels, **kwargs)

    return start


@pytest.fixture
def network(client: docker.DockerClient, engine: Engine) -> Iterator:
    """A user-defined bridge network with a subnet of its own, removed after the test."""
    made = []

    def create(subnet: str = "10.213.8.0/24"):
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)])
        net = client.networks.create(f"dolly-test-{uuid.uuid4().hex[:8]}", driver="bridge", ipam=ipam,
                                     labels={TEST_LABEL: RUN_ID})
        made.append(net)
        return net

    yield create
    for net in made:
        net.reload()
        for c in net.containers:
            discard(c, engine)
        net.remove()


@pytest.fixture(scope="session")
def engine_b() -> Iterator[docker.DockerClient]:
    """A second Docker Engine on this machine, as a second host: its own data root, bridge and
    containerd, experimental mode and Dolly's runtime, like `make host` sets up the first."""
    second = SecondEngine(ENGINE_B, experimental=True, subnet=ENGINE_B_SUBNET)
    client = second.start()
    try:
        yield client
    finally:
        second.stop()


@pytest.fixture(scope="session")
def busybox_checkpoint(client: docker.DockerClient) -> Iterator[dolly.Checkpoint]:
    """A real checkpoint of a busybox counter loop, shared by tests that only read it."""
    c = client.containers.run(BUSYBOX, ["sh", "-c", COUNTER], detach=True,
                              labels={TEST_LABEL: RUN_ID}, name=f"dolly-test-bb-{RUN_ID}")
    try:
        yield dolly.checkpoint(c, "shared")
    finally:
        discard(c, Engine.of(client))


@pytest.fixture(scope="module")
def keys():
    """An Ed25519 key pair: (private, public)."""
    return trust.generate_keypair()


@pytest.fixture
def stateful(run):
    """helpers.STATEFUL, ready and asked three times: the container and its last answer."""
    source = run(PYTHON, ["python3", "-c", STATEFUL])
    ready.wait(source, ready.http(8000), timeout=60)
    for _ in range(3):
        before = ask(source)
    return source, before


@pytest.fixture
def source_cp(run):
    """A checkpoint of a container that wrote, changed and deleted files."""
    source = run(BUSYBOX, ["sh", "-c", FILES])
    time.sleep(1)
    return dolly.checkpoint(source, "b")


# --- Engines that behave like other hosts (tests/engines.py, IsolatedEngine) -----------------------
# Their names (hence bridges, sockets, folders) and subnets can be changed, like ENGINE_B's, so that
# two test runs on one machine do not share them.
HOST_B = os.environ.get("DOLLY_TEST_HOST_B", "b")
HOST_B_SUBNET = os.environ.get("DOLLY_TEST_HOST_B_SUBNET", "10.213.111.1/24")
HOST_C = os.environ.get("DOLLY_TEST_HOST_C", "c")
HOST_C_SUBNET = os.environ.get("DOLLY_TEST_HOST_C_SUBNET", "10.213.112.1/24")
HOST_TLS = os.environ.get("DOLLY_TEST_HOST_TLS", "tls")
HOST_TLS_SUBNET = os.environ.get("DOLLY_TEST_HOST_TLS_SUBNET", "10.213.113.1/24")


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[Registry]:
    """Debian's docker-registry on loopback, for one test module."""
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def host_b_engine() -> Iterator[IsolatedEngine]:
    """An engine as on another host (its own mount namespace, files, engine ID, bridge), with
    dolly/busybox and dolly/python, experimental mode and Dolly's runtime."""
    yield from isolated(HOST_B, HOST_B_SUBNET)


@pytest.fixture(scope="session")
def host_b(host_b_engine: IsolatedEngine) -> docker.DockerClient:
    """A client of :func:`host_b_engine`, over its unix socket."""
    return host_b_engine.client


@pytest.fixture(scope="session")
def host_c_engine() -> Iterator[IsolatedEngine]:
    """A third host, like :func:`host_b_engine`."""
    yield from isolated(HOST_C, HOST_C_SUBNET)


@pytest.fixture(scope="session")
def host_c(host_c_engine: IsolatedEngine) -> docker.DockerClient:
    return host_c_engine.client


@pytest.fixture(scope="session")
def host_tls_engine() -> Iterator[IsolatedEngine]:
    """A host like :func:`host_b_engine` that also listens on a loopback address over TCP with
    TLS, client certificates required."""
    yield from isolated(HOST_TLS, HOST_TLS_SUBNET, tcp_tls=True)


@pytest.fixture(scope="session")
def host_tls(host_tls_engine: IsolatedEngine) -> Iterator[docker.DockerClient]:
    """A client of :func:`host_tls_engine` over TCP, verifying the engine's certificate and
    presenting its own."""
    client = host_tls_engine.tls_client()
    try:
        yield client
    finally:
        client.close()
