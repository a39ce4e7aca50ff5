"""Content trust for checkpoint bundles: Ed25519 signatures, keys in PEM files, AES-256-GCM at rest.

    private, public = dolly.trust.generate_keypair()
    dolly.trust.save_private_key(private, "signer.pem")        # PKCS#8, 0600, a new file
    dolly.trust.save_public_key(public, "signer.pub.pem")      # SubjectPublicKeyInfo, a new file
    dolly.export(cp, "web.dolly", signer=private)
    dolly.import_bundle("web.dolly", trusted_keys=[dolly.trust.load_public_key("signer.pub.pem")])

A bundle's manifest lists every member with its SHA-256 and size; the signature covers the
manifest's exact bytes, so one signature check and one digest check per member cover the whole
bundle. Encryption wraps the whole (compressed) archive in 4 MiB AES-256-GCM chunks, each bound to
its position and to whether it is the last, so chunks cannot be dropped, reordered or truncated.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, BinaryIO, Dict, Iterable, Iterator, Optional, Tuple, Union

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import BundleError, BundleExpired, DecryptionFailed, InvalidArgument, SignatureInvalid, UntrustedSigner

__all__ = [
    "generate_keypair",
    "save_private_key",
    "load_private_key",
    "save_public_key",
    "load_public_key",
    "key_id",
    "sign",
    "verify",
    "generate_encryption_key",
    "sign_file",
    "DetachedSignature",
    "verify_detached",
]

PathLike = Union[str, "os.PathLike[str]"]


def generate_keypair() -> Tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """A new Ed25519 key pair: ``(private_key, public_key)``."""
    private = Ed25519PrivateKey.generate()
    return private, private.public_key()


def save_private_key(
    key: Ed25519PrivateKey, path: PathLike, *, password: Optional[bytes] = None, overwrite: bool = False
) -> Path:
    """Write ``key`` as PKCS#8 PEM into a new file readable by its owner only (0600); encrypted
    when ``password`` is given.

    The file is created, never opened if it exists: an existing file, or a symlink planted at
    ``path``, is refused. With ``overwrite=True`` an existing file (or symlink) is replaced by a
    new file, atomically, and a symlink is never followed.

    Raises:
        InvalidArgument: ``path`` exists (or is a symlink) and ``overwrite`` is not set, or it is
            a folder.
    """
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    return _write_new(Path(path), data, 0o600, overwrite=overwrite)


def load_private_key(path: PathLike, *, password: Optional[bytes] = None) -> Ed25519PrivateKey:
    """Raises:
        InvalidArgument: not an Ed25519 private key in PEM (or the wrong password).
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=password)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"{path} is not a usable PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def save_public_key(key: Ed25519PublicKey, path: PathLike, *, overwrite: bool = False) -> Path:
    """Write ``key`` as SubjectPublicKeyInfo PEM into a new file (0644), like
    :func:`save_private_key`: an existing file or a symlink is refused unless ``overwrite=True``,
    and then replaced atomically, never followed.

    Raises:
        InvalidArgument: ``path`` exists (or is a symlink) and ``overwrite`` is not set, or it is
            a folder.
    """
    data = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _write_new(Path(path), data, 0o644, overwrite=overwrite)


def load_public_key(path: PathLike) -> Ed25519PublicKey:
    """Raises:
        InvalidArgument: not an Ed25519 public key in PEM.
    """
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except ValueError as e:
        raise InvalidArgument(f"{path} is not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidArgument(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def key_id(key: Union[Ed25519PublicKey, Ed25519PrivateKey]) -> str:
    """A short, stable name for a key: the first 16 hex digits of SHA-256 of its raw public bytes."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"signer must be an Ed25519 private key, got {type(key).__name__}")
    return key.sign(data)


def verify(data: bytes, signature: bytes, signer_id: str, trusted: Iterable[Ed25519PublicKey]) -> str:
    """Check that ``signature`` over ``data`` is by a trusted key; returns that key's id.

    Raises:
        UntrustedSigner: no trusted key has the id the bundle names.
        SignatureInvalid: the trusted key with that id did not make this signature.
    """
    keys = {key_id(k): k for k in trusted}
    key = keys.get(signer_id)
    if key is None:
        raise UntrustedSigner(
            f"the bundle is signed by key {signer_id}, which is not among the trusted keys "
            f"({', '.join(sorted(keys)) or 'none given'})"
        )
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise SignatureInvalid(f"the manifest's signature does not verify with key {signer_id}: "
                               "the bundle was altered after signing") from None
    return signer_id


# --- detached signatures (archives that carry none of their own) ---------------------------------

DETACHED_TYPE = "application/vnd.dolly.detached-signature.v1+json"
_MAX_DETACHED = 4096


@dataclasses.dataclass(frozen=True)
class DetachedSignature:
    """A verified detached signature: the archive's SHA-256 (hex) and size it vouches for, and
    the id of the trusted key that made it. The archive itself is still to be checked against
    them as it is read."""

    sha256: str
    size: int
    signer: str


def sign_file(key: Ed25519PrivateKey, path: PathLike, *, expires_in: timedelta = timedelta(days=7),
              out: Optional[PathLike] = None) -> Path:
    """Sign the file at ``path`` (a Podman or kubelet checkpoint archive, which has no place for
    a signature of its own) with a detached signature: a small JSON document, written to a new
    file ``out`` (default: ``path`` + ``.sig``), holding the file's SHA-256 and size, the signer's
    key id, when it was signed and when it expires, signed as a whole with Ed25519.
    ``dolly.import_bundle(path, signature=..., trusted_keys=...)`` checks it.

    Raises:
        InvalidArgument: ``key`` is no Ed25519 private key, ``expires_in`` is not positive, or
            ``out`` exists.
        OSError: ``path`` cannot be read.
    """
    if not isinstance(expires_in, timedelta) or expires_in <= timedelta(0):
        raise InvalidArgument(f"expires_in must be a positive timedelta, got {expires_in!r}")
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
    now = datetime.now(UTC)
    body = {"type": DETACHED_TYPE, "sha256": h.hexdigest(), "size": size, "signer": key_id(key),
            "signed_at": now.isoformat(), "expires_at": (now + expires_in).isoformat()}
    doc = {**body, "signature": base64.b64encode(sign(key, _canonical(body))).decode()}
    target = Path(out) if out is not None else Path(f"{path}.sig")
    return _write_new(target, json.dumps(doc, indent=2).encode() + b"\n", 0o644, overwrite=False)


def verify_detached(data: bytes, trusted: Iterable[Ed25519PublicKey]) -> DetachedSignature:
    """Check a detached signature document (see :func:`sign_file`): made by a trusted key, over
    exactly these fields, and not expired.

    Raises:
        BundleError: not a detached signature document.
        UntrustedSigner, SignatureInvalid: as :func:`verify`.
        BundleExpired: past its ``expires_at``.
    """
    try:
        doc = json.loads(data) if len(data) <= _MAX_DETACHED else None
    except ValueError:
        doc = None
    fields = {"type", "sha256", "size", "signer", "signed_at", "expires_at", "signature"}
    if not (isinstance(doc, dict) and set(doc) == fields and doc["type"] == DETACHED_TYPE
            and isinstance(doc["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", doc["sha256"])
            and isinstance(doc["size"], int) and not isinstance(doc["size"], bool) and doc["size"] >= 0
            and isinstance(doc["signer"], str) and re.fullmatch(r"[0-9a-f]{16}", doc["signer"])
            and isinstance(doc["signature"], str) and len(doc["signature"]) <= 200
            and isinstance(doc["expires_at"], str)):
        raise BundleError("not a Dolly detached signature (application/vnd.dolly.detached-signature.v1+json)")
    try:
        signature = base64.b64decode(doc["signature"], validate=True)
    except ValueError:
        raise BundleError("the detached signature's signature is not base64") from None
    body = {k: v for k, v in doc.items() if k != "signature"}
    verify(_canonical(body), signature, doc["signer"], trusted)
    try:
        expires = datetime.fromisoformat(doc["expires_at"])
    except ValueError:
        raise BundleError("the detached signature's expires_at is not a time") from None
    if expires.tzinfo is None or datetime.now(UTC) > expires:
        raise BundleExpired(f"the detached signature expired at {doc['expires_at']}: the archive is not fresh")
    return DetachedSignature(sha256=doc["sha256"], size=doc["size"], signer=doc["signer"])


def _canonical(body: Dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# --- encryption at rest ----------------------------------------------------------------------------

MAGIC = b"DOLLYENC1\n"
CHUNK = 4 << 20
_TAG = 16


def generate_encryption_key() -> bytes:
    """A new random 256-bit key for :func:`dolly.export`'s ``encryption_key``."""
    return AESGCM.generate_key(bit_length=256)


def _aead(key: bytes) -> AESGCM:
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise InvalidArgument("an encryption key is 32 bytes (AES-256): see dolly.trust.generate_encryption_key()")
    return AESGCM(bytes(key))


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def encrypt_stream(key: bytes, src: BinaryIO, dst: BinaryIO) -> None:
    """Encrypt ``src`` into ``dst``: MAGIC, an 8-byte nonce prefix, then sealed chunks."""
    writer = EncryptingWriter(key, dst)
    shutil.copyfileobj(src, writer, CHUNK)
    writer.close()


def is_encrypted(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def decrypt_chunks(key: Optional[bytes], src: BinaryIO) -> Iterator[bytes]:
    """The plaintext of an encrypted bundle, chunk by chunk, each authenticated before it is
    yielded.

    Raises:
        DecryptionFailed: no key, the wrong key, or a ciphertext that was altered or cut short.
    """
    if key is None:
        raise DecryptionFailed("the bundle is encrypted: pass encryption_key")
    aead = _aead(key)
    if src.read(len(MAGIC)) != MAGIC:
        raise BundleError("not an encrypted Dolly bundle")
    prefix = src.read(8)
    index = 0
    while True:
        sealed = src.read(CHUNK + _TAG)
        if not sealed:
            raise DecryptionFailed("the encrypted bundle is cut short")
        last = len(sealed) < CHUNK + _TAG or not _peek(src)
        try:
            yield aead.decrypt(_nonce(prefix, index), sealed, MAGIC + struct.pack(">IB", index, last))
        except InvalidTag:
            raise DecryptionFailed("cannot decrypt the bundle: wrong key, or the ciphertext was altered") from None
        if last:
            return
        index += 1


class EncryptingWriter(io.RawIOBase):
    """A writable stream that seals what is written into ``dst`` (MAGIC, an 8-byte nonce prefix,
    then sealed chunks), chunk by chunk, so that no plaintext is ever written anywhere. ``close()`` seals the
    last chunk (and does not close ``dst``)."""

    def __init__(self, key: bytes, dst: IO[bytes]) -> None:
        super().__init__()
        self._aead = _aead(key)
        self._dst = dst
        self._prefix = os.urandom(8)
        self._pending = bytearray()
        self._index = 0
        dst.write(MAGIC + self._prefix)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._pending += data
        # Keep at least one byte back: the last chunk is sealed as last, so it must be known.
        while len(self._pending) > CHUNK:
            self._seal(bytes(self._pending[:CHUNK]), last=False)
            del self._pending[:CHUNK]
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._seal(bytes(self._pending), last=True)
            self._pending.clear()
        super().close()

    def _seal(self, chunk: bytes, *, last: bool) -> None:
        aad = MAGIC + struct.pack(">IB", self._index, last)
        self._dst.write(self._aead.encrypt(_nonce(self._prefix, self._index), chunk, aad))
        self._index += 1


class DecryptingReader(io.RawIOBase):
    """A readable stream of the plaintext of an encrypted bundle, each chunk authenticated before
    any of it is returned (see :func:`decrypt_chunks`); nothing is written anywhere.

    Raises (from ``read``):
        DecryptionFailed: as :func:`decrypt_chunks`.
    """

    def __init__(self, key: Optional[bytes], src: BinaryIO) -> None:
        super().__init__()
        self._chunks = decrypt_chunks(key, src)
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def _peek(f: BinaryIO) -> bool:
    if hasattr(f, "peek"):  # a buffered stream (a pipe, a socket): look ahead without seeking
        return bool(f.peek(1))
    pos = f.tell()
    more = bool(f.read(1))
    f.seek(pos)
    return more


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_new(path: Path, data: bytes, mode: int, *, overwrite: bool) -> Path:
    """Write ``data`` into a file at ``path`` that this call creates, with ``mode``.

    O_CREAT|O_EXCL never opens an existing file and fails on any symlink, dangling or not, so
    nothing planted at ``path`` is written through. With ``overwrite``, the data goes into a new
    temporary file in the same folder, which then replaces whatever ``path`` is (a symlink itself,
    not its target) in one rename.
    """
    if not overwrite:
        try:
            _create(path, data, mode)
        except FileExistsError:
            raise InvalidArgument(
                f"{path} exists{' (a symlink)' if path.is_symlink() else ''}: refusing to write a key "
                "over it (pass overwrite=True to replace it)"
            ) from None
        return path
    if path.is_dir() and not path.is_symlink():
        raise InvalidArgument(f"{path} is a folder, not a key file")
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    _create(tmp, data, mode)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _create(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, _NEW_FILE, mode)
    try:
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd != -1:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise
