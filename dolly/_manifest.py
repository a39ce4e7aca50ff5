"""The bundle format: one archive that carries a checkpoint between engines, its manifest's rules,
and how a bundle is written, signed, read and verified. Used by the caller (which holds the keys)
and by the host that lays a bundle's members out (:mod:`dolly._bundle`), on either side of the seam.

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
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import _archive as archive, _criu as criu, _formats as formats, _names as names, trust
from ._archive import tarfile
from ._checkpoint import Checkpoint
from .errors import BundleError, BundleExpired, UnsafeArchive, UnsignedBundle, UntrustedSigner

PathLike = Union[str, "os.PathLike[str]"]
# A bundle member on its way: its name, its size and its data.
Member = Tuple[str, int, IO[bytes]]
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
MEMBER_RE = re.compile(r"^(config\.dump|spec\.dump|network\.status|rootfs-diff\.tar|deleted\.files|"
                        r"stats-dump|checkpoint/[A-Za-z0-9][A-Za-z0-9._-]{0,200})\Z")
_REQUIRED = ("config.dump", "rootfs-diff.tar", "deleted.files", "checkpoint/inventory.img")
SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
KEY_ID_RE = re.compile(r"^[0-9a-f]{16}\Z")
BUNDLE_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")


def new_manifest(checkpoint: Checkpoint, *, info: Dict[str, Any], members: List[Dict[str, Any]], lineage: Optional[str],
                 expires_in: timedelta, criu_version: str, kernel: str) -> Dict[str, Any]:
    """The manifest of ``checkpoint``'s bundle, its ``members`` entries as :func:`entry` makes
    them, the source fields from the engine's ``info``; stamped (:func:`stamp`) unsigned and not
    compressed."""
    manifest: Dict[str, Any] = {
        "format": FORMAT,
        "checkpoint": {
            "name": checkpoint.name,
            "container_id": checkpoint.container_id,
            "container_name": checkpoint.container_name,
            "created_at": checkpoint.created_at.isoformat(),
            "hostname": checkpoint.hostname,
        },
        "image": {"id": checkpoint.image_id, "name": checkpoint.config["Config"].get("Image")},
        "source": {"engine_id": info.get("ID"), "host": info.get("Name"), "docker_version": info.get("ServerVersion")},
        "criu_version": criu_version,
        "kernel": kernel,
        "members": members,
    }
    return stamp(manifest, lineage=lineage, expires_in=expires_in, compression="none", signer=None)


def stamp(manifest: Dict[str, Any], *, lineage: Optional[str], expires_in: timedelta, compression: str,
          signer: Optional[Ed25519PrivateKey]) -> Dict[str, Any]:
    """``manifest`` with the fields its writer vouches for: a bundle ID of its own, the lineage
    (default the source container's ID), this host's clock (made now, fresh for ``expires_in``),
    the compression and the signer's key id. Returns it, changed in place."""
    now = datetime.now(UTC)
    manifest.update(bundle_id=uuid.uuid4().hex, lineage=lineage or manifest["checkpoint"]["container_id"],
                    created_at=now.isoformat(), expires_at=(now + expires_in).isoformat(), compression=compression,
                    signer=trust.key_id(signer) if signer is not None else None)
    return manifest


def entry(name: str, path: Path) -> Dict[str, Any]:
    """The manifest's entry of a member: its SHA-256 and size."""
    return {"name": name, "sha256": archive.sha256_file(path), "size": path.stat().st_size}


def opened(members: List[Tuple[str, Path]]) -> Iterator[Tuple[str, int, IO[bytes]]]:
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


def read_manifest(path: PathLike, *, encryption_key: Optional[bytes] = None) -> Dict[str, Any]:
    """The manifest of a bundle, checked for form but not verified (for display). Nothing is
    written, not even a decrypted copy.

    Raises:
        BundleError: not a Dolly bundle; DecryptionFailed: encrypted without the right key.
    """
    with archive.open_bundle(Path(path), encryption_key) as tar:
        return parse_manifest(first_member(tar))


def too_large(size: int, max_bytes: int) -> str:
    return (f"the bundle unpacks to {size} bytes or more, over max_bytes={max_bytes} (by default the smaller of "
            f"{DEFAULT_MAX_BYTES} bytes and half the free space of the engine's data root): free space there, "
            "or pass a larger max_bytes if the bundle is expected to be this large")


def source_of(path: Union[PathLike, IO[bytes]]) -> Union[Path, IO[bytes]]:
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


def check_signature(data: bytes, manifest: Dict[str, Any], signature: Optional[bytes],
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
    signer = check_signature(data, manifest, signature, trusted, allow_unsigned)
    check_fresh(manifest)
    return signer


def check_fresh(manifest: Dict[str, Any]) -> None:
    now = datetime.now(UTC)
    expires = datetime.fromisoformat(manifest["expires_at"])
    if now > expires:
        raise BundleExpired(f"the bundle expired at {expires.isoformat()}")
    # A bundle from the future would hold its lineage against every real one until then.
    created = datetime.fromisoformat(manifest["created_at"])
    if created > now + CLOCK_SKEW:
        raise BundleError(f"the bundle says it was made at {created.isoformat()}, in the future "
                          f"(more than {CLOCK_SKEW} ahead of this host's clock)")


def lineage_key(manifest: Dict[str, Any], signer: Optional[str]) -> str:
    """A lineage is its signer's: another signer (or an unsigned bundle) cannot block it."""
    return f"{signer or 'unsigned'}/{manifest['lineage']}"


def source_fields(source: Any) -> Optional[Dict[str, str]]:
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
    need(isinstance(manifest.get("bundle_id"), str) and bool(BUNDLE_ID_RE.match(manifest["bundle_id"])),
         "bundle_id is not 32 hex digits")
    names.lineage(manifest.get("lineage"), error=BundleError)
    for key in ("created_at", "expires_at"):
        _aware(manifest.get(key), key)
    signer = manifest.get("signer")
    need(signer is None or (isinstance(signer, str) and bool(KEY_ID_RE.match(signer))), "signer is not a key id")

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
        need(isinstance(m, dict) and isinstance(m.get("name"), str) and bool(MEMBER_RE.match(m["name"])),
             f"a member outside the bundle layout: {m!r:.80}")
        need(m["name"] not in listed, f"{m['name']} is listed twice")
        need(isinstance(m.get("sha256"), str) and bool(SHA256_RE.match(m["sha256"])), f"{m['name']} has no SHA-256")
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


class Hashing:
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


def tar_members(tar: tarfile.TarFile, first: Optional[tarfile.TarInfo],
                members: Iterator[tarfile.TarInfo]) -> Iterator[Member]:
    """The members of a bundle's tar after its manifest and signature, from ``first`` on, each a
    regular file (not sparse, no link or device) named as the layout names them; the images'
    folder entry, which Podman's layout has, passed over once.

    Raises:
        UnsafeArchive: naming the first member that is none of those.
    """
    folder_seen = False
    member = first
    while member is not None:
        if formats.is_images_folder(member):
            if folder_seen:  # once: a stream of folder entries would be endless work
                raise UnsafeArchive("the bundle holds the images' folder twice")
            folder_seen = True
        else:
            if not MEMBER_RE.match(member.name):
                raise UnsafeArchive(f"the bundle holds {member.name!r}, which is not part of the bundle layout")
            data = tar.extractfile(member) if member.isfile() and member.sparse is None else None
            if data is None:
                raise UnsafeArchive(f"{member.name!r} in the bundle is not a regular file (links and devices are "
                                    "refused)")
            yield member.name, member.size, data
        member = next(members, None)
