"""dolly.clone and dolly.restore on fake engines (tests/fakes.py): names, clean-up after a partial
failure, and clones spread over several engines (the copies made, kept and used again)."""
from __future__ import annotations

import pytest
from fakes import FakeEngine

import dolly
from dolly import errors, trust
from dolly._start import LABEL_CHECKPOINT, LABEL_OPERATION, LABEL_SOURCE

STATE = {"count": 41}
FILES = {"/greeting": "hello"}


@pytest.fixture
def a():
    return FakeEngine("a")


@pytest.fixture
def b():
    return FakeEngine("b")


@pytest.fixture
def c():
    return FakeEngine("c")


@pytest.fixture
def web(a):
    return a.run(name="web", memory=dict(STATE), files=dict(FILES), labels={"team": "x", "dolly.pytest.run": "r1"})


@pytest.fixture
def cp(a, web):
    checkpoint = dolly.checkpoint(web, "warm", client=a.client)
    a.memory_of(web)["count"] = 99  # the source goes on: its clones start from the checkpoint
    return checkpoint


def clones_on(engine, web):
    return [x.name for x in engine.labelled(LABEL_SOURCE, str(web.id))]


def test_clones_start_from_the_checkpoint_under_the_next_free_names(a, web, cp):
    a.run(name="web-clone-1")
    a.run(name="web-clone-3")
    made = dolly.clone(cp, 3)
    assert [x.name for x in made] == ["web-clone-2", "web-clone-4", "web-clone-5"]
    for clone in made:
        assert clone.client is a.client and clone.status == "running"
        assert a.memory_of(clone) == STATE and a.files_of(clone) == FILES
        assert (clone.labels[LABEL_SOURCE], clone.labels[LABEL_CHECKPOINT]) == (web.id, "warm")
    assert a._reserved == set()  # the names are released once made


def test_a_prefix_and_labels(a, web, cp):
    made = dolly.clone(cp, 2, name_prefix="api", labels={"role": "replica"})
    assert [x.name for x in made] == ["api-1", "api-2"]
    for clone in made:
        assert clone.labels["role"] == "replica" and clone.labels["team"] == "x"
        assert "dolly.pytest.run" not in clone.labels  # who made the source is not inherited


def test_restore_makes_one_container_of_the_name_given(a, web, cp):
    restored = dolly.restore(cp, name="again")
    assert restored.name == "again" and a.memory_of(restored) == STATE
    assert clones_on(a, web) == ["again"]


def test_a_failing_clone_takes_every_clone_of_the_call_with_it(a, web, cp):
    a.faults.inject("restore", errors.RestoreFailed("CRIU failed on clone 3"), at=3)
    with pytest.raises(errors.RestoreFailed, match="clone 3"):
        dolly.clone(cp, 5)
    assert a.faults.calls["restore"] == 5  # the others were made, then removed
    assert clones_on(a, web) == [] and a.container_names() == {"web"}
    assert a._reserved == set()
    assert dolly.list_checkpoints(web, client=a.client) == [cp]
    assert a.memory_of(web) == {"count": 99}  # the source is not touched
    assert [x.name for x in dolly.clone(cp, 2)] == ["web-clone-1", "web-clone-2"]  # the names are free again


@pytest.mark.parametrize("hook", ["on_create", "progress"])
def test_a_failing_hook_leaves_no_clone(a, web, cp, hook):
    seen = []

    def fails(x):
        seen.append(x if isinstance(x, str) else x.id)
        if len(seen) == 2:
            raise RuntimeError("the caller's hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        dolly.clone(cp, 3, **{hook: fails})
    assert len(seen) == 3 and not any(a.has_container(i) for i in seen)
    assert clones_on(a, web) == [] and a._reserved == set()


def test_a_taken_name_for_restore_is_a_conflict_and_leaves_nothing(a, web, cp):
    a.run(name="taken")
    with pytest.raises(errors.NameConflict):
        dolly.restore(cp, name="taken")
    assert clones_on(a, web) == [] and a.container_names() == {"web", "taken"}


@pytest.mark.parametrize("kwargs", [
    {"n": 0}, {"n": True}, {"n": "2"}, {"n": 1, "name_prefix": "a/b"}, {"n": 1, "max_workers": 0},
    {"n": 1, "labels": {"k": 1}}, {"n": 1, "network": []}, {"n": 1, "engines": []},
])
def test_bad_arguments_are_refused_before_any_clone(a, web, cp, kwargs):
    with pytest.raises(errors.InvalidArgument):
        dolly.clone(cp, **kwargs)
    assert a.faults.calls["start_clones"] == 0 and clones_on(a, web) == []


def test_restore_refuses_a_bad_name_and_anything_but_a_checkpoint(a, cp):
    with pytest.raises(errors.InvalidArgument):
        dolly.restore(cp, name="no/slashes")
    with pytest.raises(errors.InvalidArgument, match=r"expected a dolly\.Checkpoint"):
        dolly.clone("warm", 1, client=a.client)
    assert a.faults.calls["start_clones"] == 0


def test_a_removed_checkpoint_is_not_cloned(a, web, cp):
    dolly.remove_checkpoint(cp)
    with pytest.raises(errors.CheckpointNotFound):
        dolly.clone(cp, 2)
    assert clones_on(a, web) == [] and a._reserved == set()


def test_clones_spread_round_robin_and_the_copy_is_kept(a, b, web, cp):
    made = dolly.clone(cp, 5, engines=[a.client, b.client])
    assert [(x.client, x.name) for x in made] == [(a.client, "web-clone-1"), (a.client, "web-clone-2"),
                                                 (a.client, "web-clone-3"), (b.client, "web-clone-1"),
                                                 (b.client, "web-clone-2")]
    assert all(e.memory_of(x) == STATE for e in (a, b) for x in e.labelled(LABEL_SOURCE, str(web.id)))
    (copy,) = dolly.list_checkpoints(client=b.client)
    assert (copy.container_id, copy.name, copy.created_at) == (cp.container_id, cp.name, cp.created_at)
    assert copy.origin["copy"] is True
    assert (a.faults.calls["export_members"], b.faults.calls["commit_import"]) == (1, 1)


def test_a_second_spread_uses_the_kept_copy(a, b, web, cp):
    dolly.clone(cp, 2, engines=[a.client, b.client])
    (copy,) = b.host.checkpoints
    made = dolly.clone(cp, 4, engines=[a.client, b.client])
    assert (a.faults.calls["export_members"], b.faults.calls["stage_import"]) == (1, 1)  # nothing copied again
    assert [x.name for x in made if x.client is b.client] == ["web-clone-2", "web-clone-3"]
    assert [(x.path, x.origin["imported_at"]) for x in b.host.checkpoints] == [(copy.path, copy.origin["imported_at"])]


def test_a_spread_over_other_engines_copies_once_to_each(a, b, c, web, cp):
    made = dolly.clone(cp, 4, engines=[b.client, c.client])
    assert [x.client for x in made] == [b.client, b.client, c.client, c.client]
    assert clones_on(a, web) == []
    assert a.faults.calls["export_members"] == 2
    assert [len(e.host.checkpoints) for e in (b, c)] == [1, 1]


def test_an_engine_holding_the_original_is_not_copied_to(a, b, tmp_path):
    """A checkpoint taken on b, exported and imported on a, then spread over a and b: b clones
    its own original."""
    private, public = trust.generate_keypair()
    source = b.run(name="home", memory=dict(STATE))
    original = dolly.checkpoint(source, "home", client=b.client)
    here = dolly.import_bundle(dolly.export(original, tmp_path / "home.dolly", signer=private), client=a.client,
                               trusted_keys=[public])
    made = dolly.clone(here, 4, engines=[a.client, b.client])
    assert [x.client for x in made] == [a.client, a.client, b.client, b.client]
    assert b.faults.calls["stage_import"] == 0 and b.host.checkpoints == [original]
    assert all(x.labels[LABEL_SOURCE] == source.id and x.labels[LABEL_CHECKPOINT] == "home" for x in made)


def test_an_imported_checkpoint_that_only_claims_the_identity_is_not_taken_for_the_copy(a, b, web, cp, tmp_path):
    private, public = trust.generate_keypair()
    dolly.import_bundle(dolly.export(cp, tmp_path / "cp.dolly", signer=private), client=b.client,
                        trusted_keys=[public])
    with pytest.raises(errors.CheckpointExists):
        dolly.clone(cp, 2, engines=[a.client, b.client])
    assert clones_on(a, web) == [] and clones_on(b, web) == []
    (imported,) = b.host.checkpoints
    assert "copy" not in imported.origin


def test_a_spread_failing_on_one_engine_removes_the_clones_on_all(a, b, web, cp):
    b.faults.inject("restore", errors.RestoreFailed("CRIU failed on b"), at=2)
    with pytest.raises(errors.RestoreFailed, match="on b"):
        dolly.clone(cp, 6, engines=[a.client, b.client])
    assert a.faults.calls["restore"] == 3 and b.faults.calls["restore"] == 3
    assert clones_on(a, web) == [] and clones_on(b, web) == [] and b.labelled(LABEL_OPERATION) == []
    assert [x.name for x in b.host.checkpoints] == ["warm"]  # the copy is kept for the next spread


def test_a_client_of_another_engine_gets_a_copy_there(a, b, web, cp):
    made = dolly.clone(cp, 2, client=b.client)
    assert [(x.client, x.name) for x in made] == [(b.client, "web-clone-1"), (b.client, "web-clone-2")]
    assert clones_on(a, web) == [] and [x.name for x in b.host.checkpoints] == ["warm"]
    restored = dolly.restore(cp, name="single", client=b.client)
    assert restored.client is b.client and b.memory_of(restored) == STATE
    assert a.faults.calls["export_members"] == 1  # the copy made for the clones served the restore


def test_networks_are_not_for_another_engine(a, b, web, cp):
    with pytest.raises(errors.InvalidArgument, match="network"):
        dolly.restore(cp, client=b.client, network="elsewhere")
    with pytest.raises(errors.InvalidArgument, match="network"):
        dolly.clone(cp, 2, engines=[a.client, b.client], network="elsewhere")
    assert a.faults.calls["export_members"] == 0 and clones_on(a, web) == []


def test_clones_spread_over_networks_in_turn(a, web, cp):
    made = dolly.clone(cp, 3, network=["n1", "n2"])
    assert [list(x.attrs["NetworkSettings"]["Networks"]) for x in made] == [["n1"], ["n2"], ["n1"]]


def test_resume_is_for_a_checkpoint_of_this_engine_only(a, b, web, cp, tmp_path):
    private, public = trust.generate_keypair()
    imported = dolly.import_bundle(dolly.export(cp, tmp_path / "cp.dolly", signer=private), client=b.client,
                                   trusted_keys=[public])
    with pytest.raises(errors.InvalidArgument, match="imported from a bundle"):
        dolly.resume(imported)
    assert b.faults.calls["resume"] == 0


def test_a_copy_that_fails_takes_the_clones_made_elsewhere_with_it(a, b, web, cp):
    b.faults.inject("stage_import", errors.BundleError("the copy was cut short"))
    with pytest.raises(errors.BundleError, match="cut short"):
        dolly.clone(cp, 4, engines=[a.client, b.client])
    assert a.faults.calls["restore"] == 2  # a's clones were made, then removed
    assert clones_on(a, web) == [] and b.container_names() == set()
    assert b.host.checkpoints == [] and b.host.staged == {}


def test_reset_puts_the_container_back_at_the_checkpoint_under_its_name_and_hostname(a, web, cp):
    hostname = web.attrs["Config"]["Hostname"]
    a.files_of(web)["/greeting"] = "changed since"
    back = dolly.reset(web, cp)
    assert back.id != web.id and not a.has_container(str(web.id))
    assert back.name == "web" and back.attrs["Config"]["Hostname"] == hostname
    assert a.memory_of(back) == STATE and a.files_of(back) == FILES  # the checkpoint's, not what ran since
    assert (back.labels[LABEL_SOURCE], back.labels[LABEL_CHECKPOINT]) == (web.id, "warm")
    assert a.container_names() == {"web"}
    # Its checkpoint is found under the name the user knows, though the container is a new one.
    assert dolly.get_checkpoint("web", "warm", client=a.client) == cp
    with pytest.raises(errors.CheckpointNotFound):
        dolly.get_checkpoint("web", "other", client=a.client)
    # A reset container is reset again from the same checkpoint.
    a.memory_of(back)["count"] = 7
    again = dolly.reset(back, cp)
    assert again.name == "web" and a.memory_of(again) == STATE and a.container_names() == {"web"}


def test_a_failed_reset_puts_the_container_back_under_its_name_stopped(a, web, cp):
    a.faults.inject("restore", errors.RestoreFailed("CRIU failed"), at=1)
    with pytest.raises(errors.RestoreFailed):
        dolly.reset(web, cp)
    kept = a.container(str(web.id))
    assert kept.name == "web" and kept.attrs["State"]["Running"] is False
    assert a.container_names() == {"web"} and clones_on(a, web) == []
    assert dolly.list_checkpoints(web, client=a.client) == [cp]
    assert a.memory_of(dolly.reset(web, cp)) == STATE  # the checkpoint still resets it


def test_reset_refuses_a_container_of_another_checkpoint_and_leaves_it_running(a, web, cp):
    other = a.run(name="other", memory={"count": 5})
    with pytest.raises(errors.InvalidArgument, match="neither checkpointed"):
        dolly.reset(other, cp)
    kept = a.container("other")
    assert kept.id == other.id and kept.attrs["State"]["Running"] and a.memory_of(kept) == {"count": 5}
