"""Dolly's functions for an engine whose files this process cannot see: each runs in the engine's
agent (:mod:`dolly._agent`), and its result comes back as the same values a local call returns:
:class:`~dolly.Checkpoint` objects that know their engine, docker-py containers of that engine.

Bundles cross over as plain tar streams. Keys stay here: an export is signed, compressed and
encrypted in this process as the agent's plain stream passes through; an import is decrypted and
its signature verified here, then re-signed with a key made for that one transfer, which the
agent trusts alone, so that the agent checks every member's digest, the layout and the policy as
a local import does, while the original signer is what its lineage and ``origin`` record.
"""
from __future__ import annotations

import base64
import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Union

import docker
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from docker.models.containers import Container

from .. import _archive as archive, _formats as formats, policy, trust
from .._archive import tarfile
from .._bundle import check_signature_and_freshness, first_member, parse_manifest, read_signature, write_stream
from .._checkpoint import Checkpoint
from .._engine import ContainerRef, Engine, id_of, translate_errors
from ..errors import BundleError
from .channel import Channel

_CHUNK = 1 << 20


def checkpoint_from(engine: Engine, data: Dict[str, Any]) -> Checkpoint:
    return Checkpoint.from_metadata(data, Path(data["path"]), engine.client)


def _ref(container: Optional[ContainerRef]) -> Optional[str]:
    return container.id if isinstance(container, Container) else container


def checkpoint(engine: Engine, container: ContainerRef, name: str, *, leave_running: bool,
               max_layer_bytes: int) -> Checkpoint:
    data = Channel.of(engine).call("checkpoint", container=_ref(container), name=name, leave_running=leave_running,
                                 max_layer_bytes=max_layer_bytes)
    return checkpoint_from(engine, data)


def list_checkpoints(engine: Engine, container: Optional[ContainerRef]) -> List[Checkpoint]:
    return [checkpoint_from(engine, d) for d in Channel.of(engine).call("list", container=_ref(container))]


def get_checkpoint(engine: Engine, container: ContainerRef, name: str) -> Checkpoint:
    return checkpoint_from(engine, Channel.of(engine).call("get", container=_ref(container), name=name))


def remove_checkpoint(engine: Engine, cp: Checkpoint) -> None:
    Channel.of(engine).call("remove", container_id=cp.container_id, name=cp.name)


def clone(engine: Engine, cp: Checkpoint, n: int, *, name_prefix: Optional[str], labels: Optional[Dict[str, str]],
          max_workers: int, names: Optional[List[str]], on_create: Optional[Callable[[str], None]],
          progress: Optional[Callable[[Container], None]], page_port: Optional[int] = None,
          network: Union[str, Sequence[str], None] = None) -> List[Container]:
    ids = Channel.of(engine).call("clone", container_id=cp.container_id, name=cp.name, n=n, name_prefix=name_prefix,
                                labels=labels, max_workers=max_workers, names=names, page_port=page_port,
                                network=network if isinstance(network, (str, type(None))) else list(network))
    try:
        made = [engine.container(i) for i in ids]
        for c in made:  # the agent cannot call back: each hook runs once the clones run
            if on_create is not None:
                on_create(id_of(c))
            if progress is not None:
                progress(c)
    except BaseException:
        for i in ids:  # as a local clone() does: a hook's failure leaves no clone behind
            engine.remove(i)
        raise
    return made


def resume(engine: Engine, cp: Checkpoint, container: Optional[ContainerRef]) -> Container:
    return engine.container(Channel.of(engine).call("resume", container_id=cp.container_id, name=cp.name,
                                                  container=_ref(container)))


def check_host(engine: Engine) -> List[Dict[str, Any]]:
    return list(Channel.of(engine).call("check_host"))


def export(engine: Engine, cp: Checkpoint, out: Path, *, signer: Optional[Ed25519PrivateKey], compression: str,
           encryption_key: Optional[bytes], expires_in: timedelta, lineage: Optional[str], max_bytes: int) -> Path:
    """The agent's plain, unsigned bundle, signed, compressed and encrypted here as it passes."""
    from .._bundle import write_bundle

    out.parent.mkdir(parents=True, exist_ok=True)
    with Channel.of(engine).stream_out("export", container_id=cp.container_id, name=cp.name,
                                     expires_in_s=expires_in.total_seconds(), lineage=lineage,
                                     max_bytes=max_bytes) as plain, \
            tarfile.open(fileobj=plain, mode="r|", tarinfo=archive.BoundedTarInfo) as tar:
        members = iter(tar)
        manifest = parse_manifest(first_member(tar, members))
        if (manifest["checkpoint"]["container_id"], manifest["checkpoint"]["name"]) != (cp.container_id, cp.name):
            raise BundleError("Dolly's agent sent the bundle of another checkpoint")
        # What the caller's key signs is the caller's: its clock, its lineage, a bundle ID of its own.
        now = datetime.now(UTC)
        manifest.update(bundle_id=uuid.uuid4().hex, lineage=lineage or cp.container_id, created_at=now.isoformat(),
                        expires_at=(now + expires_in).isoformat(), compression=compression,
                        signer=trust.key_id(signer) if signer is not None else None)
        listed = {m["name"]: m for m in manifest["members"]}

        def rest() -> Iterable[tuple]:
            seen = set()
            for member in members:
                if formats.is_images_folder(member):
                    continue
                want = listed.get(member.name)
                if want is None or member.name in seen or not member.isfile() or member.size != want["size"]:
                    raise BundleError(f"Dolly's agent sent {member.name!r}, which its manifest does not list so")
                seen.add(member.name)
                yield member.name, member.size, _Hashing(tar.extractfile(member), want["sha256"], member.name,
                                                         member.size)
            if seen != set(listed):  # a stream cut at a member's end looks whole to tar: not to this
                missing = ", ".join(sorted(set(listed) - seen))
                raise BundleError(f"Dolly's agent's bundle stopped short: {missing} missing")

        return write_bundle(out, manifest, rest(), signer=signer, compression=compression,
                            encryption_key=encryption_key)


def import_bundle(engine: Engine, source: Union[Path, IO[bytes]], *, trusted: List[Ed25519PublicKey],
                  allow_unsigned: bool, allow: Iterable[str], image_source: Optional[docker.DockerClient],
                  encryption_key: Optional[bytes], max_bytes: int, between_own_engines: bool,
                  rebuild: bool = True) -> Checkpoint:
    """Verified here (signature, freshness, form), re-signed for the agent with a one-time key,
    streamed to it; it checks the rest as a local import does, its images rebuilt with ``rebuild``."""

    transit, transit_public = trust.generate_keypair()
    loaded = False
    with archive.open_bundle(source, encryption_key) as tar:
        members = iter(tar)
        head = next(members, None)
        if head is not None and head.name != "manifest.json":
            raise BundleError("not a Dolly bundle: it does not start with manifest.json (a Podman or Kubernetes "
                              "checkpoint archive is imported only into an engine whose files are local, for now)")
        manifest_bytes = first_member(tar, iter([head] if head is not None else []))
        manifest = parse_manifest(manifest_bytes)
        signature, first = read_signature(tar, members)
        signer = check_signature_and_freshness(manifest_bytes, manifest, signature, trusted, allow_unsigned)
        loaded = engine.ensure_image(manifest["image"]["id"], manifest["image"]["name"], tag=False,
                                     source=Engine.of(image_source) if image_source is not None else None)

        def rest() -> Iterable[tuple]:
            member = first
            while member is not None:
                if formats.is_images_folder(member):
                    member = next(members, None)
                    continue
                if not member.isfile():
                    raise BundleError(f"{member.name!r} in the bundle is not a regular file")
                yield member.name, member.size, tar.extractfile(member)
                member = next(members, None)

        def produce(sink: Any) -> None:
            write_stream(sink, dict(manifest, signer=trust.key_id(transit)), rest(), signer=transit,
                         compression="none", encryption_key=None)

        try:
            data = Channel.of(engine).stream_in(
                "import", produce, transit_key=base64.b64encode(transit_public.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)).decode(),
                allow=sorted(allow), max_bytes=max_bytes, signed_by=signer,
                between_own_engines=between_own_engines, rebuild=rebuild)
        except BaseException:
            if loaded:
                engine.remove_image(manifest["image"]["id"])
            raise
    return checkpoint_from(engine, data)


class _Hashing:
    """A member's data as it passes, checked against its digest when it ends."""

    def __init__(self, data: Any, sha256: str, name: str, size: int) -> None:
        self.data, self.want, self.name, self.left, self.hash = data, sha256, name, size, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        chunk = self.data.read(n)
        self.hash.update(chunk)
        self.left -= len(chunk)
        if (self.left <= 0 or not chunk) and self.hash.hexdigest() != self.want:
            raise BundleError(f"{self.name} from Dolly's agent does not match its SHA-256")
        return bytes(chunk)


def allowed_from(engine: Engine, cp: Checkpoint) -> FrozenSet[str]:
    """The most that a copy of ``cp`` sent by ``engine``'s agent may ask for where it is imported:
    what the caller's own container asks for, as the engine's API (not the agent) reports it now;
    nothing, when that container is gone. A copy between the caller's engines is the caller's
    own, but what an agent sends is only as good as the agent: it is never imported with more
    allowed than the container it claims to be a copy of has.

    Raises:
        EngineError: the engine does not answer.
    """
    with translate_errors():
        try:
            attrs = engine.api.inspect_container(cp.container_id)
        except docker.errors.NotFound:
            return frozenset()
    return frozenset(item for item, _ in policy.violations(attrs) if item in policy.ITEMS)
