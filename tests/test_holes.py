"""The holes of issue 22, each closed and each held closed by a test that fails without its check.

Unit tests first (no engine), then the ones that need the real engine or the loopback registry.
"""
from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import docker
import pytest
import requests
from registries import Registry
from test_formats import _nothing_left, kubelet_archive
from test_pytest_plugin import pytest_run

import dolly
from dolly import _bundle, _criu, _formats, _manifest, _names, _oci, errors, testing
from dolly._archive import tarfile
from dolly._start import LAYER_IMAGE_MIN
from dolly.errors import InvalidArgument
from helpers import BUSYBOX, COUNTER

# --- 1. Names with a trailing newline -------------------------------------------------------------

HEX64 = "0123456789abcdef" * 4

NAME_CHECKS: list[tuple[Callable[..., Any], str]] = [
    (_names.checkpoint_name, "warm"),
    (_names.container_name, "web-1"),
    (_names.container_id, HEX64),
    (_names.image_id, "sha256:" + HEX64),
    (_names.image_name, "localhost:5000/ci/web:warm"),
    (_names.lineage, "web:nightly"),
    (_criu.check_hostname, "web-1.example"),
]


@pytest.mark.parametrize("check,valid", NAME_CHECKS, ids=[c.__name__ for c, _ in NAME_CHECKS])
def test_a_name_with_a_trailing_newline_is_refused(check: Callable[..., Any], valid: str) -> None:
    assert check(valid) == valid
    with pytest.raises(InvalidArgument):
        check(valid + "\n")


# Every module-level rule in dolly/ that validates an untrusted name or id, with a value it accepts.
RULES: list[tuple[str, re.Pattern[str], str]] = [
    ("names.CHECKPOINT_NAME", _names.CHECKPOINT_NAME, "warm"),
    ("names.CONTAINER_NAME", _names.CONTAINER_NAME, "web-1"),
    ("names.CONTAINER_ID", _names.CONTAINER_ID, HEX64),
    ("names.IMAGE_ID", _names.IMAGE_ID, "sha256:" + HEX64),
    ("names.LINEAGE", _names.LINEAGE, "web:nightly"),
    ("names.IMAGE_NAME", _names.IMAGE_NAME, "localhost:5000/ci/web:warm"),
    ("manifest.MEMBER_RE", _manifest.MEMBER_RE, "checkpoint/pages-1.img"),
    ("manifest.SHA256_RE", _manifest.SHA256_RE, HEX64),
    ("manifest.KEY_ID_RE", _manifest.KEY_ID_RE, HEX64[:16]),
    ("manifest.BUNDLE_ID_RE", _manifest.BUNDLE_ID_RE, HEX64[:32]),
    ("oci.DIGEST_RE", _oci.DIGEST_RE, "sha256:" + HEX64),
    ("oci._TAG_RE", _oci._TAG_RE, "warm"),
    ("oci._REPO_RE", _oci._REPO_RE, "ci/web"),
    ("oci._HOST_RE", _oci._HOST_RE, "localhost:5000"),
    ("formats._MEMBER_RE", _formats._MEMBER_RE, "bind.mounts"),
    ("formats._IMAGE_ID_RE", _formats._IMAGE_ID_RE, HEX64),
    ("formats._DIGEST_RE", _formats._DIGEST_RE, "sha256:" + HEX64),
    ("testing._RUN_ID_RE", testing._RUN_ID_RE, "run-1"),
    ("testing._CONTAINER_ID_RE", testing._CONTAINER_ID_RE, HEX64),
    ("criu._HOSTNAME_RE", _criu._HOSTNAME_RE, "web-1.example"),
]


@pytest.mark.parametrize("rule,valid", [(r, v) for _, r, v in RULES], ids=[n for n, _, _ in RULES])
def test_no_rule_lets_a_trailing_newline_through_match(rule: re.Pattern[str], valid: str) -> None:
    # The callers use .match: the rule itself must end at the end of the string.
    assert rule.match(valid)
    assert not rule.match(valid + "\n")


@pytest.mark.parametrize("text", [
    "localhost:5000/ci/web:warm\n",
    "localhost:5000/ci/web\n",
    "localhost:5000/ci/web@sha256:" + HEX64 + "\n",
])
def test_a_registry_reference_with_a_trailing_newline_is_refused(text: str) -> None:
    assert _oci.Reference.parse(text.rstrip("\n"))
    with pytest.raises(InvalidArgument):
        _oci.Reference.parse(text)


def test_the_plugin_state_ignores_a_run_id_or_container_id_with_a_newline(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="not a full container ID"):
        testing.record_container(tmp_path, HEX64 + "\n")
    with pytest.raises(ValueError, match="not a checkpoint"):
        testing.record_checkpoint(tmp_path, HEX64, "warm\n")


# --- 2. The lineage store is written exclusively ---------------------------------------------------


def test_the_lineage_record_is_not_written_through_a_planted_symlink(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    # The old code wrote "lineages.tmp" beside the record, through whatever was there.
    planted = store / "lineages.tmp"
    planted.symlink_to(victim)
    lineages = _bundle.Lineages(store / "lineages.json")
    with lineages.lock:
        lineages.record("unsigned/web", "2030-01-01T00:00:00+00:00")
    assert victim.read_text() == "precious"
    assert planted.is_symlink() and os.readlink(planted) == str(victim)
    record = store / "lineages.json"
    assert not record.is_symlink()
    assert json.loads(record.read_text()) == {"unsigned/web": "2030-01-01T00:00:00+00:00"}
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    # Nothing else is left beside it but the lock and the planted link.
    assert sorted(p.name for p in store.iterdir()) == ["lineages.json", "lineages.json.lock", "lineages.tmp"]
    # A second record replaces the first the same way.
    with lineages.lock:
        lineages.record("unsigned/web", "2031-01-01T00:00:00+00:00")
    assert victim.read_text() == "precious"
    lineages.check("unsigned/web", "2031-01-01T00:00:00+00:00")


# --- 3. trusted_keys with allow_unsigned on a foreign archive ---------------------------------------


def _refused(error: type, match: str, call: Callable[[], Any]) -> None:
    """``call`` raises ``error``; should it import something instead (its check missing), that
    checkpoint is removed before the test fails, so that nothing is left on the engine."""
    imported = []
    try:
        with pytest.raises(error, match=match):
            imported.append(call())
    finally:
        for cp in imported:  # only when it was not refused: nothing left, then the failure
            dolly.remove_checkpoint(cp)


def test_trusted_keys_need_a_detached_signature_on_a_foreign_archive_even_with_allow_unsigned(
        source_cp, client, keys, tmp_path: Path) -> None:
    """A Dolly bundle without a signature is refused when trusted_keys are given, whatever
    allow_unsigned says; a kubelet archive (no signature of its own) is held to the same: only a
    detached signature by a trusted key lets it in."""
    private, public = keys
    path = tmp_path / "checkpoint-web-0-counter.tar"
    container_id = kubelet_archive(source_cp, path)
    _refused(errors.UnsignedBundle, "detached signature",
             lambda: dolly.import_bundle(path, client=client, trusted_keys=[public], allow_unsigned=True))
    _nothing_left(client, container_id)
    # The same archive with a detached signature by that key goes in: the refusal was the rule.
    signature = dolly.trust.sign_file(private, path, out=tmp_path / "cp.tar.sig", expires_in=timedelta(hours=1))
    cp = dolly.import_bundle(path, client=client, trusted_keys=[public], allow_unsigned=True, signature=signature)
    try:
        assert cp.origin["signer"] == dolly.trust.key_id(public)
    finally:
        dolly.remove_checkpoint(cp)


# --- 4. A 401 after the registry probe --------------------------------------------------------------


class _TokenService:
    """A token service on loopback that records what reaches it: the hostile realm."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append({"path": self.path, "authorization": self.headers.get("Authorization")})
                body = json.dumps({"token": "stolen", "access_token": "stolen"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_401_after_the_probe_naming_a_foreign_realm_gets_no_credentials(tmp_path: Path, monkeypatch) -> None:
    """The probe finds a registry that asks for nothing (no realm to check); then the registry on
    that address asks for a token from a plain-HTTP service on another port. Docker's credentials
    for the registry must not reach it."""
    hostile = _TokenService()
    open_registry = Registry(tmp_path / "open").start()
    try:
        config = tmp_path / "docker-config"
        config.mkdir()
        auth = base64.b64encode(b"ci:hunter2").decode()
        (config / "config.json").write_text(json.dumps({"auths": {open_registry.address: {"auth": auth}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(config))
        session = _oci.Session(_oci.Reference.parse(f"{open_registry.address}/ci/holes:warm"),
                                     ca_file=None, insecure=None)
        assert session.scheme == "http"
    finally:
        open_registry.stop()
    guarded = Registry(tmp_path / "guarded", token_realm=f"http://127.0.0.1:{hostile.port}/token",
                       port=open_registry.port).start()
    try:
        with pytest.raises(errors.RegistryError) as refused:
            session.manifest("warm")
        assert [s for s in hostile.seen if s["authorization"]] == [], "credentials reached the hostile realm"
        assert hostile.seen == []
        assert "credentials are not sent" in str(refused.value)
    finally:
        guarded.stop()
        hostile.stop()


def test_a_challenge_with_a_second_realm_is_checked_as_oras_reads_it() -> None:
    """oras takes the last realm= of a challenge: the check reads it the same way."""
    _oci._check_realm('Bearer realm="http://127.0.0.1:5000/token"', "http", "127.0.0.1:5000", True)
    _oci._check_realm('Bearer realm="https://auth.example/token"', "https", "reg.example", False)
    for challenge in ['Bearer realm="https://auth.example/token",realm="http://evil.example/t"',
                      'Bearer realm="http://127.0.0.1:5001/token"', 'Basic realm="evil.example:80"', "Bearer"]:
        with pytest.raises(errors.RegistryError):
            _oci._check_realm(challenge, "http", "127.0.0.1:5000", True)


# --- 5. A pre-planted image under an imported checkpoint's shared-layer tag ---------------------------


def test_clones_of_an_imported_checkpoint_do_not_use_an_image_planted_under_its_layer_tag(
        run, client, engine, keys, tmp_path: Path) -> None:
    """The layer image's tag derives from the checkpoint's fields, which a bundle carries: it can
    be known, and an image tagged so, before the first clone. Clones must not run that image."""
    private, public = keys
    # 20 MiB in the writable layer: past LAYER_IMAGE_MIN, so clones share it as an image layer.
    source = run(BUSYBOX, ["sh", "-c", f"mkdir /data; head -c {20 << 20} /dev/urandom > /data/big; " + COUNTER])
    time.sleep(1.5)
    digest = source.exec_run(["sha256sum", "/data/big"]).output.split()[0]
    taken = dolly.checkpoint(source, "large")
    assert LAYER_IMAGE_MIN <= taken.rootfs_diff.stat().st_size
    bundle = dolly.export(taken, tmp_path / "large.dolly", signer=private)
    # As on another host: the source is not here, so the bundle is no claim on it.
    dolly.remove_checkpoint(taken)
    source.remove(force=True)
    cp = dolly.import_bundle(bundle, client=client, trusted_keys=[public])
    planter = run(BUSYBOX, ["sh", "-c", "echo planted > /planted; sleep 600"])
    clones: list = []
    planted = None
    try:
        time.sleep(0.5)
        repository, tag = cp.layer_image.rsplit(":", 1)
        planted = planter.commit(repository=repository, tag=tag)
        planter.remove(force=True)
        assert engine.image_id(cp.layer_image) == planted.id
        clones = dolly.clone(cp, 1)
        (clone,) = clones
        assert clone.attrs["Image"] != planted.id, "the clone runs the planted image"
        assert clone.exec_run(["test", "-e", "/planted"]).exit_code == 1, "the planted image's file is in the clone"
        assert clone.exec_run(["sha256sum", "/data/big"]).output.split()[0] == digest
        # The tag now names the layer image Dolly made, and clones share it.
        assert engine.image_id(cp.layer_image) == clone.attrs["Image"]
        assert not (engine.upper_dir(clone) / "data").exists(), "the layer was unpacked into the clone"
    finally:
        for c in clones:
            c.remove(force=True)
        dolly.remove_checkpoint(cp)
        if planted is not None:
            with contextlib.suppress(docker.errors.NotFound):
                client.images.remove(planted.id)
    assert not engine.has_image(cp.layer_image)


# --- 6. The pytest cache's removal at the end of a run -----------------------------------------------

CACHED_SUITE = '''
import os
import dolly.testing
from dolly import ready
from dolly._start import LABEL_SOURCE

svc = dolly.testing.warm_service(
    image="dolly/busybox",
    command=["sh", "-c", "echo $RANDOM$RANDOM > /tmp/token; echo ready; while true; do sleep 1; done"],
    ready=ready.log("ready"),
    cache=os.environ["CACHE"],
)

def test_token(svc):
    with open(os.environ["TOKENS"], "a") as f:
        f.write(svc.exec_run(["cat", "/tmp/token"]).output.decode().strip() + " " + svc.labels[LABEL_SOURCE] + "\\n")
'''


HOLDING_SUITE = CACHED_SUITE + '''
import time

def test_holds(svc):
    while not os.path.exists(os.environ["GO"]):
        time.sleep(0.1)

def test_after(svc):
    test_token(svc)
'''


@pytest.fixture
def cache_env(keys, tmp_path: Path):
    """A loopback registry, a signer, and the environment of the cached suite's runs."""
    private, _ = keys
    registry = Registry(tmp_path / "registry").start()
    try:
        dolly.trust.save_private_key(private, tmp_path / "signer.pem")
        suite = tmp_path / "suite"
        suite.mkdir()
        (suite / "test_cached.py").write_text(CACHED_SUITE)
        (suite / "test_holding.py").write_text(HOLDING_SUITE)
        yield suite, {"CACHE": f"{registry.address}/ci/holes", "TOKENS": str(tmp_path / "tokens"),
                      "GO": str(tmp_path / "go"), "DOLLY_CACHE_SIGNER": str(tmp_path / "signer.pem")}
    finally:
        registry.stop()


def _tokens(env: dict) -> list:
    path = Path(env["TOKENS"])
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_a_run_pulling_a_tag_another_run_holds_works_and_leaves_it(client, cache_env) -> None:
    """Run 2 pulls the warm checkpoint and keeps using it; run 3 starts meanwhile and wants the
    same tag on the same engine. It must work (the checkpoint is run 2's: run 3 warms its own),
    and its end must not take run 2's checkpoint away."""
    suite, env = cache_env
    first = pytest_run("-q", "test_cached.py", cwd=suite, env=env)
    assert first.returncode == 0 and "warmed here and pushed" in first.stdout, first.stdout + first.stderr
    holder = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_holding.py"],
                              cwd=suite, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_tokens(env)) < 2:  # run 1's line, then run 2's first test
            assert holder.poll() is None and time.monotonic() < deadline, holder.communicate()[0]
            time.sleep(0.2)
        third = pytest_run("-q", "test_cached.py", cwd=suite, env=env)
        assert third.returncode == 0, "a run pulling the tag another run holds: " + third.stdout + third.stderr
    finally:
        Path(env["GO"]).touch()
        out = holder.communicate(timeout=120)[0]
    assert holder.returncode == 0, "the run holding the pulled checkpoint lost it: " + out
    assert "pulled the warm checkpoint" in out, out
    tokens = _tokens(env)
    assert len(tokens) == 4, tokens
    assert tokens[0] == tokens[1] == tokens[3], "run 2 did not continue run 1's warm checkpoint"


def test_a_run_removes_only_the_checkpoint_it_pulled(client, engine, keys, cache_env) -> None:
    """The pulled source's folder in the store can hold another checkpoint of it (here: one the
    user imported under another name): the run that pulled removes its own, not the folder."""
    suite, env = cache_env
    first = pytest_run("-q", "test_cached.py", cwd=suite, env=env)
    assert first.returncode == 0 and "warmed here and pushed" in first.stdout, first.stdout + first.stderr
    (_, source_id), = _tokens(env)
    # The user's own copy of the source's checkpoint, under another name.
    tag = next(t for t in _registry_tags(env["CACHE"]) if t.startswith("warm-"))
    theirs = dolly.pull(f"{env['CACHE']}:{tag}", trusted_keys=[keys[1]])
    assert theirs.container_id == source_id
    mine = theirs.path.with_name("mine")
    os.rename(theirs.path, mine)
    meta = json.loads((mine / "dolly.json").read_text())
    meta["name"] = "mine"
    (mine / "dolly.json").write_text(json.dumps(meta))
    kept = dolly.Checkpoint.load(mine, client)
    try:
        second = pytest_run("-q", "test_cached.py", cwd=suite, env=env)
        assert second.returncode == 0 and "pulled the warm checkpoint" in second.stdout, second.stdout + second.stderr
        assert mine.is_dir(), "the run removed a checkpoint it did not make"
        assert not (engine.store_dir / source_id / "warm").exists(), "the run left its pulled checkpoint"
    finally:
        with contextlib.suppress(errors.CheckpointNotFound):
            dolly.remove_checkpoint(kept)


def _registry_tags(repository: str) -> list:
    host, _, name = repository.partition("/")
    return requests.get(f"http://{host}/v2/{name}/tags/list", timeout=10).json()["tags"]


# --- 7. The default max_bytes is bounded by the data root's free space --------------------------------


def test_a_bundle_declaring_more_than_the_free_space_allows_is_refused_before_writing(
        source_cp, client, engine, keys, tmp_path: Path) -> None:
    private, public = keys
    allowed = _bundle.default_max_bytes(engine)
    st = os.statvfs(engine.spool_dir)
    assert allowed <= st.f_bavail * st.f_frsize // 2 and allowed <= _manifest.DEFAULT_MAX_BYTES
    declared = allowed + (1 << 30)
    if declared >= _manifest.DEFAULT_MAX_BYTES:
        pytest.skip("the data root has more free space than the fixed cap: the fixed cap decides here")
    path = dolly.export(source_cp, tmp_path / "cp.dolly", signer=private, compression="none")
    dolly.remove_checkpoint(source_cp)  # not an import over the engine's own checkpoint
    # The same bundle, its manifest saying the writable layer is `declared` bytes, signed again.
    forged = tmp_path / "large.dolly"
    with tarfile.open(path) as tar, tarfile.open(forged, "w") as out:
        for member in tar.getmembers():
            data = tar.extractfile(member).read() if member.isfile() else None
            if member.name == "manifest.json":
                manifest = json.loads(data)
                (layer,) = [m for m in manifest["members"] if m["name"] == "rootfs-diff.tar"]
                layer["size"] = declared - sum(m["size"] for m in manifest["members"] if m is not layer)
                data = json.dumps(manifest).encode()
                signature = dolly.trust.sign(private, data)
            elif member.name == "manifest.sig":
                data = signature
            if data is not None:
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    with pytest.raises(errors.UnsafeArchive, match="max_bytes") as refused:
        dolly.import_bundle(forged, client=client, trusted_keys=[public])
    assert "free space" in str(refused.value)
    assert not any(engine.spool_dir.glob("import-*"))
