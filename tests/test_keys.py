"""Key files: created new, never written through a file or symlink planted at their path."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dolly import errors, trust

DOLLY = str(Path(sys.executable).with_name("dolly"))
VICTIM = b"root:x:0:0:precious\n"


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_bytes(VICTIM)
    path.chmod(0o644)
    return path


def assert_untouched(victim: Path) -> None:
    assert victim.read_bytes() == VICTIM
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


@pytest.mark.parametrize("which", ["private", "public"])
def test_a_symlink_at_the_key_path_is_refused_and_the_victim_kept(keys, tmp_path, victim, which):
    path = tmp_path / "key.pem"
    path.symlink_to(victim)
    save = trust.save_private_key if which == "private" else trust.save_public_key
    with pytest.raises(errors.InvalidArgument, match="exists"):
        save(keys[0] if which == "private" else keys[1], path)
    assert_untouched(victim)
    assert path.is_symlink()


@pytest.mark.parametrize("which", ["private", "public"])
def test_overwrite_replaces_the_symlink_itself_never_its_target(keys, tmp_path, victim, which):
    path = tmp_path / "key.pem"
    path.symlink_to(victim)
    if which == "private":
        trust.save_private_key(keys[0], path, overwrite=True)
        assert trust.key_id(trust.load_private_key(path)) == trust.key_id(keys[1])
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    else:
        trust.save_public_key(keys[1], path, overwrite=True)
        assert trust.key_id(trust.load_public_key(path)) == trust.key_id(keys[1])
    assert not path.is_symlink() and path.is_file()
    assert_untouched(victim)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem", "victim"], "a temporary file was left"


def test_a_dangling_symlink_is_refused_and_nothing_is_created(keys, tmp_path):
    target = tmp_path / "would-be-created"
    path = tmp_path / "key.pem"
    path.symlink_to(target)
    with pytest.raises(errors.InvalidArgument):
        trust.save_private_key(keys[0], path)
    assert not target.exists()


def test_an_existing_key_is_kept_unless_overwrite(keys, tmp_path):
    path = tmp_path / "k.pem"
    trust.save_private_key(keys[0], path)
    first = path.read_bytes()
    other, other_public = trust.generate_keypair()
    with pytest.raises(errors.InvalidArgument, match="overwrite=True"):
        trust.save_private_key(other, path)
    assert path.read_bytes() == first
    trust.save_private_key(other, path, overwrite=True)
    assert trust.key_id(trust.load_private_key(path)) == trust.key_id(other_public)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_private_key_is_0600_whatever_the_umask(keys, tmp_path):
    old = os.umask(0)
    try:
        path = trust.save_private_key(keys[0], tmp_path / "k.pem", password=b"pw")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert trust.key_id(trust.load_private_key(path, password=b"pw")) == trust.key_id(keys[1])


def test_keygen_makes_a_pair_and_refuses_a_planted_symlink(tmp_path, victim):
    res = subprocess.run([DOLLY, "keygen", str(tmp_path / "k.pem"), str(tmp_path / "k.pub")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    private = trust.load_private_key(tmp_path / "k.pem")
    assert trust.key_id(private) == trust.key_id(trust.load_public_key(tmp_path / "k.pub"))
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600

    (tmp_path / "evil.pem").symlink_to(victim)
    res = subprocess.run([DOLLY, "keygen", str(tmp_path / "evil.pem"), str(tmp_path / "evil.pub")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.startswith("error: InvalidArgument"), res.stderr
    assert_untouched(victim)
    # A public key path that exists: refused before the private half is written.
    (tmp_path / "taken.pub").write_text("taken")
    res = subprocess.run([DOLLY, "keygen", str(tmp_path / "half.pem"), str(tmp_path / "taken.pub")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert not (tmp_path / "half.pem").exists() and (tmp_path / "taken.pub").read_text() == "taken"


# --- detached signatures (pure logic: the engine side is in test_formats.py) -----------------------


def test_a_detached_signature_vouches_for_the_file_it_was_made_of(keys, tmp_path):
    private, public = keys
    archive = tmp_path / "a.tar"
    archive.write_bytes(os.urandom(5000))
    sig = trust.sign_file(private, archive)
    assert sig == tmp_path / "a.tar.sig"
    checked = trust.verify_detached(sig.read_bytes(), [public])
    assert checked.signer == trust.key_id(public) and checked.size == 5000
    assert checked.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(errors.InvalidArgument, match="exists"):
        trust.sign_file(private, archive)  # never written over


def test_a_detached_signature_is_refused_when_untrusted_edited_expired_or_not_one(keys, tmp_path):
    import json
    from datetime import timedelta

    private, public = keys
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"x" * 100)
    document = json.loads(trust.sign_file(private, archive).read_text())
    _, other_public = trust.generate_keypair()
    with pytest.raises(errors.UntrustedSigner):
        trust.verify_detached(json.dumps(document).encode(), [other_public])
    with pytest.raises(errors.SignatureInvalid):
        trust.verify_detached(json.dumps({**document, "sha256": "0" * 64}).encode(), [public])
    with pytest.raises(errors.BundleError, match="not a Dolly detached signature"):
        trust.verify_detached(json.dumps({**document, "extra": 1}).encode(), [public])
    with pytest.raises(errors.BundleError, match="not a Dolly detached signature"):
        trust.verify_detached(b"[" * 100_000, [public])
    with pytest.raises(errors.BundleError, match="not a Dolly detached signature"):  # it must expire
        trust.verify_detached(json.dumps({**document, "expires_at": None}).encode(), [public])
    expired = trust.sign_file(private, archive, out=tmp_path / "old.sig", expires_in=timedelta(microseconds=1))
    with pytest.raises(errors.BundleExpired):
        trust.verify_detached(expired.read_bytes(), [public])
    with pytest.raises(errors.InvalidArgument):
        trust.sign_file(private, archive, out=tmp_path / "neg.sig", expires_in=timedelta(0))
