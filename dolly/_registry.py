"""Checkpoints in an OCI registry: :func:`push` and :func:`pull`, with content trust.

A pushed checkpoint is an OCI image manifest of Dolly's own media types (an "artifact"), so any
registry that keeps OCI manifests keeps it (Debian's docker-registry, distribution 2.8, does):

    config      application/vnd.dolly.checkpoint.config.v1+json: the bundle's manifest.json, the
                exact bytes its signature covers (every member's SHA-256 and size)
    layers[0]   application/vnd.dolly.checkpoint.signature.v1: manifest.sig (when signed)
    layers[1:]  application/vnd.dolly.checkpoint.chunk.v1: the bundle's members, in its order, in
                pieces of at most :data:`CHUNK` bytes, each annotated with its member's name
    annotations io.dolly.checkpoint.* and the base image (``org.opencontainers.image.base.*``),
                by the image's ID and, when it has one, its registry digest

Pieces of a fixed size, not one layer per checkpoint (the checkpoint-image format of
``export(format="oci")``), because a registry deduplicates whole blobs: a second checkpoint of
the same service shares most of its memory's pieces with the first, and only the pieces that
changed are uploaded (each piece is looked up first, ``HEAD``). The base image is referenced,
not pushed: the pulling engine must have it, or copy it from ``image_source``.

Content trust, in the layout of cosign's signatures: a second manifest, tagged
``sha256-<hex of the checkpoint manifest's digest>.sig``, whose one layer is a "simple signing"
payload naming the repository and that digest (plus Dolly's signer, creation and expiry), its
Ed25519 signature in the layer's ``dev.cosignproject.cosign/signature`` annotation. A pull
checks it before any piece is fetched: a trusted signer, this repository, this digest, unexpired,
and a creation time not older than the newest this engine pulled from the same repository and
tag (no rollback). Then the bundle's own signature is checked, and every piece's digest and every
member's SHA-256 as they stream into the import (:func:`dolly.import_bundle`, which holds the
checkpoint to all of a bundle's rules and writes only into the engine's private staging folder
until everything verified).

The registry is spoken to through :mod:`dolly._oci` (the OCI distribution protocol, with
oras-py: Docker's credentials, Basic or token authentication, TLS with a CA file).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import os
import threading
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import docker
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import _archive as archive, _manifest as bundle, trust
from ._catalog import engine_of, remove_checkpoint
from ._checkpoint import Checkpoint
from ._engine import Engine
from ._hosts import host_of
from ._oci import DIGEST_RE, MAX_MANIFEST, OCI_MANIFEST, Reference, Session
from ._transfer import export, import_bundle
from .errors import (
    BundleError,
    BundleExpired,
    DigestMismatch,
    InvalidArgument,
    RegistryError,
    RollbackRefused,
    UnsignedBundle,
)

log = logging.getLogger("dolly")

PathLike = Union[str, "os.PathLike[str]"]

# Pieces are cut between 4 KiB blocks (CRIU's pages) where a block's CRC-32 says so, about every
# 128 blocks, never before 16 nor after 1024: a cut depends on content, not on offset, so a page
# that appears or goes in the middle of a process's memory changes only the piece it is in, not
# every piece after it (cutting at fixed offsets, a second push of a service re-sent all of it).
BLOCK = 4096
_CUT_EVERY, _MIN_BLOCKS, _MAX_BLOCKS = 128, 16, 1024
CHUNK = BLOCK * _MAX_BLOCKS  # the largest piece
CONFIG_TYPE = "application/vnd.dolly.checkpoint.config.v1+json"
SIGNATURE_TYPE = "application/vnd.dolly.checkpoint.signature.v1"
CHUNK_TYPE = "application/vnd.dolly.checkpoint.chunk.v1"
ARTIFACT_TYPE = "application/vnd.dolly.checkpoint.v1"
OCI_EMPTY_CONFIG = "application/vnd.oci.image.config.v1+json"
COSIGN_PAYLOAD = "application/vnd.dev.cosign.simplesigning.v1+json"
COSIGN_SIGNATURE = "dev.cosignproject.cosign/signature"
MEMBER_ANNOTATION = "io.dolly.member"


@dataclasses.dataclass(frozen=True)
class PushReport:
    """What :func:`push` did.

    Attributes:
        reference: ``HOST/REPOSITORY@sha256:...``, the pushed manifest by digest.
        digest: the manifest's digest; tag: the tag it was given.
        blobs, uploaded: how many blobs the checkpoint is, and how many were uploaded (the others
            the registry had: a second push of the same service uploads only what changed).
        bytes, bytes_uploaded: the same in bytes.
        seconds: the push's duration, the export included.
    """

    reference: str
    digest: str
    tag: str
    blobs: int
    uploaded: int
    bytes: int
    bytes_uploaded: int
    seconds: float


def push(
    checkpoint: Checkpoint,
    reference: str,
    *,
    signer: Optional[Ed25519PrivateKey] = None,
    expires_in: timedelta = timedelta(days=7),
    annotations: Optional[Dict[str, str]] = None,
    ca_file: Optional[PathLike] = None,
    insecure: Optional[bool] = None,
    client: Optional[docker.DockerClient] = None,
) -> PushReport:
    """Push ``checkpoint`` to an OCI registry as ``reference`` (``HOST:PORT/REPO:TAG``).

    Args:
        signer: Ed25519 key (:mod:`dolly.trust`) that signs the bundle's manifest and, cosign's
            way, the pushed manifest's digest. Unsigned when None: a pull then needs
            ``allow_unsigned=True``.
        expires_in: how long the pushed checkpoint is fresh.
        annotations: more ``str`` annotations for the manifest (``io.dolly.*`` ones are Dolly's).
        ca_file: the CA bundle that signs the registry's TLS certificate.
        insecure: plain HTTP. Default, as Docker's: plain HTTP for a registry on a loopback
            address without ``ca_file``, HTTPS for any other.
        client: the engine the checkpoint is on; default the one it knows.

    Raises:
        InvalidArgument: a bad reference, key or expiry.
        RegistryError: the registry is unreachable, refused the credentials or a request.
        the errors of :func:`dolly.export`.
    """
    ref = Reference.parse(reference)
    if ref.digest is not None:
        raise InvalidArgument(f"{reference!r}: push to a tag, not a digest (the digest is the content's)")
    if signer is not None and not isinstance(signer, Ed25519PrivateKey):
        raise InvalidArgument(f"signer must be an Ed25519 private key, got {type(signer).__name__}")
    extra = {str(k): str(v) for k, v in (annotations or {}).items()}
    started = time.perf_counter()
    session = Session(ref, ca_file=ca_file, insecure=insecure)
    engine = engine_of(checkpoint, client)
    with host_of(engine).scratch_folder("push-") as tmp:
        work = Path(tmp)
        path = export(checkpoint, work / "bundle", signer=signer, compression="none", expires_in=expires_in,
                             client=client)
        with archive.open_bundle(path, None) as tar:
            members = iter(tar)
            manifest_bytes = bundle.first_member(tar, members)
            signature, first = bundle.read_signature(tar, members)
            manifest = bundle.parse_manifest(manifest_bytes)
            blobs: List[Dict[str, Any]] = []
            if signature is not None:
                blobs.append(session.put_blob(signature, SIGNATURE_TYPE))
            member = first
            while member is not None:
                if member.isfile():
                    data = tar.extractfile(member)
                    if data is None:
                        raise BundleError(f"{member.name} is not a regular file")
                    for piece in pieces(data):
                        blobs.append(session.put_blob(piece, CHUNK_TYPE, {MEMBER_ANNOTATION: member.name}))
                member = next(members, None)
        config = session.put_blob(manifest_bytes, CONFIG_TYPE)
    repo_digests = engine.image_digests(checkpoint.image_id)
    notes = {
        **extra,
        "io.dolly.checkpoint.container": checkpoint.container_name,
        "io.dolly.checkpoint.name": checkpoint.name,
        "io.dolly.checkpoint.signer": manifest.get("signer") or "",
        "org.opencontainers.image.created": manifest["created_at"],
        "org.opencontainers.image.base.name": str(checkpoint.config["Config"].get("Image") or ""),
        "org.opencontainers.image.base.digest": (repo_digests or [checkpoint.image_id])[0].rsplit("@", 1)[-1],
        "io.dolly.checkpoint.image.id": checkpoint.image_id,
    }
    body = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
        "config": _descriptor(config), "layers": [_descriptor(b) for b in blobs], "annotations": notes,
    }, sort_keys=True, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if signer is not None:  # the signature first: a tag never names an unsigned manifest of a signed push
        _push_signature(session, ref, digest, signer, created=manifest["created_at"],
                        expires=manifest["expires_at"])
    session.put_manifest(ref.tag or "latest", body)
    everything = [config, *blobs]
    return PushReport(
        reference=f"{ref.name}@{digest}", digest=digest, tag=ref.tag or "latest", blobs=len(everything),
        uploaded=sum(b["uploaded"] for b in everything), bytes=sum(b["size"] for b in everything),
        bytes_uploaded=sum(b["size"] for b in everything if b["uploaded"]), seconds=time.perf_counter() - started)


def pull(
    reference: str,
    *,
    client: Optional[docker.DockerClient] = None,
    trusted_keys: Iterable[Ed25519PublicKey] = (),
    allow_unsigned: bool = False,
    allow: Iterable[str] = (),
    image_source: Optional[docker.DockerClient] = None,
    ca_file: Optional[PathLike] = None,
    insecure: Optional[bool] = None,
    max_bytes: Optional[int] = None,
) -> Checkpoint:
    """Pull a checkpoint that :func:`push` pushed (``HOST:PORT/REPO:TAG`` or ``...@sha256:...``)
    and make it a checkpoint on ``client``'s engine, as :func:`dolly.import_bundle` does.

    Before any piece is fetched, the pushed manifest's signature is checked (a trusted signer,
    this repository, this digest, unexpired, not older than the newest pulled here from the same
    repository and tag); the pieces are then checked by digest as they stream into the import,
    which checks the bundle's own signature and every member, and writes only into the engine's
    private staging folder until everything verified.

    Args:
        trusted_keys: public keys whose signatures are accepted; when given, the checkpoint must
            be signed by one of them.
        allow_unsigned: with no ``trusted_keys``, accept a checkpoint pushed without a signature.
        allow, image_source, max_bytes: as :func:`dolly.import_bundle` (the restore policy for
            checkpoints from elsewhere applies).
        ca_file, insecure: as :func:`push`.

    Raises:
        InvalidArgument: a bad reference.
        RegistryError: the registry is unreachable, refused the credentials, or lacks it.
        UnsignedBundle, UntrustedSigner, SignatureInvalid, BundleExpired, RollbackRefused: the
            signature's checks; DigestMismatch: a manifest or piece that is not what was signed;
            and the other errors of :func:`dolly.import_bundle`. Nothing is left of a refused pull.
    """
    return pull_annotated(reference, client=client, trusted_keys=trusted_keys, allow_unsigned=allow_unsigned,
                          allow=allow, image_source=image_source, ca_file=ca_file, insecure=insecure,
                          max_bytes=max_bytes)[0]


def pull_annotated(reference: str, *, client: Optional[docker.DockerClient] = None,
                   trusted_keys: Iterable[Ed25519PublicKey] = (), allow_unsigned: bool = False,
                   allow: Iterable[str] = (), image_source: Optional[docker.DockerClient] = None,
                   ca_file: Optional[PathLike] = None, insecure: Optional[bool] = None,
                   max_bytes: Optional[int] = None) -> Tuple[Checkpoint, Dict[str, str]]:
    """:func:`pull`, and the pushed manifest's annotations (what :func:`push` was given in
    ``annotations``, beside Dolly's: the pytest plugin's cache keeps its cold-start time there).
    They were signed with the manifest, but say what the pusher chose to say."""
    ref = Reference.parse(reference)
    trusted = list(trusted_keys)
    engine = Engine.of(client)
    session = Session(ref, ca_file=ca_file, insecure=insecure)
    body = session.manifest(ref.digest or ref.tag or "latest")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if ref.digest is not None and digest != ref.digest:
        raise DigestMismatch(f"the registry answered {ref} with a manifest of digest {digest}")
    signed = None
    if trusted or not allow_unsigned:
        signed = _check_signature(session, ref, digest, trusted)
    layout = _layout(body)
    manifest_bytes = session.small_blob(layout["config"], CONFIG_TYPE)
    manifest = bundle.parse_manifest(manifest_bytes)
    signature = session.small_blob(layout["signature"], SIGNATURE_TYPE) if layout["signature"] else None
    if signed is not None:
        if manifest.get("signer") != signed["signer"] or signature is None:
            raise BundleError(f"{ref}: the bundle inside is not signed by the key that signed its manifest")
        trust.verify(manifest_bytes, signature, signed["signer"], trusted)  # early; the import checks again
        if manifest["created_at"] != signed["created"]:
            raise BundleError(f"{ref}: the signature and the bundle disagree on when it was made")
    pieces = _pieces_by_member(layout["chunks"], manifest)
    # The engine's record when its files are here; for another host's engine, this user's (its
    # agent keeps the bundle's own lineages there).
    lineages = host_of(engine).tag_lineages()
    key = f"registry/{ref.name}:{ref.tag}"  # whoever signed it: a tag moves forward only
    if ref.digest is None:  # a digest is a pin the caller chose; a tag is what the registry says
        lineages.check(key, manifest["created_at"])

    source, sink = os.pipe()
    reader, writer = os.fdopen(source, "rb"), os.fdopen(sink, "wb")
    failure: List[BaseException] = []

    def produce() -> None:
        try:
            # Buffered: tarfile wants whole reads, and a raw stream may stop short at a piece's end.
            members = [(m["name"], m["size"], io.BufferedReader(_Pieces(session, pieces[m["name"]]), 1 << 20))
                       for m in manifest["members"]]
            bundle.write_tar(writer, manifest_bytes, signature, members,
                             compression="none", encryption_key=None)
        except BaseException as e:  # handed to the importing thread
            failure.append(e)
        finally:
            try:
                writer.close()
            except OSError:
                pass

    thread = threading.Thread(target=produce, name="dolly-pull", daemon=True)
    thread.start()
    try:
        cp = import_bundle(reader, client=client, trusted_keys=trusted, allow_unsigned=allow_unsigned,
                                  allow=allow, image_source=image_source, max_bytes=max_bytes)
    except BaseException as e:
        reader.close()
        thread.join()
        if failure and not isinstance(failure[0], (BrokenPipeError, ValueError)):
            raise failure[0] from e
        raise
    reader.close()
    thread.join()
    if failure and not isinstance(failure[0], BrokenPipeError):
        raise failure[0]
    if ref.digest is None:
        with lineages.lock:  # checked again: another pull may have recorded a newer one meanwhile
            try:
                lineages.check(key, manifest["created_at"])
            except RollbackRefused:
                remove_checkpoint(cp, cp.client)
                raise
            lineages.record(key, manifest["created_at"])
    log.info("pulled %s (%s) as checkpoint %s of %s", ref, digest, cp.name, cp.container_name)
    notes = layout["annotations"]
    return cp, {str(k): str(v) for k, v in notes.items()} if isinstance(notes, dict) else {}


# --- the manifest's layout ----------------------------------------------------------------------------


def _layout(body: bytes) -> Dict[str, Any]:
    """The pushed manifest's parts, every descriptor held to Dolly's layout.

    Raises:
        BundleError: not a Dolly checkpoint manifest.
    """
    try:
        doc = json.loads(body)
    except ValueError:
        raise BundleError("the registry's manifest is not JSON") from None
    if not (isinstance(doc, dict) and doc.get("schemaVersion") == 2 and isinstance(doc.get("layers"), list)
            and isinstance(doc.get("config"), dict) and doc["config"].get("mediaType") == CONFIG_TYPE):
        raise BundleError(f"not a Dolly checkpoint in the registry (its config is not {CONFIG_TYPE})")
    config = _checked(doc["config"], MAX_MANIFEST)
    layers = [_checked(d, CHUNK) for d in doc["layers"]]
    signature = None
    if layers and layers[0]["mediaType"] == SIGNATURE_TYPE:
        signature = layers.pop(0)
    if len(layers) > bundle.MAX_MEMBERS * 4 or any(d["mediaType"] != CHUNK_TYPE for d in layers):
        raise BundleError("the checkpoint's layers are not Dolly's pieces")
    return {"config": config, "signature": signature, "chunks": layers, "annotations": doc.get("annotations") or {}}


def _checked(descriptor: Any, max_size: int) -> Dict[str, Any]:
    if not (isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str)
            and DIGEST_RE.match(descriptor["digest"]) and type(descriptor.get("size")) is int
            and 0 <= descriptor["size"] <= max_size and isinstance(descriptor.get("mediaType"), str)):
        raise BundleError(f"a descriptor of the checkpoint's manifest breaks Dolly's layout: {descriptor!r:.200}")
    return descriptor


def _pieces_by_member(chunks: List[Dict[str, Any]], manifest: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    """Each member's pieces, in order: the members in the bundle manifest's order, each piece
    of 1 to :data:`CHUNK` bytes, their sizes adding up to the member's.

    Raises:
        BundleError: pieces that do not make up the bundle's members.
    """
    by_member: Dict[str, List[Dict[str, Any]]] = {m["name"]: [] for m in manifest["members"]}
    order: List[str] = []
    for piece in chunks:
        name = (piece.get("annotations") or {}).get(MEMBER_ANNOTATION)
        if name not in by_member:
            raise BundleError(f"a piece of the checkpoint names no member of its bundle: {name!r:.100}")
        if not order or order[-1] != name:
            if name in order:
                raise BundleError(f"the pieces of {name} are not together")
            order.append(name)
        by_member[name].append(piece)
    for m in manifest["members"]:
        sizes = [p["size"] for p in by_member[m["name"]]]
        if sum(sizes) != m["size"] or not all(0 < s <= CHUNK for s in sizes):
            raise BundleError(f"the pieces of {m['name']} do not make up its {m['size']} bytes")
    if order != [m["name"] for m in manifest["members"] if m["size"]]:
        raise BundleError("the pieces are not in the order of the bundle's members")
    return by_member


def pieces(data: IO[bytes]) -> Iterator[bytes]:
    """``data`` cut into pieces by content (see :data:`BLOCK`)."""
    piece: List[bytes] = []
    for block in iter(lambda: data.read(BLOCK), b""):
        piece.append(block)
        if len(piece) >= _MAX_BLOCKS or (len(piece) >= _MIN_BLOCKS and zlib.crc32(block) % _CUT_EVERY == 0):
            yield b"".join(piece)
            piece = []
    if piece:
        yield b"".join(piece)


def _descriptor(blob: Dict[str, Any]) -> Dict[str, Any]:
    out = {"mediaType": blob["mediaType"], "digest": blob["digest"], "size": blob["size"]}
    if blob.get("annotations"):
        out["annotations"] = blob["annotations"]
    return out


class _Pieces(io.RawIOBase):
    """A member read from its pieces, each fetched as a stream and checked against its digest
    as it is read: a piece that is not the one listed fails the read (the import then fails)."""

    def __init__(self, session: Session, pieces: List[Dict[str, Any]]) -> None:
        self._session, self._pieces = session, list(pieces)
        self._current: Optional[Iterator[bytes]] = None
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buffer:
            if self._current is None:
                if not self._pieces:
                    return 0
                self._current = self._session.blob_stream(self._pieces.pop(0))
            chunk = next(self._current, None)  # the stream's end (after its digest was checked) is None
            if chunk is None:
                self._current = None
            else:
                self._buffer = chunk
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


# --- signatures, in cosign's layout ---------------------------------------------------------------------


def _signature_tag(digest: str) -> str:
    return digest.replace(":", "-") + ".sig"


def _push_signature(session: Session, ref: Reference, digest: str, signer: Ed25519PrivateKey, *, created: str,
                    expires: str) -> None:
    payload = json.dumps({
        "critical": {"identity": {"docker-reference": ref.name}, "image": {"docker-manifest-digest": digest},
                     "type": "cosign container image signature"},
        "optional": {"io.dolly.signer": trust.key_id(signer), "io.dolly.created": created,
                     "io.dolly.expires": expires, "io.dolly.tag": ref.tag or "latest"},
    }, sort_keys=True, separators=(",", ":")).encode()
    signature = base64.b64encode(trust.sign(signer, payload)).decode()
    layer = session.put_blob(payload, COSIGN_PAYLOAD, {COSIGN_SIGNATURE: signature})
    config = session.put_blob(b"{}", OCI_EMPTY_CONFIG)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": _descriptor(config),
                       "layers": [_descriptor(layer)]}, sort_keys=True, separators=(",", ":")).encode()
    session.put_manifest(_signature_tag(digest), body)


def _check_signature(session: Session, ref: Reference, digest: str, trusted: List[Ed25519PublicKey]
                     ) -> Dict[str, str]:
    """The signature of the manifest ``digest`` in ``ref``'s repository: returns its signer's key
    id and its creation time.

    Raises:
        UnsignedBundle: there is none; UntrustedSigner, SignatureInvalid: by an untrusted key,
            or not over this payload; DigestMismatch: over another manifest or repository;
            BundleExpired: past its expiry.
    """
    try:
        body = session.manifest(_signature_tag(digest))
    except RegistryError as e:
        if e.status == 404:
            raise UnsignedBundle(f"{ref} ({digest}) has no signature in the registry: pull it with "
                                 "allow_unsigned=True if you trust where it came from") from None
        raise
    try:
        doc = json.loads(body)
        (layer,) = doc["layers"]
        layer = _checked(layer, 64 << 10)
        encoded = layer["annotations"][COSIGN_SIGNATURE]
        signature = base64.b64decode(encoded, validate=True)
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{ref}: its signature manifest is not a signature") from None
    if layer["mediaType"] != COSIGN_PAYLOAD:
        raise BundleError(f"{ref}: its signature layer is not a {COSIGN_PAYLOAD}")
    payload = session.small_blob(layer, COSIGN_PAYLOAD)
    try:
        claims = json.loads(payload)
        critical, optional = claims["critical"], claims["optional"]
        signer, created = optional["io.dolly.signer"], optional["io.dolly.created"]
        expires, tag = optional["io.dolly.expires"], optional["io.dolly.tag"]
        if not all(isinstance(x, str) for x in (signer, created, expires, tag)):
            raise TypeError("not strings")
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{ref}: its signature's payload is not Dolly's") from None
    trust.verify(payload, signature, signer, trusted)
    if critical.get("image", {}).get("docker-manifest-digest") != digest or \
            critical.get("identity", {}).get("docker-reference") != ref.name:
        raise DigestMismatch(f"{ref}: its signature is of another manifest or repository")
    if ref.digest is None and tag != ref.tag:  # a tag pull gets what was pushed to that tag
        raise DigestMismatch(f"{ref}: the registry answered with a manifest signed for the tag {tag!r:.80}")
    try:
        expired = datetime.now(UTC) > datetime.fromisoformat(expires)
    except (ValueError, TypeError):
        raise BundleError(f"{ref}: its signature's expiry is not a time") from None
    if expired:
        raise BundleExpired(f"{ref} expired at {expires}: it is not fresh")
    return {"signer": signer, "created": created}
