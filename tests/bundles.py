"""Making bundles by hand for the tests: a real bundle rebuilt with hostile parts, and checks
that a refused import left nothing behind."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

import dolly
from dolly import trust
from dolly._archive import tarfile  # the one Dolly reads with: 3.12's, backported to 3.11
from dolly._engine import Engine


def store_entries(client) -> set:
    store = Engine.of(client).store_dir
    return {str(p) for p in store.glob("**/*")} if store.exists() else set()


def assert_refused(exc, path, client, **kwargs):
    before = store_entries(client)
    containers = len(client.containers.list(all=True))
    with pytest.raises(exc):
        dolly.import_bundle(path, client=client, **kwargs)
    assert store_entries(client) == before, "a refused import left files behind"
    assert len(client.containers.list(all=True)) == containers


def rebuild(path: Path, out: Path, *, signer=None, manifest_edit=None, replace=None, extra=(),
            drop_signature=False, compression=""):
    """A bundle made from ``path`` with members replaced or added, its manifest's digests brought
    up to date (so that only the hostile part is wrong), and re-signed when ``signer`` is given
    (or stripped of its signature with ``drop_signature``)."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        sig = members.pop("manifest.sig", None)
    manifest = json.loads(members.pop("manifest.json"))
    members.update(replace or {})
    if replace:
        manifest["members"] = [{"name": n, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                               for n, d in members.items()]
    if manifest_edit:
        manifest_edit(manifest)
    if signer is not None:
        manifest["signer"] = trust.key_id(signer)
    data = json.dumps(manifest).encode()
    with tarfile.open(out, "w:" + compression) as tar:
        def add(info, payload=None):
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)

        def file(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            add(info, payload)

        file("manifest.json", data)
        if signer is not None:
            file("manifest.sig", trust.sign(signer, data))
        elif sig is not None and not drop_signature:
            file("manifest.sig", sig)
        for name, payload in members.items():
            file(name, payload)
        for info, payload in extra:
            add(info, payload)
    return out


def edit_config(path: Path, edit) -> bytes:
    """The config.dump of the bundle at ``path``, with Dolly's metadata in it changed by
    ``edit(meta)`` (the metadata sits under ``dolly``, beside checkpointctl's fields)."""
    with tarfile.open(path) as tar:
        dump = json.loads(tar.extractfile("config.dump").read())
    edit(dump["dolly"])
    return json.dumps(dump).encode()


def rootfs_tar(*entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, payload in entries:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def member(name, *, type=tarfile.REGTYPE, linkname="", payload=b"", devmajor=0, devminor=0):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.devmajor, info.devminor = type, linkname, devmajor, devminor
    info.size = len(payload) if type == tarfile.REGTYPE else 0
    return info, (payload if type == tarfile.REGTYPE else None)
