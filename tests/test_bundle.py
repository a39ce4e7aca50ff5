"""Bundles between two real engines: round trips, content trust, and hostile archives."""
from __future__ import annotations

import io
import json
import time
from datetime import timedelta
from pathlib import Path

import pytest

import dolly
from dolly import _manifest as bundle, errors, trust
from dolly._archive import tarfile  # the one Dolly reads with: 3.12's, backported to 3.11
from bundles import assert_refused, member, rebuild, rootfs_tar
from helpers import BUSYBOX, FILES, RUN_ID, read_int


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_round_trip_to_another_engine(source_cp, engine_b, keys, tmp_path, compression):
    private, public = keys
    path = dolly.export(source_cp, tmp_path / "b.dolly", signer=private, compression=compression)
    assert path.stat().st_mode & 0o077 == 0
    manifest = bundle.read_manifest(path)
    assert manifest["compression"] == compression and manifest["signer"] == trust.key_id(public)
    names = {m["name"] for m in manifest["members"]}
    assert {"config.dump", "spec.dump", "network.status", "rootfs-diff.tar", "deleted.files", "stats-dump"} <= names
    assert any(n.startswith("checkpoint/pages-") for n in names)
    assert manifest["image"]["id"] == source_cp.image_id and manifest["kernel"] and manifest["criu_version"]

    cp_b = dolly.import_bundle(path, client=engine_b, trusted_keys=[public],
                               image_source=dolly._engine.default_client())
    try:
        assert dolly.list_checkpoints(source_cp.container_id, engine_b) == [cp_b]
        (clone,) = dolly.clone(cp_b, 1, client=engine_b)
        assert clone.exec_run(["cat", "/greeting"]).output == b"hello\n"
        assert clone.exec_run(["cat", "/d/f"]).output == b"x\n"
        assert clone.exec_run(["test", "-e", "/etc/group"]).exit_code == 1, "a deleted file came back"
        with tarfile.open(source_cp.rootfs_diff) as diff:  # the counter as the checkpoint carried it
            at_checkpoint = int(diff.extractfile(next(m for m in diff.getmembers()
                                                      if m.name.removeprefix("./") == "tmp/count")).read())
        first = read_int(clone)
        assert first >= at_checkpoint >= 1, "the counter went back"
        deadline = time.monotonic() + 10
        while read_int(clone) <= first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert read_int(clone) > first, "the counter stopped"
        clone.remove(force=True)
    finally:
        dolly.remove_checkpoint(cp_b)


def test_deleted_files_are_listed_in_the_bundle(source_cp, tmp_path):
    path = dolly.export(source_cp, tmp_path / "b.dolly", compression="none")
    with tarfile.open(path) as tar:
        deleted = json.loads(tar.extractfile("deleted.files").read())
        inner = tarfile.open(fileobj=io.BytesIO(tar.extractfile("rootfs-diff.tar").read()))
        names = inner.getnames()
    assert "/etc/group" in deleted
    assert "greeting" in names and "d/f" in names
    assert not any(m.isdev() for m in inner.getmembers()), "whiteouts leaked into the bundle"


def test_image_missing_without_a_source_is_named(source_cp, engine_b, tmp_path):
    if any(source_cp.image_id == i.id for i in engine_b.images.list()):
        engine_b.images.remove(source_cp.image_id, force=True)
    path = dolly.export(source_cp, tmp_path / "b.dolly", compression="none")
    with pytest.raises(errors.ImageNotFound, match="image_source"):
        dolly.import_bundle(path, client=engine_b, allow_unsigned=True)


# --- content trust ---------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_page_image_is_refused(source_cp, client, keys, tmp_path):
    private, public = keys
    path = dolly.export(source_cp, tmp_path / "b.dolly", signer=private, compression="none")
    with tarfile.open(path) as tar:
        page = next(m for m in tar.getmembers() if m.name.startswith("checkpoint/pages-") and m.size > 0)
    with open(path, "r+b") as f:
        f.seek(page.offset_data + page.size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    dolly.remove_checkpoint(source_cp)  # importing back on the same engine must not meet it
    assert_refused(errors.DigestMismatch, path, client, trusted_keys=[public])


def test_an_expired_bundle_is_refused(source_cp, engine_b, keys, tmp_path):
    private, public = keys
    path = dolly.export(source_cp, tmp_path / "b.dolly", signer=private, expires_in=timedelta(seconds=1))
    time.sleep(1.5)
    assert_refused(errors.BundleExpired, path, engine_b, trusted_keys=[public])


def test_rollback_to_an_older_bundle_is_refused(run, engine_b, keys, tmp_path):
    private, public = keys
    source = run(BUSYBOX, ["sh", "-c", FILES])
    older = dolly.export(dolly.checkpoint(source, "older"), tmp_path / "older.dolly", signer=private)
    newer = dolly.export(dolly.checkpoint(source, "newer"), tmp_path / "newer.dolly", signer=private)
    cp = dolly.import_bundle(newer, client=engine_b, trusted_keys=[public], image_source=dolly._engine.default_client())
    try:
        assert_refused(errors.RollbackRefused, older, engine_b, trusted_keys=[public])
    finally:
        dolly.remove_checkpoint(cp)


def test_an_unsigned_bundle_needs_allow_unsigned(source_cp, engine_b, tmp_path):
    path = dolly.export(source_cp, tmp_path / "b.dolly")
    assert_refused(errors.UnsignedBundle, path, engine_b)
    cp = dolly.import_bundle(path, client=engine_b, allow_unsigned=True, image_source=dolly._engine.default_client())
    dolly.remove_checkpoint(cp)


def test_a_wrong_key_and_an_altered_manifest_are_refused(source_cp, engine_b, keys, tmp_path):
    private, public = keys
    _, stranger = trust.generate_keypair()
    path = dolly.export(source_cp, tmp_path / "b.dolly", signer=private, compression="none")
    assert_refused(errors.UntrustedSigner, path, engine_b, trusted_keys=[stranger])
    altered = rebuild(path, tmp_path / "altered.dolly",
                      manifest_edit=lambda m: m.update(expires_at="2999-01-01T00:00:00+00:00"))
    assert_refused(errors.SignatureInvalid, altered, engine_b, trusted_keys=[public])


def test_encrypted_bundles(source_cp, engine_b, keys, tmp_path):
    private, public = keys
    key = trust.generate_encryption_key()
    path = dolly.export(source_cp, tmp_path / "b.dolly", signer=private, encryption_key=key)
    assert b"manifest.json" not in path.read_bytes()
    assert_refused(errors.DecryptionFailed, path, engine_b, trusted_keys=[public])
    assert_refused(errors.DecryptionFailed, path, engine_b, trusted_keys=[public],
                   encryption_key=trust.generate_encryption_key())
    cp = dolly.import_bundle(path, client=engine_b, trusted_keys=[public], encryption_key=key,
                             image_source=dolly._engine.default_client())
    dolly.remove_checkpoint(cp)


def test_keys_round_trip_through_pem_files(keys, tmp_path):
    private, public = keys
    trust.save_private_key(private, tmp_path / "k.pem", password=b"pw")
    trust.save_public_key(public, tmp_path / "k.pub.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0
    assert trust.key_id(trust.load_private_key(tmp_path / "k.pem", password=b"pw")) == trust.key_id(public)
    assert trust.key_id(trust.load_public_key(tmp_path / "k.pub.pem")) == trust.key_id(public)
    with pytest.raises(errors.InvalidArgument):
        trust.load_public_key(tmp_path / "k.pem")


# --- hostile archives ------------------------------------------------------------------------------


SENTINEL = Path(f"/tmp/dolly-hostile-{RUN_ID}")


@pytest.mark.parametrize("case", ["traversal", "absolute", "symlink", "device", "hardlink"])
def test_hostile_outer_members_are_refused(source_cp, engine_b, keys, tmp_path, case):
    private, public = keys
    base = dolly.export(source_cp, tmp_path / "b.dolly", compression="none")
    extra = {
        "traversal": member(f"../../../../{SENTINEL}", payload=b"pwned"),
        "absolute": member(str(SENTINEL), payload=b"pwned"),
        "symlink": member("checkpoint/evil.img", type=tarfile.SYMTYPE, linkname=str(SENTINEL)),
        "device": member("checkpoint/mem.img", type=tarfile.CHRTYPE, devmajor=1, devminor=1),
        "hardlink": member("checkpoint/shadow.img", type=tarfile.LNKTYPE, linkname="/etc/shadow"),
    }[case]
    hostile = rebuild(base, tmp_path / "hostile.dolly", signer=private, extra=[extra])
    assert_refused(errors.UnsafeArchive, hostile, engine_b, trusted_keys=[public])
    assert not SENTINEL.exists()


@pytest.mark.parametrize("case", ["traversal", "absolute", "through-symlink", "device", "hardlink-out"])
def test_hostile_rootfs_diffs_are_refused(source_cp, engine_b, keys, tmp_path, case):
    private, public = keys
    base = dolly.export(source_cp, tmp_path / "b.dolly", compression="none")
    entries = {
        "traversal": [member("../../../../tmp/x", payload=b"pwned")],
        "absolute": [member(str(SENTINEL), payload=b"pwned")],
        "through-symlink": [member("etc2", type=tarfile.SYMTYPE, linkname="/tmp"),
                            member(f"etc2/{SENTINEL.name}", payload=b"pwned")],
        "device": [member("dev/kmem2", type=tarfile.CHRTYPE, devmajor=1, devminor=2)],
        "hardlink-out": [member("shadow", type=tarfile.LNKTYPE, linkname="../../../etc/shadow")],
    }[case]
    hostile = rebuild(base, tmp_path / "hostile.dolly", signer=private,
                      replace={"rootfs-diff.tar": rootfs_tar(*entries)})
    assert_refused(errors.UnsafeArchive, hostile, engine_b, trusted_keys=[public],
                   image_source=dolly._engine.default_client())
    assert not SENTINEL.exists() and not Path("/tmp") .joinpath(SENTINEL.name).exists()


def test_an_oversized_bundle_is_refused(source_cp, engine_b, keys, tmp_path):
    private, public = keys
    path = dolly.export(source_cp, tmp_path / "b.dolly", signer=private)
    assert_refused(errors.UnsafeArchive, path, engine_b, trusted_keys=[public], max_bytes=4096)


def test_a_file_that_is_not_a_bundle(engine_b, tmp_path):
    junk = tmp_path / "junk.dolly"
    junk.write_bytes(b"\x00" * 100 + b"not a tar")
    assert_refused(errors.BundleError, junk, engine_b, allow_unsigned=True)
