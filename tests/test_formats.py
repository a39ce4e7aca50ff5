"""The ecosystem's checkpoint archives, with a real engine: kubelet-style archives (CRI-O's and
containerd's layout, INTEROP-NOTES.md) in, what checkpointctl reads of Dolly's own bundles,
checkpoint OCI images out and back, Docker -> Podman and Podman -> Docker with real Podman, and
detached signatures for archives that carry none.

No kubelet, CRI-O or containerd CRI runs here: the archives are built to their documented layout
from a checkpoint this engine took (its CRIU images, its OCI spec with CRI-O's annotations added,
checkpointctl's reduced config.dump, CRI-O's bind.mounts, containerd's status.dump), under a
container ID that no container of this engine has, as an archive from another node would be.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import secrets
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest

import dolly
from dolly import _rootfs as rootfs, errors
from dolly._archive import tarfile
from dolly._engine import Engine
from helpers import STATEFUL, ask, ask_one_clone, assert_counts_on, get_json

POD_ANNOTATIONS = {"io.kubernetes.pod.name": "web-0", "io.kubernetes.pod.namespace": "default",
                   "io.kubernetes.pod.uid": "5b7c0d3e", "io.kubernetes.container.name": "counter"}
SECRET_MOUNT = {"containerPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                "hostPath": "/var/lib/kubelet/pods/5b7c0d3e/volumes/kubernetes.io~projected/kube-api-access",
                "readOnly": True, "selinuxRelabel": False}


def kubelet_archive(cp, out: Path, *, engine: str = "cri-o", compress: bool = False, spec_patch=None,
                    extra: tuple = ()) -> str:
    """Write ``cp`` as the kubelet's checkpoint archive of ``engine`` at ``out``; returns the
    container ID it carries."""
    container_id = secrets.token_hex(32)
    work = out.parent / f"work-{container_id[:8]}"
    work.mkdir()
    deleted = rootfs.to_bundle_form(cp.rootfs_diff, work / "rootfs-diff.tar", max_bytes=1 << 30)
    spec = json.loads((cp.path / "spec.dump").read_text())
    spec.pop("hooks", None)
    spec["annotations"] = {**(spec.get("annotations") or {}), **POD_ANNOTATIONS}
    if engine == "cri-o":
        spec["annotations"]["io.container.manager"] = "cri-o"
    if spec_patch:
        spec_patch(spec)
    config = {"id": container_id, "name": "k8s_counter_web-0_default_5b7c0d3e_0", "rootfsImage": "dolly/busybox",
              "rootfsImageRef": cp.image_id.removeprefix("sha256:"), "rootfsImageName": "dolly/busybox:latest",
              "runtime": "runc", "createdTime": "2026-11-29T09:00:00.123456789Z",
              "checkpointedTime": "2026-11-29T09:05:00.987654321Z"}
    files = {"config.dump": json.dumps(config).encode(), "spec.dump": json.dumps(spec).encode(),
             "deleted.files": json.dumps(deleted).encode(), "dump.log": b"(00.000001) dumped\n",
             "rootfs-diff.tar": (work / "rootfs-diff.tar").read_bytes()}
    if (cp.path / "stats-dump").exists():
        files["stats-dump"] = (cp.path / "stats-dump").read_bytes()
    if engine == "cri-o":
        files["bind.mounts"] = json.dumps([SECRET_MOUNT]).encode()
    else:
        files["status.dump"] = json.dumps({"Pid": 4242, "Status": "running"}).encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        folder = tarfile.TarInfo("checkpoint")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for image in sorted(cp.images_dir.iterdir()):
            tar.add(image, arcname=f"checkpoint/{image.name}")
        for name, data in [*files.items(), *extra]:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    out.write_bytes(gzip.compress(raw.getvalue()) if compress else raw.getvalue())
    return container_id


def counter_at(cp) -> int:
    """The counter's value at the checkpoint: its file in the writable layer taken with it."""
    with tarfile.open(cp.rootfs_diff) as tar:
        for m in tar.getmembers():
            if m.name.removeprefix("./") == "tmp/count":
                return int(tar.extractfile(m).read())
    raise AssertionError("no /tmp/count in the checkpoint's writable layer")


def _nothing_left(client, container_id: str) -> None:
    engine = Engine.of(client)
    assert not (engine.store_dir / container_id).exists()
    assert not any(engine.spool_dir.glob("import-*"))


def test_a_cri_o_archive_clones_on_docker_with_its_state(source_cp, client, tmp_path):
    at_checkpoint = counter_at(source_cp)
    path = tmp_path / "checkpoint-web-0-counter.tar"
    container_id = kubelet_archive(source_cp, path)
    cp = dolly.import_bundle(path, client=client, allow_unsigned=True)
    try:
        assert cp.container_id == container_id and cp.origin["format"] == "cri-o"
        assert cp.container_name == "k8s_counter_web-0_default_5b7c0d3e_0"
        reported = " ".join(cp.origin["not_applied"])
        assert SECRET_MOUNT["hostPath"] in reported and "io.kubernetes.pod.name=web-0" in reported
        clones = dolly.clone(cp, 2)
        try:
            assert len({c.attrs["NetworkSettings"]["IPAddress"] for c in clones}) == 2
            for clone in clones:
                assert clone.exec_run(["cat", "/greeting"]).output == b"hello\n"
                assert clone.exec_run(["cat", "/d/f"]).output == b"x\n"
                assert clone.exec_run(["test", "-e", "/etc/group"]).exit_code == 1, "a deleted file came back"
                assert_counts_on(clone, at_checkpoint)
        finally:
            for c in clones:
                c.remove(force=True)
    finally:
        dolly.remove_checkpoint(cp)


def test_a_containerd_archive_gzipped_is_told_apart_and_clones(source_cp, client, tmp_path):
    path = tmp_path / "checkpoint.tar.gz"
    kubelet_archive(source_cp, path, engine="containerd", compress=True)
    cp = dolly.import_bundle(path, client=client, allow_unsigned=True)
    try:
        assert cp.origin["format"] == "containerd"
        assert any("status.dump" in x for x in cp.origin["not_applied"])
        (clone,) = dolly.clone(cp, 1)
        try:
            assert clone.exec_run(["cat", "/greeting"]).output == b"hello\n"
            assert_counts_on(clone, counter_at(source_cp))
        finally:
            clone.remove(force=True)
    finally:
        dolly.remove_checkpoint(cp)


def test_a_foreign_archive_needs_allow_unsigned(source_cp, client, tmp_path):
    path = tmp_path / "cp.tar"
    container_id = kubelet_archive(source_cp, path)
    with pytest.raises(errors.UnsignedBundle):
        dolly.import_bundle(path, client=client)
    _nothing_left(client, container_id)


def test_a_foreign_archive_with_a_path_outside_is_refused(source_cp, client, tmp_path):
    path = tmp_path / "cp.tar"
    container_id = kubelet_archive(source_cp, path, extra=(("../../etc/evil", b"x"),))
    with pytest.raises(errors.UnsafeArchive):
        dolly.import_bundle(path, client=client, allow_unsigned=True)
    _nothing_left(client, container_id)
    assert not (tmp_path.parent.parent / "etc" / "evil").exists()


def test_a_foreign_archive_asking_for_more_capabilities_is_refused(source_cp, client, tmp_path):
    def add_sys_admin(spec):
        caps = spec["process"]["capabilities"]
        for key in caps:
            caps[key] = sorted({*caps[key], "CAP_SYS_ADMIN"})

    path = tmp_path / "cp.tar"
    container_id = kubelet_archive(source_cp, path, spec_patch=add_sys_admin)
    with pytest.raises(errors.PolicyRefused) as info:
        dolly.import_bundle(path, client=client, allow_unsigned=True)
    assert "capabilities" in info.value.items
    _nothing_left(client, container_id)


def test_dolly_bundles_carry_what_checkpointctl_reads(source_cp, tmp_path):
    """checkpointctl (internal/utils.go, lib/metadata.go): a `checkpoint` directory entry,
    config.dump's and spec.dump's fields for `show`, a top-level stats-dump for `inspect --stats`."""
    path = dolly.export(source_cp, tmp_path / "cp.dolly", compression="gzip")
    with tarfile.open(path, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["checkpoint"].isdir()
        assert "checkpoint/inventory.img" in members and "stats-dump" in members
        config = json.load(tar.extractfile("config.dump"))
        spec = json.load(tar.extractfile("spec.dump"))
    assert config["id"] == source_cp.container_id and config["name"] == source_cp.container_name
    assert config["rootfsImageName"] == source_cp.config["Config"]["Image"] and config["runtime"] == "runc"
    assert config["rootfsImageRef"] == source_cp.image_id.removeprefix("sha256:")
    assert config["checkpointedTime"].startswith(source_cp.created_at.strftime("%Y-%m-%dT%H:%M:%S"))
    assert spec["ociVersion"] and spec["process"]["args"] and spec["root"]["path"]
    assert os.stat(path).st_mode & 0o077 == 0


# --- checkpoint OCI images ------------------------------------------------------------------------------


def test_a_checkpoint_oci_image_goes_out_and_back_in(source_cp, client, keys, tmp_path):
    """export(format="oci") writes an OCI image layout that skopeo reads, with the annotations
    CRI-O, Podman and checkpointctl look for; importing the folder verifies the layer's digest
    and the bundle's signature, and the clone continues the checkpoint's state."""
    private, public = keys
    at_checkpoint = counter_at(source_cp)
    layout = dolly.export(source_cp, tmp_path / "image", format="oci", signer=private)
    raw = json.loads(subprocess.run(["skopeo", "inspect", "--raw", f"oci:{layout}"], capture_output=True,
                                    check=True).stdout)
    notes = raw["annotations"]
    assert notes["io.kubernetes.cri-o.annotations.checkpoint.name"] == source_cp.container_name
    assert notes["io.podman.annotations.checkpoint.rootfsImageID"] == source_cp.image_id.removeprefix("sha256:")
    assert notes["org.criu.checkpoint.container.id"] == source_cp.container_id
    assert notes["io.dolly.checkpoint.signer"] == dolly.trust.key_id(private)
    (layer,) = raw["layers"]
    blob = layout / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
    with tarfile.open(blob) as tar:
        first = tar.next()
        manifest_bytes = tar.extractfile(first).read()
        assert first.name == "manifest.json" and tar.getmember("checkpoint").isdir()
    assert notes["io.dolly.checkpoint.manifest.digest"] == "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()

    imported = _import_as_another_container(layout, client, public)
    try:
        assert imported.origin["signer"] == dolly.trust.key_id(private)
        (clone,) = dolly.clone(imported, 1)
        try:
            assert clone.exec_run(["cat", "/greeting"]).output == b"hello\n"
            assert_counts_on(clone, at_checkpoint)
        finally:
            clone.remove(force=True)
    finally:
        dolly.remove_checkpoint(imported)


def _import_as_another_container(layout: Path, client, public):
    """The checkpoint of a container this engine runs cannot be imported here (it would pass
    for one of its own): the source goes first, as on another host it would not exist."""
    source_id = json.loads((layout / "index.json").read_text())["manifests"][0]["annotations"][
        "org.criu.checkpoint.container.id"]
    client.containers.get(source_id).remove(force=True)
    for cp in dolly.list_checkpoints(source_id, client):
        if cp.origin is None:
            dolly.remove_checkpoint(cp)
    return dolly.import_bundle(layout, client=client, trusted_keys=[public])


def test_a_checkpoint_oci_image_with_a_changed_layer_is_refused(source_cp, client, keys, tmp_path):
    private, public = keys
    layout = dolly.export(source_cp, tmp_path / "image", format="oci", signer=private)
    index = json.loads((layout / "index.json").read_text())
    manifest_blob = layout / "blobs" / "sha256" / index["manifests"][0]["digest"].removeprefix("sha256:")
    layer = json.loads(manifest_blob.read_text())["layers"][0]
    blob = layout / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
    # Another bundle, as valid as the first (signed by the same trusted key, of the same size), in
    # the layer's place: its own digests and signature hold, so only the OCI blob's digest, which
    # the signed manifest names, tells it from the layer that was exported.
    second = dolly.export(source_cp, tmp_path / "second", format="oci", signer=private)
    other = next(p for p in (second / "blobs" / "sha256").iterdir() if p.stat().st_size == blob.stat().st_size
                 and p.read_bytes()[:13] == b"manifest.json").read_bytes()
    assert other != blob.read_bytes()
    blob.chmod(0o600)
    blob.write_bytes(other)
    with pytest.raises(errors.DigestMismatch):
        dolly.import_bundle(layout, client=client, trusted_keys=[public])
    assert not any(Engine.of(client).spool_dir.glob("import-*"))


def test_an_oci_export_refuses_encryption_and_an_existing_folder(source_cp, tmp_path):
    with pytest.raises(errors.InvalidArgument, match="not encrypted"):
        dolly.export(source_cp, tmp_path / "image", format="oci", encryption_key=dolly.trust.generate_encryption_key())
    (tmp_path / "taken").mkdir()
    with pytest.raises(errors.InvalidArgument, match="exists"):
        dolly.export(source_cp, tmp_path / "taken", format="oci")
    with pytest.raises(errors.InvalidArgument, match="format"):
        dolly.export(source_cp, tmp_path / "x", format="tarball")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# --- Docker -> Podman --------------------------------------------------------------------------------

def podman(*args: str, check: bool = True) -> str:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, timeout=300).stdout.strip()


@pytest.fixture(scope="module")
def podman_image(client):
    """dolly/python in Podman's storage (docker save | podman load), removed after unless it was
    there before."""
    had = subprocess.run(["podman", "image", "exists", "localhost/dolly/python:latest"]).returncode == 0
    if not had:
        save = subprocess.Popen(["docker", "save", "dolly/python"], stdout=subprocess.PIPE)
        subprocess.run(["podman", "load", "-q"], stdin=save.stdout, check=True, capture_output=True, timeout=300)
        save.wait()
    yield "localhost/dolly/python:latest"
    if not had:
        podman("rmi", "-f", "localhost/dolly/python:latest", check=False)


def test_docker_to_podman_two_clones_answer_with_the_state(stateful, podman_image, keys, tmp_path):
    private, _ = keys
    source, before = stateful
    cp = dolly.checkpoint(source, "to-podman")
    archive_path = dolly.export(cp, tmp_path / "podman.tar.zst", format="podman", signer=private)
    with _open_any(archive_path) as tar:
        assert tar.next().name == "manifest.json", "Dolly's signed manifest leads, and Podman passes over it"
        manifest = json.load(tar.extractfile("manifest.json"))
        config = json.load(tar.extractfile("config.dump"))
        spec = json.load(tar.extractfile("spec.dump"))
        assert tar.getmember("checkpoint").isdir()
    assert manifest["flavor"] == "podman" and manifest["signer"] == dolly.trust.key_id(private)
    assert config["id"] == cp.container_id and config["runtime"] == "runc" and config["rootfsImageName"] == podman_image
    assert "hooks" not in spec, "Docker's hooks call dockerd"
    names = [f"dolly-podman-{secrets.token_hex(3)}-{i}" for i in (1, 2)]
    try:
        for name in names:
            podman("container", "restore", "--import", str(archive_path), "--name", name)
        _two_answer_with(names, before)
    finally:
        podman("rm", "-f", *names, check=False)


def _two_answer_with(names, before) -> None:
    """Podman's containers ``names`` each answer on their own address with the state of ``before``."""
    addresses = set()
    for name in names:
        ip = podman("inspect", name, "--format", "{{.NetworkSettings.IPAddress}}")
        addresses.add(ip)
        after = get_json(ip, 8000)
        assert after["token"] == before["token"] and after["hits"] == before["hits"] + 1, after
        assert podman("exec", name, "cat", "/var/tmp/born") == before["token"]
    assert len(addresses) == len(names) and "" not in addresses


def test_podman_restores_a_dolly_checkpoint_image(stateful, podman_image, keys, tmp_path):
    """export(format="oci") -> skopeo copy into Podman's storage -> podman container restore IMAGE."""
    private, _ = keys
    source, before = stateful
    layout = dolly.export(dolly.checkpoint(source, "to-image"), tmp_path / "image", format="oci", signer=private)
    image = f"localhost/dolly-checkpoint-{secrets.token_hex(3)}:test"
    names = [f"dolly-podman-image-{secrets.token_hex(3)}-{i}" for i in (1, 2)]
    subprocess.run(["skopeo", "copy", "-q", f"oci:{layout}", f"containers-storage:{image}"], check=True,
                   capture_output=True, timeout=300)
    try:
        for name in names:
            podman("container", "restore", "--name", name, image)
        _two_answer_with(names, before)
    finally:
        podman("rm", "-f", *names, check=False)
        podman("rmi", "-f", image, check=False)


def _open_any(path: Path):
    """A tar archive, plain or zstd- or gzip-compressed."""
    import zstandard

    data = path.read_bytes()
    if data[:4] == b"\x28\xb5\x2f\xfd":
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    elif data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return tarfile.open(fileobj=io.BytesIO(data))


# --- Podman -> Docker --------------------------------------------------------------------------------

# Podman can run containers on this machine only with limits root may set (no CAP_SYS_RESOURCE).
PODMAN_LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")


@pytest.fixture(scope="module")
def podman_exports(podman_image, tmp_path_factory):
    """A stateful service started by Podman, with a file in its /dev/shm, asked 3 times, then
    exported by ``podman container checkpoint --export`` three ways (Podman's default, gzip,
    none); the service's last answer, and the archives by compression."""
    folder = tmp_path_factory.mktemp("podman")
    name = f"dolly-psrc-{secrets.token_hex(3)}"
    podman("run", "-d", "--name", name, *PODMAN_LIMITS, podman_image, "python3", "-c", STATEFUL)
    try:
        ip = podman("inspect", name, "--format", "{{.NetworkSettings.IPAddress}}")
        _wait_http(ip)
        podman("exec", name, "sh", "-c", "echo shared > /dev/shm/marker")
        for _ in range(3):
            before = get_json(ip, 8000)
        archives = {}
        for compress in ("zstd", "gzip", "none"):
            archives[compress] = folder / f"{compress}.tar"
            podman("container", "checkpoint", "--leave-running", "--compress", compress, "--export",
                   str(archives[compress]), name)
    finally:
        podman("rm", "-f", name, check=False)
    return before, archives


def _wait_http(ip: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            get_json(ip, 8000)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_podman_to_docker_two_clones_continue_the_state(podman_exports, client):
    before, archives = podman_exports
    cp = dolly.import_bundle(archives["zstd"], client=client, allow_unsigned=True)
    try:
        assert cp.origin["format"] == "podman" and cp.origin["signer"] is None
        assert any("/run/.containerenv" in x for x in cp.origin["not_applied"])
        clones = dolly.clone(cp, 2)
        try:
            assert len({c.attrs["NetworkSettings"]["IPAddress"] for c in clones} - {""}) == 2
            for clone in clones:
                after = ask(clone)
                assert after["token"] == before["token"] and after["hits"] == before["hits"] + 1, after
                assert clone.exec_run(["cat", "/var/tmp/born"]).output.decode() == before["token"]
                # Podman's /dev/shm is a bind of a tmpfs the engine made; it comes in as the
                # clone's own tmpfs, with its files.
                assert clone.exec_run(["cat", "/dev/shm/marker"]).output == b"shared\n"
                assert clone.exec_run(["hostname"]).output.decode().strip() == clone.id[:12]
        finally:
            for c in clones:
                c.remove(force=True)
    finally:
        dolly.remove_checkpoint(cp)


@pytest.mark.parametrize("compress", ["gzip", "none"])
def test_podman_archives_gzipped_or_plain_import_and_clone(podman_exports, client, compress):
    before, archives = podman_exports
    after = ask_one_clone(dolly.import_bundle(archives[compress], client=client, allow_unsigned=True))
    assert after["token"] == before["token"] and after["hits"] == before["hits"] + 1, after


def test_a_podman_archive_without_a_signature_is_refused(podman_exports, client):
    _, archives = podman_exports
    with pytest.raises(errors.UnsignedBundle):
        dolly.import_bundle(archives["zstd"], client=client)
    _nothing_left_of_podman(client, archives["zstd"])


def _podman_id(archive_path: Path) -> str:
    with _open_any(archive_path) as tar:
        return json.load(tar.extractfile("config.dump"))["id"]


def _nothing_left_of_podman(client, archive_path: Path) -> None:
    _nothing_left(client, _podman_id(archive_path))


def test_a_podman_archive_writing_through_a_link_in_its_dev_shm_is_refused(podman_exports, client, tmp_path):
    """devshm-checkpoint.tar is unpacked by CRIU (GNU tar, as root): nothing may be written
    through a symlink it made."""
    _, archives = podman_exports
    shm = io.BytesIO()
    with tarfile.open(fileobj=shm, mode="w") as tar:
        link = tarfile.TarInfo("./escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
        planted = tarfile.TarInfo("./escape/cron.d/dolly-test")
        planted.size = 2
        tar.addfile(planted, io.BytesIO(b"x\n"))
    path = tmp_path / "evil.tar"
    _rewrite_members(archives["none"], path, {"devshm-checkpoint.tar": shm.getvalue()})
    with pytest.raises(errors.UnsafeArchive, match="under one of its symlinks"):
        dolly.import_bundle(path, client=client, allow_unsigned=True)
    _nothing_left_of_podman(client, path)
    assert not Path("/etc/cron.d/dolly-test").exists()


def _rewrite_members(src: Path, out: Path, replace: dict) -> None:
    """A plain copy of the archive ``src`` with members' contents replaced."""
    with _open_any(src) as tar, tarfile.open(out, "w") as new:
        for member in tar.getmembers():
            data = replace.get(member.name, tar.extractfile(member).read() if member.isfile() else None)
            if data is not None:
                member.size = len(data)
            new.addfile(member, io.BytesIO(data) if data is not None else None)


# --- detached signatures -------------------------------------------------------------------------------


def test_a_detached_signature_by_a_trusted_key_imports_a_podman_archive(podman_exports, client, keys, tmp_path):
    before, archives = podman_exports
    private, public = keys
    signature = dolly.trust.sign_file(private, archives["gzip"], out=tmp_path / "gzip.tar.sig",
                                      expires_in=timedelta(hours=1))
    cp = dolly.import_bundle(archives["gzip"], client=client, trusted_keys=[public], signature=signature)
    assert cp.origin["signer"] == dolly.trust.key_id(public)
    assert ask_one_clone(cp)["token"] == before["token"]


def test_a_detached_signature_refuses_a_changed_archive_an_untrusted_key_and_age(podman_exports, client, keys,
                                                                                 tmp_path):
    _, archives = podman_exports
    private, public = keys
    other, _ = dolly.trust.generate_keypair()
    changed = tmp_path / "changed.tar"
    # One byte of a member's data changed, the archive's size kept: only the digest the detached
    # signature signs tells it from the signed one (a longer file would be caught by its size).
    data = bytearray(archives["none"].read_bytes())
    with tarfile.open(archives["none"]) as tar:
        member = max((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.size)
    data[member.offset_data + member.size // 2] ^= 0x01
    changed.write_bytes(bytes(data))
    assert changed.stat().st_size == archives["none"].stat().st_size
    signed = dolly.trust.sign_file(private, archives["none"], out=tmp_path / "good.sig")
    with pytest.raises(errors.DigestMismatch):
        dolly.import_bundle(changed, client=client, trusted_keys=[public], signature=signed)
    by_other = dolly.trust.sign_file(other, archives["none"], out=tmp_path / "other.sig")
    with pytest.raises(errors.UntrustedSigner):
        dolly.import_bundle(archives["none"], client=client, trusted_keys=[public], signature=by_other)
    document = json.loads(signed.read_text())
    document["size"] += 1  # a field changed after signing
    (tmp_path / "edited.sig").write_text(json.dumps(document))
    with pytest.raises(errors.SignatureInvalid):
        dolly.import_bundle(archives["none"], client=client, trusted_keys=[public], signature=tmp_path / "edited.sig")
    old = dolly.trust.sign_file(private, archives["none"], out=tmp_path / "old.sig", expires_in=timedelta(seconds=1))
    time.sleep(1.1)
    with pytest.raises(errors.BundleExpired):
        dolly.import_bundle(archives["none"], client=client, trusted_keys=[public], signature=old)
    _nothing_left_of_podman(client, archives["none"])
