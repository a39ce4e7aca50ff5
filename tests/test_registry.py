"""Checkpoints through a real OCI registry (Debian's docker-registry, distribution 2.8, started here
on a loopback address): push from one engine, pull and clone on another, content trust refusals
with nothing written, deduplicated second pushes, TLS with Basic authentication from Docker's
config.json, and the pytest plugin's cache across two engines."""
from __future__ import annotations

import json
import secrets
import time
from datetime import timedelta
from pathlib import Path

import pytest
from registries import Registry
from test_pytest_plugin import pytest_run, run_containers

import dolly
from dolly import errors, trust
from dolly._engine import Engine
from helpers import PYTHON, ask, ask_one_clone

# Read, never imported: importing it runs the service.
DEMO_SERVICE = Path(dolly.__file__).with_name("demo_service.py")


@pytest.fixture
def repo():
    """A repository of its own for each test."""
    return f"dolly-test/{secrets.token_hex(4)}"


@pytest.fixture
def served(stateful):
    """A stateful service asked three times, checkpointed; its last answer and the checkpoint."""
    source, before = stateful
    return source, before, dolly.checkpoint(source, "pushed")


def gone(source, client) -> None:
    """The source and its checkpoints removed, as on another host they would not be there: a pull
    into the engine they came from would claim one of its own containers."""
    for cp in dolly.list_checkpoints(source.id, client):
        dolly.remove_checkpoint(cp)
    source.remove(force=True)


def nothing_written(client, container_id: str) -> None:
    engine = Engine.of(client)
    assert not (engine.store_dir / container_id).exists(), "a refused pull left a checkpoint"
    assert not [p for p in engine.spool_dir.glob("*") if p.name.startswith(("import-", "push-"))]


def test_push_on_a_pull_and_clone_on_b_keep_the_state(served, client, host_b, registry, repo, keys):
    source, before, cp = served
    private, public = keys
    report = dolly.push(cp, f"{registry.address}/{repo}:v1", signer=private)
    assert report.reference == f"{registry.address}/{repo}@{report.digest}"
    assert registry.digests(repo, "v1") == registry.digests(repo, report.digest)
    pulled = dolly.pull(f"{registry.address}/{repo}:v1", client=host_b, trusted_keys=[public])
    try:
        assert pulled.container_id == source.id and pulled.origin["signer"] == trust.key_id(public)
        clones = dolly.clone(pulled, 2)
        try:
            for clone in clones:
                after = ask(clone)
                assert after["token"] == before["token"] and after["hits"] == before["hits"] + 1, after
            assert len({c.attrs["NetworkSettings"]["IPAddress"] for c in clones}) == 2
        finally:
            for clone in clones:
                clone.remove(force=True)
    finally:
        dolly.remove_checkpoint(pulled)


def test_a_pull_by_digest_gets_that_manifest(served, client, registry, repo, keys):
    source, before, cp = served
    private, public = keys
    first = dolly.push(cp, f"{registry.address}/{repo}:v1", signer=private)
    ask(source)
    dolly.push(dolly.checkpoint(source, "later"), f"{registry.address}/{repo}:v1", signer=private)
    gone(source, client)
    pulled = dolly.pull(first.reference, client=client, trusted_keys=[public])
    assert pulled.name == "pushed"
    assert ask_one_clone(pulled)["hits"] == before["hits"] + 1


def test_a_tampered_piece_is_refused_with_nothing_written(served, client, registry, repo, keys):
    source, _, cp = served
    private, public = keys
    dolly.push(cp, f"{registry.address}/{repo}:v1", signer=private)
    doc = json.loads(registry.manifest(repo, "v1"))
    largest = max(doc["layers"], key=lambda layer: layer["size"])
    blob = registry.blob_file(largest["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    gone(source, client)
    with pytest.raises(errors.DigestMismatch):
        dolly.pull(f"{registry.address}/{repo}:v1", client=client, trusted_keys=[public])
    nothing_written(client, source.id)


def test_a_wrong_signer_and_no_signature_are_refused_before_any_piece(served, client, registry, repo, keys):
    source, _, cp = served
    private, public = keys
    _, stranger = trust.generate_keypair()
    dolly.push(cp, f"{registry.address}/{repo}:signed", signer=private)
    dolly.push(cp, f"{registry.address}/{repo}:unsigned")
    gone(source, client)
    with pytest.raises(errors.UntrustedSigner):
        dolly.pull(f"{registry.address}/{repo}:signed", client=client, trusted_keys=[stranger])
    with pytest.raises(errors.UnsignedBundle):
        dolly.pull(f"{registry.address}/{repo}:unsigned", client=client)
    with pytest.raises(errors.UnsignedBundle):  # a trusted key demands a signature, whatever allow_unsigned says
        dolly.pull(f"{registry.address}/{repo}:unsigned", client=client, trusted_keys=[public], allow_unsigned=True)
    nothing_written(client, source.id)
    pulled = dolly.pull(f"{registry.address}/{repo}:unsigned", client=client, allow_unsigned=True)
    dolly.remove_checkpoint(pulled)


def test_an_expired_checkpoint_is_refused(served, client, registry, repo, keys):
    source, _, cp = served
    private, public = keys
    dolly.push(cp, f"{registry.address}/{repo}:short", signer=private, expires_in=timedelta(seconds=1))
    gone(source, client)
    time.sleep(1.2)
    with pytest.raises(errors.BundleExpired):
        dolly.pull(f"{registry.address}/{repo}:short", client=client, trusted_keys=[public])
    nothing_written(client, source.id)


def test_a_tag_rolled_back_to_an_older_signed_manifest_is_refused(served, client, registry, repo, keys):
    source, _, cp = served
    private, public = keys
    old = dolly.push(cp, f"{registry.address}/{repo}:web", signer=private)
    old_body = registry.manifest(repo, old.digest)
    ask(source)
    dolly.push(dolly.checkpoint(source, "newer"), f"{registry.address}/{repo}:web", signer=private)
    gone(source, client)
    newest = dolly.pull(f"{registry.address}/{repo}:web", client=client, trusted_keys=[public])
    assert newest.name == "newer"
    dolly.remove_checkpoint(newest)
    registry.put_manifest(repo, "web", old_body)  # the old manifest, validly signed, under the tag again
    with pytest.raises(errors.RollbackRefused):
        dolly.pull(f"{registry.address}/{repo}:web", client=client, trusted_keys=[public])
    nothing_written(client, source.id)


def test_a_signature_for_another_repository_is_refused(served, client, registry, repo, keys):
    """The signature names the repository: a manifest and its signature copied into another
    repository (blobs mounted across, as a registry lets anyone with both repositories do) do
    not pass there."""
    source, _, cp = served
    private, public = keys
    pushed = dolly.push(cp, f"{registry.address}/{repo}:v1", signer=private)
    other = repo + "-copy"
    sig_tag = pushed.digest.replace(":", "-") + ".sig"
    for reference in (pushed.digest, sig_tag):
        body = registry.manifest(repo, reference)
        for digest in registry.digests(repo, reference):
            registry.mount_blob(digest, from_repository=repo, to_repository=other)
        registry.put_manifest(other, reference, body)
    gone(source, client)
    with pytest.raises(errors.DigestMismatch, match="another manifest or repository"):
        dolly.pull(f"{registry.address}/{other}@{pushed.digest}", client=client, trusted_keys=[public])
    nothing_written(client, source.id)


def test_a_manifest_served_under_another_tag_is_refused(served, client, registry, repo, keys):
    """The signature names the tag it was pushed to: a registry that answers one tag with
    another tag's (validly signed) manifest is caught."""
    source, _, cp = served
    private, public = keys
    dolly.push(cp, f"{registry.address}/{repo}:postgres", signer=private)
    registry.put_manifest(repo, "web", registry.manifest(repo, "postgres"))
    gone(source, client)
    with pytest.raises(errors.DigestMismatch, match="signed for the tag"):
        dolly.pull(f"{registry.address}/{repo}:web", client=client, trusted_keys=[public])
    nothing_written(client, source.id)


def test_a_second_push_of_the_service_uploads_only_the_pieces_that_changed(run, client, registry, repo):
    source = run(PYTHON, ["python3", "-c", DEMO_SERVICE.read_text()],
                 environment={"STATE_MB": "64", "RANDOM_STATE": "1"})
    dolly.ready.wait(source, dolly.ready.http(8000), timeout=120)
    first = dolly.push(dolly.checkpoint(source, "one"), f"{registry.address}/{repo}:one")
    for _ in range(5):
        ask(source)
    second = dolly.push(dolly.checkpoint(source, "two"), f"{registry.address}/{repo}:two")
    one, two = registry.digests(repo, "one"), registry.digests(repo, "two")
    assert first.uploaded == len(set(one)) and first.blobs == len(one)
    assert second.uploaded == len(set(two) - set(one)), (first, second)
    # 64 MiB of random state that the requests do not touch: most of the memory's pieces are shared
    # (the interpreter's own 10 to 12 MB are re-sent nearly whole: 32 MiB left that at the edge).
    assert second.bytes_uploaded < second.bytes / 4, second


def test_tls_and_basic_auth_from_docker_config(served, client, tmp_path, keys, monkeypatch, tmp_path_factory):
    source, before, cp = served
    private, public = keys
    secure = Registry(tmp_path_factory.mktemp("secure-registry"), user=("ci", secrets.token_hex(8))).start()
    try:
        ref = f"{secure.address}/dolly-test/tls:v1"
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "empty"))
        with pytest.raises(errors.RegistryError, match="credentials"):
            dolly.push(cp, ref, signer=private, ca_file=secure.ca_file)
        monkeypatch.setenv("DOCKER_CONFIG", str(secure.docker_config(tmp_path / "docker")))
        with pytest.raises(errors.RegistryError, match="TLS"):
            dolly.push(cp, ref, signer=private)  # the registry's CA is not the system's
        dolly.push(cp, ref, signer=private, ca_file=secure.ca_file)
        gone(source, client)
        pulled = dolly.pull(ref, client=client, trusted_keys=[public], ca_file=secure.ca_file)
        assert ask_one_clone(pulled)["token"] == before["token"]
    finally:
        secure.stop()


CACHED_SUITE = '''
import os
import dolly.testing
from dolly import ready

svc = dolly.testing.warm_service(
    image="dolly/busybox",
    command=["sh", "-c", "echo $RANDOM$RANDOM > /tmp/token; echo ready; while true; do sleep 1; done"],
    ready=ready.log("ready"),
    cache=os.environ["CACHE"],
)

def test_token(svc):
    with open(os.environ["TOKENS"], "a") as f:
        f.write(svc.exec_run(["cat", "/tmp/token"]).output.decode())
'''


def test_the_pytest_cache_warms_on_one_engine_and_pulls_on_the_other(client, host_b_engine, registry, repo,
                                                                    tmp_path, keys):
    private, _ = keys
    trust.save_private_key(private, tmp_path / "signer.pem")
    (tmp_path / "test_cached.py").write_text(CACHED_SUITE)
    tokens = tmp_path / "tokens"
    env = {"CACHE": f"{registry.address}/{repo}", "TOKENS": str(tokens),
           "DOLLY_CACHE_SIGNER": str(tmp_path / "signer.pem")}
    on_b = dolly.list_checkpoints(client=host_b_engine.client)
    first = pytest_run("-q", "test_cached.py", cwd=tmp_path, env={**env, "DOCKER_HOST": "unix:///var/run/docker.sock"})
    assert first.returncode == 0, first.stdout + first.stderr
    assert "warmed here and pushed" in first.stdout, first.stdout
    second = pytest_run("-q", "test_cached.py", cwd=tmp_path, env={**env, "DOCKER_HOST": host_b_engine.url})
    assert second.returncode == 0, second.stdout + second.stderr
    assert "pulled the warm checkpoint" in second.stdout and "saved" in second.stdout, second.stdout
    warmed, pulled = tokens.read_text().split()
    assert warmed == pulled, "the second run warmed its own service instead of pulling the first run's"
    assert not run_containers(client) and not run_containers(host_b_engine.client)
    # The run on host b removed the checkpoint it pulled, through that engine's agent.
    assert dolly.list_checkpoints(client=host_b_engine.client) == on_b
