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
    ├── CriuError                CRIU itself failed; carries the lines of CRIU's log that matter
    │   ├── CheckpointFailed     ... while dumping; .kept names the images kept when the dump
    │   │                        had already stopped the container (dolly.resume starts it again)
    │   └── RestoreFailed        ... while restoring
    ├── BundleError              a bundle that cannot be imported; nothing was extracted
    │   ├── UnsignedBundle       it has no signature and allow_unsigned was not given
    │   ├── UntrustedSigner      it is signed by a key that is not trusted
    │   ├── SignatureInvalid     its manifest does not match its signature
    │   ├── DigestMismatch       a member differs from the manifest (or is missing or extra)
    │   ├── BundleExpired        it is past its expires_at
    │   ├── RollbackRefused      it is older than one of its lineage already imported here
    │   ├── DecryptionFailed     it is encrypted and the key is missing or wrong
    │   ├── UnsafeArchive        absolute paths, "..", escaping links, devices, or too large
    │   └── PolicyRefused        its container asks for host access the restore policy does not
    │                            allow (privileged, host mounts, devices, ...); .items names them
    ├── RegistryError            an OCI registry could not be reached or refused; carries .status
    ├── MigrationFailed          a step of migrate failed; .step names it, the source runs again
    │                            (but at "roll back": the target's state is unknown, see message)
    └── SchemaMigrationFailed    a project's database migration failed while a warm database was
                                 made (dolly.testing.django); .migration names it

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
    "BundleError",
    "UnsignedBundle",
    "UntrustedSigner",
    "SignatureInvalid",
    "DigestMismatch",
    "BundleExpired",
    "RollbackRefused",
    "DecryptionFailed",
    "UnsafeArchive",
    "PolicyRefused",
    "RegistryError",
    "MigrationFailed",
    "SchemaMigrationFailed",
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
    """Docker or CRIU could not dump the container, or a step after the dump failed.

    ``kept`` is None when the container was left as it was. When the dump had already stopped
    the container (``leave_running=False``) and a later step failed, its images are not thrown
    away: ``kept`` is the folder of the checkpoint holding them, from which
    :func:`dolly.resume` starts the container again with its state."""

    def __init__(
        self,
        message: str,
        *,
        log_lines: Sequence[str] = (),
        log_path: Optional[Path] = None,
        kept: Optional[Path] = None,
    ) -> None:
        self.kept = kept
        if kept is not None:
            message += f"; the container was stopped by the dump and its images are kept at {kept}"
        super().__init__(message, log_lines=log_lines, log_path=log_path)


class RestoreFailed(CriuError):
    """Docker or CRIU could not restore the checkpoint into a new container."""


class BundleError(DollyError):
    """A checkpoint bundle that cannot be imported. Nothing of it was extracted or restored."""


class UnsignedBundle(BundleError):
    """The bundle carries no signature, and ``allow_unsigned=True`` was not given."""


class UntrustedSigner(BundleError):
    """The bundle is signed by a key that is not among the trusted keys."""


class SignatureInvalid(BundleError):
    """The manifest does not match its signature: it was altered after signing."""


class DigestMismatch(BundleError):
    """A member's content or size differs from the manifest, or a member is missing or extra."""


class BundleExpired(BundleError):
    """The bundle is past its ``expires_at``: it is not fresh."""


class RollbackRefused(BundleError):
    """A newer bundle of the same lineage was already imported on this engine."""


class DecryptionFailed(BundleError):
    """The bundle is encrypted and the key is missing or wrong, or the ciphertext was altered."""


class UnsafeArchive(BundleError):
    """An archive member that could write outside the target: an absolute path, "..", a link or
    device node, or more data than the caps allow."""


class PolicyRefused(BundleError):
    """A checkpoint that did not come from this engine asks for host access that the restore
    policy does not allow. ``items`` names each one (``"privileged"``, ``"host-mounts"``, ...);
    pass them in ``allow=`` to accept them on purpose."""

    def __init__(self, message: str, *, items: Sequence[str] = ()) -> None:
        self.items = list(items)
        super().__init__(message)


class RegistryError(DollyError):
    """An OCI registry could not be reached, refused the credentials, or refused a request.
    ``status`` holds the HTTP status when it answered (404: it has no such tag or blob)."""

    def __init__(self, message: str, *, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class MigrationFailed(DollyError):
    """A step of :func:`dolly.migrate` failed. ``step`` names it. The source container is running
    again with its state, except at step ``"roll back"``: then the target's state could not be
    known, so the source was not started again (two copies could run); the message says where its
    checkpoint is kept and how to resume it."""

    def __init__(self, message: str, *, step: str) -> None:
        self.step = step
        super().__init__(message)


class SchemaMigrationFailed(DollyError):
    """A project's database migrations failed while its warm database was made, before any
    checkpoint (:mod:`dolly.testing.django`). ``migration`` names the one that failed
    (``"app_label.0003_name"``), or is None when the failure came after the migrations (a
    ``post_migrate`` handler); the server it ran on is removed."""

    def __init__(self, message: str, *, migration: Optional[str] = None) -> None:
        self.migration = migration
        super().__init__(message)


# What a Dolly error carries besides its message, sent back from Dolly's agent with it.
CARRIED = ("kept", "log_lines", "log_path", "items", "status_code", "step", "logs")
