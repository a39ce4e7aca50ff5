"""dolly.reset on the real engine: the container back at its checkpoint under its own name,
hostname, MAC, published host port and (on a network with a subnet of the user's) address, so
that whoever talks to it keeps talking to it; and the way back when it fails."""
from __future__ import annotations

import dataclasses
import io
import time
import uuid

import pytest

import dolly
from dolly import errors
from helpers import BUSYBOX, PYTHON, RUN_ID, STATEFUL, TEST_LABEL, get_json, kernel_hostname

pytestmark = pytest.mark.engine


def published_port(container) -> str:
    container.reload()
    (binding,) = container.attrs["NetworkSettings"]["Ports"]["8000/tcp"]
    return binding["HostPort"]


def answer(port: str) -> dict:
    """The service's answer through its published host port: the way a client outside sees it."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return get_json("127.0.0.1", int(port))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def served(run, network):
    """A stateful HTTP service on a user-defined network, its port published on a host port
    Docker chose, asked once, then checkpointed: (container, checkpoint, answer at the checkpoint)."""
    net = network("10.213.31.0/24")
    c = run(PYTHON, ["python3", "-c", STATEFUL], network=net.name, ports={"8000/tcp": None})
    at = answer(published_port(c))
    assert at["hits"] == 1
    cp = dolly.checkpoint(c, "warm")
    yield c, cp, at, net
    dolly.remove_checkpoint(cp)


def test_reset_keeps_what_clients_know_and_brings_the_state_back(served):
    c, cp, at, net = served
    port, hostname = published_port(c), c.attrs["Config"]["Hostname"]
    address = c.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
    mac = c.attrs["NetworkSettings"]["Networks"][net.name]["MacAddress"]
    for _ in range(3):
        answer(port)  # the state moves on past the checkpoint: hits 2, 3, 4
    back = dolly.reset(c, cp)
    back.reload()
    assert back.id != c.id and back.name == c.name
    with pytest.raises(docker_not_found()):
        c.reload()
    assert published_port(back) == port
    assert back.attrs["Config"]["Hostname"] == hostname == kernel_hostname(back)
    endpoint = back.attrs["NetworkSettings"]["Networks"][net.name]
    assert (endpoint["IPAddress"], endpoint["MacAddress"]) == (address, mac)
    # The process goes on from the checkpoint: one hit after the checkpoint's, the same token.
    assert answer(port) == {**at, "hits": at["hits"] + 1}
    assert get_json(address, 8000) == {**at, "hits": at["hits"] + 2}


def test_a_reset_container_is_reset_again(served):
    c, cp, at, _ = served
    first = dolly.reset(c, cp)
    port = published_port(first)
    answer(port)
    second = dolly.reset(first, cp)
    assert second.name == c.name and published_port(second) == port
    assert answer(port) == {**at, "hits": at["hits"] + 1}


def test_reset_on_the_default_bridge_keeps_the_name_and_host_port(run):
    c = run(PYTHON, ["python3", "-c", STATEFUL], ports={"8000/tcp": None})
    port = published_port(c)
    at = answer(port)
    cp = dolly.checkpoint(c, "warm")
    try:
        answer(port)
        back = dolly.reset(c.name, cp)
        assert back.name == c.name and published_port(back) == port
        assert answer(port) == {**at, "hits": at["hits"] + 1}
    finally:
        dolly.remove_checkpoint(cp)


def test_a_refused_reset_puts_the_container_back_under_its_name(run, client):
    c = run(PYTHON, ["python3", "-c", STATEFUL], ports={"8000/tcp": None}, cap_add=["SYS_PTRACE"])
    at = answer(published_port(c))
    cp = dolly.checkpoint(c, "warm")
    try:
        # The same checkpoint, as if imported from a bundle whose importer allowed nothing (an added
        # capability is refused): the refusal comes once the container has been set aside, so the
        # way back is taken.
        refused = dataclasses.replace(cp, origin={"bundle_id": "b" * 64, "signer": None, "source": "elsewhere",
                                                  "allowed": []})
        with pytest.raises(errors.PolicyRefused):
            dolly.reset(c, refused)
        name = c.name
        c.reload()
        assert c.name == name and client.containers.get(name).id == c.id
        assert c.status == "exited"
        assert dolly.list_checkpoints(c) == [cp]
        # The checkpoint still resets it. Stopped, it held no host port: Docker gives a new one, as
        # a `docker start` would.
        back = dolly.reset(c, cp)
        assert back.name == c.name and answer(published_port(back)) == {**at, "hits": at["hits"] + 1}
    finally:
        dolly.remove_checkpoint(cp)


def test_reset_refuses_another_checkpoint_s_container(served, run):
    _, cp, _, _ = served
    other = run(PYTHON, ["sleep", "600"])
    with pytest.raises(errors.InvalidArgument, match="neither checkpointed"):
        dolly.reset(other, cp)
    other.reload()
    assert other.status == "running" and other.name == other.attrs["Name"].lstrip("/")


def docker_not_found():
    import docker.errors

    return docker.errors.NotFound


def test_reset_on_a_network_without_a_subnet_of_the_user_s(run, client):
    # Docker refuses a fixed address there: the container that replaces it takes the next free one.
    net = client.networks.create(f"dolly-test-auto-{uuid.uuid4().hex[:8]}", driver="bridge",
                                 labels={TEST_LABEL: RUN_ID})
    try:
        c = run(PYTHON, ["python3", "-c", STATEFUL], network=net.name, ports={"8000/tcp": None})
        port = published_port(c)
        at = answer(port)
        cp = dolly.checkpoint(c, "warm")
        try:
            back = dolly.reset(c, cp)
            back.reload()
            assert back.name == c.name and published_port(back) == port
            assert back.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
            assert answer(port) == {**at, "hits": at["hits"] + 1}
            back.remove(force=True)
        finally:
            dolly.remove_checkpoint(cp)
    finally:
        net.remove()


def test_labels_never_lead_a_lookup_to_another_container_s_checkpoint(run, client):
    """Image labels become container labels: an image carrying Dolly's restore labels must not make
    ``get_checkpoint(web, "warm")`` (what ``dolly restore/clone/reset web warm`` call) answer with
    another container's checkpoint. After a reset, the name finds its checkpoint through what Dolly
    recorded at the checkpoint (the removed container's name), never through labels."""
    victim = run(BUSYBOX, ["sleep", "600"], name=f"dolly-test-db-{uuid.uuid4().hex[:8]}")
    cp = dolly.checkpoint(victim, "warm")
    tag = f"dolly-test-labelled:{uuid.uuid4().hex[:8]}"
    dockerfile = f"FROM {BUSYBOX}\nLABEL dolly.source={victim.id} dolly.checkpoint=warm\n"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, labels={TEST_LABEL: RUN_ID}, rm=True)
    try:
        web = run(tag, ["sleep", "600"], name=f"dolly-test-web-{uuid.uuid4().hex[:8]}")
        with pytest.raises(errors.CheckpointNotFound):
            dolly.get_checkpoint(web.name, "warm")
        with pytest.raises(errors.CheckpointNotFound):
            dolly.get_checkpoint(web, "warm")
        # The victim's own name still finds it, and so does its name once a reset replaced it.
        assert dolly.get_checkpoint(victim.name, "warm") == cp
        back = dolly.reset(victim, cp)
        assert dolly.get_checkpoint(back.name, "warm") == cp
    finally:
        for c in client.containers.list(all=True, filters={"ancestor": tag}):
            c.remove(force=True)
        client.images.remove(tag, force=True)
        dolly.remove_checkpoint(cp)
