"""Keeping the store tidy: prune removes the checkpoints of removed containers (or, asked, every
checkpoint, or those older than an age), and nothing else. Each test labels its containers with a
value of its own and narrows prune to it, so that no other checkpoint (another test's, the
session's shared ones, or any outside the test suite) is ever touched."""
from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

import dolly
from dolly.errors import InvalidArgument
from helpers import BUSYBOX, COUNTER, dolly_cmd, read_int

PRUNE_LABEL = "dolly.test.prune"


@pytest.fixture
def ours(run):
    """``(start, labels)``: ``run`` with a label unique to this test, and that label."""
    labels = {PRUNE_LABEL: uuid.uuid4().hex}
    return (lambda image, command, **kw: run(image, command, labels=labels, **kw)), labels


def names(cps) -> set:
    return {(cp.container_id, cp.name) for cp in cps}


def test_prune_removes_the_checkpoints_of_removed_containers_only(ours, keys, tmp_path):
    run, labels = ours
    gone = run(BUSYBOX, ["sh", "-c", COUNTER])
    live = run(BUSYBOX, ["sh", "-c", COUNTER])
    elsewhere = run(BUSYBOX, ["sh", "-c", COUNTER])
    time.sleep(1)
    gone_cps = [dolly.checkpoint(gone, "g1"), dolly.checkpoint(gone, "g2")]
    live_cp = dolly.checkpoint(live, "l1")
    # An imported checkpoint is kept unless asked, though no container of its own is here: as one
    # brought from another host would be (its source exported, then gone from this engine).
    exported = dolly.checkpoint(elsewhere, "to-export")
    bundle = dolly.export(exported, tmp_path / "b.dolly", signer=keys[0])
    dolly.remove_checkpoint(exported)
    elsewhere.remove(force=True)
    imported = dolly.import_bundle(bundle, trusted_keys=[keys[1]])
    assert imported.origin is not None
    (clone,) = dolly.clone(gone_cps[1], 1)
    at = read_int(clone)
    sizes = {(cp.container_id, cp.name): cp.size for cp in gone_cps}
    gone.remove(force=True)

    # g2 is in use while its clone exists: only g1 goes.
    seen = dolly.prune(dry_run=True, labels=labels)
    assert names(seen.checkpoints) == names(gone_cps[:1]) and seen.dry_run
    assert seen.reclaimed == sizes[(gone.id, "g1")]
    assert names(dolly.list_checkpoints()) >= names(gone_cps)  # a dry run removes nothing

    done = dolly.prune(labels=labels)
    assert names(done.checkpoints) == names(gone_cps[:1]) and not done.dry_run
    assert done.reclaimed == sizes[(gone.id, "g1")]
    assert not gone_cps[0].path.exists() and gone_cps[1].path.exists()
    left = names(cp for cp in dolly.list_checkpoints()
                 if cp.config["Config"]["Labels"].get(PRUNE_LABEL) == labels[PRUNE_LABEL])
    assert left == names([gone_cps[1], live_cp, imported])

    # Asked for every checkpoint, the clone's goes too, and the clone runs on without it.
    everything = dolly.prune(all_containers=True, labels=labels)
    assert names(everything.checkpoints) == names([gone_cps[1], live_cp, imported])
    assert not live_cp.path.exists() and not imported.path.exists() and not gone_cps[1].path.exists()
    live.reload()
    assert live.status == "running"
    time.sleep(0.3)
    assert read_int(clone) > at


def test_prune_older_than_keeps_the_younger_checkpoints(ours):
    run, labels = ours
    source = run(BUSYBOX, ["sh", "-c", COUNTER])
    time.sleep(0.5)
    old = dolly.checkpoint(source, "old")
    time.sleep(3)
    young = dolly.checkpoint(source, "young")
    # The cut between the two, however long each checkpoint took.
    cut = old.created_at + (young.created_at - old.created_at) / 2
    report = dolly.prune(all_containers=True, older_than=datetime.now(UTC) - cut, labels=labels)
    assert names(report.checkpoints) == names([old])
    assert names(dolly.list_checkpoints(source)) == names([young])


@pytest.mark.parametrize("bad", [{"older_than": 3600}, {"older_than": timedelta(seconds=-1)},
                                 {"labels": {"a": 1}}, {"labels": ["a"]}])
def test_prune_refuses_bad_arguments(bad):
    with pytest.raises(InvalidArgument):
        dolly.prune(**bad)


def test_prune_on_the_command_line_asks_first(ours):
    run, labels = ours
    source = run(BUSYBOX, ["sh", "-c", COUNTER])
    time.sleep(0.5)
    cp = dolly.checkpoint(source, "cli-prune")
    source.remove(force=True)
    label = f"--label={PRUNE_LABEL}={labels[PRUNE_LABEL]}"

    refused = dolly_cmd("prune", label, input="n\n")
    assert refused.returncode == 1 and "Continue?" in refused.stderr
    assert cp.path.exists()

    res = dolly_cmd("prune", label, "--force", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [c["name"] for c in out["checkpoints"]] == ["cli-prune"] and out["reclaimed_bytes"] > 0
    assert not cp.path.exists()
    assert dolly_cmd("prune", "--older-than", "soon").returncode == 2
