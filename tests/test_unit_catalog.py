"""dolly.checkpoint, list_checkpoints, get_checkpoint and remove_checkpoint on fake engines
(tests/fakes.py): what the public layer checks before a host is asked, and which engine it asks."""
from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from fakes import FakeEngine

import dolly
from dolly import errors
from dolly._catalog import engine_of


@pytest.fixture
def a():
    return FakeEngine("a")


@pytest.fixture
def b():
    return FakeEngine("b")


def test_a_checkpoint_takes_the_container_as_it_is_then(a):
    c = a.run(name="web", memory={"count": 41}, labels={"team": "x"})
    before = datetime.now(UTC)
    cp = dolly.checkpoint(c, client=a.client)
    assert re.fullmatch(r"cp-\d{8}T\d{6}\.\d{6}Z", cp.name)
    assert before - timedelta(seconds=1) <= datetime.strptime(cp.name, "cp-%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    assert (cp.container_id, cp.container_name, cp.config["Config"]["Labels"]) == (c.id, "web", {"team": "x"})
    assert cp.client is a.client and a.container(c.id).status == "running"
    a.memory_of(c)["count"] = 50
    (clone,) = dolly.clone(cp, 1)
    assert a.memory_of(clone) == {"count": 41}


def test_leave_running_false_stops_the_container(a):
    c = a.run(name="web", memory={"count": 41})
    cp = dolly.checkpoint(c, "stop", leave_running=False, client=a.client)
    assert a.container(c.id).status == "exited" and a.memory_of(c) == {}
    resumed = dolly.resume(cp)
    assert resumed.id == c.id and resumed.status == "running" and a.memory_of(c) == {"count": 41}


@pytest.mark.parametrize("kwargs", [
    {"name": "../escape"}, {"name": ""}, {"name": "a" * 129}, {"max_layer_bytes": 0}, {"max_layer_bytes": True},
    {"max_layer_bytes": 1.5}, {"max_layer_bytes": 10**18},
])
def test_bad_arguments_are_refused_before_the_host_is_asked(a, kwargs):
    c = a.run(name="web")
    with pytest.raises(errors.InvalidArgument):
        dolly.checkpoint(c, client=a.client, **kwargs)
    assert a.faults.calls["checkpoint"] == 0 and a.container(c.id).status == "running"


def test_list_is_oldest_first_over_every_container(a):
    ticks = iter(datetime(2030, 1, 1, tzinfo=UTC) + timedelta(minutes=m) for m in (5, 1, 3))
    a.host.clock = lambda: next(ticks)
    x, y = a.run(name="x"), a.run(name="y")
    five, one, three = (dolly.checkpoint(c, n, client=a.client) for c, n in ((x, "five"), (y, "one"), (x, "three")))
    assert dolly.list_checkpoints(client=a.client) == [one, three, five]
    assert dolly.list_checkpoints(x, client=a.client) == [three, five]
    assert dolly.list_checkpoints("y", client=a.client) == [one]


def test_get_checks_the_name_before_asking_the_host(a):
    c = a.run(name="web")
    with pytest.raises(errors.InvalidArgument):
        dolly.get_checkpoint(c, "no/slash", client=a.client)
    assert a.faults.calls["get_checkpoint"] == 0
    with pytest.raises(errors.CheckpointNotFound):
        dolly.get_checkpoint(c, "missing", client=a.client)


def test_remove_goes_to_the_checkpoint_s_own_engine(a, b):
    c = a.run(name="web")
    cp = dolly.checkpoint(c, "cp", client=a.client)
    with pytest.raises(errors.InvalidArgument, match="another engine"):
        dolly.remove_checkpoint(cp, client=b.client)
    assert dolly.list_checkpoints(client=a.client) == [cp]
    assert engine_of(cp, None) is a and engine_of(cp, a.client) is a
    dolly.remove_checkpoint(cp)  # no client: the one the checkpoint knows
    assert dolly.list_checkpoints(client=a.client) == []
    with pytest.raises(errors.CheckpointNotFound):
        dolly.remove_checkpoint(cp)


def test_remove_takes_only_a_checkpoint(a):
    with pytest.raises(errors.InvalidArgument, match=r"expected a dolly\.Checkpoint"):
        dolly.remove_checkpoint("cp", client=a.client)
    assert a.faults.calls["remove_checkpoint"] == 0


def test_an_engine_that_does_not_answer_is_an_error_not_an_empty_list(a):
    c = a.run(name="web")
    dolly.checkpoint(c, "cp", client=a.client)
    a.stop_answering()
    with pytest.raises(errors.EngineUnavailable):
        dolly.list_checkpoints(client=a.client)
    with pytest.raises(errors.EngineUnavailable):
        dolly.prune(all_containers=True, client=a.client)
    a.answer_again()
    assert [cp.name for cp in dolly.list_checkpoints(client=a.client)] == ["cp"]


def test_a_container_name_where_a_checkpoint_belongs_is_pointed_to_get_checkpoint(a):
    """`dolly.clone("web", 2)`: the error says how to get the checkpoint (issue 24)."""
    a.run(name="web")
    with pytest.raises(errors.InvalidArgument) as info:
        dolly.clone("web", 2, client=a.client)  # type: ignore[arg-type]
    assert "dolly.get_checkpoint('web', NAME)" in str(info.value)
    assert a.container_names() == {"web"}  # nothing was made
