"""dolly.prune on a fake engine (tests/fakes.py): which checkpoints each choice removes.

The store holds, oldest first: ``old`` of a removed container (three days old), ``kept`` of a
container that still exists (three days old, labelled tier=web), ``imported`` from another
engine's bundle (two days old), and ``recent`` of a removed container (an hour old, labelled
tier=web).
"""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fakes import FakeEngine

import dolly
from dolly import errors, trust
from dolly._checkpoint import User

NOW = datetime.now(UTC)


@pytest.fixture
def a():
    return FakeEngine("a")


@pytest.fixture
def store(a, tmp_path):
    def taken(name, age, *, labels=None, remove=False, engine=a):
        engine.host.clock = lambda: NOW - age
        c = engine.run(name=name, labels=labels or {}, memory={"name": name}, files={"/f": name * 50})
        cp = dolly.checkpoint(c, name, client=engine.client)
        if remove:
            engine.remove(str(c.id))
        return cp

    taken("old", timedelta(days=3), remove=True)
    taken("kept", timedelta(days=3, minutes=-1), labels={"tier": "web"})
    other = FakeEngine("b")
    private, public = trust.generate_keypair()
    elsewhere = taken("imported", timedelta(days=2), engine=other)
    imported = dolly.import_bundle(dolly.export(elsewhere, tmp_path / "b.dolly", signer=private), client=a.client,
                                   trusted_keys=[public])
    taken("recent", timedelta(hours=1), labels={"tier": "web"}, remove=True)
    everything = dolly.list_checkpoints(client=a.client)
    assert [cp.name for cp in everything] == ["old", "kept", "imported", "recent"]
    assert imported.origin is not None
    return {cp.name: cp for cp in everything}


def names_in(report):
    return [cp.name for cp in report.checkpoints]


def left(a):
    return [cp.name for cp in dolly.list_checkpoints(client=a.client)]


def test_by_default_only_removed_containers_checkpoints_go(a, store):
    report = dolly.prune(client=a.client)
    assert names_in(report) == ["old", "recent"] and report.dry_run is False
    assert report.reclaimed == store["old"].size + store["recent"].size
    assert left(a) == ["kept", "imported"]
    assert a.faults.calls["remove_unused_layer_images"] == 1


def test_a_dry_run_reports_sizes_and_removes_nothing(a, store):
    report = dolly.prune(all_containers=True, dry_run=True, client=a.client)
    assert report.dry_run is True and names_in(report) == ["old", "kept", "imported", "recent"]
    assert report.reclaimed == sum(cp.size for cp in store.values())
    assert [cp.size for cp in report.checkpoints] == [store[n].size for n in names_in(report)]
    assert left(a) == ["old", "kept", "imported", "recent"]
    assert a.faults.calls["remove_checkpoint"] == 0 and a.faults.calls["remove_unused_layer_images"] == 0


def test_older_than_narrows_the_choice(a, store):
    assert names_in(dolly.prune(older_than=timedelta(days=2, hours=12), client=a.client)) == ["old"]
    assert left(a) == ["kept", "imported", "recent"]


def test_labels_narrow_the_choice_to_the_sources_that_carried_them(a, store):
    assert names_in(dolly.prune(labels={"tier": "web"}, client=a.client)) == ["recent"]
    assert left(a) == ["old", "kept", "imported"]


def test_all_containers_takes_imported_ones_and_those_of_existing_containers(a, store):
    report = dolly.prune(all_containers=True, client=a.client)
    assert names_in(report) == ["old", "kept", "imported", "recent"]
    assert report.reclaimed == sum(cp.size for cp in store.values())
    assert left(a) == []


@pytest.mark.parametrize("kwargs,removed", [
    ({"labels": {"tier": "web"}}, ["kept", "recent"]),
    ({"older_than": timedelta(days=1)}, ["old", "kept", "imported"]),
    ({"older_than": timedelta(days=1), "labels": {"tier": "web"}}, ["kept"]),
    ({"labels": {"tier": "db"}}, []),
])
def test_the_narrowings_apply_to_all_containers_too(a, store, kwargs, removed):
    assert names_in(dolly.prune(all_containers=True, client=a.client, **kwargs)) == removed
    assert left(a) == [n for n in ["old", "kept", "imported", "recent"] if n not in removed]


def test_a_checkpoint_removed_meanwhile_is_left_out_of_the_report(a, store):
    a.faults.inject("remove_checkpoint", errors.CheckpointNotFound("removed meanwhile by another caller"), at=1)
    report = dolly.prune(client=a.client)
    assert names_in(report) == ["recent"] and report.reclaimed == store["recent"].size
    assert a.faults.calls["remove_unused_layer_images"] == 1


def test_a_removed_container_is_looked_up_once(a):
    c = a.run(name="gone")
    for name in ("one", "two", "three"):
        dolly.checkpoint(c, name, client=a.client)
    a.remove(str(c.id))
    asked = a.faults.calls["engine.has_container"]
    assert names_in(dolly.prune(client=a.client)) == ["one", "two", "three"]
    assert a.faults.calls["engine.has_container"] == asked + 1


def test_nothing_to_prune(a):
    a.run(name="alive")
    report = dolly.prune(client=a.client)
    assert (report.checkpoints, report.reclaimed, report.dry_run) == ((), 0, False)


@pytest.mark.parametrize("kwargs", [
    {"labels": {"tier": 1}}, {"labels": ["tier"]}, {"older_than": timedelta(seconds=-1)}, {"older_than": 5},
])
def test_bad_arguments_remove_nothing(a, store, kwargs):
    with pytest.raises(errors.InvalidArgument):
        dolly.prune(client=a.client, **kwargs)
    assert left(a) == ["old", "kept", "imported", "recent"] and a.faults.calls["remove_checkpoint"] == 0


def test_a_checkpoint_a_container_was_restored_from_is_in_use(a, store):
    (clone,) = dolly.clone(store["old"], 1)
    assert names_in(dolly.prune(client=a.client)) == ["recent"]  # "old" has a clone
    assert left(a) == ["old", "kept", "imported"]
    a.remove(str(clone.id))
    assert names_in(dolly.prune(client=a.client)) == ["old"]


def test_a_reset_source_keeps_its_checkpoint_in_use(a):
    web = a.run(name="web", memory={"n": 1})
    cp = dolly.checkpoint(web, "warm", client=a.client)
    back = dolly.reset(web, cp)  # the source is gone; the container that replaced it is restored from cp
    assert not a.has_container(str(web.id))
    assert names_in(dolly.prune(client=a.client)) == [] and left(a) == ["warm"]
    a.remove(str(back.id))
    assert names_in(dolly.prune(client=a.client)) == ["warm"]


def test_only_the_caller_s_own_checkpoints_go_unless_all_users(a):
    alice, nobody = User(1001, "alice"), None
    for name, maker in (("alice", alice), ("old", nobody)):
        c = a.run(name=name, memory={"n": 1})
        a.host.checkpoint(c, "cp", leave_running=True, max_layer_bytes=1 << 30, made_by=maker)
        a.remove(str(c.id))
    mine = a.run(name="mine", memory={"n": 2})
    cp = dolly.checkpoint(mine, "cp", client=a.client)
    assert cp.made_by == User.current()
    a.remove(str(mine.id))
    report = dolly.prune(client=a.client)
    assert names_in(report) == ["cp"] and [c.container_name for c in report.checkpoints] == ["mine"]
    assert report.others == 2
    assert sorted(c.container_name for c in dolly.list_checkpoints(client=a.client)) == ["alice", "old"]
    everyone = dolly.prune(client=a.client, all_users=True)
    assert sorted(c.container_name for c in everyone.checkpoints) == ["alice", "old"] and everyone.others == 0
    assert left(a) == []
