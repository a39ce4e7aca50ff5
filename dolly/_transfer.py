"""Bundles as the caller sees them: export a checkpoint to a file, import one, and copy a checkpoint
between engines. Keys stay here, whichever host holds the files: an export's members come from the
engine's host (:meth:`~dolly._hosts.base.Host.export_members`) and are signed, compressed and
encrypted here; an import is decrypted and its signature verified here, then one sequence for
either host: the members staged and checked beside the engine's files, only then the image copied,
then the checkpoint committed to the store (see :mod:`dolly._bundle`).

Importing treats the bundle as written by an attacker until it is verified, and reads the caller's
file exactly once, as a stream (:func:`dolly._archive.open_bundle`). A refusal at any step leaves
nothing of the bundle anywhere.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Dict, FrozenSet, Iterable, List, Optional, Union

import docker
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import _archive as archive, _formats as formats, _names as names, _rebuild, policy, trust
from ._bundle import Staged
from ._catalog import engine_of, require
from ._checkpoint import Checkpoint
from ._engine import Engine, translate_errors
from ._hosts import Host, host_of
from ._manifest import (
    COMPRESSIONS,
    DEFAULT_MAX_BYTES,
    Member,
    PathLike,
    check_signature_and_freshness,
    entry,
    first_member,
    opened,
    parse_manifest,
    read_signature,
    source_of,
    stamp,
    tar_members,
    write_bundle,
)
from .errors import DigestMismatch, InvalidArgument, UnsignedBundle

__all__ = ["export", "import_bundle", "transfer", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("dolly", "oci", "podman")


def export(
    checkpoint: Checkpoint,
    path: PathLike,
    *,
    format: str = "dolly",
    signer: Optional[Ed25519PrivateKey] = None,
    compression: str = "zstd",
    encryption_key: Optional[bytes] = None,
    expires_in: timedelta = timedelta(days=7),
    lineage: Optional[str] = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    client: Optional[docker.DockerClient] = None,
) -> Path:
    """Write ``checkpoint`` as one bundle at ``path``, readable by root only.

    The layer's conversion happens in the engine's root-only spool; with ``encryption_key``,
    the archive is encrypted as it is written, so no plaintext reaches ``path``'s folder.

    Args:
        format: ``"dolly"`` (a bundle file at ``path``); ``"podman"``: the archive that
            ``podman container restore --import PATH`` restores (Podman 4.3 with runc; the image
            loaded into Podman first, ``docker save | podman load``; the host needs
            ``dolly._formats.PODMAN_CRIU_CONFIG``, which ``make host`` writes; the clones keep
            the source's kernel hostname): a bundle whose members are made for Podman's set-up
            (``"flavor": "podman"`` in its manifest, which Podman passes over, as it does the
            signature), not encrypted, and importable into Docker again; or ``"oci"``: a
            checkpoint OCI image, the new folder ``path`` holding an OCI image layout whose one
            layer is the ``"podman"`` archive, uncompressed (its files at ``/``, as CRI-O's and
            Podman's checkpoint images hold theirs), annotated for CRI-O
            (``io.kubernetes.cri-o.annotations.checkpoint.name``), Podman
            (``io.podman.annotations.checkpoint.*``: ``podman container restore IMAGE`` restores
            it once in Podman's storage), checkpointctl (``org.criu.checkpoint.*``) and Dolly
            (``io.dolly.checkpoint.*``: the manifest's digest and the signer).
            ``skopeo copy oci:PATH docker://...`` pushes it.
        signer: an Ed25519 private key (:func:`dolly.trust.generate_keypair`); unsigned when None.
        compression: ``"zstd"`` (default), ``"gzip"`` or ``"none"``.
        encryption_key: 32 bytes (:func:`dolly.trust.generate_encryption_key`) to encrypt the
            bundle with AES-256-GCM: checkpoint images hold process memory, secrets included.
        expires_in: how long the bundle is fresh; importing it later is refused.
        lineage: bundles of one lineage (and one signer) may not be imported older than
            newest-seen; default the source container's ID.
        max_bytes: refuse a writable layer that would take more than this in the bundle
            (sparse files are written out whole).
        client: the engine the checkpoint is on (for the manifest's source fields); default the
            one the checkpoint knows.

    Raises:
        InvalidArgument: an unknown format or compression, a bad key or lineage, a non-positive
            ``expires_in``, a layer larger than ``max_bytes`` in the bundle, an encrypted OCI
            image (an image's layer is not encrypted), or an OCI image folder that exists.
        CheckpointNotFound: the checkpoint's files are gone.
    """
    require(checkpoint)
    if format not in EXPORT_FORMATS:
        raise InvalidArgument(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    if format == "oci":
        return _export_oci(checkpoint, Path(path), signer=signer, encryption_key=encryption_key,
                           expires_in=expires_in, lineage=lineage, max_bytes=max_bytes, client=client)
    if format == "podman":
        if encryption_key is not None:
            raise InvalidArgument("Podman reads no encrypted archive: export format='dolly' to encrypt")
        if compression not in COMPRESSIONS:
            raise InvalidArgument(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        if signer is not None and not isinstance(signer, Ed25519PrivateKey):
            raise InvalidArgument(f"signer must be an Ed25519 private key, got {type(signer).__name__}")
        return _export_podman(checkpoint, Path(path), signer=signer, compression=compression, expires_in=expires_in,
                              lineage=lineage, max_bytes=max_bytes, client=client)
    if compression not in COMPRESSIONS:
        raise InvalidArgument(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if not isinstance(expires_in, timedelta) or expires_in <= timedelta(0):
        raise InvalidArgument(f"expires_in must be a positive timedelta, got {expires_in!r}")
    if signer is not None and not isinstance(signer, Ed25519PrivateKey):
        raise InvalidArgument(f"signer must be an Ed25519 private key, got {type(signer).__name__}")
    if lineage is not None:
        names.lineage(lineage)
    if encryption_key is not None:
        trust.EncryptingWriter(encryption_key, io.BytesIO())  # a bad key fails before any work
    engine = engine_of(checkpoint, client)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with host_of(engine).export_members(checkpoint, expires_in=expires_in, lineage=lineage,
                                        max_bytes=max_bytes) as (manifest, members):
        # What the caller's key signs is the caller's: its clock, its lineage, a bundle ID of its own.
        stamp(manifest, lineage=lineage, expires_in=expires_in, compression=compression, signer=signer)
        return write_bundle(out, manifest, members, signer=signer, compression=compression,
                            encryption_key=encryption_key)



def _export_oci(checkpoint: Checkpoint, out: Path, *, signer: Optional[Ed25519PrivateKey],
                encryption_key: Optional[bytes], expires_in: timedelta, lineage: Optional[str], max_bytes: int,
                client: Optional[docker.DockerClient]) -> Path:
    """:func:`export` with ``format="oci"``."""
    if encryption_key is not None:
        raise InvalidArgument("a checkpoint OCI image is not encrypted: export format='dolly' to encrypt")
    if out.exists():
        raise InvalidArgument(f"{out} exists: an OCI image layout is written as a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    bundle = out.with_name(f".{out.name}.layer")
    try:
        export(checkpoint, bundle, format="podman", signer=signer, compression="none", expires_in=expires_in,
               lineage=lineage, max_bytes=max_bytes, client=client)
        with archive.open_bundle(bundle, None) as tar:
            manifest_bytes = first_member(tar)
        manifest = parse_manifest(manifest_bytes)
        image_name = str(checkpoint.config["Config"].get("Image") or checkpoint.image_id)
        annotations = {
            "io.kubernetes.cri-o.annotations.checkpoint.name": checkpoint.container_name,
            "io.podman.annotations.checkpoint.name": checkpoint.container_name,
            "io.podman.annotations.checkpoint.rootfsImageID": checkpoint.image_id.removeprefix("sha256:"),
            "io.podman.annotations.checkpoint.rootfsImageName": image_name,
            "io.podman.annotations.checkpoint.runtime.name": "runc",
            "io.podman.annotations.checkpoint.criu.version": str(manifest.get("criu_version") or ""),
            "org.criu.checkpoint.container.name": checkpoint.container_name,
            "org.criu.checkpoint.container.id": checkpoint.container_id,
            "org.criu.checkpoint.rootfsImageName": image_name,
            "org.criu.checkpoint.rootfsImageRef": checkpoint.image_id,
            "org.criu.checkpoint.engine.name": "dolly",
            "io.dolly.checkpoint.manifest.digest": "sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
            "io.dolly.checkpoint.signer": str(manifest.get("signer") or ""),
            "org.opencontainers.image.created": manifest["created_at"],
        }
        formats.write_oci_layout(bundle, out, annotations=annotations,
                                 architecture={"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine,
                                                                                         os.uname().machine))
    finally:
        bundle.unlink(missing_ok=True)
    return out


def _export_podman(checkpoint: Checkpoint, out: Path, *, signer: Optional[Ed25519PrivateKey], compression: str,
                   expires_in: timedelta, lineage: Optional[str], max_bytes: int,
                   client: Optional[docker.DockerClient]) -> Path:
    """:func:`export` with ``format="podman"``: the bundle, made as usual (from any engine), its
    members rewritten into Podman's (:func:`dolly._formats.podman_members`) beside ``out``, then
    written as a bundle again: a manifest over the new members that says ``"flavor": "podman"``
    (and its signature) first, which Podman passes over."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp)
        export(checkpoint, work / "bundle", compression="none", expires_in=expires_in, lineage=lineage,
               max_bytes=max_bytes, client=client)
        unpacked = work / "in"
        (unpacked / "checkpoint").mkdir(parents=True, mode=0o700)
        with archive.open_bundle(work / "bundle", None) as tar:
            members = iter(tar)
            manifest = parse_manifest(first_member(tar, members))
            digests = {m["name"]: m["sha256"] for m in manifest["members"]}
            for member in members:
                if member.isfile() and member.name in digests:
                    archive.write_member(tar, member, unpacked / member.name, sha256=digests[member.name])
        meta = json.loads((unpacked / "config.dump").read_text())["dolly"]
        image_name = formats.podman_image_name(str(checkpoint.config["Config"].get("Image") or checkpoint.image_id))
        flavoured = formats.podman_members(unpacked, meta=meta, image_name=image_name, work=work / "work")
        # A member podman_members left as it was keeps the digest its extraction checked.
        kept = {m["name"]: m for m in manifest["members"]}
        manifest.update(
            flavor="podman", compression=compression, signer=trust.key_id(signer) if signer is not None else None,
            members=[kept[n] if p == unpacked / n and n in kept else entry(n, p) for n, p in flavoured])
        write_bundle(out, manifest, opened(flavoured), signer=signer, compression=compression, encryption_key=None)
    return out


def import_bundle(
    path: Union[PathLike, IO[bytes]],
    *,
    client: Optional[docker.DockerClient] = None,
    trusted_keys: Iterable[Ed25519PublicKey] = (),
    allow_unsigned: bool = False,
    allow: Iterable[str] = (),
    image_source: Optional[docker.DockerClient] = None,
    encryption_key: Optional[bytes] = None,
    max_bytes: Optional[int] = None,
    signature: Optional[PathLike] = None,
) -> Checkpoint:
    """Make a bundle a checkpoint on ``client``'s engine, usable by :func:`dolly.restore` and
    :func:`dolly.clone`. It is listed under its source container's name and ID.

    Args:
        path: the bundle's file, or a readable binary stream of it (read once, in order); or
            the folder of a checkpoint OCI image (an OCI image layout, as ``export(format="oci")``
            writes it: its layer's digest is checked, then the layer is imported as the archive);
            or a checkpoint archive of Podman or the kubelet (CRI-O, containerd), told apart by
            its content, which needs ``allow_unsigned`` (see :mod:`dolly._formats`).
        trusted_keys: public keys whose signatures are accepted. When any are given, the bundle
            must be signed by one of them, whatever ``allow_unsigned`` says; so must a Podman or
            kubelet archive, through a detached ``signature``.
        allow_unsigned: with no ``trusted_keys``, accept a bundle whose signature cannot be
            checked (or that has none). Off by default.
        allow: restore policy items (:mod:`dolly.policy`) the bundle's container may ask for:
            by default it may not be privileged, mount host paths or named volumes, use host
            devices, add capabilities, join host namespaces, change security options, set
            sysctls or a cgroup parent, or log off the host. Trusting a signer is trusting it with
            what you allow here.
        image_source: another engine's client to copy the source's image from, when this engine
            lacks it.
        encryption_key: the key the bundle was encrypted with.
        max_bytes: refuse a bundle that would unpack to more than this (its manifest's sizes
            are checked before anything is written). Default: the smaller of
            :data:`DEFAULT_MAX_BYTES` (64 GiB) and half the free space of the engine's data root
            (:func:`default_max_bytes`); 64 GiB for an engine on another host.
        signature: a detached signature of the archive at ``path`` (see
            :func:`dolly.trust.sign_file`), for Podman's and the kubelet's archives, which have
            no place for one: it must be by one of ``trusted_keys`` and unexpired, and the
            archive's SHA-256 and size, taken as it is read, must be the ones it signs, before
            anything leaves the private staging folder. Then ``allow_unsigned`` is not needed.

    Raises:
        BundleError: each refusal, as one of UnsignedBundle, UntrustedSigner, SignatureInvalid,
            DigestMismatch, BundleExpired, RollbackRefused, DecryptionFailed, UnsafeArchive; nothing of the bundle is
            left anywhere (it was only ever written into a private staging folder).
        PolicyRefused: the bundle's container asks for policy items not in ``allow``, or its
            process images give more than its configuration (capabilities, no seccomp filter,
            unmasked /proc paths).
        CheckpointExists: this engine already has that checkpoint of that container, or the
            bundle claims the ID of a container of this engine (or one with checkpoints taken
            here): an imported checkpoint is never taken for one of this engine's own.
        ImageNotFound: the engine lacks the image and no ``image_source`` has it.
        InvalidArgument: an unknown ``allow`` item or a bad ``max_bytes``.
        BundleError: not a Dolly bundle, or one whose fields break Dolly's rules.
    """
    if isinstance(path, (str, os.PathLike)) and formats.is_oci_layout(Path(path)):
        path, _ = formats.oci_layer(Path(path))  # a checkpoint image: its layer is the archive
    trusted = list(trusted_keys)
    detached = None
    if signature is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidArgument("a detached signature is checked over a file: pass the archive's path")
        try:
            with open(signature, "rb") as f:
                document = f.read(8192)
        except OSError as e:
            raise InvalidArgument(f"cannot read the detached signature {signature}: {e}") from e
        detached = trust.verify_detached(document, trusted)
    return _import(path, engine=Engine.of(client), trusted=trusted, allow_unsigned=allow_unsigned,
                   allowed=policy.items(allow), image_source=image_source, encryption_key=encryption_key,
                   max_bytes=max_bytes, detached=detached)


def _import(path: Union[PathLike, IO[bytes]], *, engine: Engine, trusted: List[Ed25519PublicKey], allow_unsigned: bool,
            allowed: FrozenSet[str], image_source: Optional[docker.DockerClient], encryption_key: Optional[bytes],
            max_bytes: Optional[int], detached: Optional[trust.DetachedSignature]) -> Checkpoint:
    """:func:`import_bundle` once its arguments are read: a Dolly bundle, or a Podman or kubelet
    archive (which only a host with local files takes)."""
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise InvalidArgument(f"max_bytes must be a positive int, got {max_bytes!r}")
    host = host_of(engine)
    source = Engine.of(image_source) if image_source is not None else None
    reader: Optional[archive.HashingReader] = None
    try:
        if detached is not None:
            reader = archive.HashingReader(Path(path))  # type: ignore[arg-type]
            if (size := reader.file_size()) != detached.size:  # cheap, before anything is unpacked
                raise DigestMismatch(f"the archive is {size} bytes; its detached signature signs {detached.size}")
        with archive.open_bundle(reader or source_of(path), encryption_key) as tar:
            members = iter(tar)
            head = next(members, None)
            if formats.is_foreign(head) and head is not None:
                # Podman's or the kubelet's archive: no manifest, no signature (see dolly._formats).
                # With trusted keys the caller asked for a verification: only a detached signature
                # by one of them gives it, allow_unsigned never stands in (as for a Dolly bundle).
                if trusted and detached is None:
                    raise UnsignedBundle(_FOREIGN_UNSIGNED)
                check = (lambda: _check_detached(reader, detached)) if reader is not None and detached else None
                staged = host.stage_foreign(tar, head, members, allow_unsigned=allow_unsigned and not trusted,
                                            allowed=allowed, max_bytes=max_bytes, between_own_engines=False,
                                            signer=detached.signer if detached is not None else None,
                                            rebuild=True, verify=check)
            else:
                if detached is not None:
                    raise InvalidArgument("a Dolly bundle carries its own signature: a detached one is for "
                                          "Podman's and the kubelet's archives")
                manifest_bytes = first_member(tar, iter([head] if head is not None else []))
                manifest = parse_manifest(manifest_bytes)
                signature, first = read_signature(tar, members)
                signer = check_signature_and_freshness(manifest_bytes, manifest, signature, trusted, allow_unsigned)
                staged = stage(host, manifest, signer, tar_members(tar, first, members), allowed=allowed,
                               max_bytes=max_bytes, between_own_engines=False, rebuild=True,
                               image_source=source)
    finally:
        if reader is not None:
            reader.close()
    return commit(host, staged, image_source=source)


def stage(host: Host, manifest: Dict[str, Any], signer: Optional[str], members: Iterable[Member], *,
          allowed: FrozenSet[str], max_bytes: Optional[int], between_own_engines: bool, rebuild: bool,
          image_source: Optional[Engine]) -> Staged:
    """The first step of every import, on either host: the members staged and checked beside the
    files (``rebuild``: everything from outside, its images remade at the commit).

    Raises:
        the errors of :func:`dolly._bundle.stage`.
    """
    return host.stage_import(manifest, signer, members, allowed=allowed, max_bytes=max_bytes,
                             between_own_engines=between_own_engines, rebuild=rebuild)


def commit(host: Host, staged: Staged, *, image_source: Optional[Engine]) -> Checkpoint:
    """The rest of every import, on either host, once its members are verified: the image copied
    (by ID, never tagged: a bundle's name must not take over one of this engine's), and Dolly's
    busybox when the images are to be rebuilt (:func:`dolly._rebuild.reference_image`), then the
    checkpoint committed to the store (rebuilt first); the staged import dropped, and an image
    loaded for it removed, when either fails.

    Raises:
        ImageNotFound: the engine lacks the image and ``image_source`` does not have it.
        HostNotReady: the images are to be rebuilt and neither engine has Dolly's busybox.
        UnsafeArchive, CheckpointExists, RollbackRefused: from the commit.
    """
    engine = host.engine
    try:
        loaded = engine.ensure_image(staged.image[0], staged.image[1], tag=False, source=image_source)
    except BaseException:
        host.discard_import(staged)
        raise
    try:
        reference = _rebuild.reference_image(engine, image_source=image_source) if staged.needs_reference else None
        return host.commit_import(staged, reference=reference)
    except BaseException:
        host.discard_import(staged)  # gone already when the commit itself failed
        if loaded:
            engine.remove_image(staged.image[0])
        raise


def _check_detached(reader: archive.HashingReader, detached: trust.DetachedSignature) -> None:
    """Raises:
        DigestMismatch: the archive read is not the one the detached signature signs.
    """
    digest = reader.finish()
    if (digest, reader.size) != (detached.sha256, detached.size):
        raise DigestMismatch(f"the archive (sha256:{digest}, {reader.size} bytes) is not the one its detached "
                             f"signature signs (sha256:{detached.sha256}, {detached.size} bytes)")


_FOREIGN_UNSIGNED = (
    "this is a Podman or kubelet checkpoint archive, which carries no signature of its own, and "
    "trusted_keys were given: import it with a detached signature by one of them "
    "(signature=ARCHIVE.sig, made by dolly.trust.sign_file / `dolly sign`); allow_unsigned applies "
    "only when no trusted_keys are given")


def transfer(
    checkpoint: Checkpoint,
    target: docker.DockerClient,
    *,
    source: Optional[docker.DockerClient] = None,
    steps: Optional[Dict[str, float]] = None,
) -> Checkpoint:
    """Copy a checkpoint to another engine, with its image when the target lacks it. The members
    stream from the source's host into the target's (through this process, never into a file),
    checked as they go in (``steps`` gets ``"transfer"``). Both engines are the caller's, so the
    restore policy allows everything the source had, and the copy is marked as one
    (``origin["copy"]``: the next spread over that engine uses it). What an agent sends is only as
    good as the agent: it is never imported with more allowed than the container it claims to be
    a copy of has, as the engine's API shows it now, and its images are rebuilt as an import's.

    Raises:
        the errors of :func:`export` and :func:`import_bundle`.
    """
    steps = {} if steps is None else steps
    source_host = host_of(Engine.of(source if source is not None else checkpoint.client))
    target_host = host_of(Engine.of(target))
    allowed = policy.ALL if source_host.vouches else _allowed_from(source_host.engine, checkpoint)
    started = time.perf_counter()
    with source_host.export_members(checkpoint, expires_in=timedelta(hours=1), lineage=None,
                                    max_bytes=DEFAULT_MAX_BYTES) as (manifest, members):
        staged = stage(target_host, manifest, None, members, allowed=allowed, max_bytes=DEFAULT_MAX_BYTES,
                       between_own_engines=True, rebuild=not source_host.vouches, image_source=source_host.engine)
    copy = commit(target_host, staged, image_source=source_host.engine)
    steps["transfer"] = time.perf_counter() - started
    return copy


def _allowed_from(engine: Engine, cp: Checkpoint) -> FrozenSet[str]:
    """The most that a copy of ``cp`` sent by ``engine``'s agent may ask for where it is imported:
    what the caller's own container asks for, as the engine's API (not the agent) reports it now;
    nothing, when that container is gone.

    Raises:
        EngineError: the engine does not answer.
    """
    with translate_errors():
        try:
            attrs = engine.api.inspect_container(cp.container_id)
        except docker.errors.NotFound:
            return frozenset()
    return frozenset(item for item, _ in policy.violations(attrs) if item in policy.ITEMS)
