"""The agent ships itself (issue 23): Dolly's agent runs ``dolly/agent:<version>``, an image made of
this installation's Dolly and its dependencies (dolly/_hosts/agent_image.py), put through the
engine API on an engine that lacks it, with nothing of the caller's host mounted.

Real engines only: the main engine, and engines in mount namespaces of their own
(tests/engines.py IsolatedEngine): one with dolly/busybox only, one prepared without this
checkout (an empty tmpfs over it and over the Python this process runs on). And a user who is not
root: nobody, with and without the socket's group.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

import docker
import pytest

import dolly
from dolly import errors, ready, trust
from dolly._engine import Engine
from dolly._hosts import agent_image
from dolly._hosts.agent import LABEL
from dolly._hosts.channel import Channel
from engines import IsolatedEngine, isolated
from helpers import BUSYBOX, COUNTER, PYTHON, RUN_ID, STATEFUL, TEST_LABEL, ask, assert_counts_on, read_int

NOBODY = 65534
BARE_SUBNET = os.environ.get("DOLLY_TEST_BARE_SUBNET", "10.213.121.1/24")
ELSEWHERE_SUBNET = os.environ.get("DOLLY_TEST_ELSEWHERE_SUBNET", "10.213.122.1/24")


# --- what the image is made of (no engine) ---------------------------------------------------------


def test_the_image_ships_this_dolly_and_what_it_runs_on():
    paths = {f.path for f in agent_image.shipped()}
    package = Path(dolly.__file__).resolve().parent
    assert {p.relative_to(package.parent).as_posix() for p in package.rglob("*.py")
            if "__pycache__" not in p.parts} <= paths
    for needed in ("dolly/_hosts/serve.py", "dolly/py.typed", "docker/__init__.py", "requests/__init__.py",
                   "cryptography/__init__.py", "zstandard/__init__.py", "google/protobuf/__init__.py",
                   "backports/tarfile/__init__.py", "pycriu/__init__.py", "pycriu/images/core_pb2.py"):
        assert needed in paths, needed
    assert not [p for p in paths if p.endswith(".pyc") or "__pycache__" in p or "/tests/" in p or "/test/" in p]
    assert not [p for p in paths if p.startswith(("pytest", "_pytest", "mypy", "numpy"))], "test-only packages"
    assert not [p for p in paths if "__editable__" in p]
    assert re.fullmatch(re.escape(dolly.__version__) + r"-[0-9a-f]{12}", agent_image.version())
    assert agent_image.reference() == f"dolly/agent:{agent_image.version()}"


def test_any_changed_byte_or_mode_is_another_version(tmp_path, monkeypatch):
    shipped = tmp_path / "m.py"
    shipped.write_text("x = 1\n")
    monkeypatch.setattr(agent_image, "shipped", lambda: (agent_image.Shipped("m.py", shipped, False),))
    digest = agent_image.content_digest.__wrapped__  # not the process's cached one
    first = digest()
    assert digest() == first
    shipped.write_text("x = 2\n")
    assert digest() != first
    second = digest()
    monkeypatch.setattr(agent_image, "shipped", lambda: (agent_image.Shipped("m.py", shipped, True),))
    assert digest() not in (first, second)


# --- getting it onto an engine ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare(client):
    """An engine as on another host that has dolly/busybox only: no dolly/python, no agent image."""
    yield from isolated(f"bare{RUN_ID[:4]}", BARE_SUBNET, images=(BUSYBOX,))


def _without_agent(client: docker.DockerClient, *images: str) -> None:
    """No agent on that engine, and none of ``images`` (the agent's image, dolly/python)."""
    engine = Engine.of(client)
    Channel.of(engine).agent.remove()
    for c in client.containers.list(all=True, filters={"label": LABEL}):
        c.remove(force=True)
    for image in images:
        if engine.has_image(image):
            client.images.remove(image, force=True)


def _agent_of(client: docker.DockerClient) -> dict:
    (row,) = client.api.containers(filters={"label": LABEL})
    return client.api.inspect_container(row["Id"])


def _main_image(client: docker.DockerClient) -> str:
    """The agent image on the main engine, made there if it lacks it."""
    main = Engine.of(client)
    found = agent_image.inspect(main)
    return str(found["Id"]) if found else agent_image.build(main)


def _assert_runs_its_own_image(attrs: dict, image_id: str) -> None:
    """The agent's container runs this image with nothing of this process's host bound in."""
    assert attrs["Image"] == image_id
    binds = attrs["HostConfig"]["Binds"]
    caller = (*IsolatedEngine.checkout_paths(), sys.prefix, "/usr", "/root", "/home")
    assert len(binds) == 4 and not [b for b in binds if b.split(":")[0].startswith(caller)], binds
    assert f"PYTHONPATH={agent_image.PREFIX}" in attrs["Config"]["Env"]


def test_an_engine_lacking_the_image_gets_a_copy_of_the_one_made_here(client, bare):
    """Neither the image nor dolly/python there: the first use of its agent copies the main
    engine's image over the API; removed, it is copied again, the same image by ID."""
    target = Engine.of(bare.client)
    ref = agent_image.reference()
    _without_agent(bare.client, ref, agent_image.BASE)
    made = _main_image(client)
    for _ in range(2):
        assert not target.has_image(ref) and not target.has_image(agent_image.BASE)
        assert dolly.list_checkpoints(client=bare.client) == []  # the agent runs
        assert target.image_id(ref) == made
        assert not target.has_image(agent_image.BASE)  # the image came whole, not made there
        _assert_runs_its_own_image(_agent_of(bare.client), made)
        _without_agent(bare.client, ref)
    # And it works: a checkpoint there, cloned there.
    source = bare.client.containers.run(BUSYBOX, ["sh", "-c", COUNTER], detach=True, labels={TEST_LABEL: RUN_ID})
    try:
        time.sleep(0.5)
        before = read_int(source)
        cp = dolly.checkpoint(source.id, "copied", client=bare.client)
        (clone,) = dolly.clone(cp, 1)
        assert_counts_on(clone, before)
        assert target.image_id(ref) == made
        clone.remove(force=True)
        dolly.remove_checkpoint(cp)
    finally:
        source.remove(force=True)


def test_an_engine_with_dolly_python_and_no_provider_makes_its_own(client, bare):
    target = Engine.of(bare.client)
    ref = agent_image.reference()
    _without_agent(bare.client, ref)
    target.ensure_image(Engine.of(client).image_id(agent_image.BASE), agent_image.BASE, source=Engine.of(client))
    made = agent_image.ensure(target, providers=[])
    assert made["Config"]["Labels"][agent_image.VERSION_LABEL] == agent_image.version()
    assert made["Config"]["Labels"]["dolly.agent.content"] == agent_image.content_digest()
    assert not bare.client.containers.list(all=True, filters={"name": agent_image.BUILDER})
    assert dolly.list_checkpoints(client=bare.client) == []
    _assert_runs_its_own_image(_agent_of(bare.client), made["Id"])


def test_no_image_and_nothing_to_make_it_on_is_said_so(client, bare):
    target = Engine.of(bare.client)
    _without_agent(bare.client, agent_image.reference(), agent_image.BASE)
    with pytest.raises(errors.HostNotReady, match=r"dolly/python.*make host") as info:
        agent_image.ensure(target, providers=[])
    assert agent_image.reference() in str(info.value)


def test_an_agent_image_whose_python_does_not_run_is_said_so(client, bare):
    """The agent's image is something without /usr/bin/python3 (dolly/busybox under its name): not
    an unexplained exit code, but what could not run, and what to do."""
    ref = agent_image.reference()
    _without_agent(bare.client, ref)
    bare.client.images.get(BUSYBOX).tag(*ref.split(":"))
    try:
        with pytest.raises(errors.HostNotReady, match=r"cannot run /usr/bin/python3 -I -S: /usr/bin/python3 is "
                                                      r"not .*\(exit 12[67]\).*remove the image") as info:
            dolly.list_checkpoints(client=bare.client)
        assert "agent" in str(info.value)
    finally:
        _without_agent(bare.client, ref)


# --- a second host prepared without this repository ------------------------------------------------


@pytest.fixture(scope="module")
def elsewhere(client):
    """An engine as on another host where this checkout, this virtualenv and the Python it was made
    from are not: empty folders in their place (dolly/busybox and dolly/python are copied in)."""
    yield from isolated(f"nock{RUN_ID[:4]}", ELSEWHERE_SUBNET, hide_checkout=True)


def _service(run, **labels: str):
    source = run(PYTHON, ["python3", "-c", STATEFUL], labels=labels)
    ready.wait(source, ready.http(8000), timeout=60)
    for _ in range(3):
        before = ask(source)
    return source, before


def _assert_continues(container, at_checkpoint: dict) -> None:
    """The service answers from the state it had when it was checkpointed: the same token (its
    memory, and the file it wrote at start-up) and one more request than it had served."""
    after = ask(container)
    assert (after["token"], after["hits"]) == (at_checkpoint["token"], at_checkpoint["hits"] + 1), after
    assert container.exec_run(["cat", "/var/tmp/born"]).output.decode() == at_checkpoint["token"]


def test_the_second_host_has_no_checkout(elsewhere):
    assert elsewhere.hidden and str(Path(__file__).resolve().parent.parent) in elsewhere.hidden
    for path in elsewhere.hidden:
        listed = elsewhere.client.containers.run(BUSYBOX, ["ls", "-A", "/x"], volumes=[f"{path}:/x:ro"],
                                                 remove=True, network_mode="none")
        assert listed == b"", f"{path} is there on the second host"
    assert not Engine.of(elsewhere.client).files_are_local()


def test_migrate_clone_and_pull_onto_a_host_without_the_checkout(client, run, elsewhere, registry, keys):
    target = elsewhere.client
    # migrate: main engine -> that host, its memory and files with it
    source, before = _service(run)
    moved = dolly.migrate(source, target).container
    assert moved.client is target
    _assert_continues(moved, before)
    _assert_runs_its_own_image(_agent_of(target), Engine.of(target).image_id(agent_image.reference()))
    # clone there, of a checkpoint taken there
    at_checkpoint = ask(moved)
    cp = dolly.checkpoint(moved.id, "there", client=target)
    clones = dolly.clone(cp, 2)
    assert {c.client for c in clones} == {target}
    for c in clones:
        _assert_continues(c, at_checkpoint)
    assert len({c.attrs["Config"]["Hostname"] for c in clones}) == 2
    # pull from a registry into it
    private, public = keys
    pushed_source, pushed = _service(run)
    ref = f"{registry.address}/dolly-test/{secrets.token_hex(4)}:v1"
    dolly.push(dolly.checkpoint(pushed_source, "pushed"), ref, signer=private)
    pulled = dolly.pull(ref, client=target, trusted_keys=[public])
    assert pulled.client is target and pulled.origin["signer"] == trust.key_id(public)
    (clone,) = dolly.clone(pulled, 1)
    assert clone.client is target
    _assert_continues(clone, pushed)


# --- a user who is not root -------------------------------------------------------------------------


@pytest.fixture
def nobody_home():
    """A home of nobody's own (0700), for its secret and state."""
    home = Path(tempfile.mkdtemp(prefix="dolly-nobody-"))
    os.chown(home, NOBODY, NOBODY)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _as_nobody(home: Path, script: str, *args: str, groups: tuple = ()) -> subprocess.CompletedProcess:
    """``script`` run by nobody (uid and gid 65534; with ``groups``, also in those), with Dolly and
    its dependencies from this installation, and no environment but a home of its own."""
    (home / "script.py").write_text(script)
    os.chown(home / "script.py", NOBODY, NOBODY)
    paths = dict.fromkeys([str(Path(dolly.__file__).resolve().parent.parent), sysconfig.get_paths()["purelib"],
                           sysconfig.get_paths()["platlib"]])
    env = {"HOME": str(home), "XDG_STATE_HOME": str(home / "state"), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": ":".join(paths), "PYTHONDONTWRITEBYTECODE": "1"}
    who = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
           f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups", "--"]
    return subprocess.run([*who, _python_for_nobody(who, env), str(home / "script.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=home)


def _python_for_nobody(who: list, env: dict) -> str:
    """This process's Python if nobody may run it, else the system's of the same version (a
    virtualenv made from a Python in root's home is not nobody's to run)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        done = subprocess.run([*who, candidate, "-c", "import sys; print(sys.version_info[:2])"], env=env,
                              capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == str(tuple(sys.version_info[:2])):
            return candidate
    pytest.skip("no Python of this version that nobody may run")


_CHECKPOINT_AND_CLONE = """
import json, sys
import docker
import dolly
from dolly._engine import Engine
from dolly._hosts.agent import agent_name
client = docker.from_env()
out = {"files_are_local": Engine.of(client).files_are_local(), "agent": agent_name()}
cp = dolly.checkpoint(sys.argv[1], "by-nobody", client=client)
(clone,) = dolly.clone(cp, 1)
out["clone"] = clone.id
print(json.dumps(out))
"""


def test_a_user_in_the_socket_s_group_checkpoints_and_clones_through_the_agent(client, run, nobody_home):
    """Not root, so the engine's files are not this user's to see: Dolly drives the main engine
    through an agent of that user's own (its own secret, hence its own name)."""
    socket_gid = os.stat("/var/run/docker.sock").st_gid
    mine = {"dolly-test.prune-owner": uuid.uuid4().hex}
    source, before = _service(run, **mine)
    done = _as_nobody(nobody_home, _CHECKPOINT_AND_CLONE, source.id, groups=(socket_gid,))
    out = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    try:
        assert out is not None, done.stderr[-3000:]
        assert out["files_are_local"] is False
        clone = client.containers.get(out["clone"])
        _assert_continues(clone, before)
        agent = client.api.inspect_container(out["agent"])
        _assert_runs_its_own_image(agent, Engine.of(client).image_id(agent_image.reference()))
        # The checkpoint records who took it, though the agent (root) wrote it; root's prune,
        # asked for every checkpoint of this source, keeps it unless asked for all users too.
        cp = dolly.get_checkpoint(source.id, "by-nobody")
        assert cp.made_by is not None and cp.made_by.uid == NOBODY
        kept = dolly.prune(all_containers=True, labels=mine, dry_run=True)
        assert kept.checkpoints == () and kept.others == 1
        assert cp in dolly.prune(all_containers=True, labels=mine, dry_run=True, all_users=True).checkpoints
    finally:
        for c in client.containers.list(all=True, filters={"label": LABEL}):
            if out is not None and c.name == out["agent"]:
                c.remove(force=True)  # nobody's agent: not left on the main engine


_LIST = """
import dolly
try:
    dolly.list_checkpoints()
except Exception as e:
    print(type(e).__name__, isinstance(e, dolly.DollyError), str(e))
"""


def test_a_user_without_the_socket_gets_a_dolly_error(client, nobody_home):
    done = _as_nobody(nobody_home, _LIST)
    assert done.returncode == 0, done.stderr[-3000:]
    _, is_dolly, message = done.stdout.strip().split(" ", 2)
    assert is_dolly == "True" and "Permission denied" in message, done.stdout


def test_a_user_without_the_socket_is_told_what_is_needed(client, nobody_home):
    done = _as_nobody(nobody_home, _LIST)
    assert "docker group" in done.stdout and "/var/run/docker.sock" in done.stdout, done.stdout
