"""Every error Dolly raises on purpose.

    DollyError
    ├── HostNotReady             the engine or CRIU is not set up for checkpoints (see check_host)
    ├── EngineUnavailable        the Docker Engine did not answer (transient: retried first)
    ├── EngineError              the Docker Engine refused a request; carries its status code
    ├── InvalidArgument          a value that can never work (also a ValueError)
    ├── ContainerNotFound        no such container
    ├── ContainerNotRunning      the container exists but is not running
    ├── ImageNotFound            the engine lacks the image a checkpoint was taken from
    ├── NotReady                 a service did not pass its readiness check in time
    ├── NameConflict             a container name that is already taken
    ├── CheckpointNotFound       no such checkpoint
    ├── CheckpointExists         a checkpoint of that name exists for that container
    ├── ImageRewriteError        a CRIU image that cannot be read or rewritten
    └── CriuError                CRIU itself failed; carries the lines of CRIU's log that matter
        ├── CheckpointFailed     ... while dumping
        └── RestoreFailed        ... while restoring

Each leaves the world as it found it: the source container running, the checkpoint usable, and
no container half-made by Dolly left behind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

__all__ = [
    "DollyError",
    "HostNotReady",
    "EngineUnavailable",
    "EngineError",
    "InvalidArgument",
    "ContainerNotFound",
    "ContainerNotRunning",
    "ImageNotFound",
    "NotReady",
    "NameConflict",
    "CheckpointNotFound",
    "CheckpointExists",
    "ImageRewriteError",
    "CriuError",
    "CheckpointFailed",
    "RestoreFailed",
]


class DollyError(Exception):
    """Base class of every error Dolly raises on purpose."""


class HostNotReady(DollyError):
    """The engine or CRIU cannot take or restore checkpoints; the message says how to fix it."""


class EngineUnavailable(DollyError):
    """The Docker Engine could not be reached, or answered that it is briefly unavailable."""


class EngineError(DollyError):
    """The Docker Engine refused a request for a reason Dolly has no better name for."""

    def __init__(self, message: str, *, status_code: Optional[int] = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class InvalidArgument(DollyError, ValueError):
    """An argument that can never work, whatever the state of the engine."""


class ContainerNotFound(DollyError):
    """No container has that name or ID."""


class ContainerNotRunning(DollyError):
    """The container exists but is not running, so there is no process to checkpoint."""


class ImageNotFound(DollyError):
    """The engine lacks the image that a checkpoint's container was created from."""


class NotReady(DollyError):
    """A service did not pass its readiness check in time; ``logs`` holds its last log lines."""

    def __init__(self, message: str, *, logs: Sequence[str] = ()) -> None:
        self.logs = list(logs)
        super().__init__(message)


class NameConflict(DollyError):
    """A container name that is already taken on the engine."""


class CheckpointNotFound(DollyError):
    """No checkpoint of that name exists (or its files are gone)."""


class CheckpointExists(DollyError):
    """The container already has a checkpoint of that name."""


class ImageRewriteError(DollyError):
    """A CRIU image that cannot be read or written back."""


class CriuError(DollyError):
    """CRIU failed. ``log_lines`` holds the lines of CRIU's log that explain it, ``log_path``
    where the whole log was kept (Docker deletes it; Dolly's runtime keeps a copy)."""

    def __init__(
        self,
        message: str,
        *,
        log_lines: Sequence[str] = (),
        log_path: Optional[Path] = None,
    ) -> None:
        self.log_lines = list(log_lines)
        self.log_path = log_path
        text = message
        if self.log_lines:
            text += "\nCRIU log (" + str(log_path) + "):\n  " + "\n  ".join(self.log_lines)
        super().__init__(text)


class CheckpointFailed(CriuError):
    """Docker or CRIU could not dump the container."""


class RestoreFailed(CriuError):
    """Docker or CRIU could not restore the checkpoint into a new container."""
