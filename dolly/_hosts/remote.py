"""AgentHost: the :class:`~dolly._hosts.base.Host` of an engine whose files this process cannot
see: each method is one operation of Dolly's agent beside them (:mod:`dolly._hosts.channel`),
which runs :class:`~dolly._hosts.local.LocalHost`'s method of the same name there
(:mod:`dolly._hosts.serve`). Results come back as the values a local call returns: checkpoints
that know their engine, docker-py containers of that engine.

Keys stay here. An export's members come back as a plain stream and are held to the manifest the
agent sent, every digest checked as they pass (the caller signs, compresses and encrypts). An
import's members go to the agent re-signed with a key made for that one transfer, which the agent
trusts alone: it checks every member's digest, the layout and the policy as a local import does,
while the original signer is what its lineage and ``origin`` record.
"""
from __future__ import annotations

import base64
import contextlib
import os
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple

from cryptography.hazmat.primitives import serialization
from docker.models.containers import Container

from .. import _archive as archive, trust
from .._archive import tarfile
from .._bundle import Lineages, Staged
from .._checkpoint import Checkpoint, User
from .._checks import Check
from .._engine import ContainerRef, Engine, id_of
from .._manifest import Hashing, Member, first_member, parse_manifest, tar_members, write_stream
from .._postcopy import PageSource, PageTarget, require_64_bit
from .._start import CloneRequest
from ..errors import BundleError, CheckpointFailed, DollyError
from .base import ref_text
from .channel import Channel


class AgentHost:
    """The host of ``engine``, reached through Dolly's agent there."""

    vouches = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.channel = Channel.of(engine)

    def __repr__(self) -> str:
        return f"AgentHost({self.engine.api.base_url})"

    def _checkpoint(self, data: Dict[str, Any]) -> Checkpoint:
        return Checkpoint.from_metadata(data, Path(data["path"]), self.engine.client)

    # --- the checkpoint store -------------------------------------------------------------------

    def list_checkpoints(self, container: Optional[ContainerRef]) -> List[Checkpoint]:
        return [self._checkpoint(d) for d in self.channel.call("list", container=ref_text(container))]

    def get_checkpoint(self, container: ContainerRef, name: str) -> Checkpoint:
        return self._checkpoint(self.channel.call("get", container=ref_text(container), name=name))

    def remove_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.channel.call("remove", container_id=checkpoint.container_id, name=checkpoint.name)

    def remove_all_of(self, container_id: str) -> None:
        self.channel.call("remove_all_of", container_id=container_id)

    def remove_unused_layer_images(self) -> None:
        self.channel.call("remove_unused_layer_images")

    def require(self, checkpoint: Checkpoint) -> None:
        """Nothing here: the agent checks the files when it is asked to use them."""

    # --- dumps ----------------------------------------------------------------------------------

    def checkpoint(self, container: ContainerRef, name: str, *, leave_running: bool,
                   max_layer_bytes: int, tcp_established: bool = False,
                   made_by: Optional[User] = None) -> Checkpoint:
        return self._checkpoint(self.channel.call("checkpoint", container=ref_text(container), name=name,
                                                  leave_running=leave_running, max_layer_bytes=max_layer_bytes,
                                                  tcp_established=tcp_established,
                                                  made_by=made_by.to_json() if made_by else None))

    def post_copy_source(self, container: ContainerRef, name: str) -> PageSource:
        require_64_bit()
        duplex = self.channel.duplex("post_copy_source", container=ref_text(container), name=name)
        try:
            cp = self._checkpoint(duplex.control("ready", timeout=600))
            # When its agent, by its own clock, asked for the dump, less the few ms its answer took.
            frozen_at = time.perf_counter() - float(duplex.control("frozen_s", timeout=1))
        except BaseException:
            duplex.close()
            raise

        def wait(timeout: float) -> None:
            ended = duplex.control("ended", timeout=timeout)
            if ended is not True:
                raise CheckpointFailed(f"the post-copy dump ended without the target: {ended}")

        return PageSource(cp, duplex, wait, frozen_at)

    def post_copy_target(self) -> PageTarget:
        require_64_bit()
        duplex = self.channel.duplex("post_copy_target")
        try:
            return PageTarget(int(duplex.control("relay", timeout=60)), duplex)
        except BaseException:
            duplex.close()
            raise

    # --- clones ---------------------------------------------------------------------------------

    def start_clones(self, checkpoint: Checkpoint, request: CloneRequest, *,
                     on_create: Optional[Callable[[str], None]],
                     progress: Optional[Callable[[Container], None]],
                     same_as: Optional[datetime] = None) -> List[Container]:
        """The agent cannot call back: each hook runs once the clones run. ``same_as``: looked up
        there, in the same exec."""
        ids = self.channel.call("clone", container_id=checkpoint.container_id, name=checkpoint.name,
                                request=request.to_json(),
                                same_as=same_as.isoformat() if same_as is not None else None)
        self.channel.keep_warm()  # off the critical path: the next clones here start from a warm worker
        try:
            made = [self.engine.container(i) for i in ids]
            for c in made:
                if on_create is not None:
                    on_create(id_of(c))
                if progress is not None:
                    progress(c)
        except BaseException:
            for i in ids:  # as a local start does: a hook's failure leaves no clone behind
                self.engine.remove(i)
            raise
        return made

    def resume(self, checkpoint: Checkpoint, container: Optional[ContainerRef]) -> Container:
        return self.engine.container(self.channel.call("resume", container_id=checkpoint.container_id,
                                                       name=checkpoint.name, container=ref_text(container)))

    def shared_layer(self, checkpoint: Checkpoint) -> Optional[str]:
        return self.channel.call("shared_layer", container_id=checkpoint.container_id, name=checkpoint.name)

    # --- bundles --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def export_members(self, checkpoint: Checkpoint, *, expires_in: timedelta, lineage: Optional[str],
                       max_bytes: int) -> Iterator[Tuple[Dict[str, Any], Iterator[Member]]]:
        """The agent's plain bundle, each member held to the manifest it sent as it passes.

        Raises:
            BundleError: the agent sent another checkpoint's bundle, a member its manifest does
                not list (so), a digest that differs, or a stream cut short.
        """
        with self.channel.stream_out("export", container_id=checkpoint.container_id, name=checkpoint.name,
                                     expires_in_s=expires_in.total_seconds(), lineage=lineage,
                                     max_bytes=max_bytes) as plain, \
                tarfile.open(fileobj=plain, mode="r|", tarinfo=archive.BoundedTarInfo) as tar:
            members = iter(tar)
            manifest = parse_manifest(first_member(tar, members))
            meta = manifest["checkpoint"]
            if (meta["container_id"], meta["name"]) != (checkpoint.container_id, checkpoint.name):
                raise BundleError("Dolly's agent sent the bundle of another checkpoint")
            listed = {m["name"]: m for m in manifest["members"]}

            def checked() -> Iterator[Member]:
                seen = set()
                for name, size, data in tar_members(tar, next(members, None), members):
                    want = listed.get(name)
                    if want is None or name in seen or size != want["size"]:
                        raise BundleError(f"Dolly's agent sent {name!r}, which its manifest does not list so")
                    seen.add(name)
                    yield name, size, Hashing(data, want["sha256"], name, size)  # type: ignore[misc]
                if seen != set(listed):  # a stream cut at a member's end looks whole to tar: not to this
                    raise BundleError(f"Dolly's agent's bundle stopped short: {', '.join(sorted(set(listed) - seen))}"
                                      " missing")

            yield manifest, checked()

    def stage_import(self, manifest: Dict[str, Any], signer: Optional[str], members: Iterable[Member], *,
                     allowed: FrozenSet[str], max_bytes: Optional[int], between_own_engines: bool,
                     rebuild: bool) -> Staged:
        """The members streamed to the agent, signed for this one transfer, into a staging named
        here: an agent that ends mid-way without a word (killed, its container stopped) cannot
        remove what it staged, so its staging is discarded from here (another exec in the agent, or
        in a new one when its container stopped), as after any failure (an agent that failed with
        its own error has removed it already)."""
        transit, transit_public = trust.generate_keypair()
        meta = manifest["checkpoint"]
        staging = Staged(uuid.uuid4().hex, meta["container_id"], meta["name"],
                         (manifest["image"]["id"], manifest["image"]["name"]))

        def produce(sink: IO[bytes]) -> None:
            write_stream(sink, dict(manifest, signer=trust.key_id(transit)), members, signer=transit,
                         compression="none", encryption_key=None)

        key = base64.b64encode(transit_public.public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
        try:
            data = self.channel.stream_in("stage_import", produce, transit_key=key, signed_by=signer,
                                          allow=sorted(allowed), max_bytes=max_bytes,
                                          between_own_engines=between_own_engines, rebuild=rebuild,
                                          token=staging.token)
        except BaseException:
            self.discard_import(staging)
            raise
        return Staged.from_json(data)

    def stage_foreign(self, tar: tarfile.TarFile, head: tarfile.TarInfo, members: Iterator[tarfile.TarInfo], *,
                      allow_unsigned: bool, allowed: FrozenSet[str], max_bytes: Optional[int],
                      between_own_engines: bool, signer: Optional[str], rebuild: bool,
                      verify: Optional[Callable[[], None]]) -> Staged:
        raise BundleError("not a Dolly bundle: it does not start with manifest.json (a Podman or Kubernetes "
                          "checkpoint archive is imported only into an engine whose files are local, for now)")

    def commit_import(self, staged: Staged, *, reference: Optional[str]) -> Checkpoint:
        return self._checkpoint(self.channel.call("commit_import", staged=staged.to_json(), reference=reference))

    def discard_import(self, staged: Staged) -> None:
        with contextlib.suppress(DollyError):
            self.channel.call("discard_import", staged=staged.to_json())

    # --- the host -------------------------------------------------------------------------------

    def check(self) -> List[Check]:
        """The agent's lines, checked beside the files; a failing ``agent`` line when it does not
        answer."""
        try:
            rows = self.channel.call("check_host")
        except DollyError as e:
            # An engine whose socket Dolly cannot tell needs its label, not another `make host`.
            fix = ("give the engine its socket's path as a label: \"labels\": [\"dolly.socket=/path/to.sock\"] in its "
                   "daemon.json" if "dolly.socket" in str(e) else "run `make host` on the engine's host")
            return [Check("agent", False, str(e), fix)]
        return [Check("agent", True, f"Dolly's agent answers beside the files of {self.engine.api.base_url}"),
                *(Check(**row) for row in rows)]

    def tag_lineages(self) -> Lineages:
        """This user's record, ``$XDG_STATE_HOME/dolly`` (else ``~/.local/state/dolly``); the agent
        keeps the bundles' own lineages on the engine's host."""
        state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "dolly"
        return Lineages(state / "lineages.json")

    def scratch_folder(self, prefix: str) -> contextlib.AbstractContextManager[str]:
        """A private folder in the system's temporary folder: the engine's spool is not here."""
        return tempfile.TemporaryDirectory(prefix=f"dolly-{prefix}")

    def prepare(self, n: int) -> Callable[[float], None]:
        """``n`` of the agent's workers started ahead (see :meth:`Channel.prewarm`)."""
        return self.channel.prewarm(n)

    def release(self) -> None:
        self.channel.release()
