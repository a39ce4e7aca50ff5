"""Hostile input, generated and mutated (hypothesis): only dolly.errors come out, nothing is
written outside the target, and no restore starts.

DOLLY_FUZZ_EXAMPLES sets how many inputs each test tries (200 in `make test`, 5,000 in `make soak`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import dolly
from dolly import _images as criu_images, errors, trust
from dolly._archive import tarfile  # the one Dolly reads with: 3.12's, backported to 3.11
from dolly._engine import Engine

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

    def __new__(cls, data: bytes, public) -> Base:
        return super().__new__(cls, (data, public))

    def __repr__(self) -> str:
        return f"<bundle of {len(self[0])} bytes>"


class Outcome:
    """Runs one import and checks what it may and may not do."""

    def __init__(self, client) -> None:
        self.client = client
        self.engine = Engine.of(client)

    def outside_store(self) -> dict:
        """Everything under the engine's data root that an import could touch but its store:
        the top level, the containers' folders, Dolly's folder but for the store and the spool."""
        root = self.engine.root_dir
        own = {"checkpoints", "spool", "locks", "lineages.json", "lineages.json.lock"}
        return {
            "top": sorted(p.name for p in root.iterdir() if p.name != "dolly"),
            "containers": sorted(str(p) for p in (root / "containers").glob("*/**")),
            "dolly": sorted(p.name for p in (root / "dolly").iterdir() if p.name not in own),
            "images": sorted(t for i in self.client.images.list() for t in i.tags),
        }

    def import_bytes(self, data: bytes, trusted) -> None:
        containers = len(self.client.containers.list(all=True))
        self.engine.spool_dir.mkdir(parents=True, exist_ok=True)
        before = self.outside_store()
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
        assert not list(self.engine.spool_dir.glob("import-*")), "a staging folder was left behind"
        assert len(self.client.containers.list(all=True)) == containers, "a container was started"
        assert self.outside_store() == before, "the import wrote outside Dolly's store"
        assert not (self.engine.root_dir / "x").exists() and not Path("/tmp/x").exists()


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
    "checkpoint/inventory.img",
])
TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                         tarfile.CHRTYPE, tarfile.FIFOTYPE])
# Checkpoint names and container IDs become path parts: valid ones, and ones that try to escape.
CHECKPOINT_NAMES = st.sampled_from(["fuzz", "../../x", "..", ".", "a/b", "x" * 129, "-x"]) | st.text(max_size=12)
CONTAINER_IDS = (st.sampled_from(["f" * 64, ".", "..", "../../x", "F" * 64, "/tmp/x"])
                 | st.text(alphabet="0123456789abcdef./", max_size=66))
LAYER_PATHS = st.sampled_from(["a", "a/b", "../x", "/tmp/x", "l", "l/x", "etc", "etc/passwd", "."])
HOST_CONFIGS = st.sampled_from([{}, {"Privileged": True}, {"Binds": ["/:/host"]}, {"NetworkMode": "host"},
                                {"CapAdd": ["ALL"]}, {"Devices": [{"PathOnHost": "/dev/mem"}]}])


@st.composite
def layers(draw) -> bytes:
    """A writable layer in a bundle's form: files, directories, links, devices, any of them hostile."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, link in draw(st.lists(st.tuples(LAYER_PATHS, TYPES, LAYER_PATHS), max_size=5)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            payload = b"fuzz" if kind == tarfile.REGTYPE else None
            info.size = len(payload or b"")
            tar.addfile(info, io.BytesIO(payload) if payload else None)
    return buf.getvalue()


@st.composite
def archives(draw, image_id: str = "sha256:" + "0" * 64):
    """Tar archives whose manifest lists the members with their true digests, so that the
    checks past the digests (layout, member types, names that become paths, the rootfs diff, the
    restore policy) are reached too; often whole enough to be imported."""
    # Mostly valid, so that most examples get past the names to the members and the layout.
    name = draw(CHECKPOINT_NAMES) if draw(st.integers(0, 3)) == 0 else "fuzz"
    container_id = draw(CONTAINER_IDS) if draw(st.integers(0, 3)) == 0 else "f" * 64
    created = "2026-01-01T00:00:00+00:00"
    members = draw(st.lists(st.tuples(NAMES, TYPES, st.binary(max_size=512), st.text(max_size=40)), max_size=8))
    if draw(st.integers(0, 3)) > 0:
        meta = {"format": 1, "container_id": container_id, "container_name": "fuzz", "name": name,
                "created_at": created, "hostname": "fuzz",
                "config": {"Image": image_id, "Config": {"Image": "dolly/busybox"},
                           "HostConfig": draw(HOST_CONFIGS)}}
        members = [("config.dump", tarfile.REGTYPE, json.dumps(meta).encode(), ""),
                   ("rootfs-diff.tar", tarfile.REGTYPE, draw(layers()), ""),
                   ("deleted.files", tarfile.REGTYPE,
                    json.dumps(draw(st.lists(LAYER_PATHS.map(lambda p: "/" + p), max_size=3))).encode(), ""),
                   ("checkpoint/inventory.img", tarfile.REGTYPE, b"inventory", ""), *members]
    listed = [{"name": n, "sha256": hashlib.sha256(p).hexdigest(), "size": len(p)}
              for n, t, p, _ in members if t == tarfile.REGTYPE]
    manifest = {"format": "dolly-bundle/1", "bundle_id": "0" * 32, "lineage": "fuzz", "created_at": created,
                "expires_at": "2999-01-01T00:00:00+00:00", "signer": None, "members": listed,
                "checkpoint": {"name": name, "container_id": container_id, "container_name": "fuzz",
                               "created_at": created, "hostname": "fuzz"},
                "image": {"id": image_id,
                          "name": draw(st.sampled_from([None, "dolly/busybox", "victim:latest", "../x"]))}}
    if draw(st.integers(0, 5)) == 0:
        manifest = draw(st.recursive(st.none() | st.integers() | st.text(max_size=10),
                                     lambda inner: st.dictionaries(st.text(max_size=8), inner, max_size=4),
                                     max_leaves=8))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        payload = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
        for member_name, kind, payload, link in members:
            info = tarfile.TarInfo(member_name)
            info.type = kind
            info.linkname = link
            info.size = len(payload) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


@FUZZ
@given(data=st.data())
def test_generated_archives(base_bundle, busybox_checkpoint, engine_b, data):
    """base_bundle: engine b has the busybox image, so that generated bundles get past it."""
    bundle = data.draw(archives(busybox_checkpoint.image_id))
    Outcome(engine_b).import_bytes(bundle, [])


@FUZZ
@given(data=st.data())
def test_mutated_uts_images(busybox_checkpoint, data):
    original = bytearray(criu_images.uts_images(busybox_checkpoint.images_dir)[0].read_bytes())
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
            criu_images.read_hostname(Path(tmp))
        except errors.ImageRewriteError:
            pass
        try:
            criu_images.rewrite_hostname(src, Path(tmp) / "out.img", "fuzzed-host")
            assert criu_images.hostname_in(Path(tmp) / "out.img") == "fuzzed-host"
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
