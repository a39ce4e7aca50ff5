"""dolly.resume: a stopped container started again from its own checkpoint, and only then."""
from __future__ import annotations

import dataclasses
import time

import pytest

import dolly
from dolly import errors
from helpers import BUSYBOX, COUNTER, assert_counts_on, read_int


def logged(container) -> list:
    return [int(x) for x in container.logs().decode().split() if x.isdigit()]


@pytest.fixture
def stopped(run):
    """A counter stopped by a checkpoint: (container, checkpoint, its count at the checkpoint)."""
    c = run(BUSYBOX, ["sh", "-c", COUNTER])
    time.sleep(1)
    read_int(c)
    cp = dolly.checkpoint(c, "stop", leave_running=False)
    c.reload()
    assert c.status == "exited"
    return c, cp, logged(c)[-1]


def test_resume_refuses_a_container_started_since_the_checkpoint(stopped):
    c, cp, at_checkpoint = stopped
    c.start()  # from scratch: the counter starts over and rewrites /tmp/count
    time.sleep(0.5)
    c.kill()
    c.wait()
    with pytest.raises(errors.InvalidArgument, match="started again"):
        dolly.resume(cp, c.id)
    c.reload()
    assert c.status == "exited"
    assert dolly.list_checkpoints(c) == [cp], "the checkpoint was not kept"
    # A new container from it is still possible: its files come from the checkpoint.
    [clone] = dolly.clone(cp, 1)
    assert_counts_on(clone, at_checkpoint)


def test_resume_refuses_an_imported_checkpoint(stopped):
    c, cp, at_checkpoint = stopped
    # What an imported checkpoint that claims this container would look like: its files are real.
    claimed = dataclasses.replace(cp, origin={"bundle_id": "b" * 64, "signer": None, "source": "elsewhere"})
    with pytest.raises(errors.InvalidArgument, match="imported"):
        dolly.resume(claimed, c.id)
    c.reload()
    assert c.status == "exited"
    # Its own checkpoint still resumes it.
    resumed = dolly.resume(cp, c.id)
    assert_counts_on(resumed, at_checkpoint, new=False)


def test_resume_leaves_a_docker_checkpoint_of_the_same_name_alone(run, engine):
    c = run(BUSYBOX, ["sh", "-c", COUNTER])
    time.sleep(1)
    # The user's own `docker checkpoint create --leave-running c mine`.
    engine.create_checkpoint(c.id, "mine", exit=False)
    theirs = engine.checkpoints_dir(c.id) / "mine"
    assert (theirs / "inventory.img").is_file()
    files = sorted(p.name for p in theirs.iterdir())
    cp = dolly.checkpoint(c, "mine", leave_running=False)
    at_checkpoint = logged(c)[-1]
    resumed = dolly.resume(cp, c.id)
    assert_counts_on(resumed, at_checkpoint, new=False)
    assert sorted(p.name for p in theirs.iterdir()) == files, "the user's docker checkpoint was touched"
    assert [p.name for p in engine.checkpoints_dir(c.id).iterdir()] == ["mine"], "Dolly left its own folder"
