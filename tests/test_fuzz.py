"""Hostile input, generated and mutated (hypothesis): only dolly.errors come out, nothing is
written outside the target, and no restore starts.

DOLLY_FUZZ_EXAMPLES sets how many inputs each test tries (200 in `make test`, 5,000 in `make soak`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dolly
from dolly import criu, errors, trust
from dolly.engine import Engine

EXAMPLES = int(os.environ.get("DOLLY_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def base_bundle(busybox_checkpoint, engine_b, client):
    """A real, valid, signed, uncompressed bundle; engine b has the image."""
    private, public = trust.generate_keypair()
    Engine.of(engine_b).ensure_image(busybox_checkpoint.image_id, "dolly/busybox", source=Engine.of(client))
    with tempfile.TemporaryDirectory() as tmp:
        path = dolly.export(busybox_checkpoint, Path(tmp) / "b.dolly", signer=private, compression="none")
        yield Base(path.read_bytes(), public)


class Base(tuple):
    """(bundle bytes, public key), with a short repr for hypothesis's failure reports."""

    def __new__(cls, data: bytes, public) -> "Base":
        return super().__new__(cls, (data, public))

    def __repr__(self) -> str:
        return f"<bundle of {len(self[0])} bytes>"


class Outcome:
    """Runs one import and checks what it may and may not do."""

    def __init__(self, client) -> None:
        self.client = client
        self.engine = Engine.of(client)

    def import_bytes(self, data: bytes, trusted) -> None:
        containers = len(self.client.containers.list(all=True))
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "in"
            target.mkdir()
            bundle = target / "fuzz.dolly"
            bundle.write_bytes(data)
            try:
                cp = dolly.import_bundle(bundle, client=self.client, trusted_keys=trusted, allow_unsigned=True)
            except errors.DollyError:
                cp = None
            # Anything else propagates and fails the test.
            assert sorted(p.name for p in Path(tmp).rglob("*")) == ["fuzz.dolly", "in"], "wrote beside the bundle"
            if cp is not None:
                dolly.remove_checkpoint(cp)
        assert not list(self.engine.store_dir.glob("*/.*")), "a staging folder was left behind"
        assert len(self.client.containers.list(all=True)) == containers, "a container was started"


@FUZZ
@given(data=st.data())
def test_mutated_bundles(base_bundle, engine_b, data):
    original, public = base_bundle
    mutated = bytearray(original)
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice", "garbage"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(mutated) - 1))
            mutated[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        mutated = mutated[: data.draw(st.integers(0, len(mutated) - 1))]
    elif kind == "splice":
        i = data.draw(st.integers(0, len(mutated)))
        mutated[i:i] = data.draw(st.binary(min_size=1, max_size=2048))
    else:
        mutated = bytearray(data.draw(st.binary(max_size=4096)))
    Outcome(engine_b).import_bytes(bytes(mutated), [public])


NAMES = st.sampled_from([
    "manifest.json", "manifest.sig", "config.dump", "spec.dump", "network.status", "rootfs-diff.tar",
    "deleted.files", "stats-dump", "checkpoint/pages-1.img", "checkpoint/utsns-12.img", "../evil",
    "/etc/evil", "checkpoint/../../evil", "checkpoint", "./manifest.json", "checkpoint/a/b.img",
])
TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                         tarfile.CHRTYPE, tarfile.FIFOTYPE])


@st.composite
def archives(draw):
    """Tar archives whose manifest lists the members with their true digests, so that the
    checks past the digests (layout, member types, the rootfs diff) are reached too."""
    members = draw(st.lists(st.tuples(NAMES, TYPES, st.binary(max_size=512), st.text(max_size=40)), max_size=8))
    listed = [{"name": n, "sha256": hashlib.sha256(p).hexdigest(), "size": len(p)}
              for n, t, p, _ in members if t == tarfile.REGTYPE]
    manifest = {"format": "dolly-bundle/1", "lineage": "fuzz", "created_at": "2026-01-01T00:00:00+00:00",
                "expires_at": "2999-01-01T00:00:00+00:00", "signer": None, "members": listed,
                "checkpoint": {"name": "fuzz", "container_id": "f" * 64, "container_name": "fuzz",
                               "created_at": "2026-01-01T00:00:00+00:00", "hostname": "fuzz"},
                "image": {"id": "sha256:" + "0" * 64, "name": None}}
    if draw(st.booleans()):
        manifest = draw(st.recursive(st.none() | st.integers() | st.text(max_size=10),
                                     lambda inner: st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        payload = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
        for name, kind, payload, link in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = link
            info.size = len(payload) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


@FUZZ
@given(data=archives())
def test_generated_archives(engine_b, data):
    Outcome(engine_b).import_bytes(data, [])


@FUZZ
@given(data=st.data())
def test_mutated_uts_images(busybox_checkpoint, data):
    original = bytearray(criu.uts_images(busybox_checkpoint.images_dir)[0].read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if op == "flip" and original:
            i = data.draw(st.integers(0, len(original) - 1))
            original[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            original = original[: data.draw(st.integers(0, len(original)))]
        else:
            original += data.draw(st.binary(max_size=64))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "utsns-12.img"
        src.write_bytes(bytes(original))
        try:
            criu.read_hostname(Path(tmp))
        except errors.ImageRewriteError:
            pass
        try:
            criu.rewrite_hostname(src, Path(tmp) / "out.img", "fuzzed-host")
            assert criu.hostname_in(Path(tmp) / "out.img") == "fuzzed-host"
        except errors.ImageRewriteError:
            pass
        assert sorted(p.name for p in Path(tmp).iterdir()) in (["utsns-12.img"], ["out.img", "utsns-12.img"])


def test_caller_names_never_reach_engine_paths(busybox_checkpoint):
    for ref in ("../../etc", "/etc/passwd", "a/../../b", ".."):
        with pytest.raises(errors.ContainerNotFound):
            dolly.list_checkpoints(ref)
    for name in ("../x", "x/y", "/abs", ".."):
        with pytest.raises(errors.InvalidArgument):
            dolly.get_checkpoint(busybox_checkpoint.container_id, name)
        with pytest.raises(errors.InvalidArgument):
            dolly.restore(busybox_checkpoint, name=name)
