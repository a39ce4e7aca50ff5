"""The seam between Dolly's operations and an engine's host.

Everything Dolly does that needs an engine's host (its files, CRIU, the runtime's spool) is one
method of :class:`Host`. Two implementations fill it: :class:`~dolly._hosts.local.LocalHost`,
when this process sees the engine's files, and :class:`~dolly._hosts.remote.AgentHost`, when it
does not and Dolly's agent works beside them (one ``exec`` per method: the methods are coarse, so
a remote host is not chattier than a local one). :func:`dolly._hosts.host_of` chooses, once per
engine; nothing else asks. The agent's entry point (:mod:`dolly._hosts.serve`) serves
``LocalHost``'s methods, so both hosts run the same code beside the files.

What stays with the caller for both: keys (signing, verifying, encrypting), the Docker API calls
an operation composes (names, images, labels), hooks, and the order of an import: verify, stage,
copy the image, commit.
"""
from __future__ import annotations

import contextlib
from datetime import datetime, timedelta
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Protocol, Tuple

from docker.models.containers import Container

from .._archive import tarfile
from .._bundle import Lineages, Staged
from .._checkpoint import Checkpoint, User
from .._checks import Check
from .._engine import ContainerRef, Engine
from .._manifest import Member
from .._postcopy import PageSource, PageTarget
from .._start import CloneRequest


class Host(Protocol):
    """The operations that need the files of :attr:`engine`'s host. Each raises the Dolly
    errors its docstring in :class:`~dolly._hosts.local.LocalHost` names, the same from either
    host (an agent's error comes back as its own class)."""

    engine: Engine
    # Whether what this host sends is this process's own work (True), or the word of an agent
    # on another host, which a copy from it is held to as to anything from outside (False).
    vouches: bool

    # --- the checkpoint store ---------------------------------------------------------------
    def list_checkpoints(self, container: Optional[ContainerRef]) -> List[Checkpoint]: ...

    def get_checkpoint(self, container: ContainerRef, name: str) -> Checkpoint: ...

    def remove_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    def remove_all_of(self, container_id: str) -> None: ...

    def remove_unused_layer_images(self) -> None: ...

    def require(self, checkpoint: Checkpoint) -> None: ...

    # --- dumps ------------------------------------------------------------------------------
    def checkpoint(self, container: ContainerRef, name: str, *, leave_running: bool,
                   max_layer_bytes: int, tcp_established: bool = False,
                   made_by: Optional[User] = None) -> Checkpoint: ...

    def post_copy_source(self, container: ContainerRef, name: str) -> PageSource: ...

    def post_copy_target(self) -> PageTarget: ...

    # --- clones -----------------------------------------------------------------------------
    def start_clones(self, checkpoint: Checkpoint, request: CloneRequest, *,
                     on_create: Optional[Callable[[str], None]],
                     progress: Optional[Callable[[Container], None]],
                     same_as: Optional[datetime] = None) -> List[Container]:
        """Start the clones ``request`` names. With ``same_as``, ``checkpoint`` is another
        engine's: the clones start from this host's own copy of it taken at that instant (the
        original, or a copy Dolly's transfer made), found in the same call, and
        CheckpointNotFound or ContainerNotFound say there is none."""
        ...

    def resume(self, checkpoint: Checkpoint, container: Optional[ContainerRef]) -> Container: ...

    def shared_layer(self, checkpoint: Checkpoint) -> Optional[str]: ...

    # --- bundles ----------------------------------------------------------------------------
    def export_members(self, checkpoint: Checkpoint, *, expires_in: timedelta, lineage: Optional[str],
                       max_bytes: int) -> contextlib.AbstractContextManager[Tuple[Dict[str, Any], Iterator[Member]]]:
        ...

    def stage_import(self, manifest: Dict[str, Any], signer: Optional[str], members: Iterable[Member], *,
                     allowed: FrozenSet[str], max_bytes: Optional[int], between_own_engines: bool,
                     rebuild: bool) -> Staged: ...

    def commit_import(self, staged: Staged, *, reference: Optional[str]) -> Checkpoint: ...

    def discard_import(self, staged: Staged) -> None: ...

    def stage_foreign(self, tar: tarfile.TarFile, head: tarfile.TarInfo, members: Iterator[tarfile.TarInfo], *,
                      allow_unsigned: bool, allowed: FrozenSet[str], max_bytes: Optional[int],
                      between_own_engines: bool, signer: Optional[str], rebuild: bool,
                      verify: Optional[Callable[[], None]]) -> Staged: ...

    # --- the host ---------------------------------------------------------------------------
    def check(self) -> List[Check]: ...

    def tag_lineages(self) -> Lineages: ...

    def scratch_folder(self, prefix: str) -> contextlib.AbstractContextManager[str]: ...

    def prepare(self, n: int) -> Callable[[float], None]: ...

    def release(self) -> None: ...


def ref_text(container: Optional[ContainerRef]) -> Optional[str]:
    """A container reference as it crosses to a host: its ID for a Container, else as given."""
    return container.id if isinstance(container, Container) else container


__all__ = ["CloneRequest", "Host", "Member", "PageSource", "PageTarget", "Staged", "ref_text"]
