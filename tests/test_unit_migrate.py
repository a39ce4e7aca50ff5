"""dolly.migrate on fake engines (tests/fakes.py): each step's failure and its roll back.

The source holds ``{"count": 41}`` in memory when it is checkpointed. A dump that stops it clears
its memory (as a stopped process's is gone), so a source found running again with
``{"count": 41}`` was started again from its checkpoint, not from scratch.
"""
from __future__ import annotations

import pytest
from fakes import FakeEngine, image_id_of

import dolly
from dolly import _migration, errors
from dolly._start import LABEL_CHECKPOINT, LABEL_SOURCE

STATE = {"count": 41}


@pytest.fixture(autouse=True)
def quick_settle(monkeypatch):
    """The moved container's settle checked once instead of polled for a second: the same checks."""
    monkeypatch.setitem(_migration._settle.__kwdefaults__, "seconds", 0.0)


@pytest.fixture
def a():
    return FakeEngine("a", images=("dolly/busybox", "dolly/python"))


@pytest.fixture
def b():
    return FakeEngine("b")


@pytest.fixture
def web(a):
    return a.run(name="web", memory=dict(STATE), files={"/data/x": "kept"}, labels={"team": "x"})


def migrate(a, b, **kwargs):
    return dolly.migrate("web", b.client, source_client=a.client, **kwargs)


def assert_source_runs_on(a, web):
    """The source runs again from its checkpoint, which is gone with everything of the move."""
    source = a.container(web.id)
    assert source.status == "running"
    assert a.memory_of(web) == STATE
    assert a.files_of(web) == {"/data/x": "kept"}
    assert a.host.checkpoints == []


def assert_nothing_on(b):
    assert b.container_names() == set()
    assert b.host.checkpoints == [] and b.host.staged == {}


def test_a_move_carries_memory_files_and_name_and_leaves_nothing_behind(a, b, web):
    moved = migrate(a, b)
    assert moved.container.client is b.client and moved.container.name == "web"
    assert b.memory_of(moved.container) == STATE and b.files_of(moved.container) == {"/data/x": "kept"}
    labels = moved.container.labels
    assert (labels["team"], labels[LABEL_SOURCE]) == ("x", web.id) and labels[LABEL_CHECKPOINT].startswith("migrate-")
    assert set(moved.steps) == {"checkpoint", "transfer", "restore", "verify"}
    assert a.container_names() == set()
    assert a.host.checkpoints == [] and b.host.checkpoints == []
    assert (a.host.prepared, a.host.released, b.host.prepared, b.host.released) == (1, 1, 1, 1)


def test_the_image_goes_along_when_the_target_lacks_it(a, b):
    python = image_id_of("dolly/python")
    c = a.run("dolly/python", name="web", memory=dict(STATE))
    assert not b.has_image(python)
    moved = migrate(a, b)
    assert b.has_image(python) and moved.container.attrs["Image"] == python
    assert b.memory_of(moved.container) == STATE and not a.has_container(str(c.id))


@pytest.mark.parametrize("setup,error,match", [
    (lambda a, b, web: b.run(name="web"), errors.NameConflict, "already has a container named 'web'"),
    (lambda a, b, web: a.exit(web), errors.ContainerNotRunning, "not running"),
    (lambda a, b, web: a.pause(str(web.id)), errors.ContainerNotRunning, "not running"),
    (lambda a, b, web: setattr(b, "experimental_mode", False), errors.HostNotReady, "experimental"),
    (lambda a, b, web: setattr(a, "runtime", False), errors.HostNotReady, "runtime"),
])
def test_a_move_that_cannot_start_touches_nothing(a, b, web, setup, error, match):
    setup(a, b, web)
    names_on_b = b.container_names()
    with pytest.raises(error, match=match):
        migrate(a, b)
    assert a.faults.calls["checkpoint"] == 0 and a.host.prepared == 0
    assert a.has_container(str(web.id)) and b.container_names() == names_on_b and b.host.checkpoints == []


def test_the_target_may_not_be_the_source_engine(a, web):
    with pytest.raises(errors.InvalidArgument, match="the target engine is the source engine"):
        dolly.migrate("web", a.client, source_client=a.client)
    with pytest.raises(errors.InvalidArgument, match="compression"):
        dolly.migrate("web", FakeEngine("b").client, source_client=a.client, compression="lz4")
    assert a.faults.calls["checkpoint"] == 0 and a.container(web.id).status == "running"


@pytest.mark.parametrize("binds,flag", [(["data:/data"], "drop_volumes"), (["/srv:/srv:ro"], "rebind_mounts")])
def test_volumes_and_bind_mounts_need_their_flag(a, b, binds, flag):
    c = a.run(name="web", memory=dict(STATE), host_config={"Binds": binds})
    with pytest.raises(errors.InvalidArgument, match=flag):
        migrate(a, b)
    assert a.faults.calls["checkpoint"] == 0 and a.memory_of(c) == STATE
    moved = migrate(a, b, **{flag: True})
    assert moved.container.attrs["HostConfig"]["Binds"] == binds and b.memory_of(moved.container) == STATE


def test_a_checkpoint_failing_before_the_dump_leaves_the_source_untouched(a, b, web):
    started = a.container(web.id).attrs["State"]["StartedAt"]
    a.faults.inject("checkpoint", errors.CheckpointFailed("CRIU said no"))
    with pytest.raises(errors.MigrationFailed, match="still running, untouched") as failed:
        migrate(a, b)
    assert failed.value.step == "checkpoint"
    assert a.container(web.id).attrs["State"]["StartedAt"] == started  # never stopped
    assert_source_runs_on(a, web)
    assert_nothing_on(b)
    assert b.faults.calls["stage_import"] == 0


def test_a_checkpoint_failing_after_the_dump_starts_the_source_from_the_images_it_kept(a, b, web):
    started = a.container(web.id).attrs["State"]["StartedAt"]
    a.faults.inject("dump", OSError("no space left on device"))
    with pytest.raises(errors.MigrationFailed, match="from the images the checkpoint kept") as failed:
        migrate(a, b)
    assert failed.value.step == "checkpoint"
    assert a.container(web.id).attrs["State"]["StartedAt"] != started  # stopped by the dump, resumed
    assert_source_runs_on(a, web)
    assert_nothing_on(b)


def test_when_the_kept_images_do_not_start_either_the_step_is_roll_back(a, b, web):
    a.faults.inject("dump", OSError("no space left on device"))
    a.faults.inject("resume", errors.RestoreFailed("CRIU could not restore"))
    with pytest.raises(errors.MigrationFailed) as failed:
        migrate(a, b)
    (kept,) = a.host.checkpoints
    assert failed.value.step == "roll back"
    assert str(kept.path) in str(failed.value) and "CRIU could not restore" in str(failed.value)
    assert a.container(web.id).status == "exited"
    assert_nothing_on(b)


def test_a_failed_checkpoint_that_kept_nothing_of_a_stopped_source_is_roll_back(a, b, web):
    def dies():
        a.exit(web)
        return errors.CheckpointFailed("the container died under CRIU")

    a.faults.inject("checkpoint", dies)
    with pytest.raises(errors.MigrationFailed, match="no images were kept") as failed:
        migrate(a, b)
    assert failed.value.step == "roll back"
    assert a.container(web.id).status == "exited" and a.host.checkpoints == []


def test_a_transfer_refused_by_the_target_brings_the_source_back(a, b, web):
    b.faults.inject("stage_import", errors.DigestMismatch("checkpoint/pages-1.img does not match"))
    with pytest.raises(errors.MigrationFailed, match=r"pages-1\.img") as failed:
        migrate(a, b)
    assert failed.value.step == "transfer"
    assert_source_runs_on(a, web)
    assert_nothing_on(b)


def test_an_image_copy_that_fails_drops_the_staged_import(a, b, web):
    b.faults.inject("engine.ensure_image", errors.ImageNotFound("the image went away"))
    with pytest.raises(errors.MigrationFailed) as failed:
        migrate(a, b)
    assert failed.value.step == "transfer"
    assert b.faults.calls["discard_import"] == 1 and b.faults.calls["commit_import"] == 0
    assert_source_runs_on(a, web)
    assert_nothing_on(b)


def test_a_failed_commit_removes_the_image_copied_for_it(a, b):
    python = image_id_of("dolly/python")
    c = a.run("dolly/python", name="web", memory=dict(STATE), files={"/data/x": "kept"})
    b.faults.inject("commit_import", errors.CheckpointExists("appeared meanwhile"))
    with pytest.raises(errors.MigrationFailed) as failed:
        migrate(a, b)
    assert failed.value.step == "transfer"
    assert not b.has_image(python)
    assert_source_runs_on(a, c)
    assert b.host.checkpoints == [] and b.container_names() == set()


def test_a_restore_that_fails_on_the_target_brings_the_source_back(a, b, web):
    b.faults.inject("restore", errors.RestoreFailed("CRIU failed on the target"))
    with pytest.raises(errors.MigrationFailed, match="CRIU failed on the target") as failed:
        migrate(a, b)
    assert failed.value.step == "restore"
    assert_source_runs_on(a, web)
    assert_nothing_on(b)


def test_a_restore_whose_own_clean_up_failed_has_its_container_removed(a, b, web):
    # Both removals of the failed clone fail (its own, then its operation's): it stays, under
    # the source's name, labelled with the move's checkpoint, until the roll back removes it.
    b.faults.inject("restore", errors.RestoreFailed("CRIU failed on the target"))
    b.faults.inject("engine.remove", errors.EngineError("device or resource busy"), at=1)
    b.faults.inject("engine.remove", errors.EngineError("device or resource busy"), at=2)
    with pytest.raises(errors.MigrationFailed) as failed:
        migrate(a, b)
    assert failed.value.step == "restore"
    assert b.faults.calls["engine.remove"] == 3
    assert_source_runs_on(a, web)
    assert_nothing_on(b)


def test_a_container_that_took_the_name_meanwhile_is_not_the_move_s_to_remove(a, b, web):
    def someone_takes_the_name():
        b.run(name="web", labels={"owner": "someone else"})
        return errors.NameConflict("the container name 'web' is already taken")

    b.faults.inject("start_clones", someone_takes_the_name)
    with pytest.raises(errors.MigrationFailed) as failed:
        migrate(a, b)
    assert failed.value.step == "restore"
    (theirs,) = b.labelled("owner", "someone else")
    assert theirs.name == "web" and b.container_names() == {"web"}
    assert_source_runs_on(a, web)
    assert b.host.checkpoints == []


def test_a_target_that_never_gets_ready_brings_the_source_back(a, b, web):
    with pytest.raises(errors.MigrationFailed) as failed:
        migrate(a, b, ready=lambda c: False, ready_timeout=0.2)
    assert failed.value.step == "verify" and isinstance(failed.value.__cause__, errors.NotReady)
    assert_source_runs_on(a, web)
    assert_nothing_on(b)


@pytest.mark.parametrize("after_check,why", [
    (lambda b, c: b.exit(c), "did not keep running"),
    (lambda b, c: b.restart(c), "started again"),
])
def test_a_target_that_does_not_keep_running_after_its_check_brings_the_source_back(a, b, web, after_check, why):
    def passes_then(c):
        after_check(b, c)
        return True

    with pytest.raises(errors.MigrationFailed, match=why) as failed:
        migrate(a, b, ready=passes_then)
    assert failed.value.step == "verify"
    assert_source_runs_on(a, web)
    assert_nothing_on(b)


def test_a_target_that_stops_answering_leaves_the_source_stopped_with_its_checkpoint(a, b, web):
    def engine_lost(c):
        b.stop_answering()
        return False

    with pytest.raises(errors.MigrationFailed, match="may still run") as failed:
        migrate(a, b, ready=engine_lost)
    assert failed.value.step == "roll back"
    assert a.container(web.id).status == "exited"  # never two copies
    (cp,) = a.host.checkpoints
    assert str(cp.path) in str(failed.value) and "dolly.resume" in str(failed.value)
    # Once the target answers again and its container is gone, the way back the error gives works.
    b.answer_again()
    (left,) = b.labelled(LABEL_CHECKPOINT, cp.name)
    assert left.name == "web" and left.status == "running"
    b.remove(str(left.id))
    dolly.resume(dolly.get_checkpoint(web.id, cp.name, client=a.client), client=a.client)
    assert a.container(web.id).status == "running" and a.memory_of(web) == STATE


def test_a_target_lost_during_the_restore_is_not_taken_for_clean(a, b, web):
    def engine_lost():
        b.stop_answering()
        return errors.RestoreFailed("the target engine went away")

    b.faults.inject("restore", engine_lost)
    with pytest.raises(errors.MigrationFailed) as failed:
        migrate(a, b)
    assert failed.value.step == "roll back"
    (cp,) = a.host.checkpoints
    assert a.container(web.id).status == "exited"
    assert f"checkpoint {cp.name!r} is kept at {cp.path}" in str(failed.value)
    b.answer_again()
    assert [c.name for c in b.labelled(LABEL_SOURCE, str(web.id))] == ["web"]
