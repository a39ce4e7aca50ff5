"""Data in /dev/shm (a tmpfs of the container's own, which CRIU archives with tar): a checkpoint
carries it, each clone gets its own copy of the bytes at the checkpoint, and a bundle's round trip
keeps it.

Dolly's CRIU dumps a tmpfs as a plain tar (scripts/criu-patches/0005: gzip was most of the
freeze) and restores a plain or a gzipped one; Dolly's imports repack it gzipped, and its Podman
exports gzip it, as every other CRIU unpacks it.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json

import pytest

import dolly
from dolly import ready
from dolly._archive import GZIP_MAGIC, tarfile
from helpers import PYTHON, get_json

SIZE = 32 << 20
# 32 MiB of random bytes in a file of /dev/shm, mapped shared (as a POSIX shared memory segment
# is); the service answers with the sha256 of what its mapping holds.
SERVICE = f"""
import hashlib, http.server, json, mmap, os
fd = os.open("/dev/shm/payload", os.O_CREAT | os.O_RDWR, 0o600)
os.ftruncate(fd, {SIZE})
seg = mmap.mmap(fd, {SIZE})
for off in range(0, {SIZE}, 1 << 20):
    seg[off:off + (1 << 20)] = os.urandom(1 << 20)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{"sha": hashlib.sha256(seg).hexdigest()}}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("", 8000), H).serve_forever()
"""
FILE_SHA = "import hashlib; print(hashlib.sha256(open('/dev/shm/payload', 'rb').read()).hexdigest())"


def file_sha(container) -> str:
    res = container.exec_run(["python3", "-c", FILE_SHA])
    assert res.exit_code == 0, res.output
    return res.output.decode().strip()


def mapped_sha(container) -> str:
    container.reload()
    return get_json(ready.ip_address(container), 8000)["sha"]


def scribble(container, text: bytes) -> None:
    """Overwrite the first bytes of the container's /dev/shm/payload (through the file: its
    process sees them through its shared mapping)."""
    res = container.exec_run(["python3", "-c", f"f = open('/dev/shm/payload', 'r+b'); f.write({text!r}); f.close()"])
    assert res.exit_code == 0, res.output


def tmpfs_images(cp: dolly.Checkpoint) -> list:
    found = sorted((cp.path / "criu").glob("tmpfs-*.img"))
    assert found, "the checkpoint carries no tmpfs image"
    return found


@pytest.fixture
def shm_source(run):
    """The service above, answering; and the sha256 of its /dev/shm/payload."""
    source = run(PYTHON, ["python3", "-c", SERVICE])
    ready.wait(source, ready.http(8000), timeout=60)
    sha = file_sha(source)
    assert mapped_sha(source) == sha
    return source, sha


def test_clones_have_the_bytes_of_the_checkpoint_each_its_own(shm_source):
    source, at_checkpoint = shm_source
    cp = dolly.checkpoint(source, "shm")
    # This CRIU's dump: a plain tar, not gzipped (the freeze this fix is about).
    assert all(p.read_bytes()[:2] != GZIP_MAGIC for p in tmpfs_images(cp))
    # The source, left running, still has its data; it changes after the checkpoint.
    assert file_sha(source) == at_checkpoint and mapped_sha(source) == at_checkpoint
    scribble(source, b"source-after-checkpoint")
    source_now = file_sha(source)
    assert source_now != at_checkpoint and mapped_sha(source) == source_now

    a, b = dolly.clone(cp, 2)
    for clone in (a, b):
        assert file_sha(clone) == at_checkpoint
        assert mapped_sha(clone) == at_checkpoint, "the process's mapping is of the clone's own file"
    scribble(a, b"written-in-clone-a")
    a_now = file_sha(a)
    assert a_now not in (at_checkpoint, source_now) and mapped_sha(a) == a_now
    assert file_sha(b) == at_checkpoint and mapped_sha(b) == at_checkpoint
    assert file_sha(source) == source_now and mapped_sha(source) == source_now


def test_an_export_and_import_keep_the_bytes_and_a_gzipped_image_restores(shm_source, client, keys, tmp_path):
    private, public = keys
    source, at_checkpoint = shm_source
    cp = dolly.checkpoint(source, "shm-bundle")
    path = dolly.export(cp, tmp_path / "shm.dolly", signer=private)
    # This engine takes the bundle back as another host would: no source, no checkpoint of it.
    dolly.remove_checkpoint(cp)
    source.remove(force=True)
    imported = dolly.import_bundle(path, client=client, trusted_keys=[public])
    try:
        # Imports repack each tmpfs image gzipped, as upstream CRIU and Podman write them: this
        # CRIU restores that form too.
        assert all(p.read_bytes()[:2] == GZIP_MAGIC for p in tmpfs_images(imported))
        (clone,) = dolly.clone(imported, 1)
        assert file_sha(clone) == at_checkpoint and mapped_sha(clone) == at_checkpoint
    finally:
        dolly.remove_checkpoint(imported)


def test_a_podman_export_carries_the_bytes_gzipped(shm_source, keys, tmp_path):
    private, _ = keys
    source, at_checkpoint = shm_source
    cp = dolly.checkpoint(source, "shm-podman")
    path = dolly.export(cp, tmp_path / "shm.tar", format="podman", signer=private, compression="none")
    with tarfile.open(path) as outer:
        names = [n for n in outer.getnames() if n.startswith("checkpoint/tmpfs-")]
        manifest = json.load(outer.extractfile("manifest.json"))
        digests = {m["name"]: m["sha256"] for m in manifest["members"]}
        found = []
        for name in names:
            packed = outer.extractfile(name).read()
            assert packed[:2] == GZIP_MAGIC, f"{name}: any CRIU unpacks it only gzipped"
            assert hashlib.sha256(packed).hexdigest() == digests[name], "the signed manifest names these bytes"
            with tarfile.open(fileobj=io.BytesIO(gzip.decompress(packed))) as inner:
                for member in inner:
                    if member.name.removeprefix("./") == "payload":
                        found.append(hashlib.sha256(inner.extractfile(member).read()).hexdigest())
    assert found == [at_checkpoint]
