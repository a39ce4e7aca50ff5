"""The Host contract: the same observable behaviour from every implementation of
:class:`dolly._hosts.base.Host`.

Each test runs on three hosts: the in-memory :class:`fakes.FakeHost` (no engine: part of `make
unit`), :class:`LocalHost` of the main engine, and :class:`AgentHost` of host b, an engine in a
mount namespace of its own reached through Dolly's agent (both marked ``engine``). A difference
between them is a bug in one of them, or in the fake the unit tests stand on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from docker.models.containers import Container
from fakes import FakeEngine

from dolly import errors, policy
from dolly._bundle import Staged
from dolly._checkpoint import Checkpoint
from dolly._dump import DEFAULT_MAX_LAYER_BYTES
from dolly._engine import Engine
from dolly._hosts import Host, host_of
from dolly._hosts.local import LocalHost
from dolly._hosts.remote import AgentHost
from dolly._manifest import DEFAULT_MAX_BYTES, parse_manifest
from dolly._start import LABEL_CHECKPOINT, LABEL_SOURCE, CloneRequest, Identity
from helpers import BUSYBOX, RUN_ID, TEST_LABEL

LOOP = "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done"
# Every container a test starts carries it, with a value of its own per test; clones inherit it.
CONTRACT = "dolly-contract.test"


@dataclasses.dataclass
class Side:
    """One host under the contract, and how a test acts on its engine."""

    kind: str
    host: Host
    start: Callable[[], Container]  # a running busybox loop, labelled for this test, freshly inspected
    labelled: Callable[[str, str], List[str]]  # the IDs of the engine's containers labelled key=value
    remove: Callable[[Container], None]  # remove a container (force)
    started: List[str] = dataclasses.field(default_factory=list)
    staged: List[Staged] = dataclasses.field(default_factory=list)


@pytest.fixture(params=["fake", pytest.param("local", marks=pytest.mark.engine),
                        pytest.param("agent", marks=pytest.mark.engine)])
def side(request: pytest.FixtureRequest) -> Iterator[Side]:
    tag = uuid.uuid4().hex[:12]
    if request.param == "fake":
        engine = FakeEngine("contract")

        def start_fake() -> Container:
            c = engine.run(BUSYBOX, ["sh", "-c", LOOP], labels={CONTRACT: tag}, memory={"i": 7},
                           files={"/tmp/n": "7"})
            made.started.append(str(c.id))
            return c

        made = Side("fake", engine.host, start_fake, lambda k, v: [str(c.id) for c in engine.labelled(k, v)],
                    lambda c: engine.remove(str(c.id)))
        yield made
        return

    client = request.getfixturevalue("client" if request.param == "local" else "host_b")
    host = host_of(Engine.of(client))
    assert isinstance(host, LocalHost if request.param == "local" else AgentHost)

    def start_real() -> Container:
        c = client.containers.run(BUSYBOX, ["sh", "-c", LOOP], detach=True, labels={TEST_LABEL: RUN_ID, CONTRACT: tag})
        made.started.append(str(c.id))
        c.reload()
        return c

    def labelled(key: str, value: str) -> List[str]:
        return [str(c.id) for c in client.containers.list(all=True, filters={"label": f"{key}={value}"})]

    made = Side(request.param, host, start_real, labelled, lambda c: c.remove(force=True))
    try:
        yield made
    finally:
        for staged in made.staged:
            host.discard_import(staged)
        for c in client.containers.list(all=True, filters={"label": f"{CONTRACT}={tag}"}):
            c.remove(force=True, v=True)
            host.remove_all_of(str(c.id))
        for cid in made.started:
            host.remove_all_of(cid)


def take(side: Side, c: Container, name: str = "contract", *, leave_running: bool = True) -> Checkpoint:
    return side.host.checkpoint(c, name, leave_running=leave_running, max_layer_bytes=DEFAULT_MAX_LAYER_BYTES)


def exported(side: Side, cp: Checkpoint) -> Tuple[Dict[str, Any], List[Tuple[str, int, bytes]]]:
    """The manifest and the members of ``cp``'s bundle, read whole."""
    with side.host.export_members(cp, expires_in=timedelta(hours=1), lineage=None,
                                  max_bytes=DEFAULT_MAX_BYTES) as (manifest, members):
        return manifest, [(name, size, data.read()) for name, size, data in members]


def stage(side: Side, manifest: Dict[str, Any], members: List[Tuple[str, int, bytes]]) -> Staged:
    """The members staged as a copy between the caller's own engines (as a transfer stages them)."""
    staged = side.host.stage_import(manifest, None, ((n, s, io.BytesIO(d)) for n, s, d in members),
                                    allowed=policy.ALL, max_bytes=None, between_own_engines=True, rebuild=False)
    side.staged.append(staged)
    return staged


def test_a_checkpoint_is_listed_and_got_as_its_container_was(side):
    c = side.start()
    before = datetime.now(UTC)
    cp = take(side, c)
    after = datetime.now(UTC)
    assert (cp.container_id, cp.container_name, cp.name) == (c.id, c.name, "contract")
    assert cp.hostname == c.attrs["Config"]["Hostname"]
    assert before <= cp.created_at <= after
    assert cp.origin is None and cp.client is side.host.engine.client
    assert cp.image_id == c.attrs["Image"]
    assert cp.config["Id"] == c.id
    assert cp.config["Config"]["Labels"] == c.attrs["Config"]["Labels"]
    assert cp.config["Config"]["Cmd"] == ["sh", "-c", LOOP]
    assert cp.config["State"]["StartedAt"] == c.attrs["State"]["StartedAt"]
    (listed,) = side.host.list_checkpoints(c)
    assert listed == cp and side.host.list_checkpoints(str(c.id)) == [cp]
    assert cp in side.host.list_checkpoints(None)
    for ref in (c, c.id, c.name):
        got = side.host.get_checkpoint(ref, "contract")
        assert got == cp and got.config["Id"] == c.id and got.size == listed.size


def test_a_missing_checkpoint_or_container_is_not_found(side):
    c = side.start()
    take(side, c)
    with pytest.raises(errors.CheckpointNotFound):
        side.host.get_checkpoint(c.id, "no-such-checkpoint")
    with pytest.raises(errors.ContainerNotFound):
        side.host.get_checkpoint("f" * 64, "contract")
    with pytest.raises(errors.ContainerNotFound):
        side.host.list_checkpoints("no-such-container-" + uuid.uuid4().hex[:8])


def test_a_removed_checkpoint_is_gone_and_cannot_be_removed_again(side):
    c = side.start()
    cp = take(side, c)
    side.host.remove_checkpoint(cp)
    with pytest.raises(errors.CheckpointNotFound):
        side.host.get_checkpoint(c.id, "contract")
    assert side.host.list_checkpoints(c.id) == []
    with pytest.raises(errors.CheckpointNotFound):
        side.host.remove_checkpoint(cp)


def test_a_second_checkpoint_of_one_name_is_refused(side):
    c = side.start()
    cp = take(side, c)
    with pytest.raises(errors.CheckpointExists):
        take(side, c)
    assert side.host.list_checkpoints(c.id) == [cp]


def test_a_removed_container_s_checkpoints_are_found_by_its_id_and_name(side):
    c = side.start()
    cp = take(side, c)
    side.remove(c)
    assert side.host.list_checkpoints(c.id) == [cp]
    assert side.host.get_checkpoint(c.name, "contract") == cp
    assert side.host.get_checkpoint(c.id[:12], "contract") == cp


def test_clones_with_explicit_names_are_labelled_with_their_checkpoint(side):
    c = side.start()
    cp = take(side, c)
    prefix = f"contract-{uuid.uuid4().hex[:8]}"
    created: List[str] = []
    running: List[str] = []
    request = CloneRequest((f"{prefix}-a", f"{prefix}-b"), True, prefix, {"extra": "yes"}, 2)
    made = side.host.start_clones(cp, request, on_create=created.append, progress=lambda x: running.append(x.id))
    assert [x.name for x in made] == [f"{prefix}-a", f"{prefix}-b"]
    assert sorted(created) == sorted(running) == sorted(x.id for x in made)
    for clone in made:
        assert clone.status == "running"
        assert clone.id != c.id
        labels = clone.attrs["Config"]["Labels"]
        assert (labels[LABEL_SOURCE], labels[LABEL_CHECKPOINT], labels["extra"]) == (c.id, "contract", "yes")
        assert labels[CONTRACT] == c.labels[CONTRACT]  # the source's own labels are inherited
    assert sorted(side.labelled(LABEL_SOURCE, str(c.id))) == sorted(x.id for x in made)


def test_a_clone_given_an_identity_to_keep_takes_it(side):
    c = side.start()
    cp = take(side, c)
    name = f"contract-{uuid.uuid4().hex[:8]}"
    keep = Identity(f"kept-{uuid.uuid4().hex[:6]}")
    (made,) = side.host.start_clones(cp, CloneRequest((name,), True, name, {}, 1, keep=keep),
                                     on_create=None, progress=None)
    assert made.name == name and made.attrs["Config"]["Hostname"] == keep.hostname
    if side.kind != "fake":  # the kernel's hostname too: the UTS image was written with it
        assert made.exec_run(["hostname"]).output.decode().strip() == keep.hostname


def test_a_taken_explicit_name_is_a_conflict_and_leaves_no_clone(side):
    c = side.start()
    cp = take(side, c)
    prefix = f"contract-{uuid.uuid4().hex[:8]}"
    request = CloneRequest((f"{prefix}-free", str(c.name)), True, prefix, {}, 2)
    with pytest.raises(errors.NameConflict):
        side.host.start_clones(cp, request, on_create=None, progress=None)
    assert side.labelled(LABEL_SOURCE, str(c.id)) == []
    assert side.labelled(CONTRACT, c.labels[CONTRACT]) == [c.id]
    assert side.host.list_checkpoints(c.id) == [cp]


def test_exported_members_match_their_manifest(side):
    c = side.start()
    cp = take(side, c)
    manifest, members = exported(side, cp)
    parse_manifest(json.dumps(manifest).encode())  # a manifest Dolly's own rules accept
    assert manifest["checkpoint"] == {"name": cp.name, "container_id": cp.container_id,
                                      "container_name": cp.container_name, "created_at": cp.created_at.isoformat(),
                                      "hostname": cp.hostname}
    assert manifest["image"]["id"] == cp.image_id
    listed = {m["name"]: (m["size"], m["sha256"]) for m in manifest["members"]}
    assert sorted(name for name, _, _ in members) == sorted(listed)
    for name, size, data in members:
        assert (size, len(data)) == (listed[name][0], listed[name][0]), name
        assert hashlib.sha256(data).hexdigest() == listed[name][1], name
    config = json.loads({n: d for n, _, d in members}["config.dump"])["dolly"]
    assert (config["container_id"], config["name"], config["config"]["Id"]) == (c.id, cp.name, c.id)


def test_a_staged_import_is_committed_as_the_checkpoint_it_was(side):
    c = side.start()
    cp = take(side, c)
    manifest, members = exported(side, cp)
    side.host.remove_checkpoint(cp)
    staged = stage(side, manifest, members)
    assert (staged.container_id, staged.name, staged.image[0]) == (cp.container_id, cp.name, cp.image_id)
    assert side.host.list_checkpoints(c.id) == []  # not in the store until committed
    back = side.host.commit_import(staged, reference=None)
    assert back == cp
    assert back.client is side.host.engine.client
    assert back.config["Id"] == c.id and back.config["Config"]["Labels"] == cp.config["Config"]["Labels"]
    assert back.origin is not None and back.origin["copy"] is True and back.origin["allowed"] == sorted(policy.ALL)
    assert side.host.list_checkpoints(c.id) == [back]
    assert side.host.get_checkpoint(c.id, cp.name).origin == back.origin


def test_staging_a_checkpoint_the_host_holds_is_refused(side):
    c = side.start()
    cp = take(side, c)
    manifest, members = exported(side, cp)
    with pytest.raises(errors.CheckpointExists):
        stage(side, manifest, members)
    assert side.host.list_checkpoints(c.id) == [cp]


def test_a_discarded_import_leaves_nothing(side):
    c = side.start()
    cp = take(side, c)
    manifest, members = exported(side, cp)
    side.host.remove_checkpoint(cp)
    staged = stage(side, manifest, members)
    side.host.discard_import(staged)
    with pytest.raises(errors.BundleError):
        side.host.commit_import(staged, reference=None)
    assert side.host.list_checkpoints(c.id) == []


def test_committing_over_an_existing_checkpoint_is_refused_and_drops_the_staged_import(side):
    c = side.start()
    cp = take(side, c)
    manifest, members = exported(side, cp)
    side.host.remove_checkpoint(cp)
    first, second = stage(side, manifest, members), stage(side, manifest, members)
    back = side.host.commit_import(first, reference=None)
    with pytest.raises(errors.CheckpointExists):
        side.host.commit_import(second, reference=None)
    assert side.host.list_checkpoints(c.id) == [back]
    with pytest.raises(errors.BundleError):  # the refused commit dropped it
        side.host.commit_import(second, reference=None)


def test_a_container_its_checkpoint_stopped_is_resumed_as_itself(side):
    c = side.start()
    cp = take(side, c, "stopping", leave_running=False)
    c.reload()
    assert c.status == "exited"
    with pytest.raises(errors.InvalidArgument):
        side.host.resume(cp, side.start())  # not the container it was taken of
    again = side.host.resume(cp, None)
    assert (again.id, again.name, again.status) == (c.id, c.name, "running")
    with pytest.raises(errors.InvalidArgument):
        side.host.resume(cp, c.id)  # running now


def test_a_clone_from_the_host_s_own_copy_never_takes_an_import_for_it(side):
    """``start_clones(same_as=)`` (how a spread clones from an engine's own copy): the original
    taken on that host is used; another instant is not, nor an imported checkpoint that only
    claims the same container, name and instant (CheckpointNotFound), and nothing is made."""
    c = side.start()
    cp = take(side, c)

    def request(tag: str) -> CloneRequest:
        return CloneRequest((f"contract-{tag}-{uuid.uuid4().hex[:8]}",), True, "contract", {}, 1)

    later = request("later")
    with pytest.raises(errors.CheckpointNotFound):
        side.host.start_clones(cp, later, on_create=None, progress=None, same_as=cp.created_at + timedelta(seconds=1))
    (clone,) = side.host.start_clones(cp, request("own"), on_create=None, progress=None, same_as=cp.created_at)
    assert (clone.labels[LABEL_SOURCE], clone.labels[LABEL_CHECKPOINT]) == (cp.container_id, cp.name)
    side.remove(clone)
    manifest, members = exported(side, cp)
    side.host.remove_checkpoint(cp)
    side.remove(c)
    staged = side.host.stage_import(manifest, None, ((n, s, io.BytesIO(d)) for n, s, d in members),
                                    allowed=policy.ALL, max_bytes=None, between_own_engines=False, rebuild=False)
    side.staged.append(staged)
    imported = side.host.commit_import(staged, reference=None)
    assert (imported.container_id, imported.name, imported.created_at) == (cp.container_id, cp.name, cp.created_at)
    assert imported.origin is not None and "copy" not in imported.origin
    lookalike = request("import")
    with pytest.raises(errors.CheckpointNotFound):
        side.host.start_clones(cp, lookalike, on_create=None, progress=None, same_as=cp.created_at)
    assert side.labelled(LABEL_CHECKPOINT, cp.name) == []
