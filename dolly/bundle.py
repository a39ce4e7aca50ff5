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

Importing verifies everything before anything is extracted: the signature (by a trusted key), that
the bundle has not expired, that no newer bundle of its lineage was imported on this engine, and
every member's digest and size. Then it extracts with :mod:`tarfile`'s extraction filters into a
private staging folder, checks the digests again, and only then makes it a checkpoint.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import time
import uuid
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, Dict, Iterable, List, Optional, Tuple, Union

import docker
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from filelock import FileLock

from . import criu, trust
from .checkpoint import METADATA, ROOTFS_DIFF, Checkpoint, require
from .engine import Engine
from .errors import (
    BundleError,
    BundleExpired,
    CheckpointExists,
    DecryptionFailed,
    DigestMismatch,
    InvalidArgument,
    RollbackRefused,
    UnsafeArchive,
    UnsignedBundle,
)

__all__ = ["export", "import_bundle", "read_manifest", "transfer", "DEFAULT_MAX_BYTES"]

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = "dolly-bundle/1"
COMPRESSIONS = ("zstd", "gzip", "none")
DEFAULT_MAX_BYTES = 64 << 30  # what one bundle may unpack to, in all
MAX_MEMBERS = 100_000
MAX_MANIFEST = 16 << 20
_CHUNK = 1 << 20
_MEMBER_RE = re.compile(r"^(manifest\.json|manifest\.sig|config\.dump|spec\.dump|network\.status|"
                        r"rootfs-diff\.tar|deleted\.files|stats-dump|checkpoint/[A-Za-z0-9][A-Za-z0-9._-]{0,200})$")
_OPAQUE = "SCHILY.xattr.trusted.overlay.opaque"
_OVERLAY_XATTRS = "SCHILY.xattr.trusted.overlay."


# --- export ----------------------------------------------------------------------------------------


def export(
    checkpoint: Checkpoint,
    path: PathLike,
    *,
    signer: Optional[Ed25519PrivateKey] = None,
    compression: str = "zstd",
    encryption_key: Optional[bytes] = None,
    expires_in: timedelta = timedelta(days=7),
    lineage: Optional[str] = None,
    client: Optional[docker.DockerClient] = None,
) -> Path:
    """Write ``checkpoint`` as one bundle at ``path``, readable by root only.

    Args:
        signer: an Ed25519 private key (:func:`dolly.trust.generate_keypair`); unsigned when None.
        compression: ``"zstd"`` (default), ``"gzip"`` or ``"none"``.
        encryption_key: 32 bytes (:func:`dolly.trust.generate_encryption_key`) to encrypt the
            bundle with AES-256-GCM: checkpoint images hold process memory, secrets included.
        expires_in: how long the bundle is fresh; importing it later is refused.
        lineage: bundles of one lineage may not be imported older than newest-seen; default the
            source container's ID.
        client: the engine the checkpoint is on (for the manifest's source fields).

    Raises:
        InvalidArgument: an unknown compression, a bad key, or a non-positive ``expires_in``.
        CheckpointNotFound: the checkpoint's files are gone.
    """
    if compression not in COMPRESSIONS:
        raise InvalidArgument(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if not isinstance(expires_in, timedelta) or expires_in <= timedelta(0):
        raise InvalidArgument(f"expires_in must be a positive timedelta, got {expires_in!r}")
    if signer is not None and not isinstance(signer, Ed25519PrivateKey):
        raise InvalidArgument(f"signer must be an Ed25519 private key, got {type(signer).__name__}")
    require(checkpoint)
    engine = Engine.of(client)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".dolly-export-") as tmp:
        work = Path(tmp)
        members: List[Tuple[str, Path]] = [
            (f"checkpoint/{p.name}", p) for p in sorted(checkpoint.images_dir.iterdir()) if p.is_file()
        ]
        deleted = _rootfs_to_bundle(checkpoint.rootfs_diff, work / "rootfs-diff.tar")
        (work / "deleted.files").write_text(json.dumps(deleted))
        (work / "network.status").write_text(
            json.dumps((checkpoint.config.get("NetworkSettings") or {}).get("Networks") or {}))
        members += [
            ("config.dump", checkpoint.path / METADATA),
            ("network.status", work / "network.status"),
            ("rootfs-diff.tar", work / "rootfs-diff.tar"),
            ("deleted.files", work / "deleted.files"),
        ]
        members += [(n, checkpoint.path / n) for n in ("spec.dump", "stats-dump") if (checkpoint.path / n).exists()]

        now = datetime.now(timezone.utc)
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
            "members": [{"name": name, "sha256": _sha256(p), "size": p.stat().st_size} for name, p in members],
        }
        manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()

        plain = work / "bundle.tar"
        fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as raw, _compressor(raw, compression) as stream:
            with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                _add_bytes(tar, "manifest.json", manifest_bytes, now)
                if signer is not None:
                    _add_bytes(tar, "manifest.sig", trust.sign(signer, manifest_bytes), now)
                for name, p in members:
                    info_ = tarfile.TarInfo(name)
                    info_.size, info_.mode, info_.mtime = p.stat().st_size, 0o600, int(now.timestamp())
                    with open(p, "rb") as f:
                        tar.addfile(info_, f)
        if encryption_key is not None:
            sealed = work / "bundle.sealed"
            fd = os.open(sealed, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(plain, "rb") as src, os.fdopen(fd, "wb") as dst:
                trust.encrypt_stream(encryption_key, src, dst)
            plain = sealed
        os.replace(plain, out)
    os.chmod(out, 0o600)
    return out


def _rootfs_to_bundle(overlay_tar: Path, out: Path) -> List[str]:
    """Podman's form of a writable layer: the files as they are, and deletions listed apart.
    Overlay whiteouts (character devices 0:0) become deleted paths; an opaque directory (one that
    hides everything the image had there) becomes a deleted path and the directory again."""
    deleted: List[str] = []
    with tarfile.open(overlay_tar, "r:") as tin, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            name = posixpath.normpath(m.name)
            if name == ".":
                continue
            if m.ischr() and m.devmajor == 0 and m.devminor == 0:
                deleted.append("/" + name)
                continue
            if m.pax_headers.get(_OPAQUE) == "y":
                deleted.append("/" + name)
            m.pax_headers = {k: v for k, v in m.pax_headers.items() if not k.startswith(_OVERLAY_XATTRS)}
            m.name = name
            tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
    return deleted


# --- import ----------------------------------------------------------------------------------------


def read_manifest(path: PathLike, *, encryption_key: Optional[bytes] = None) -> Dict[str, Any]:
    """The manifest of a bundle, unverified (for display).

    Raises:
        BundleError: not a Dolly bundle; DecryptionFailed: encrypted without the right key.
    """
    with _plaintext(Path(path), encryption_key) as plain, _open_tar(plain) as tar:
        first = next(iter(tar), None)
        if first is None or first.name != "manifest.json" or not first.isfile() or first.size > MAX_MANIFEST:
            raise BundleError(f"{path} is not a Dolly bundle: it does not start with manifest.json")
        return _parse_manifest(tar.extractfile(first).read())


def import_bundle(
    path: PathLike,
    *,
    client: Optional[docker.DockerClient] = None,
    trusted_keys: Iterable[Ed25519PublicKey] = (),
    allow_unsigned: bool = False,
    image_source: Optional[docker.DockerClient] = None,
    encryption_key: Optional[bytes] = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Checkpoint:
    """Make a bundle a checkpoint on ``client``'s engine, usable by :func:`dolly.restore` and
    :func:`dolly.clone`. It is listed under its source container's name and ID.

    Args:
        trusted_keys: public keys whose signatures are accepted.
        allow_unsigned: accept a bundle without a (trusted) signature. Off by default.
        image_source: another engine's client to copy the source's image from, when this engine
            lacks it.
        encryption_key: the key the bundle was encrypted with.
        max_bytes: refuse a bundle that would unpack to more than this.

    Raises:
        UnsignedBundle, UntrustedSigner, SignatureInvalid, DigestMismatch, BundleExpired,
        RollbackRefused, DecryptionFailed, UnsafeArchive: each refusal, before anything is
            extracted (a hostile rootfs-diff.tar is refused while unpacking into the staging
            folder, which is then removed).
        CheckpointExists: this engine already has that checkpoint of that container.
        ImageNotFound: the engine lacks the image and no ``image_source`` has it.
        BundleError: not a Dolly bundle.
    """
    trusted = list(trusted_keys)
    engine = Engine.of(client)
    source = Path(path)
    with _plaintext(source, encryption_key, spool=engine.spool_dir) as plain:
        manifest = _verify(plain, trusted=trusted, allow_unsigned=allow_unsigned, max_bytes=max_bytes)
        lineages = _Lineages(engine)
        lineages.check(manifest)
        meta = manifest["checkpoint"]
        folder = engine.store_dir / meta["container_id"]
        final = folder / meta["name"]
        if final.exists():
            raise CheckpointExists(f"this engine already has checkpoint {meta['name']!r} of {meta['container_name']}")
        engine.ensure_image(manifest["image"]["id"], manifest["image"].get("name"),
                            source=Engine.of(image_source) if image_source is not None else None)

        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = folder / f".import-{uuid.uuid4().hex[:12]}"
        staging.mkdir(mode=0o700)
        try:
            _extract(plain, staging, manifest)
            _unpack_layout(staging, manifest, max_bytes)
            try:
                os.rename(staging, final)
            except OSError as e:
                raise CheckpointExists(f"checkpoint {meta['name']!r} of {meta['container_name']} appeared meanwhile") from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                folder.rmdir()  # only if the import left it empty
            except OSError:
                pass
        lineages.record(manifest)
    return Checkpoint.load(final)


def _verify(plain: Path, *, trusted: List[Ed25519PublicKey], allow_unsigned: bool, max_bytes: int) -> Dict[str, Any]:
    """Pass one: read the whole archive without writing anything; returns the verified manifest."""
    with _open_tar(plain) as tar:
        members = iter(tar)
        first = next(members, None)
        if first is None or first.name != "manifest.json" or not first.isfile() or first.size > MAX_MANIFEST:
            raise BundleError("not a Dolly bundle: it does not start with manifest.json")
        manifest_bytes = tar.extractfile(first).read()
        manifest = _parse_manifest(manifest_bytes)
        expected = {m["name"]: m for m in manifest["members"]}
        if sum(int(m["size"]) for m in expected.values()) > max_bytes or len(expected) > MAX_MEMBERS:
            raise UnsafeArchive(f"the bundle would unpack to more than {max_bytes} bytes or {MAX_MEMBERS} files")

        nxt = next(members, None)
        signature = None
        if nxt is not None and nxt.name == "manifest.sig":
            _check_member(nxt)
            signature = tar.extractfile(nxt).read(1024)
            nxt = next(members, None)
        _check_signature(manifest_bytes, manifest, signature, trusted, allow_unsigned)
        _check_fresh(manifest)

        seen = set()
        total = 0
        while nxt is not None:
            _check_member(nxt)
            want = expected.get(nxt.name)
            if want is None or nxt.name in seen:
                raise DigestMismatch(f"the bundle holds {nxt.name!r}, which its manifest does not list (once)")
            seen.add(nxt.name)
            total += nxt.size
            if nxt.size != int(want["size"]) or total > max_bytes:
                raise DigestMismatch(f"{nxt.name} is {nxt.size} bytes, the manifest says {want['size']}")
            if _sha256_stream(tar.extractfile(nxt)) != want["sha256"]:
                raise DigestMismatch(f"{nxt.name} does not match its SHA-256 in the manifest")
            nxt = next(members, None)
        missing = set(expected) - seen
        if missing:
            raise DigestMismatch(f"the bundle lacks {', '.join(sorted(missing))}, which its manifest lists")
    return manifest


def _check_signature(data: bytes, manifest: Dict[str, Any], signature: Optional[bytes],
                     trusted: List[Ed25519PublicKey], allow_unsigned: bool) -> None:
    if signature is None or manifest.get("signer") is None:
        if not allow_unsigned:
            raise UnsignedBundle("the bundle is not signed; pass allow_unsigned=True to import it anyway")
        return
    if not trusted and allow_unsigned:
        return  # the caller accepts bundles it cannot verify
    trust.verify(data, signature, str(manifest["signer"]), trusted)


def _check_fresh(manifest: Dict[str, Any]) -> None:
    expires = datetime.fromisoformat(manifest["expires_at"])
    if datetime.now(timezone.utc) > expires:
        raise BundleExpired(f"the bundle expired at {expires.isoformat()}")


class _Lineages:
    """The newest ``created_at`` imported per lineage on one engine (no rollback)."""

    def __init__(self, engine: Engine) -> None:
        self.path = engine.store_dir.parent / "lineages.json"
        self.lock = FileLock(str(self.path) + ".lock")

    def _load(self) -> Dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def check(self, manifest: Dict[str, Any]) -> None:
        seen = self._load().get(manifest["lineage"])
        if seen and datetime.fromisoformat(seen) > datetime.fromisoformat(manifest["created_at"]):
            raise RollbackRefused(
                f"a bundle of lineage {manifest['lineage'][:12]} made at {seen} was already imported "
                f"here; this one was made earlier, at {manifest['created_at']}"
            )

    def record(self, manifest: Dict[str, Any]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.lock:
            data = self._load()
            seen = data.get(manifest["lineage"])
            if not seen or datetime.fromisoformat(seen) < datetime.fromisoformat(manifest["created_at"]):
                data[manifest["lineage"]] = manifest["created_at"]
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data, indent=1))
                os.replace(tmp, self.path)


def _extract(plain: Path, staging: Path, manifest: Dict[str, Any]) -> None:
    """Pass two: extract with tarfile's data filter (plus Dolly's own member rules), then check
    every digest again: the file may have changed since pass one."""

    def only_listed(member: tarfile.TarInfo, dest: str) -> Optional[tarfile.TarInfo]:
        _check_member(member)
        if member.name == "manifest.json" or member.name == "manifest.sig":
            return None
        return tarfile.data_filter(member, dest)

    try:
        with _open_tar(plain) as tar:
            tar.extractall(staging, filter=only_listed)
    except tarfile.FilterError as e:
        raise UnsafeArchive(f"refused while extracting: {e}") from e
    for m in manifest["members"]:
        p = staging / m["name"]
        if not p.is_file() or p.stat().st_size != int(m["size"]) or _sha256(p) != m["sha256"]:
            raise DigestMismatch(f"{m['name']} changed between verification and extraction")


def _unpack_layout(staging: Path, manifest: Dict[str, Any], max_bytes: int) -> None:
    """Turn the bundle's layout into Dolly's checkpoint folder (see dolly.checkpoint)."""
    os.rename(staging / "checkpoint", staging / "criu")
    deleted = json.loads((staging / "deleted.files").read_text())
    if not isinstance(deleted, list) or not all(isinstance(d, str) for d in deleted):
        raise UnsafeArchive("deleted.files is not a list of paths")
    _rootfs_to_overlay(staging / "rootfs-diff.tar", deleted, staging / (ROOTFS_DIFF + ".new"), max_bytes)
    os.replace(staging / (ROOTFS_DIFF + ".new"), staging / ROOTFS_DIFF)
    meta = json.loads((staging / "config.dump").read_text())
    if meta.get("container_id") != manifest["checkpoint"]["container_id"] or meta.get("name") != manifest["checkpoint"]["name"]:
        raise DigestMismatch("config.dump does not describe the checkpoint the manifest names")
    os.rename(staging / "config.dump", staging / METADATA)
    for leftover in ("deleted.files", "network.status"):
        (staging / leftover).unlink(missing_ok=True)
    for p in staging.rglob("*"):
        os.chmod(p, 0o700 if p.is_dir() else 0o600)


def _rootfs_to_overlay(bundle_tar: Path, deleted: List[str], out: Path, max_bytes: int) -> None:
    """Back to an overlay upper directory's form, refusing anything that could write outside the
    container's layer when unpacked: absolute paths, "..", paths through a symlink, hard links
    out of the archive, device nodes, more than ``max_bytes``."""
    gone = {_deleted_relpath(d) for d in deleted}
    symlinks: set = set()
    names: set = set()
    total = 0
    with tarfile.open(bundle_tar, "r:") as tin, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tout:
        for count, m in enumerate(tin):
            if count > MAX_MEMBERS:
                raise UnsafeArchive(f"rootfs-diff.tar holds more than {MAX_MEMBERS} files")
            name = _safe_relpath(m.name)
            parts = name.split("/")
            if any("/".join(parts[:i]) in symlinks for i in range(1, len(parts))):
                raise UnsafeArchive(f"rootfs-diff.tar: {name} lies beneath a symlink of the archive")
            if m.isdev() and not m.isfifo():
                raise UnsafeArchive(f"rootfs-diff.tar: {name} is a device node")
            if m.islnk() and _safe_relpath(m.linkname) not in names:
                raise UnsafeArchive(f"rootfs-diff.tar: hard link {name} points outside the archive")
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
                raise UnsafeArchive(f"rootfs-diff.tar: {name} has an unsupported type")
            total += m.size
            if total > max_bytes:
                raise UnsafeArchive(f"rootfs-diff.tar unpacks to more than {max_bytes} bytes")
            if m.issym():
                symlinks.add(name)
            names.add(name)
            headers = {k: v for k, v in m.pax_headers.items() if not k.startswith(_OVERLAY_XATTRS)}
            if m.isdir() and name in gone:
                headers[_OPAQUE] = "y"  # deleted, then made again: it hides what the image had
                gone.discard(name)
            m.pax_headers, m.name = headers, name
            if m.islnk():
                m.linkname = _safe_relpath(m.linkname)
            tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
        for name in sorted(gone):
            whiteout = tarfile.TarInfo(name)
            whiteout.type, whiteout.devmajor, whiteout.devminor, whiteout.mode = tarfile.CHRTYPE, 0, 0, 0
            tout.addfile(whiteout)


def _safe_relpath(name: str) -> str:
    """``name`` normalised, if it stays inside the folder it is unpacked into."""
    if (not isinstance(name, str) or name.startswith("/") or "\0" in name
            or ".." in name.split("/") or posixpath.normpath(name) in ("", ".")):
        raise UnsafeArchive(f"unsafe path in archive: {name!r}")
    return posixpath.normpath(name)


def _deleted_relpath(path: str) -> str:
    """An entry of deleted.files: an absolute path inside the container."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise UnsafeArchive(f"deleted.files holds {path!r}, not an absolute path")
    return _safe_relpath(path.lstrip("/"))


def _check_member(m: tarfile.TarInfo) -> None:
    if m.name.startswith("/") or ".." in m.name.split("/"):
        raise UnsafeArchive(f"unsafe path in bundle: {m.name!r}")
    if not _MEMBER_RE.match(m.name):
        raise UnsafeArchive(f"the bundle holds {m.name!r}, which is not part of the bundle layout")
    if not m.isfile():
        raise UnsafeArchive(f"{m.name!r} in the bundle is not a regular file (links and devices are refused)")


def _parse_manifest(data: bytes) -> Dict[str, Any]:
    try:
        manifest = json.loads(data)
        assert manifest["format"] == FORMAT
        for key in ("lineage", "created_at", "expires_at", "checkpoint", "image", "members"):
            assert key in manifest
        for m in manifest["members"]:
            assert _MEMBER_RE.match(m["name"]) and isinstance(m["sha256"], str) and int(m["size"]) >= 0
        datetime.fromisoformat(manifest["created_at"])
        datetime.fromisoformat(manifest["expires_at"])
        return manifest
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise BundleError(f"not a Dolly bundle manifest ({type(e).__name__}: {e})") from None


# --- streams ---------------------------------------------------------------------------------------


class _plaintext:
    """The bundle as a plain (possibly compressed) tar: decrypted into a private temporary file
    first when it is encrypted, so that the two passes read the same authenticated bytes."""

    def __init__(self, path: Path, key: Optional[bytes], *, spool: Optional[Path] = None) -> None:
        self.path, self.key, self.spool = path, key, spool
        self.tmp: Optional[Path] = None

    def __enter__(self) -> Path:
        try:
            encrypted = trust.is_encrypted(self.path)
        except OSError as e:
            raise BundleError(f"cannot read bundle {self.path}: {e}") from e
        if not encrypted:
            return self.path
        if self.key is None:
            raise DecryptionFailed("the bundle is encrypted: pass encryption_key")
        # Decrypted process memory goes to a root-only folder (the engine's spool), never beside
        # the bundle, and is removed whatever happens.
        if self.spool is not None:
            self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="decrypted-", dir=self.spool)
        self.tmp = Path(name)
        try:
            with open(self.path, "rb") as src, os.fdopen(fd, "wb") as dst:
                for chunk in trust.decrypt_chunks(self.key, src):
                    dst.write(chunk)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        return self.tmp

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


class _open_tar:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> tarfile.TarFile:
        self.raw = open(self.path, "rb")
        magic = self.raw.read(4)
        self.raw.seek(0)
        if magic == b"\x28\xb5\x2f\xfd":
            self.stream: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(self.raw)
        elif magic[:2] == b"\x1f\x8b":
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
        else:
            self.stream = self.raw
        try:
            self.tar = tarfile.open(fileobj=self.stream, mode="r|")
        except _DAMAGED as e:
            self.raw.close()
            raise BundleError(f"{self.path} is not a bundle (not a readable tar archive): {e}") from e
        return self.tar

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.tar.close()
        self.raw.close()
        if isinstance(exc, _DAMAGED) and not isinstance(exc, BundleError):
            raise BundleError(f"the bundle {self.path} is damaged: {type(exc).__name__}: {exc}") from exc


# What a damaged archive raises from the tar, gzip and zstd readers (the fuzz tests found each).
_DAMAGED = (tarfile.TarError, EOFError, zstandard.ZstdError, zlib.error, OSError, UnicodeDecodeError)


class _compressor:
    def __init__(self, raw: IO[bytes], compression: str) -> None:
        self.raw, self.compression = raw, compression

    def __enter__(self) -> IO[bytes]:
        if self.compression == "zstd":
            self.stream: Any = zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(self.raw, closefd=False)
        elif self.compression == "gzip":
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="wb", compresslevel=6)
        else:
            self.stream = None
        return self.stream or self.raw

    def __exit__(self, *exc: Any) -> None:
        if self.stream is not None:
            self.stream.close()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, when: datetime) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o600, int(when.timestamp())
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256_stream(f)


def _sha256_stream(f: Any) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()



def transfer(
    checkpoint: Checkpoint,
    target: docker.DockerClient,
    *,
    source: Optional[docker.DockerClient] = None,
    compression: str = "none",
    steps: Optional[Dict[str, float]] = None,
) -> Checkpoint:
    """Copy a checkpoint to another engine: a bundle signed with a key made for this one copy,
    imported on the target with only that key trusted, with the image copied if it lacks it.
    ``steps``, when given, receives the seconds ``"export"`` and ``"import"`` took, each as it ends.

    Raises:
        the errors of :func:`export` and :func:`import_bundle`.
    """
    steps = {} if steps is None else steps
    private, public = trust.generate_keypair()
    spool = Engine.of(target).store_dir.parent / "spool"
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=spool) as tmp:
        started = time.perf_counter()
        path = export(checkpoint, Path(tmp) / "transfer.dolly", signer=private, compression=compression,
                      expires_in=timedelta(hours=1), client=source)
        steps["export"] = time.perf_counter() - started
        started = time.perf_counter()
        copy = import_bundle(path, client=target, trusted_keys=[public],
                             image_source=source or Engine.of(None).client)
        steps["import"] = time.perf_counter() - started
        return copy
