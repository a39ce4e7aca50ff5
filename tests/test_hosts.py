"""The engines that stand in for other hosts (tests/engines.py, IsolatedEngine) are what they claim:
their own engine IDs, files this process cannot see, containers reachable at their addresses, TCP
with verified TLS, and working CRIU inside them. Real engines, real containers."""
from __future__ import annotations

import contextlib
import http.client
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import docker
import pytest
import requests

from dolly._engine import Engine
from helpers import BUSYBOX, COUNTER, PYTHON, read_int


@pytest.fixture
def started():
    """``started(client, command, image=BUSYBOX, **kwargs)``: a detached container on that
    engine, removed after the test."""
    made = []

    def run(client: docker.DockerClient, command, image: str = BUSYBOX, **kwargs):
        container = client.containers.run(image, command, detach=True, **kwargs)
        made.append(container)
        return container

    yield run
    for container in made:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True, v=True)


def test_each_host_has_its_own_engine_id(client, host_b, host_c, host_b_engine):
    main, b, c = (x.info() for x in (client, host_b, host_c))
    assert len({main["ID"], b["ID"], c["ID"]}) == 3, (main["ID"], b["ID"], c["ID"])
    # From its own /etc/docker/key.json, which dockerd made in the folder bound over /etc/docker.
    assert (host_b_engine.base / "etc" / "key.json").is_file()
    # The same path names as the main engine's, for other files.
    assert b["DockerRootDir"] == c["DockerRootDir"] == main["DockerRootDir"] == "/var/lib/docker"


@pytest.mark.engine  # its engine fixture comes by name, at run time
@pytest.mark.parametrize("host", ["host_b_engine", "host_c_engine"])
def test_data_root_is_not_this_process_s(request, started, host):
    engine = request.getfixturevalue(host)
    root = engine.client.info()["DockerRootDir"]
    marker = f"dolly-test-marker-{uuid.uuid4().hex}"
    writer = started(engine.client, ["sh", "-c", f"echo here > /data/{marker}"],
                     volumes={root: {"bind": "/data", "mode": "rw"}})
    assert writer.wait(timeout=30)["StatusCode"] == 0, writer.logs()
    # The engine sees it in its data root ...
    reader = started(engine.client, ["cat", f"/data/{marker}"], volumes={root: {"bind": "/data", "mode": "ro"}})
    assert reader.wait(timeout=30)["StatusCode"] == 0, reader.logs()
    assert reader.logs().decode().strip() == "here"
    # ... this process does not, at the same path: that is the main engine's data root.
    assert not (Path(root) / marker).exists()
    # (Behind the scenes it is in the folder bound over /var/lib/docker in the engine's namespace.)
    assert (engine.data_root / marker).read_text().strip() == "here"
    (engine.data_root / marker).unlink()


def test_images_run_on_host_b(host_b):
    assert host_b.containers.run(BUSYBOX, ["echo", "busybox here"], remove=True).decode().strip() == "busybox here"
    out = host_b.containers.run(PYTHON, ["python3", "-c", "print('python here')"], remove=True)
    assert out.decode().strip() == "python here"


def test_container_on_host_b_is_reachable_from_here(host_b, host_b_engine, started):
    token = uuid.uuid4().hex
    server = started(host_b, ["sh", "-c", f"mkdir /www && echo {token} > /www/index.html && httpd -f -p 8080 -h /www"])
    server.reload()
    ip = server.attrs["NetworkSettings"]["IPAddress"]
    assert ip.startswith(host_b_engine.subnet.rsplit(".", 1)[0] + "."), ip  # on its own bridge
    deadline = time.monotonic() + 10
    while True:
        conn = http.client.HTTPConnection(ip, 8080, timeout=2)
        try:
            conn.request("GET", "/index.html")
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read().decode().strip() == token
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        finally:
            conn.close()


def test_tls_host_answers_over_tcp_with_verified_tls(host_tls, host_tls_engine):
    assert host_tls.api.base_url.startswith("https://127.0.0.")
    assert host_tls.api.verify == host_tls_engine.tls_files["ca"]  # our CA, not the system's
    assert host_tls.version()["Version"]
    assert host_tls.info()["ID"] == host_tls_engine.client.info()["ID"]


def test_tls_host_refuses_a_client_without_a_certificate(host_tls_engine):
    anonymous = host_tls_engine.tls_client(client_cert=False)
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        anonymous.version()
    anonymous.close()
    # Nor does it speak plain HTTP.
    plain = docker.DockerClient(base_url=host_tls_engine.tcp_url, version=host_tls_engine.client.api.api_version)
    with pytest.raises(docker.errors.APIError, match="HTTPS"):
        plain.version()
    plain.close()


def test_files_are_local_only_for_the_main_engine(client, host_b, host_tls):
    assert Engine.of(client).files_are_local()
    assert not Engine.of(host_b).files_are_local()  # a unix socket, but dockerd is in another mount namespace
    assert not Engine.of(host_tls).files_are_local()  # TCP


def _checkpoint(client: docker.DockerClient, container_id: str, name: str, *, exit: bool) -> None:
    res = client.api._post_json(client.api._url("/containers/{0}/checkpoints", container_id),
                                data={"CheckpointID": name, "Exit": exit})
    assert res.status_code == 201, f"checkpoint {name} failed: {res.status_code} {res.text}"


def test_criu_checkpoint_inside_host_b(host_b, started):
    """Plain Docker API calls, no Dolly: CRIU works in the isolated engine."""
    counter = started(host_b, ["sh", "-c", COUNTER])
    time.sleep(1)
    _checkpoint(host_b, counter.id, "c1", exit=False)
    listed = host_b.api._result(host_b.api._get(host_b.api._url("/containers/{0}/checkpoints", counter.id)), True)
    assert [cp["Name"] for cp in listed] == ["c1"]
    counter.reload()
    assert counter.status == "running"
    before = read_int(counter)
    time.sleep(0.5)
    assert read_int(counter) > before


def test_criu_restore_inside_host_b(host_b, started):
    counter = started(host_b, ["sh", "-c", COUNTER])
    time.sleep(1)
    _checkpoint(host_b, counter.id, "c2", exit=True)
    counter.reload()
    assert counter.status == "exited"
    at_checkpoint = max(int(x) for x in counter.logs().decode().split() if x.isdigit())
    res = host_b.api._post(host_b.api._url("/containers/{0}/start", counter.id), params={"checkpoint": "c2"})
    host_b.api._raise_for_status(res)
    counter.reload()
    assert counter.status == "running"
    now = read_int(counter)
    assert now >= at_checkpoint - 1
    time.sleep(0.5)
    assert read_int(counter) > now
    logged = [int(x) for x in counter.logs().decode().split() if x.isdigit()]
    assert logged.count(1) == 1, "the counter started over instead of going on"
    assert max(logged) > at_checkpoint


def test_criu_checkpoint_from_host_b_restores_on_host_c(host_b, host_c, host_b_engine, host_c_engine, started):
    """A checkpoint taken on one host starts a new container on another (the folder carried
    over behind the engines' backs, through their data roots as this process reaches them)."""
    source = started(host_b, ["sh", "-c", COUNTER])
    time.sleep(1)
    _checkpoint(host_b, source.id, "moved", exit=True)
    at_checkpoint = max(int(x) for x in source.logs().decode().split() if x.isdigit())
    target = host_c.containers.create(BUSYBOX, ["sh", "-c", COUNTER])
    try:
        shutil.copytree(host_b_engine.data_root / "containers" / source.id / "checkpoints" / "moved",
                        host_c_engine.data_root / "containers" / target.id / "checkpoints" / "moved")
        res = host_c.api._post(host_c.api._url("/containers/{0}/start", target.id), params={"checkpoint": "moved"})
        assert res.status_code == 204, f"restore on host_c failed: {res.status_code} {res.text}"
        time.sleep(0.5)
        logged = [int(x) for x in target.logs().decode().split() if x.isdigit()]
        assert logged and min(logged) >= at_checkpoint - 1, "the counter started over on host_c"
        assert read_int(target) > at_checkpoint
    finally:
        target.remove(force=True, v=True)


@pytest.mark.engine
def test_criu_keeps_its_kernel_probes_between_runs(tmp_path):
    """CRIU keeps its kernel probes in /run/criu.kdat, which only a tmpfs /run held: on a host
    whose /run is no tmpfs (this one) every dump and restore probed the kernel again, some 30 ms
    and a dozen forks of iptables. Patch 0004 keeps the cache anywhere, bound to the boot."""
    subprocess.run(["criu", "check"], check=True, capture_output=True)
    assert Path("/run/criu.kdat").stat().st_size > 0
    assert not list(Path("/run").glob("criu.kdat*.tmp")), "a temporary cache file was left behind"
    subprocess.run(["criu", "check", "-v4", "-W", str(tmp_path), "-o", "check.log"], check=True,
                   capture_output=True)
    assert "Loaded kdat cache from /run/criu.kdat" in (tmp_path / "check.log").read_text()
