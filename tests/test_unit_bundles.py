"""dolly.export, dolly.import_bundle and the restore policy, on fake engines (tests/fakes.py): real
bundle files, signed and verified by the caller as always, laid out by the fake hosts."""
from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from fakes import FakeEngine, image_id_of

import dolly
from dolly import errors, policy, trust
from dolly._manifest import read_manifest
from dolly._start import LABEL_SOURCE

STATE = {"count": 41}
PYTHON = image_id_of("dolly/python")


@pytest.fixture(scope="module")
def keys():
    return trust.generate_keypair()


@pytest.fixture
def a():
    return FakeEngine("a", images=("dolly/busybox", "dolly/python"))


@pytest.fixture
def b():
    return FakeEngine("b")


def bundle_of(a, tmp_path, keys, *, image="dolly/busybox", host_config=None, name="web", **export):
    c = a.run(image, name=name, memory=dict(STATE), files={"/f": "x"}, host_config=host_config)
    cp = dolly.checkpoint(c, "cp", client=a.client)
    return cp, dolly.export(cp, tmp_path / f"{name}.dolly", signer=keys[0], **export)


def assert_nothing_imported(b):
    assert b.host.checkpoints == [] and b.host.staged == {} and b.container_names() == set()


def test_a_bundle_carries_the_checkpoint_to_another_engine(a, b, tmp_path, keys):
    cp, path = bundle_of(a, tmp_path, keys)
    manifest = read_manifest(path)
    assert manifest["signer"] == trust.key_id(keys[1]) and manifest["lineage"] == cp.container_id
    imported = dolly.import_bundle(path, client=b.client, trusted_keys=[keys[1]])
    assert imported == cp and imported.client is b.client
    assert imported.config["Config"]["Labels"] == cp.config["Config"]["Labels"]
    assert (imported.origin["signer"], imported.origin["allowed"]) == (trust.key_id(keys[1]), [])
    assert imported.origin["bundle_id"] == manifest["bundle_id"] and "copy" not in imported.origin
    restored = dolly.restore(imported, name="there")
    assert restored.client is b.client and b.memory_of(restored) == STATE and b.files_of(restored) == {"/f": "x"}
    assert restored.labels[LABEL_SOURCE] == cp.container_id


def test_an_encrypted_bundle_needs_its_key(a, b, tmp_path, keys):
    key = trust.generate_encryption_key()
    cp, path = bundle_of(a, tmp_path, keys, encryption_key=key)
    with pytest.raises(errors.DecryptionFailed):
        dolly.import_bundle(path, client=b.client, trusted_keys=[keys[1]])
    assert_nothing_imported(b)
    assert dolly.import_bundle(path, client=b.client, trusted_keys=[keys[1]], encryption_key=key) == cp


def test_signatures_are_checked_before_anything_is_staged(a, b, tmp_path, keys):
    _, path = bundle_of(a, tmp_path, keys)
    _, stranger = trust.generate_keypair()
    with pytest.raises(errors.UntrustedSigner):
        dolly.import_bundle(path, client=b.client)
    with pytest.raises(errors.BundleError):
        dolly.import_bundle(path, client=b.client, trusted_keys=[stranger])
    assert b.faults.calls["stage_import"] == 0
    assert_nothing_imported(b)


def test_an_unsigned_bundle_needs_allow_unsigned(a, b, tmp_path, keys):
    c = a.run(name="web", memory=dict(STATE))
    cp = dolly.checkpoint(c, "cp", client=a.client)
    path = dolly.export(cp, tmp_path / "u.dolly")
    with pytest.raises(errors.UnsignedBundle):
        dolly.import_bundle(path, client=b.client)
    with pytest.raises(errors.UnsignedBundle):  # trusted keys ask for a signature, whatever allow_unsigned says
        dolly.import_bundle(path, client=b.client, trusted_keys=[keys[1]], allow_unsigned=True)
    assert_nothing_imported(b)
    assert dolly.import_bundle(path, client=b.client, allow_unsigned=True).origin["signer"] is None


def test_export_refuses_bad_arguments_and_a_removed_checkpoint(a, tmp_path, keys):
    c = a.run(name="web")
    cp = dolly.checkpoint(c, "cp", client=a.client)
    for kwargs in ({"format": "tar"}, {"compression": "lz4"}, {"expires_in": timedelta(0)},
                   {"lineage": "../x"}):
        with pytest.raises(errors.InvalidArgument):
            dolly.export(cp, tmp_path / "x.dolly", **kwargs)
    dolly.remove_checkpoint(cp)
    with pytest.raises(errors.CheckpointNotFound):
        dolly.export(cp, tmp_path / "x.dolly")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_image_drops_the_staged_import(a, b, tmp_path, keys):
    cp, path = bundle_of(a, tmp_path, keys, image="dolly/python")
    with pytest.raises(errors.ImageNotFound):
        dolly.import_bundle(path, client=b.client, trusted_keys=[keys[1]])
    assert b.faults.calls["discard_import"] == 1
    assert_nothing_imported(b)
    imported = dolly.import_bundle(path, client=b.client, trusted_keys=[keys[1]], image_source=a.client)
    assert imported == cp
    assert b.images[PYTHON] == set()  # copied by ID, never tagged: a bundle's name takes no name here


def test_a_failed_commit_removes_the_image_loaded_for_it(a, b, tmp_path, keys):
    _, path = bundle_of(a, tmp_path, keys, image="dolly/python")
    b.faults.inject("commit_import", errors.RollbackRefused("a newer bundle of its lineage was imported"))
    with pytest.raises(errors.RollbackRefused):
        dolly.import_bundle(path, client=b.client, trusted_keys=[keys[1]], image_source=a.client)
    assert not b.has_image(PYTHON) and b.host.checkpoints == []


@pytest.mark.parametrize("host_config,items", [
    ({"Privileged": True}, ["privileged"]),
    ({"Binds": ["/:/host"]}, ["host-mounts"]),
    ({"CapAdd": ["SYS_ADMIN"]}, ["capabilities"]),
    ({"PidMode": "host", "Sysctls": {"kernel.shmmax": "1"}}, ["host-namespaces", "sysctls"]),
    ({"CapAdd": ["NET_ADMIN"], "Binds": ["/etc:/etc"], "Devices": [{"PathOnHost": "/dev/sda"}]},
     ["host-mounts", "devices", "capabilities"]),
])
def test_an_import_asking_for_host_access_is_refused_unless_allowed(a, b, tmp_path, keys, host_config, items):
    cp, path = bundle_of(a, tmp_path, keys, host_config=host_config)
    with pytest.raises(errors.PolicyRefused) as refused:
        dolly.import_bundle(path, client=b.client, trusted_keys=[keys[1]])
    assert refused.value.items == items
    assert_nothing_imported(b)
    imported = dolly.import_bundle(path, client=b.client, trusted_keys=[keys[1]], allow=items)
    assert imported == cp and imported.origin["allowed"] == sorted(items)
    (clone,) = dolly.clone(imported, 1)
    assert b.memory_of(clone) == STATE
    for key, value in host_config.items():
        assert clone.attrs["HostConfig"][key] == value


def test_an_unknown_allow_item_is_an_invalid_argument(a, b, tmp_path, keys):
    _, path = bundle_of(a, tmp_path, keys)
    with pytest.raises(errors.InvalidArgument, match="everything"):
        dolly.import_bundle(path, client=b.client, trusted_keys=[keys[1]], allow=["everything"])
    assert_nothing_imported(b)


def test_a_clone_holds_an_imported_checkpoint_to_what_its_importer_allowed(a, b, tmp_path, keys):
    _, path = bundle_of(a, tmp_path, keys, host_config={"Privileged": True})
    imported = dolly.import_bundle(path, client=b.client, trusted_keys=[keys[1]], allow=["privileged"])
    narrowed = dataclasses.replace(imported, origin={**imported.origin, "allowed": []})
    with pytest.raises(errors.PolicyRefused) as refused:
        dolly.clone(narrowed, 2)
    assert refused.value.items == ["privileged"]
    assert b.faults.calls["start_clones"] == 0 and b.labelled(LABEL_SOURCE) == []


def test_an_imported_checkpoint_joins_its_recorded_networks_only_when_allowed(a, b, tmp_path, keys):
    c = a.run(name="web", memory=dict(STATE))
    a.connect(str(c.id), "backend", {"Aliases": ["db"]})
    cp = dolly.checkpoint(c, "cp", client=a.client)
    path = dolly.export(cp, tmp_path / "n.dolly", signer=keys[0])
    imported = dolly.import_bundle(path, client=b.client, trusted_keys=[keys[1]])
    (plain,) = dolly.clone(imported, 1)
    assert list(plain.attrs["NetworkSettings"]["Networks"]) == ["bridge"]
    dolly.remove_checkpoint(imported)
    allowed = dolly.import_bundle(path, client=b.client, trusted_keys=[keys[1]], allow=["networks"])
    (joined,) = dolly.clone(allowed, 1)
    assert sorted(joined.attrs["NetworkSettings"]["Networks"]) == ["backend", "bridge"]


def test_a_copy_between_own_engines_allows_what_the_source_had(a, b):
    c = a.run(name="web", memory=dict(STATE), host_config={"CapAdd": ["NET_ADMIN"]})
    cp = dolly.checkpoint(c, "cp", client=a.client)
    (clone,) = dolly.clone(cp, 1, engines=[b.client])
    (copy,) = b.host.checkpoints
    assert copy.origin["copy"] is True and copy.origin["allowed"] == sorted(policy.ALL)
    assert clone.attrs["HostConfig"]["CapAdd"] == ["NET_ADMIN"] and b.memory_of(clone) == STATE


def test_what_a_host_that_does_not_vouch_sends_gets_no_more_than_its_container_has(b):
    """The agent's copy says CapAdd; the container, as its engine's API shows it now, has none."""
    a = FakeEngine("a", vouches=False)
    c = a.run(name="web", memory=dict(STATE), host_config={"CapAdd": ["SYS_ADMIN"]})
    cp = dolly.checkpoint(c, "cp", client=a.client)
    a.update(c, CapAdd=None)
    with pytest.raises(errors.PolicyRefused) as refused:
        dolly.clone(cp, 1, engines=[b.client])
    assert refused.value.items == ["capabilities"]
    assert_nothing_imported(b)
    a.update(c, CapAdd=["SYS_ADMIN"])
    (clone,) = dolly.clone(cp, 1, engines=[b.client])
    (copy,) = b.host.checkpoints
    assert copy.origin["allowed"] == ["capabilities"] and b.memory_of(clone) == STATE


def test_what_a_host_that_does_not_vouch_sends_of_a_removed_container_gets_nothing(b):
    a = FakeEngine("a", vouches=False)
    c = a.run(name="web", memory=dict(STATE))
    cp = dolly.checkpoint(c, "cp", client=a.client)
    a.remove(str(c.id))
    (clone,) = dolly.clone(cp, 1, engines=[b.client])
    (copy,) = b.host.checkpoints
    assert copy.origin["allowed"] == [] and b.memory_of(clone) == STATE


def test_only_what_comes_from_outside_is_rebuilt_against_the_reference_image(a, b, tmp_path, keys):
    """A copy from a host that vouches is staged as it is; a bundle, or a copy sent by an agent,
    is rebuilt against Dolly's busybox on the engine it goes to."""
    busybox = image_id_of("dolly/busybox")
    c = a.run(name="web", memory=dict(STATE))
    cp = dolly.checkpoint(c, "cp", client=a.client)
    dolly.clone(cp, 1, engines=[b.client])
    imported = FakeEngine("c")
    dolly.import_bundle(dolly.export(cp, tmp_path / "cp.dolly", signer=keys[0]), client=imported.client,
                        trusted_keys=[keys[1]])
    agent = FakeEngine("agent", vouches=False)
    there = dolly.checkpoint(agent.run(name="web"), "cp", client=agent.client)
    target = FakeEngine("d")
    dolly.clone(there, 1, engines=[target.client])
    assert (b.host.references, imported.host.references, target.host.references) == ([None], [busybox], [busybox])


def test_a_reference_image_the_target_lacks_comes_from_the_source(b):
    a = FakeEngine("a", vouches=False)
    b.images.clear()
    b.add_image("dolly/python")
    c = a.run(name="web", memory=dict(STATE))
    cp = dolly.checkpoint(c, "cp", client=a.client)
    a.remove(str(c.id))
    (clone,) = dolly.clone(cp, 1, engines=[b.client])
    assert b.host.references == [image_id_of("dolly/busybox")] and b.memory_of(clone) == STATE
    assert b.images[image_id_of("dolly/busybox")] == set()  # by ID, untagged
