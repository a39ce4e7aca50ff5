"""Dolly's retry policies, all in one place.

Only what is transient is retried: the engine briefly unreachable, the engine's content-store
conflict that clears by itself, and a dump that found a task in uninterruptible sleep. A CRIU
failure, a missing container or a bad argument is deterministic and is raised at once.
"""
from __future__ import annotations

import logging

from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from .errors import DollyError, EngineUnavailable, NameConflict

log = logging.getLogger("dolly")


class ContentConflict(DollyError):
    """containerd already holds a blob with the same digest as the checkpoint being uploaded
    ("failed to upload checkpoint to containerd: commit failed: content sha256:...: already
    exists"). It clears once the other upload or clone has let go of the blob."""


def engine_calls() -> Retrying:
    """For a single Engine API call: retry while the engine is unavailable, up to 30 s."""
    return Retrying(
        retry=retry_if_exception_type(EngineUnavailable),
        stop=stop_after_delay(30),
        wait=wait_exponential(multiplier=0.2, max=3),
        before_sleep=before_sleep_log(log, logging.INFO),
        reraise=True,
    )


def checkpoint_upload() -> Retrying:
    """For starting a container from a checkpoint: content conflicts clear within seconds;
    jitter keeps concurrent clones from meeting again."""
    return Retrying(
        retry=retry_if_exception_type(ContentConflict),
        stop=stop_after_attempt(6),
        wait=wait_exponential(multiplier=0.1, max=2) + wait_random(0, 0.3),
        before_sleep=before_sleep_log(log, logging.INFO),
        reraise=True,
    )


class TasksBusy(DollyError):
    """CRIU could not seize a task of the container within its freeze timeout because the task
    sat in uninterruptible sleep ("Unseizable non-zombie ... state D", seen on a database under a
    write load waiting on its disk); CRIU let every task run on and dumped nothing. Carries the
    :class:`~dolly.errors.CheckpointFailed` it came from."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def busy_tasks() -> Retrying:
    """For a dump: a task in uninterruptible sleep leaves it within moments; twice more."""
    return Retrying(
        retry=retry_if_exception_type(TasksBusy),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.5, max=2) + wait_random(0, 0.3),
        before_sleep=before_sleep_log(log, logging.INFO),
        reraise=True,
    )


class StillRunning(Exception):
    """An exec whose output has ended but that the engine has not yet seen exit."""


def exec_end() -> Retrying:
    """For the exit code of an exec of Dolly's agent: it follows its output's end within a moment."""
    return Retrying(
        retry=retry_if_exception_type(StillRunning),
        stop=stop_after_delay(30),
        wait=wait_exponential(multiplier=0.01, max=0.5),
        reraise=True,
    )


def name_freed() -> Retrying:
    """For giving a container its name back: the engine frees a removed container's name only once
    it is gone, a moment after the removal returns (NameConflict meanwhile), up to 10 s."""
    return Retrying(
        retry=retry_if_exception_type(NameConflict),
        stop=stop_after_delay(10),
        wait=wait_exponential(multiplier=0.05, max=1),
        reraise=True,
    )
