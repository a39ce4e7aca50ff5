"""A real OCI registry for the tests: Debian's docker-registry (distribution 2.8), on loopback."""
from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import requests

from engines import make_tls_files


class Registry:
    """``docker-registry serve`` on 127.0.0.1 with its storage in ``folder``; with ``user``, Basic
    authentication (an htpasswd file, bcrypt) and TLS by a CA of its own (:attr:`ca_file`)."""

    def __init__(self, folder: Path, *, user: Optional[tuple] = None, token_realm: Optional[str] = None,
                 port: Optional[int] = None) -> None:
        """``token_realm``: token authentication (plain HTTP) by that token service; ``port``: a
        port of its own (another registry's, stopped, to change what answers there)."""
        self.folder = folder
        self.user = user
        self.token_realm = token_realm
        self.ca_file: Optional[str] = None
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.address = f"127.0.0.1:{self.port}"
        self._proc: Optional[subprocess.Popen] = None

    def start(self) -> Registry:
        self.folder.mkdir(parents=True, exist_ok=True)
        http: dict = {"addr": self.address}
        config: dict = {"version": 0.1, "log": {"level": "warn"},
                        "storage": {"filesystem": {"rootdirectory": str(self.folder / "data")},
                                    "delete": {"enabled": True}},
                        "http": http}
        if self.user is not None:
            import bcrypt

            tls = make_tls_files(self.folder, "127.0.0.1")
            self.ca_file = tls["ca"]
            http["tls"] = {"certificate": tls["server"], "key": tls["server_key"]}
            name, password = self.user
            # The lowest cost: the registry checks the password on every request.
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4, prefix=b"2a")).decode()
            (self.folder / "htpasswd").write_text(f"{name}:{hashed}\n")
            config["auth"] = {"htpasswd": {"realm": "dolly-test", "path": str(self.folder / "htpasswd")}}
        if self.token_realm is not None:
            bundle = make_tls_files(self.folder, "127.0.0.1")["ca"]  # a certificate it would verify tokens by
            config["auth"] = {"token": {"realm": self.token_realm, "service": "dolly-test", "issuer": "dolly-test",
                                        "rootcertbundle": bundle}}
        (self.folder / "config.yml").write_text(json.dumps(config))  # YAML reads JSON
        self._proc = subprocess.Popen(["docker-registry", "serve", str(self.folder / "config.yml")],
                                      stdout=open(self.folder / "log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{self.scheme}://{self.address}/v2/", timeout=2, verify=self.ca_file or True)
                return self
            except requests.exceptions.RequestException:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    log = (self.folder / "log").read_text()[-2000:]
                    raise RuntimeError(f"docker-registry did not start: {log}") from None
                time.sleep(0.1)

    @property
    def scheme(self) -> str:
        return "https" if self.user is not None else "http"

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def docker_config(self, folder: Path) -> Path:
        """A Docker config folder (for ``DOCKER_CONFIG``) holding this registry's credentials."""
        folder.mkdir(parents=True, exist_ok=True)
        name, password = self.user or ("", "")
        auth = base64.b64encode(f"{name}:{password}".encode()).decode()
        (folder / "config.json").write_text(json.dumps({"auths": {self.address: {"auth": auth}}}))
        return folder

    # --- what the registry holds, read and changed behind Dolly's back ---------------------------

    def _get(self, path: str, **kwargs) -> requests.Response:
        auth = self.user if self.user is not None else None
        return requests.get(f"{self.scheme}://{self.address}{path}", auth=auth, verify=self.ca_file or True,
                            timeout=30, **kwargs)

    def manifest(self, repository: str, reference: str) -> bytes:
        r = self._get(f"/v2/{repository}/manifests/{reference}",
                      headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        r.raise_for_status()
        return r.content

    def put_manifest(self, repository: str, reference: str, body: bytes) -> None:
        r = requests.put(f"{self.scheme}://{self.address}/v2/{repository}/manifests/{reference}", data=body,
                         headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
                         auth=self.user, verify=self.ca_file or True, timeout=30)
        r.raise_for_status()

    def mount_blob(self, digest: str, *, from_repository: str, to_repository: str) -> None:
        r = requests.post(f"{self.scheme}://{self.address}/v2/{to_repository}/blobs/uploads/",
                          params={"mount": digest, "from": from_repository}, auth=self.user,
                          verify=self.ca_file or True, timeout=30)
        assert r.status_code == 201, (r.status_code, r.text)

    def blob_file(self, digest: str) -> Path:
        hex_ = digest.removeprefix("sha256:")
        return self.folder / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hex_[:2] / hex_ / "data"

    def digests(self, repository: str, reference: str) -> list:
        """The blobs a pushed checkpoint's manifest names: its config, then its layers."""
        doc = json.loads(self.manifest(repository, reference))
        return [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]
