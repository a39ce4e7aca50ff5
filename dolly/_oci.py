"""The OCI distribution protocol, as Dolly speaks it to a registry: :class:`Reference`
(``HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]``) and :class:`Session`, one repository of one
registry (blobs and manifests by digest and tag: ``HEAD``, ``GET``, ``PUT``, uploads), with its
limits (bounded reads, digests checked as blobs stream).

The registry is spoken to with oras-py (the ORAS project's client): its session, credentials from
Docker's ``config.json`` (``$DOCKER_CONFIG``, else ``~/.docker/config.json``: ``auths``,
``credsStore``, ``credHelpers``), Basic or token authentication, and TLS with a CA file. What
Dolly adds: a probe that fails fast, plain HTTP only on loopback (as Docker), every token realm
checked before credentials go there, uploads only to the registry's own origin, timeouts.

Dolly's checkpoints as artifacts (their manifests, pieces and signatures) are
:mod:`dolly._registry`'s; this module knows nothing of them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union
from urllib.parse import urlsplit

import requests
import requests.adapters

from .errors import BundleError, DigestMismatch, InvalidArgument, RegistryError

PathLike = Union[str, "os.PathLike[str]"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MAX_MANIFEST = 4 << 20
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_REPO_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*\Z")
_HOST_RE = re.compile(r"^(?:\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(?::\d{1,5})?\Z")


@dataclasses.dataclass(frozen=True)
class Reference:
    """``HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]``: a registry must be named (Dolly never
    guesses Docker Hub)."""

    registry: str
    repository: str
    tag: Optional[str] = None
    digest: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Raises:
            InvalidArgument: not such a reference.
        """
        if not isinstance(text, str) or len(text) > 512:
            raise InvalidArgument(f"not a registry reference: {text!r:.80}")
        rest, at, digest_part = text.partition("@")
        digest = digest_part if at else None
        host, _, path = rest.partition("/")
        tag = None
        if ":" in path.rsplit("/", 1)[-1]:
            path, tag = path.rsplit(":", 1)
        if not (_HOST_RE.match(host) and ("." in host or ":" in host or host == "localhost")):
            raise InvalidArgument(f"{text!r}: name the registry, HOST:PORT/REPOSITORY[:TAG] (no default registry)")
        if not _REPO_RE.match(path) or len(path) > 255:
            raise InvalidArgument(f"{text!r}: {path!r} is not a repository name (lowercase, / separated)")
        if tag is not None and not _TAG_RE.match(tag):
            raise InvalidArgument(f"{text!r}: {tag!r} is not a tag")
        if digest is not None and not DIGEST_RE.match(digest):
            raise InvalidArgument(f"{text!r}: {digest!r} is not a sha256 digest")
        return cls(host, path, tag if tag is not None or digest is not None else "latest", digest)

    @property
    def name(self) -> str:
        """``HOST/REPOSITORY``, as a signature names it."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return self.name + (f"@{self.digest}" if self.digest else f":{self.tag}")


# --- the registry, through oras-py -----------------------------------------------------------------------


class Session:
    """One repository of one registry: blobs and manifests by digest and tag."""

    def __init__(self, ref: Reference, *, ca_file: Optional[PathLike], insecure: Optional[bool]) -> None:
        import oras.auth
        import oras.container
        import oras.provider

        self.ref = ref
        verify: Union[bool, str] = str(ca_file) if ca_file is not None else True
        # As Docker: HTTPS, and for a registry on a loopback address without a CA file, plain HTTP
        # when it does not speak TLS at all (never when its certificate fails to verify).
        plain_allowed = insecure is None and ca_file is None and _is_loopback(ref.registry)
        self.scheme = "http" if insecure else "https"
        # Docker's answer to an unauthenticated request names the scheme: Basic (htpasswd) or a
        # token service (Bearer). Asked once, without oras' retries, so that a registry that is
        # not there fails now, not after minutes of back-off.
        try:
            probe = requests.get(f"{self.scheme}://{ref.registry}/v2/", timeout=10, verify=verify, stream=True)
        except requests.exceptions.SSLError as e:
            if not plain_allowed or "CERTIFICATE_VERIFY_FAILED" in str(e) or "certificate" in str(e).lower():
                raise RegistryError(f"TLS with {ref.registry} failed (pass ca_file= for a private CA): {e}") from e
            self.scheme = "http"
            probe = self._probe_plain(ref)
        except requests.exceptions.RequestException as e:
            raise RegistryError(f"cannot reach the registry {ref.registry} over {self.scheme}: {e}") from e
        insecure = self.scheme == "http"
        probe.close()
        challenge = probe.headers.get("Www-Authenticate", "")
        backend = "basic" if challenge.lower().startswith("basic") else "token"
        if backend == "token" and challenge:
            _check_realm(challenge, self.scheme, ref.registry, insecure)
        self.registry = oras.provider.Registry(ref.registry, insecure=insecure, tls_verify=verify,
                                               auth_backend=backend)
        if backend == "token":
            # The probe's challenge is not the last word: any later 401 (a registry restarted with
            # token auth, a proxy, one path guarded differently) names a realm of its own, and
            # oras' TokenAuth sends Docker's Basic credentials there. Every challenge is checked
            # before oras answers it. (Basic: oras retries the same URL, the registry's own.)
            answer = self.registry.auth.authenticate_request

            def checked(original: Any, headers: Any, refresh: bool = False) -> Any:
                if challenge := original.headers.get("Www-Authenticate", ""):  # none: oras contacts nothing
                    try:
                        _check_realm(challenge, self.scheme, ref.registry, insecure)
                    except RegistryError as e:
                        # oras retries any other exception for minutes; this one it passes on at
                        # once, and _request turns it back into the RegistryError.
                        raise oras.auth.AuthenticationException(str(e)) from e
                return answer(original, headers, refresh)

            self.registry.auth.authenticate_request = checked
        # Every request has connect and read timeouts (oras sets none): a registry that stops
        # answering fails the call instead of hanging it.
        adapter = _TimeoutAdapter()
        self.registry.session.mount("https://", adapter)
        self.registry.session.mount("http://", adapter)
        self.container = oras.container.Container(f"{ref.registry}/{ref.repository}")
        config = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"
        self.registry.auth.load_configs(self.container, configs=[str(config)] if config.exists() else None)
        if probe.status_code == 401 and backend == "basic" and not getattr(self.registry.auth, "_basic_auth", None):
            raise RegistryError(f"{ref.registry} asks for credentials and Docker's config.json ({config}) has none "
                                "for it: `docker login` it", status=401)

    @staticmethod
    def _probe_plain(ref: Reference) -> Any:
        try:
            return requests.get(f"http://{ref.registry}/v2/", timeout=10, stream=True)
        except requests.exceptions.RequestException as e:
            raise RegistryError(f"cannot reach the registry {ref.registry}: {e}") from e

    def _request(self, url: str, method: str, **kwargs: Any) -> Any:
        import oras.auth

        try:
            response = self.registry.do_request(url, method, **kwargs)
        except requests.exceptions.RequestException as e:
            raise RegistryError(f"{method} {url}: {e}") from e
        except ValueError as e:  # oras: a 500 after its retries, or credentials it could not use
            raise RegistryError(f"{method} {url}: {e}") from e
        except oras.auth.AuthenticationException as e:  # a challenge refused by _check_realm
            raise RegistryError(f"{method} {url}: {e}") from e
        return response

    def _fail(self, what: str, response: Any) -> RegistryError:
        try:  # at most 4 KiB of whatever the registry says
            body = response.raw.read(4096, decode_content=False) if response.raw is not None else b""
        except Exception:
            body = b""
        finally:
            response.close()
        try:
            errors = "; ".join(str(e.get("message"))[:200] for e in json.loads(body).get("errors", [])[:5])
        except (ValueError, AttributeError):
            errors = body[:200].decode("utf-8", "replace")
        return RegistryError(f"{what}: the registry answered {response.status_code} {response.reason}"
                             f"{': ' + errors if errors else ''}", status=response.status_code)

    def manifest(self, reference: str) -> bytes:
        url = f"{self.scheme}://{self.container.manifest_url(reference)}"
        response = self._request(url, "GET", headers={"Accept": OCI_MANIFEST}, stream=True)
        with response:
            if response.status_code != 200:
                raise self._fail(f"{self.ref.name}:{reference}", response)
            return _bounded(response, MAX_MANIFEST, f"the manifest {self.ref.name}:{reference}")

    def put_manifest(self, reference: str, body: bytes) -> None:
        url = f"{self.scheme}://{self.container.manifest_url(reference)}"
        response = self._request(url, "PUT", data=body, headers={"Content-Type": OCI_MANIFEST}, stream=True)
        if response.status_code not in (200, 201):
            raise self._fail(f"pushing the manifest {self.ref.name}:{reference}", response)
        response.close()

    def put_blob(self, data: bytes, media_type: str, annotations: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """Upload ``data`` unless the repository has it; returns its descriptor, with
        ``uploaded``."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blob = {"mediaType": media_type, "digest": digest, "size": len(data), "annotations": annotations,
                "uploaded": False}
        head = self._request(f"{self.scheme}://{self.container.get_blob_url(digest)}", "HEAD", stream=True)
        head.close()
        if head.status_code == 200:
            return blob
        start = self._request(f"{self.scheme}://{self.container.upload_blob_url()}", "POST",
                              headers={"Content-Length": "0"}, stream=True)
        location = self.registry._get_location(start, self.container)  # oras' own (relative URLs)
        if start.status_code != 202 or not location:
            raise self._fail("starting an upload", start)
        start.close()
        if not _same_origin(location, self.scheme, self.ref.registry):
            raise RegistryError(f"the registry sends the upload elsewhere ({location!r:.200}): refused, as "
                                "credentials would go with it")
        url = f"{location}{'&' if '?' in location else '?'}digest={digest}"
        done = self._request(url, "PUT", data=data, headers={"Content-Type": "application/octet-stream",
                                                              "Content-Length": str(len(data))}, stream=True)
        if done.status_code != 201:
            raise self._fail(f"uploading {digest}", done)
        done.close()
        blob["uploaded"] = True
        return blob

    def small_blob(self, descriptor: Dict[str, Any], media_type: str) -> bytes:
        """A small blob, read whole and checked against its descriptor."""
        if descriptor.get("mediaType") != media_type or descriptor["size"] > MAX_MANIFEST:
            raise BundleError(f"{descriptor['digest']} is not a {media_type} of at most {MAX_MANIFEST} bytes")
        data = b"".join(self.blob_stream(descriptor))
        return data

    def blob_stream(self, descriptor: Dict[str, Any]) -> Iterator[bytes]:
        """The blob's bytes as they arrive, checked against its digest and size by the end.

        Raises:
            DigestMismatch: more bytes than its size, or another digest.
        """
        digest, size = descriptor["digest"], descriptor["size"]
        response = self._request(f"{self.scheme}://{self.container.get_blob_url(digest)}", "GET", stream=True)
        with response:
            if response.status_code != 200:
                raise self._fail(f"fetching {digest}", response)
            h, seen = hashlib.sha256(), 0
            for chunk in response.iter_content(chunk_size=1 << 20):
                if not chunk:
                    continue
                seen += len(chunk)
                if seen > size:
                    raise DigestMismatch(f"the registry sent more than the {size} bytes of {digest}")
                h.update(chunk)
                if seen == size and "sha256:" + h.hexdigest() != digest:
                    raise DigestMismatch(f"the registry's blob {digest} is not what was pushed (its digest differs)")
                yield chunk
            if seen != size or "sha256:" + h.hexdigest() != digest:
                raise DigestMismatch(f"the registry's blob {digest} is not what was pushed ({seen} of {size} bytes)")


class _TimeoutAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter with connect and read timeouts on every request that sets none."""

    def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = (10, 60)
        return super().send(request, **kwargs)


def _same_origin(url: str, scheme: str, registry: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == scheme and parts.netloc == registry


def _same_trust(realm: str, scheme: str, registry: str) -> bool:
    """A token service credentials may go to: HTTPS, or the registry's own plain-HTTP origin
    (which Dolly only speaks to on loopback, or when the caller passed ``insecure=True``)."""
    parts = urlsplit(realm)
    return parts.scheme == "https" or (parts.scheme == scheme == "http" and parts.netloc == registry)


def _check_realm(challenge: str, scheme: str, registry: str, insecure: bool) -> None:
    """Refuse a token challenge whose realm credentials may not go to. The realm is read with
    oras' own parser and completed as oras completes it, so the URL checked is the one oras would
    contact (a second ``realm=`` in the header, which a first-match reading would miss, included).

    Raises:
        RegistryError: the challenge names no realm, or one that is neither HTTPS nor the
            registry's own plain-HTTP origin.
    """
    import oras.auth.utils

    realm = oras.auth.utils.parse_auth_header(challenge).realm
    if not isinstance(realm, str) or not realm:
        raise RegistryError(f"{registry} asks for authentication without naming a token service "
                            f"({challenge!r:.200}): check the registry's auth configuration")
    if not realm.startswith("http"):  # as oras does before it sends the request
        realm = f"{'http' if insecure else 'https'}://{realm}"
    if not _same_trust(realm, scheme, registry):
        # oras sends Docker's credentials for the registry to the token service it names:
        # over TLS only (as Docker), unless it is the registry's own plain-HTTP (loopback) origin.
        raise RegistryError(f"{registry} names the token service {realm!r:.200}, which is neither HTTPS nor "
                            f"the registry's own origin: credentials are not sent there (serve the token "
                            "service over HTTPS)")


def _bounded(response: Any, limit: int, what: str) -> bytes:
    data = b""
    for chunk in response.iter_content(chunk_size=1 << 16):
        data += chunk
        if len(data) > limit:
            raise BundleError(f"{what} is larger than {limit} bytes")
    return data


def _is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.startswith("[") else registry[1:].split("]")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
