"""Bundles: one archive that carries a checkpoint to another engine, signed and verified.

A bundle is a tar (zstd, gzip or not compressed; optionally encrypted, see :mod:`dolly.trust`)
laid out like Podman's checkpoint export, plus Dolly's manifest:

    manifest.json      first: every other member with its SHA-256 and size, the source engine and
                       host, CRIU and kernel versions, image, lineage, created_at, expires_at
    manifest.sig       Ed25519 signature of manifest.json's bytes (absent when unsigned)
    checkpoint/*       CRIU's images
    config.dump        the source's recorded configuration (Dolly's checkpoint metadata)
    spec.dump          the source's OCI runtime spec
    network.status     the source's networks, as the engine reported them
    rootfs-diff.tar    files the container changed or added in its writable layer
    deleted.files      JSON list of the files it deleted (absolute paths)
    stats-dump         CRIU's dump statistics

Importing treats the bundle as written by an attacker until it is verified, and reads the caller's
file exactly once, as a stream (:func:`dolly._archive.open_bundle`):

1. the manifest: every field checked against the rules Dolly's own values follow
   (:mod:`dolly._names`); the signature by a trusted key; freshness; no rollback in its lineage;
2. each member, in order: listed, once, of its listed size, a regular file, written into a private
   staging folder in the engine's root-only spool while it is hashed; a digest that differs stops
   the import;
3. the layout: the writable layer checked and converted (:func:`dolly._rootfs.to_overlay_form`),
   the recorded configuration parsed and held to the restore policy (:mod:`dolly.policy`);
4. only then the image (copied from ``image_source`` when missing; a tag is added only where the
   name is free), and the staging folder renamed into the store, under the lineage lock.

A refusal at any step removes the staging folder: nothing of the bundle remains.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import types
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple, Union, cast

import docker
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from filelock import FileLock

from . import (
    _archive as archive,
    _criu as criu,
    _formats as formats,
    _names as names,
    _rebuild,
    _rootfs as rootfs,
    policy,
    trust,
)
from ._archive import tarfile
from ._checkpoint import METADATA, Checkpoint
from ._engine import Engine
from ._store import engine_of, require, seal
from .errors import (
    BundleError,
    BundleExpired,
    CheckpointExists,
    DigestMismatch,
    ImageRewriteError,
    InvalidArgument,
    RollbackRefused,
    UnsafeArchive,
    UnsignedBundle,
    UntrustedSigner,
)

log = logging.getLogger("dolly")

__all__ = ["export", "import_bundle", "read_manifest", "transfer", "DEFAULT_MAX_BYTES"]

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = "dolly-bundle/1"
# What the members were made for: Docker's restore (bundles without the field), or Podman's
# (export format "podman" and "oci"; an import into Docker undoes the images' changes).
FLAVORS = ("docker", "podman")
COMPRESSIONS = ("zstd", "gzip", "none")
# What one bundle may unpack to, in all, at most; by default an import also keeps to half the free
# space of the engine's data root (default_max_bytes): a bundle must not fill the disk the engine
# and its containers live on.
DEFAULT_MAX_BYTES = 64 << 30
MAX_MEMBERS = 100_000
MAX_MANIFEST = 16 << 20
MAX_SIGNATURE = 1024
CLOCK_SKEW = timedelta(minutes=10)
_MEMBER_RE = re.compile(r"^(config\.dump|spec\.dump|network\.status|rootfs-diff\.tar|deleted\.files|"
                        r"stats-dump|checkpoint/[A-Za-z0-9][A-Za-z0-9._-]{0,200})\Z")
_REQUIRED = ("config.dump", "rootfs-diff.tar", "deleted.files", "checkpoint/inventory.img")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}\Z")
_BUNDLE_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")


# --- export ----------------------------------------------------------------------------------------


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
    if not engine.files_are_local():
        from ._hosts import remote as _remote

        return _remote.export(engine, checkpoint, Path(path), signer=signer, compression=compression,
                              encryption_key=encryption_key, expires_in=expires_in, lineage=lineage,
                              max_bytes=max_bytes)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _export(checkpoint, engine, lambda manifest, members: write_bundle(
        out, manifest, members, signer=signer, compression=compression, encryption_key=encryption_key),
        signer=signer, compression=compression, expires_in=expires_in, lineage=lineage, max_bytes=max_bytes)
    return out


EXPORT_FORMATS = ("dolly", "oci", "podman")


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
            members=[kept[n] if p == unpacked / n and n in kept else _entry(n, p) for n, p in flavoured])
        write_bundle(out, manifest, _opened(flavoured), signer=signer, compression=compression, encryption_key=None)
    return out


def export_stream(checkpoint: Checkpoint, sink: IO[bytes], *, engine: Engine, expires_in: timedelta,
                  lineage: Optional[str], max_bytes: int) -> None:
    """Write ``checkpoint`` to ``sink`` as a plain bundle (unsigned, not compressed), as it is
    read: what Dolly's agent sends, to be signed and sealed by its caller.

    Raises:
        the errors of :func:`export`.
    """
    _export(checkpoint, engine, lambda manifest, members: write_stream(
        sink, manifest, members, signer=None, compression="none", encryption_key=None),
        signer=None, compression="none", expires_in=expires_in, lineage=lineage, max_bytes=max_bytes)


def _export(checkpoint: Checkpoint, engine: Engine, emit: Any, *, signer: Optional[Ed25519PrivateKey],
            compression: str, expires_in: timedelta, lineage: Optional[str], max_bytes: int) -> None:
    """Build the manifest and the members of ``checkpoint``'s bundle (the layer converted in the
    engine's root-only spool) and hand them to ``emit(manifest, members)``."""
    require(checkpoint)
    engine.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=engine.spool_dir, prefix="export-") as tmp:
        work = Path(tmp)
        members: List[Tuple[str, Path]] = [
            (f"checkpoint/{p.name}", p) for p in sorted(checkpoint.images_dir.iterdir()) if p.is_file()
        ]
        deleted = rootfs.to_bundle_form(checkpoint.rootfs_diff, work / "rootfs-diff.tar", max_bytes=max_bytes)
        (work / "deleted.files").write_text(json.dumps(deleted))
        (work / "network.status").write_text(
            json.dumps((checkpoint.config.get("NetworkSettings") or {}).get("Networks") or {}))
        # The fields checkpointctl shows (Podman's names: ``name`` is the container's), and
        # Dolly's own metadata under ``dolly``.
        metadata = json.loads((checkpoint.path / METADATA).read_text())
        (work / "config.dump").write_text(json.dumps({
            "dolly": metadata, "id": checkpoint.container_id, "name": checkpoint.container_name,
            "rootfsImage": checkpoint.config["Config"].get("Image"),
            "rootfsImageRef": checkpoint.image_id.removeprefix("sha256:"),
            "rootfsImageName": checkpoint.config["Config"].get("Image"),
            "runtime": "runc", "createdTime": checkpoint.config.get("Created"),
            "checkpointedTime": checkpoint.created_at.isoformat().replace("+00:00", "Z")}))
        members += [
            ("config.dump", work / "config.dump"),
            ("network.status", work / "network.status"),
            ("rootfs-diff.tar", work / "rootfs-diff.tar"),
            ("deleted.files", work / "deleted.files"),
        ]
        members += [(n, checkpoint.path / n) for n in ("spec.dump", "stats-dump") if (checkpoint.path / n).exists()]

        now = datetime.now(UTC)
        info = engine.info()
        manifest = {
            "format": FORMAT,
            "bundle_id": uuid.uuid4().hex,
            "lineage": lineage or checkpoint.container_id,
            "created_at": now.isoformat(),
            "expires_at": (now + expires_in).isoformat(),
            "checkpoint": {
                "name": checkpoint.name,
                "container_id": checkpoint.container_id,
                "container_name": checkpoint.container_name,
                "created_at": checkpoint.created_at.isoformat(),
                "hostname": checkpoint.hostname,
            },
            "image": {"id": checkpoint.image_id, "name": checkpoint.config["Config"].get("Image")},
            "source": {"engine_id": info.get("ID"), "host": info.get("Name"),
                       "docker_version": info.get("ServerVersion")},
            "criu_version": ".".join(map(str, criu.version() or ())),
            "kernel": os.uname().release,
            "compression": compression,
            "signer": trust.key_id(signer) if signer is not None else None,
            "members": [_entry(name, p) for name, p in members],
        }
        emit(manifest, _opened(members))


def _entry(name: str, path: Path) -> Dict[str, Any]:
    """The manifest's entry of a member: its SHA-256 and size."""
    return {"name": name, "sha256": archive.sha256_file(path), "size": path.stat().st_size}


def _opened(members: List[Tuple[str, Path]]) -> Iterator[Tuple[str, int, IO[bytes]]]:
    """``(name, size, data)`` of ``(name, path)`` members, each open only while it is read."""
    for name, p in members:
        with open(p, "rb") as f:
            yield name, p.stat().st_size, f


def write_bundle(out: Path, manifest: Dict[str, Any], members: Iterable[Tuple[str, int, IO[bytes]]], *,
                 signer: Optional[Ed25519PrivateKey], compression: str, encryption_key: Optional[bytes]) -> Path:
    """Write the bundle file ``out``: the manifest (signed when ``signer`` is given), then each
    ``(name, size, data)`` member in order, compressed and encrypted as it is written, into a
    0600 partial file renamed into place at the end (removed on failure)."""
    fd, partial = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as raw:
            write_stream(raw, manifest, members, signer=signer, compression=compression,
                         encryption_key=encryption_key)
        os.chmod(partial, 0o600)
        os.replace(partial, out)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return out


def write_stream(sink: IO[bytes], manifest: Dict[str, Any], members: Iterable[Tuple[str, int, IO[bytes]]], *,
                 signer: Optional[Ed25519PrivateKey], compression: str, encryption_key: Optional[bytes]) -> None:
    """A bundle written to ``sink`` as it goes: the manifest (signed when ``signer`` is given),
    then each ``(name, size, data)`` member, compressed and encrypted on the way."""
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    write_tar(sink, manifest_bytes, trust.sign(signer, manifest_bytes) if signer is not None else None, members,
              compression=compression, encryption_key=encryption_key)


def write_tar(sink: IO[bytes], manifest_bytes: bytes, signature: Optional[bytes],
              members: Iterable[Tuple[str, int, IO[bytes]]], *, compression: str,
              encryption_key: Optional[bytes]) -> None:
    """A bundle's tar written to ``sink``: ``manifest.json`` (these exact bytes), its
    ``signature`` when there is one, then the members."""
    now = datetime.now(UTC)
    sealed = trust.EncryptingWriter(encryption_key, sink) if encryption_key is not None else None
    # EncryptingWriter is a raw stream: to the compressor, a file like any other.
    with archive.compressor(cast(IO[bytes], sealed or sink), compression) as stream, \
            tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "manifest.json", manifest_bytes, now)
        if signature is not None:
            _add_bytes(tar, "manifest.sig", signature, now)
        folder_made = False
        for name, size, data in members:
            if name.startswith(f"{formats.IMAGES_FOLDER}/") and not folder_made:
                tar.addfile(formats.images_folder_entry(int(now.timestamp())))
                folder_made = True
            member = tarfile.TarInfo(name)
            member.size, member.mode, member.mtime = size, 0o600, int(now.timestamp())
            tar.addfile(member, data)
    if sealed is not None:
        sealed.close()
    sink.flush()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, when: datetime) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mode, member.mtime = len(data), 0o600, int(when.timestamp())
    tar.addfile(member, io.BytesIO(data))


# --- import ----------------------------------------------------------------------------------------


def read_manifest(path: PathLike, *, encryption_key: Optional[bytes] = None) -> Dict[str, Any]:
    """The manifest of a bundle, checked for form but not verified (for display). Nothing is
    written, not even a decrypted copy.

    Raises:
        BundleError: not a Dolly bundle; DecryptionFailed: encrypted without the right key.
    """
    with archive.open_bundle(Path(path), encryption_key) as tar:
        return parse_manifest(first_member(tar))


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
        UnsignedBundle, UntrustedSigner, SignatureInvalid, DigestMismatch, BundleExpired,
        RollbackRefused, DecryptionFailed, UnsafeArchive: each refusal; nothing of the bundle is
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
    return _import(path, client=client, trusted_keys=trusted, allow_unsigned=allow_unsigned, allow=allow,
                   image_source=image_source, encryption_key=encryption_key, max_bytes=max_bytes, detached=detached)


def import_between_own_engines(path: Union[PathLike, IO[bytes]], *, client: Optional[docker.DockerClient],
                               trusted_keys: Iterable[Ed25519PublicKey] = (), allow_unsigned: bool = False,
                               image_source: Optional[docker.DockerClient], max_bytes: int = DEFAULT_MAX_BYTES,
                               allow: Iterable[str] = policy.ALL, from_agent: bool = False) -> Checkpoint:
    """An import of a copy that :func:`transfer` makes between engines the caller drives: every
    policy item allowed (less, for what an agent sent: see dolly._remote.allowed_from), no claim
    or rollback bookkeeping (a copy's key is made for it alone). What an agent sent
    (``from_agent``) is from outside: its images are rebuilt as an import's are."""
    return _import(path, client=client, trusted_keys=trusted_keys, allow_unsigned=allow_unsigned, allow=allow,
                   image_source=image_source, max_bytes=max_bytes, between_own_engines=True, rebuild=from_agent)


def import_relayed(stream: IO[bytes], *, client: docker.DockerClient, transit_key: Ed25519PublicKey,
                   signed_by: Optional[str], allow: Iterable[str], max_bytes: int,
                   between_own_engines: bool, rebuild: bool = False) -> Checkpoint:
    """What Dolly's agent runs for an import its caller verified (see dolly._remote): the stream
    is signed by the one-time ``transit_key``; ``signed_by`` is the original signer's key id (or
    None), which the lineage and ``origin`` record.

    Raises:
        the errors of :func:`import_bundle`; BundleError for a ``signed_by`` that is no key id.
    """
    if signed_by is not None and not (isinstance(signed_by, str) and _KEY_ID_RE.match(signed_by)):
        raise BundleError(f"not a key id: {signed_by!r:.40}")
    return _import(stream, client=client, trusted_keys=[transit_key], allow_unsigned=False, allow=allow,
                   image_source=None, max_bytes=max_bytes, between_own_engines=between_own_engines,
                   relayed=True, relayed_for=signed_by, rebuild=rebuild)


def _import(
    path: Union[PathLike, IO[bytes]],
    *,
    client: Optional[docker.DockerClient],
    trusted_keys: Iterable[Ed25519PublicKey],
    allow_unsigned: bool,
    allow: Iterable[str],
    image_source: Optional[docker.DockerClient],
    max_bytes: Optional[int],
    encryption_key: Optional[bytes] = None,
    between_own_engines: bool = False,
    relayed: bool = False,
    relayed_for: Optional[str] = None,
    detached: Optional[trust.DetachedSignature] = None,
    rebuild: bool = False,
) -> Checkpoint:
    # The images that decide privilege are made again for everything from outside: an import,
    # and a copy between the caller's engines that one engine's agent sent (``rebuild``).
    rebuild = rebuild or not between_own_engines
    allowed = policy.items(allow)
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise InvalidArgument(f"max_bytes must be a positive int, got {max_bytes!r}")
    trusted = list(trusted_keys)
    engine = Engine.of(client)
    if not engine.files_are_local():
        max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes  # its disk is not here to measure
        from ._hosts import remote as _remote

        return _remote.import_bundle(engine, _source(path), trusted=trusted, allow_unsigned=allow_unsigned,
                                     allow=allowed, image_source=image_source, encryption_key=encryption_key,
                                     max_bytes=max_bytes, between_own_engines=between_own_engines,
                                     rebuild=rebuild)
    lineages = Lineages.of(engine)
    engine.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if max_bytes is None:
        max_bytes = default_max_bytes(engine)
    staging = names.inside(engine.spool_dir, f"import-{uuid.uuid4().hex}")
    staging.mkdir(mode=0o700)
    reader: Optional[archive.HashingReader] = None
    try:
        if detached is not None:
            reader = archive.HashingReader(Path(path))  # type: ignore[arg-type]
            if (size := reader.file_size()) != detached.size:  # cheap, before anything is unpacked
                raise DigestMismatch(f"the archive is {size} bytes; its detached signature signs {detached.size}")
        with archive.open_bundle(reader or _source(path), encryption_key) as tar:
            members = iter(tar)
            head = next(members, None)
            if formats.is_foreign(head) and not relayed and head is not None:
                # Podman's or the kubelet's archive: no manifest, no signature (see dolly._formats).
                # With trusted keys the caller asked for a verification: only a detached signature
                # by one of them gives it, allow_unsigned never stands in (as for a Dolly bundle).
                if trusted and detached is None and not relayed:
                    raise UnsignedBundle(_FOREIGN_UNSIGNED)
                formats.extract(tar, head, members, staging / "in", max_bytes=max_bytes)
                if reader is not None and detached is not None:
                    _check_detached(reader, detached)
                return _import_foreign(engine, staging, allow_unsigned=allow_unsigned and not trusted, allowed=allowed,
                                       image_source=image_source, max_bytes=max_bytes,
                                       between_own_engines=between_own_engines, rebuild=rebuild,
                                       signer=detached.signer if detached is not None else None)
            if detached is not None:
                raise InvalidArgument("a Dolly bundle carries its own signature: a detached one is for "
                                      "Podman's and the kubelet's archives")
            manifest_bytes = first_member(tar, iter([head] if head is not None else []))
            manifest = parse_manifest(manifest_bytes)
            signature, first = read_signature(tar, members)
            signer = _check_signature(manifest_bytes, manifest, signature, trusted, allow_unsigned)
            if relayed:  # verified by the caller of Dolly's agent, which re-signed it for this hop
                signer = relayed_for
            _check_fresh(manifest)
            meta = manifest["checkpoint"]
            lineage = _lineage_key(manifest, signer)
            lineages.check(lineage, manifest["created_at"])  # early; again under the lock below
            final = names.inside(engine.store_dir, meta["container_id"], meta["name"], error=BundleError)
            if final.exists():
                raise CheckpointExists(f"this engine already has checkpoint {meta['name']!r} "
                                       f"of {meta['container_name']}")
            if (declared := sum(m["size"] for m in manifest["members"])) > max_bytes:  # before a byte is written
                raise UnsafeArchive(_too_large(declared, max_bytes))
            _extract(tar, first, members, staging / "in", manifest, max_bytes)

        origin = {
            "bundle_id": manifest["bundle_id"],
            "signer": signer,
            "source": _source_fields(manifest.get("source")),
            "imported_at": datetime.now(UTC).isoformat(),
            "allowed": sorted(allowed),
        }
        if between_own_engines:
            # A copy :func:`transfer` made between the caller's engines: the next clone spread
            # over this engine uses it again instead of copying the checkpoint once more.
            origin["copy"] = True
        cp = _make_checkpoint(staging / "in", staging / "cp", manifest, final, origin, max_bytes)
        _check_policy(cp, staging / "cp" / "criu", allowed)
        if not between_own_engines:
            _refuse_claims(engine, meta["container_id"])
        # By ID, and never tagged: a bundle's name must not take over one of this engine's.
        loaded = engine.ensure_image(manifest["image"]["id"], manifest["image"]["name"], tag=False,
                                     source=Engine.of(image_source) if image_source is not None else None)
        try:
            if rebuild:
                _rebuild_images(engine, cp, staging / "cp" / "criu", allowed, image_source)
            with lineages.lock:
                lineages.check(lineage, manifest["created_at"])
                final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                if final.exists():
                    raise CheckpointExists(f"checkpoint {meta['name']!r} of {meta['container_name']} "
                                           "appeared meanwhile")
                os.rename(staging / "cp", final)
                if not between_own_engines:  # a copy's key is made for it alone: nothing to roll back to
                    lineages.record(lineage, manifest["created_at"])
        except BaseException:
            if loaded:
                engine.remove_image(manifest["image"]["id"])
            raise
    finally:
        if reader is not None:
            reader.close()
        shutil.rmtree(staging, ignore_errors=True)
    return Checkpoint.load(final, engine.client)


def default_max_bytes(engine: Engine) -> int:
    """What an import into ``engine`` may unpack to by default: the smaller of
    :data:`DEFAULT_MAX_BYTES` and half the free space of the engine's data root (the bundle is
    unpacked in its spool, and its writable layer may be converted once more), so that one
    bundle cannot fill the disk the engine and its containers need.

    Raises:
        OSError: the data root cannot be measured.
    """
    st = os.statvfs(engine.spool_dir)
    return max(1, min(DEFAULT_MAX_BYTES, st.f_bavail * st.f_frsize // 2))


def _too_large(size: int, max_bytes: int) -> str:
    return (f"the bundle unpacks to {size} bytes or more, over max_bytes={max_bytes} (by default the smaller of "
            f"{DEFAULT_MAX_BYTES} bytes and half the free space of the engine's data root): free space there, "
            "or pass a larger max_bytes if the bundle is expected to be this large")


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


def _import_foreign(engine: Engine, staging: Path, *, allow_unsigned: bool, allowed: FrozenSet[str],
                    image_source: Optional[docker.DockerClient], max_bytes: int,
                    between_own_engines: bool, signer: Optional[str], rebuild: bool = True) -> Checkpoint:
    """The rest of an import of a Podman or kubelet archive, extracted into ``staging / "in"``
    (and, when ``signer`` is set, checked against a detached signature by that key): held to the
    same rules as a bundle's members (policy, process images, claims, image).

    Raises:
        UnsignedBundle: neither a detached signature (``signer``) nor ``allow_unsigned`` (which
            the caller passes as False whenever trusted keys were given).
        and the other errors of :func:`import_bundle`.
    """
    cp, final, image_id, image_name, kind = formats.make_checkpoint(
        staging / "in", staging / "cp", engine.store_dir, allow_unsigned=allow_unsigned or signer is not None,
        max_bytes=max_bytes)
    origin = {**(cp.origin or {}), "signer": signer, "imported_at": datetime.now(UTC).isoformat(),
              "allowed": sorted(allowed)}
    cp = dataclasses.replace(cp, origin=origin)
    _check_policy(cp, staging / "cp" / "criu", allowed)
    if not between_own_engines:
        _refuse_claims(engine, cp.container_id)
    for item in origin["not_applied"]:
        log.warning("import of a %s archive: %s", kind, item)
    seal(cp, staging / "cp")
    loaded = engine.ensure_image(image_id, image_name, tag=False,
                                 source=Engine.of(image_source) if image_source is not None else None)
    try:
        if rebuild:
            _rebuild_images(engine, cp, staging / "cp" / "criu", allowed, image_source)
        final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if final.exists():
            raise CheckpointExists(f"checkpoint {cp.name!r} of {cp.container_name} exists already")
        os.rename(staging / "cp", final)
    except BaseException:
        if loaded:
            engine.remove_image(image_id)
        raise
    return Checkpoint.load(final, engine.client)


def _check_policy(cp: Checkpoint, images: Path, allowed: FrozenSet[str]) -> None:
    """The restore policy on what came from outside: the recorded configuration, and CRIU's
    images against it (capabilities, seccomp, masked paths, the mount tree's types).

    Raises:
        PolicyRefused: what it asks for beyond ``allowed``; UnsafeArchive: unreadable images.
    """
    policy.check(cp.config, allowed)
    try:
        policy.check_images(criu.processes(images), criu.mountpoints(images), cp.config, allowed,
                            host_paths=[p for p in policy.masked_paths() if os.path.exists(p)])
        policy.check_mount_types(criu.mount_types(images), allowed)
    except ImageRewriteError as e:
        raise UnsafeArchive(f"the checkpoint's process images cannot be read: {e}") from e


def _rebuild_images(engine: Engine, cp: Checkpoint, images: Path, allowed: FrozenSet[str],
                    image_source: Optional[docker.DockerClient]) -> None:
    """The images that decide privilege made again from what this engine makes for the accepted
    configuration (:mod:`dolly._rebuild`); after the policy and once the checkpoint's image is
    here, so that a missing image is named first.

    Raises:
        UnsafeArchive: images asking for what the accepted configuration does not make, or
            unreadable ones; HostNotReady: no reference image on either engine.
    """
    if not _rebuild.needed(cp.config, allowed):
        return
    source = Engine.of(image_source) if image_source is not None else None
    try:
        _rebuild.rebuild(images, _rebuild.make_reference(engine, cp.config, image_source=source))
    except ImageRewriteError as e:
        raise UnsafeArchive(f"the checkpoint's process images cannot be read: {e}") from e


def _refuse_claims(engine: Engine, container_id: str) -> None:
    """A bundle may not pass for a checkpoint of one of this engine's containers: it would be
    listed, and picked by name, among that container's own."""
    if engine.has_container(container_id):
        raise CheckpointExists(f"the bundle claims to be of container {container_id[:12]}, which this engine "
                               "runs: an imported checkpoint never passes for one of its own")
    folder = engine.store_dir / container_id
    for meta in folder.glob(f"*/{METADATA}") if folder.is_dir() else []:
        try:
            own = json.loads(meta.read_text()).get("origin") is None
        except (OSError, ValueError):
            own = True
        if own:
            raise CheckpointExists(f"the bundle claims to be of container {container_id[:12]}, which has "
                                   "checkpoints taken on this engine")


def _source(path: Union[PathLike, IO[bytes]]) -> Union[Path, IO[bytes]]:
    return path if hasattr(path, "read") else Path(path)  # type: ignore[return-value]


def first_member(tar: tarfile.TarFile, members: Optional[Iterator[tarfile.TarInfo]] = None) -> bytes:
    first = next(members if members is not None else iter(tar), None)
    if first is None or first.name != "manifest.json" or not first.isfile() or first.size > MAX_MANIFEST:
        raise BundleError("not a Dolly bundle: it does not start with manifest.json")
    data = tar.extractfile(first)
    if data is None:
        raise BundleError("not a Dolly bundle: manifest.json is not a regular file")
    return data.read()


def read_signature(tar: tarfile.TarFile, members: Iterator[tarfile.TarInfo]
                   ) -> Tuple[Optional[bytes], Optional[tarfile.TarInfo]]:
    """The signature, when the next member is one; and the first member after it."""
    nxt = next(members, None)
    if nxt is None or nxt.name != "manifest.sig":
        return None, nxt
    if not nxt.isfile() or nxt.size > MAX_SIGNATURE:
        raise UnsafeArchive("manifest.sig is not a small regular file")
    data = tar.extractfile(nxt)
    if data is None:
        raise UnsafeArchive("manifest.sig is not a regular file")
    return data.read(), next(members, None)


def _check_signature(data: bytes, manifest: Dict[str, Any], signature: Optional[bytes],
                     trusted: List[Ed25519PublicKey], allow_unsigned: bool) -> Optional[str]:
    """The id of the trusted key that signed the manifest, or None when the caller accepts a
    bundle it cannot verify. With trusted keys, a bundle stripped of its signature is refused:
    ``allow_unsigned`` never turns a verification the caller asked for into none."""
    signed = signature is not None and manifest.get("signer") is not None
    if trusted:
        if not signed:
            raise UnsignedBundle(
                "the bundle is not signed, and trusted_keys were given, so a signature by one of "
                "them is required (allow_unsigned applies only when no trusted_keys are given)")
        return trust.verify(data, signature or b"", str(manifest["signer"]), trusted)
    if allow_unsigned:
        return None
    if signed:
        raise UntrustedSigner(f"the bundle is signed by key {manifest['signer']}, and no trusted_keys "
                              "were given: pass the signer's public key")
    raise UnsignedBundle("the bundle is not signed; pass allow_unsigned=True to import it anyway")


def check_signature_and_freshness(data: bytes, manifest: Dict[str, Any], signature: Optional[bytes],
                                  trusted: List[Ed25519PublicKey], allow_unsigned: bool) -> Optional[str]:
    """The checks an import makes of a manifest before any member: the verified signer's key id
    (None when the caller accepts an unverifiable bundle), and freshness.

    Raises:
        UnsignedBundle, UntrustedSigner, SignatureInvalid, BundleExpired, BundleError.
    """
    signer = _check_signature(data, manifest, signature, trusted, allow_unsigned)
    _check_fresh(manifest)
    return signer


def _check_fresh(manifest: Dict[str, Any]) -> None:
    now = datetime.now(UTC)
    expires = datetime.fromisoformat(manifest["expires_at"])
    if now > expires:
        raise BundleExpired(f"the bundle expired at {expires.isoformat()}")
    # A bundle from the future would hold its lineage against every real one until then.
    created = datetime.fromisoformat(manifest["created_at"])
    if created > now + CLOCK_SKEW:
        raise BundleError(f"the bundle says it was made at {created.isoformat()}, in the future "
                          f"(more than {CLOCK_SKEW} ahead of this host's clock)")


def _lineage_key(manifest: Dict[str, Any], signer: Optional[str]) -> str:
    """A lineage is its signer's: another signer (or an unsigned bundle) cannot block it."""
    return f"{signer or 'unsigned'}/{manifest['lineage']}"


def _extract(tar: tarfile.TarFile, first: Optional[tarfile.TarInfo], members: Iterator[tarfile.TarInfo],
             into: Path, manifest: Dict[str, Any], max_bytes: int) -> None:
    """Every member after the manifest and signature, listed, once each, hashed while written."""
    expected = {m["name"]: m for m in manifest["members"]}
    into.mkdir(mode=0o700)
    (into / "checkpoint").mkdir(mode=0o700)
    seen = set()
    total = 0
    folder_seen = False
    member = first
    while member is not None:
        if formats.is_images_folder(member):
            if folder_seen:  # once: a stream of folder entries would be endless work
                raise UnsafeArchive("the bundle holds the images' folder twice")
            folder_seen = True
            member = next(members, None)
            continue
        if not _MEMBER_RE.match(member.name):
            raise UnsafeArchive(f"the bundle holds {member.name!r}, which is not part of the bundle layout")
        if not member.isfile() or member.sparse is not None:
            raise UnsafeArchive(f"{member.name!r} in the bundle is not a regular file (links and devices are refused)")
        try:
            tarfile.data_filter(member, str(into))
        except tarfile.FilterError as e:
            raise UnsafeArchive(f"refused while extracting: {e}") from e
        want = expected.get(member.name)
        if want is None or member.name in seen:
            raise DigestMismatch(f"the bundle holds {member.name!r}, which its manifest does not list (once)")
        seen.add(member.name)
        total += member.size
        if member.size != want["size"]:
            raise DigestMismatch(f"{member.name} is {member.size} bytes, the manifest says {want['size']}")
        if total > max_bytes:
            raise UnsafeArchive(_too_large(total, max_bytes))
        dest = names.inside(into, *member.name.split("/"), error=UnsafeArchive)
        archive.write_member(tar, member, dest, sha256=want["sha256"])
        member = next(members, None)
    missing = set(expected) - seen
    if missing:
        raise DigestMismatch(f"the bundle lacks {', '.join(sorted(missing))}, which its manifest lists")


def _make_checkpoint(extracted: Path, folder: Path, manifest: Dict[str, Any], final: Path,
                     origin: Dict[str, Any], max_bytes: int) -> Checkpoint:
    """Dolly's checkpoint folder (see dolly._checkpoint) from a verified bundle's members, with
    the recorded configuration checked and its metadata written by Dolly, not copied."""
    formats.unpack_layout(extracted, folder, max_bytes=max_bytes)
    if manifest.get("flavor") == "podman":
        try:
            formats.undo_podman_images(folder / "criu")
        except ImageRewriteError as e:
            raise UnsafeArchive(f"the bundle's CRIU images cannot be made Docker's again: {e}") from e
    meta = archive.small_json(extracted / "config.dump")
    if isinstance(meta, dict) and "dolly" in meta:  # beside checkpointctl's fields (older bundles: alone)
        meta = meta["dolly"]
    want = manifest["checkpoint"]
    try:
        if not isinstance(meta, dict):
            raise TypeError("not an object")
        config = meta["config"]
        if not (isinstance(config, dict) and isinstance(config.get("Config"), dict)
                and isinstance(config.get("HostConfig"), dict)):
            raise TypeError("config is not a docker inspect")
        for key in ("container_id", "name", "container_name", "created_at", "hostname"):
            if meta[key] != want[key]:
                raise ValueError(f"its {key} is not the manifest's")
        if config.get("Image") != manifest["image"]["id"]:
            raise ValueError("its image is not the manifest's")
    except (KeyError, TypeError, ValueError) as e:
        raise DigestMismatch(f"config.dump does not describe the checkpoint the manifest names ({e})") from None
    cp = Checkpoint(
        container_id=want["container_id"],
        container_name=want["container_name"],
        name=want["name"],
        created_at=datetime.fromisoformat(want["created_at"]),
        hostname=want["hostname"],
        config=types.MappingProxyType(config),
        path=final,
        origin=origin,
    )
    seal(cp, folder)
    return cp


def _source_fields(source: Any) -> Optional[Dict[str, str]]:
    """The manifest's (unverifiable, informative) source fields, kept only as short strings."""
    if not isinstance(source, dict):
        return None
    return {k: v[:200] for k, v in source.items()
            if k in ("engine_id", "host", "docker_version") and isinstance(v, str)}


def parse_manifest(data: bytes) -> Dict[str, Any]:
    """The manifest, every field held to the rules of Dolly's own values (no ``assert``: these
    checks must survive ``python -O``).

    Raises:
        BundleError: naming the first field that breaks them.
    """
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise BundleError(f"not a Dolly bundle manifest (not JSON: {e})") from None

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise BundleError(f"not a usable Dolly bundle manifest: {what}")

    need(isinstance(manifest, dict), "not an object")
    need(manifest.get("format") == FORMAT, f"format is not {FORMAT}")
    need(isinstance(manifest.get("bundle_id"), str) and bool(_BUNDLE_ID_RE.match(manifest["bundle_id"])),
         "bundle_id is not 32 hex digits")
    names.lineage(manifest.get("lineage"), error=BundleError)
    for key in ("created_at", "expires_at"):
        _aware(manifest.get(key), key)
    signer = manifest.get("signer")
    need(signer is None or (isinstance(signer, str) and bool(_KEY_ID_RE.match(signer))), "signer is not a key id")

    cp = manifest.get("checkpoint")
    need(isinstance(cp, dict), "checkpoint is not an object")
    names.checkpoint_name(cp.get("name"), error=BundleError)
    names.container_id(cp.get("container_id"), error=BundleError)
    names.container_name(cp.get("container_name"), error=BundleError)
    _aware(cp.get("created_at"), "checkpoint.created_at")
    need(isinstance(cp.get("hostname"), str) and 0 < len(cp["hostname"]) <= criu.HOSTNAME_MAX,
         "checkpoint.hostname is not a hostname")

    image = manifest.get("image")
    need(isinstance(image, dict), "image is not an object")
    names.image_id(image.get("id"), error=BundleError)
    if image.get("name") is not None:
        names.image_name(image["name"], error=BundleError)

    need(manifest.get("flavor", "docker") in FLAVORS, f"flavor is not one of {', '.join(FLAVORS)}")
    members = manifest.get("members")
    need(isinstance(members, list) and len(members) <= MAX_MEMBERS, f"members is not a list of at most {MAX_MEMBERS}")
    listed = set()
    for m in members:
        need(isinstance(m, dict) and isinstance(m.get("name"), str) and bool(_MEMBER_RE.match(m["name"])),
             f"a member outside the bundle layout: {m!r:.80}")
        need(m["name"] not in listed, f"{m['name']} is listed twice")
        need(isinstance(m.get("sha256"), str) and bool(_SHA256_RE.match(m["sha256"])), f"{m['name']} has no SHA-256")
        need(type(m.get("size")) is int and m["size"] >= 0, f"{m['name']} has no size")
        listed.add(m["name"])
    missing = [n for n in _REQUIRED if n not in listed]
    need(not missing, f"it lists no {', '.join(missing)}")
    return manifest


def _aware(value: Any, what: str) -> datetime:
    try:
        when = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise BundleError(f"not a usable Dolly bundle manifest: {what} is not an ISO 8601 time") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise BundleError(f"not a usable Dolly bundle manifest: {what} has no time zone")
    return when


class Lineages:
    """The newest ``created_at`` imported per (signer, lineage) on one engine: no rollback.
    Checked and recorded under one lock, with the import's final rename between them."""

    @classmethod
    def of(cls, engine: Engine) -> Lineages:
        """The record of an engine whose files are here, beside its checkpoints."""
        return cls(engine.store_dir.parent / "lineages.json")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.lock = FileLock(str(self.path) + ".lock")

    def _load(self) -> Dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise BundleError(f"the rollback record {self.path} is damaged ({e}): refusing imports "
                              "until it is repaired or removed") from None
        if not isinstance(data, dict):
            raise BundleError(f"the rollback record {self.path} is damaged")
        return data

    def check(self, key: str, created_at: str) -> None:
        seen = self._load().get(key)
        if seen and datetime.fromisoformat(seen) > datetime.fromisoformat(created_at):
            raise RollbackRefused(
                f"a bundle of lineage {key} made at {seen} was already imported here; this one "
                f"was made earlier, at {created_at}"
            )

    def record(self, key: str, created_at: str) -> None:
        """Call with :attr:`lock` held."""
        data = self._load()
        seen = data.get(key)
        if not seen or datetime.fromisoformat(seen) < datetime.fromisoformat(created_at):
            data[key] = created_at
            self._write(json.dumps(data, indent=1).encode())

    def _write(self, payload: bytes) -> None:
        """Replace the record at once. The temporary file has a random name and is created
        exclusively, never through a link: a fixed ``lineages.tmp`` could be a symlink planted
        beforehand, and writing through it would overwrite whatever it points at as root.

        Raises:
            OSError: it cannot be written.
        """
        tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


# --- between engines -------------------------------------------------------------------------------


def transfer(
    checkpoint: Checkpoint,
    target: docker.DockerClient,
    *,
    source: Optional[docker.DockerClient] = None,
    compression: str = "none",
    steps: Optional[Dict[str, float]] = None,
) -> Checkpoint:
    """Copy a checkpoint to another engine, with the image copied if it lacks it. Both engines are
    the caller's, so the restore policy allows everything the source had. Between engines whose
    files are both here: a bundle signed with a key made for this one copy, in the target's spool,
    imported with only that key trusted (``steps`` gets ``"export"`` and ``"import"``). With an
    engine on another host: one stream from the export into the import, through Dolly's agent(s),
    never a file (``steps`` gets ``"transfer"``; ``compression`` is not used).

    Raises:
        the errors of :func:`export` and :func:`import_bundle`.
    """
    steps = {} if steps is None else steps
    source = source if source is not None else checkpoint.client
    source_engine, target_engine = Engine.of(source), Engine.of(target)
    image_source = source_engine.client
    if not (target_engine.files_are_local() and source_engine.files_are_local()):
        # An engine on another host: the bundle streams from the export into the import, never
        # into a file. It is not signed: it travels inside this process and the engines' own API
        # connections (a remote target's import is re-signed for its agent, see dolly._remote).
        started = time.perf_counter()
        copy = _stream_between(checkpoint, source_engine, target, image_source)
        steps["transfer"] = time.perf_counter() - started
        return copy
    # Both engines' files are here: the bundle goes straight into the target's spool.
    private, public = trust.generate_keypair()
    target_engine.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_engine.spool_dir) as tmp:
        started = time.perf_counter()
        path = export(checkpoint, Path(tmp) / "transfer.dolly", signer=private, compression=compression,
                      expires_in=timedelta(hours=1), client=source)
        steps["export"] = time.perf_counter() - started
        started = time.perf_counter()
        copy = import_between_own_engines(path, client=target, trusted_keys=[public], image_source=image_source)
        steps["import"] = time.perf_counter() - started
        return copy


def _stream_between(checkpoint: Checkpoint, source: Engine, target: docker.DockerClient,
                    image_source: docker.DockerClient) -> Checkpoint:
    def into_target(stream: IO[bytes], allow: Iterable[str] = policy.ALL, from_agent: bool = False) -> Checkpoint:
        return import_between_own_engines(stream, client=target, allow_unsigned=True, image_source=image_source,
                                          allow=allow, from_agent=from_agent)

    if not source.files_are_local():
        from ._hosts import remote as _remote
        from ._hosts.channel import Channel

        allow = _remote.allowed_from(source, checkpoint)  # an agent's stream: no more than the source has
        with Channel.of(source).stream_out("export", container_id=checkpoint.container_id, name=checkpoint.name,
                                         expires_in_s=3600.0, lineage=None, max_bytes=DEFAULT_MAX_BYTES) as plain:
            return into_target(plain, allow, from_agent=True)
    # A local export, written by a thread into a pipe that the import reads.
    read_fd, write_fd = os.pipe()
    failed: List[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb") as sink:
                export_stream(checkpoint, sink, engine=source, expires_in=timedelta(hours=1), lineage=None,
                              max_bytes=DEFAULT_MAX_BYTES)
        except BrokenPipeError:
            pass  # the import stopped reading: its error is the one that counts
        except BaseException as e:  # raised below, in the caller's thread
            failed.append(e)

    producer = threading.Thread(target=produce, name="dolly-export", daemon=True)
    producer.start()
    try:
        with os.fdopen(read_fd, "rb") as stream:
            copy = into_target(stream)
    except BaseException:
        producer.join()
        if failed:
            raise failed[0] from None
        raise
    producer.join()
    if failed:
        raise failed[0]
    return copy

