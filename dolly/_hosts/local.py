"""LocalHost: the :class:`~dolly._hosts.base.Host` of an engine whose files this process sees.

Each method is one call into the module that does that job beside the files: the store
(:mod:`dolly._store`), dumps (:mod:`dolly._dump`, :mod:`dolly._lazy_dump`, :mod:`dolly._postcopy`),
clones (:mod:`dolly._start`), bundles (:mod:`dolly._bundle`) and checks (:mod:`dolly._checks`).
Dolly's agent serves these same methods on another host (:mod:`dolly._hosts.serve`).
"""
from __future__ import annotations

import contextlib
import tempfile
from datetime import datetime, timedelta
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple

from docker.models.containers import Container

from .. import (
    _bundle as bundle,
    _checks as checks,
    _criu as criu,
    _dump as dump,
    _postcopy as postcopy,
    _start as start,
    _store as store,
)
from .._archive import tarfile
from .._bundle import Lineages, Staged
from .._checkpoint import Checkpoint, User
from .._checks import Check
from .._engine import ContainerRef, Engine
from .._manifest import Member
from .._postcopy import PageSource, PageTarget
from .._start import CloneRequest


class LocalHost:
    """The host of ``engine``, whose files are this process's to see."""

    vouches = True

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __repr__(self) -> str:
        return f"LocalHost({self.engine.api.base_url})"

    # --- the checkpoint store -------------------------------------------------------------------

    def list_checkpoints(self, container: Optional[ContainerRef]) -> List[Checkpoint]:
        """Raises: ContainerNotFound, InvalidArgument (see :func:`dolly.list_checkpoints`)."""
        return store.find_all(self.engine, container)

    def get_checkpoint(self, container: ContainerRef, name: str) -> Checkpoint:
        """Raises: ContainerNotFound, CheckpointNotFound, InvalidArgument."""
        return store.find(self.engine, container, name)

    def remove_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Raises: CheckpointNotFound, InvalidArgument (a path outside the store)."""
        store.require(checkpoint)
        store.remove(self.engine, checkpoint)

    def remove_all_of(self, container_id: str) -> None:
        store.remove_all_of(self.engine, container_id)

    def remove_unused_layer_images(self) -> None:
        store.remove_unused_layer_images(self.engine)

    def require(self, checkpoint: Checkpoint) -> None:
        """Raises: CheckpointNotFound: its files are gone."""
        store.require(checkpoint)

    # --- dumps ----------------------------------------------------------------------------------

    def checkpoint(self, container: ContainerRef, name: str, *, leave_running: bool,
                   max_layer_bytes: int, tcp_established: bool = False,
                   made_by: Optional[User] = None) -> Checkpoint:
        """Raises: the errors of :func:`dolly.checkpoint`."""
        return dump.take(self.engine, container, name, leave_running=leave_running, max_layer_bytes=max_layer_bytes,
                         tcp_established=tcp_established, made_by=made_by)

    def post_copy_source(self, container: ContainerRef, name: str) -> PageSource:
        """Raises: the errors of :func:`dolly._lazy_dump.checkpoint_lazy`."""
        return postcopy.open_source(self.engine, container, name)

    def post_copy_target(self) -> PageTarget:
        """Raises: HostNotReady."""
        return postcopy.open_target(self.engine)

    # --- clones ---------------------------------------------------------------------------------

    def start_clones(self, checkpoint: Checkpoint, request: CloneRequest, *,
                     on_create: Optional[Callable[[str], None]],
                     progress: Optional[Callable[[Container], None]],
                     same_as: Optional[datetime] = None) -> List[Container]:
        """Raises: the errors of :func:`dolly.clone`; no clone is left behind."""
        if same_as is not None:
            checkpoint = store.find_same(self.engine, checkpoint.container_id, checkpoint.name, same_as)
        return start.start_clones(self.engine, checkpoint, request, on_create=on_create, progress=progress)

    def resume(self, checkpoint: Checkpoint, container: Optional[ContainerRef]) -> Container:
        """Raises: the errors of :func:`dolly.resume`."""
        return start.resume(self.engine, checkpoint, container)

    def shared_layer(self, checkpoint: Checkpoint) -> Optional[str]:
        """The clones' shared layer image of ``checkpoint`` (made now when it is to be), or None."""
        return start.shared_layer(self.engine, checkpoint)

    # --- bundles --------------------------------------------------------------------------------

    def export_members(self, checkpoint: Checkpoint, *, expires_in: timedelta, lineage: Optional[str],
                       max_bytes: int) -> contextlib.AbstractContextManager[Tuple[Dict[str, Any], Iterator[Member]]]:
        """Raises: CheckpointNotFound, InvalidArgument (a layer over ``max_bytes``)."""
        return bundle.bundle_members(checkpoint, self.engine, expires_in=expires_in, lineage=lineage,
                                     max_bytes=max_bytes)

    def stage_import(self, manifest: Dict[str, Any], signer: Optional[str], members: Iterable[Member], *,
                     allowed: FrozenSet[str], max_bytes: Optional[int], between_own_engines: bool,
                     rebuild: bool) -> Staged:
        """Raises: the errors of :func:`dolly._bundle.stage`."""
        return bundle.stage(self.engine, manifest, signer, members, allowed=allowed, max_bytes=max_bytes,
                            between_own_engines=between_own_engines, rebuild=rebuild)

    def stage_foreign(self, tar: tarfile.TarFile, head: tarfile.TarInfo, members: Iterator[tarfile.TarInfo], *,
                      allow_unsigned: bool, allowed: FrozenSet[str], max_bytes: Optional[int],
                      between_own_engines: bool, signer: Optional[str], rebuild: bool,
                      verify: Optional[Callable[[], None]]) -> Staged:
        """Raises: the errors of :func:`dolly._bundle.stage_foreign`."""
        return bundle.stage_foreign(self.engine, tar, head, members, allow_unsigned=allow_unsigned, allowed=allowed,
                                    max_bytes=max_bytes, between_own_engines=between_own_engines, signer=signer,
                                    rebuild=rebuild, verify=verify)

    def commit_import(self, staged: Staged, *, reference: Optional[str]) -> Checkpoint:
        """Raises: the errors of :func:`dolly._bundle.commit`."""
        return bundle.commit(self.engine, staged, reference=reference)

    def discard_import(self, staged: Staged) -> None:
        bundle.discard(self.engine, staged)

    # --- the host -------------------------------------------------------------------------------

    def check(self) -> List[Check]:
        return checks.local_checks(self.engine)

    def tag_lineages(self) -> Lineages:
        """The engine's own record, beside its checkpoints."""
        return Lineages.of(self.engine)

    def scratch_folder(self, prefix: str) -> contextlib.AbstractContextManager[str]:
        """A folder only root reads, in the engine's spool, removed when the block ends."""
        self.engine.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(dir=self.engine.spool_dir, prefix=prefix)

    def prepare(self, n: int) -> Callable[[float], None]:
        """Ready for an operation that must not wait once it starts (a migration's freeze): CRIU
        checked and pycriu loaded here, now. Nothing to wait for after.

        Raises:
            HostNotReady: CRIU is missing or older than 4.2.
        """
        criu.require_version()
        criu.preload()
        return lambda timeout: None

    def release(self) -> None:
        pass
