"""Hostile bundles: each test shows one way in closed, on real engines, with crafted input.

Every refusal is a dolly error, and leaves nothing: no file outside Dolly's store (nor in it), no
image loaded or retagged, no container.
"""
from __future__ import annotations

import dataclasses
import errno
import gzip
import io
import json
import os
import select
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import dolly
from dolly import errors, trust
from dolly._archive import tarfile  # the one Dolly reads with: 3.12's, backported to 3.11
from dolly._checkpoint import METADATA, Checkpoint
from dolly._engine import Engine, default_client
from bundles import assert_refused, edit_config, member, rebuild, rootfs_tar
from helpers import BUSYBOX, COUNTER, ENGINE_B_URL, PYTHON, RUN_ID


@pytest.fixture
def base(source_cp, tmp_path):
    """An unsigned, uncompressed bundle of a real checkpoint, for rebuilding with hostile parts."""
    return dolly.export(source_cp, tmp_path / "base.dolly", compression="none")


def data_root_listing(client) -> dict:
    """What an import could write outside Dolly's store: the data root's top level, the
    containers' folders, and Dolly's own folder but for the store and the spool."""
    root = Engine.of(client).root_dir
    dolly_dir = root / "dolly"
    own = {"checkpoints", "spool", "locks", "lineages.json", "lineages.json.lock"}
    return {
        "top": sorted(p.name for p in root.iterdir() if p.name != "dolly"),
        "containers": sorted(str(p) for p in (root / "containers").glob("*/**")),
        "dolly": sorted(p.name for p in dolly_dir.iterdir() if p.name not in own) if dolly_dir.exists() else [],
    }


def with_checkpoint_fields(path, out, *, signer=None, **fields):
    """The bundle at ``path`` with its checkpoint's manifest fields and config.dump changed alike."""
    def manifest_edit(m):
        m["checkpoint"].update(fields)

    def config_edit(meta):
        meta.update(fields)

    return rebuild(path, out, signer=signer, manifest_edit=manifest_edit,
                   replace={"config.dump": edit_config(path, config_edit)})


# --- writing outside the store ----------------------------------------------------------------------


@pytest.mark.parametrize("name,container_id", [
    ("../../x", "."),                      # the hole as found: <DockerRootDir>/x
    ("x", "../../containers"),
    ("..", "a" * 64),
    ("cp", "A" * 64),                      # not a container ID Docker would make
    ("cp/../../../x", "b" * 64),
])
def test_manifest_fields_never_become_paths_outside_the_store(base, engine_b, tmp_path, name, container_id):
    hostile = with_checkpoint_fields(base, tmp_path / "hostile.dolly", name=name, container_id=container_id)
    before = data_root_listing(engine_b)
    assert_refused(errors.BundleError, hostile, engine_b, allow_unsigned=True, image_source=default_client())
    assert data_root_listing(engine_b) == before
    assert not (Engine.of(engine_b).root_dir / "x").exists()


def test_a_checkpoint_value_cannot_aim_a_write_or_removal_elsewhere(source_cp, tmp_path):
    with pytest.raises(errors.InvalidArgument):
        dataclasses.replace(source_cp, name="../../victim")
    with pytest.raises(errors.InvalidArgument):
        dataclasses.replace(source_cp, container_id="..")
    # A folder elsewhere that looks like a checkpoint is not removed through a Checkpoint value.
    victim = tmp_path / "victim"
    (victim / "criu").mkdir(parents=True)
    (victim / METADATA).write_text("{}")
    with pytest.raises(errors.InvalidArgument):
        dolly.remove_checkpoint(dataclasses.replace(source_cp, path=victim))
    assert (victim / METADATA).read_text() == "{}"
    # A stored checkpoint whose metadata names a path is not loaded at all.
    meta = json.loads((source_cp.path / METADATA).read_text())
    meta["name"] = "../../victim"
    forged = source_cp.path.parent / "forged"
    (forged / "criu").mkdir(parents=True)
    (forged / METADATA).write_text(json.dumps(meta))
    with pytest.raises(errors.CheckpointNotFound):
        Checkpoint.load(forged)


# --- host access through the recorded configuration --------------------------------------------------


HOST_ROOT = {"Privileged": True, "Binds": ["/:/host"], "CapAdd": ["ALL"]}


def asking_for_host_root(base, out, signer=None):
    def config_edit(meta):
        meta["config"]["HostConfig"].update(HOST_ROOT)

    return rebuild(base, out, signer=signer, replace={"config.dump": edit_config(base, config_edit)})


def test_a_signed_bundle_asking_for_host_root_is_refused_by_the_policy(base, engine_b, keys, tmp_path):
    private, public = keys
    hostile = asking_for_host_root(base, tmp_path / "root.dolly", signer=private)
    with pytest.raises(errors.PolicyRefused) as refused:
        dolly.import_bundle(hostile, client=engine_b, trusted_keys=[public], image_source=default_client())
    assert refused.value.items == ["privileged", "host-mounts", "capabilities"]
    assert "/:/host" in str(refused.value)
    assert_refused(errors.PolicyRefused, hostile, engine_b, trusted_keys=[public], image_source=default_client())
    # Allowing some items refuses the rest, by name.
    with pytest.raises(errors.PolicyRefused) as refused:
        dolly.import_bundle(hostile, client=engine_b, trusted_keys=[public], allow=["privileged", "capabilities"],
                            image_source=default_client())
    assert refused.value.items == ["host-mounts"]
    # Allowing all of them on purpose imports it, and the checkpoint remembers what was allowed.
    cp = dolly.import_bundle(hostile, client=engine_b, trusted_keys=[public],
                             allow=["privileged", "host-mounts", "capabilities"], image_source=default_client())
    try:
        assert cp.origin["allowed"] == ["capabilities", "host-mounts", "privileged"]
        assert cp.origin["signer"] == trust.key_id(public)
        assert cp.config["HostConfig"]["Privileged"] is True
    finally:
        dolly.remove_checkpoint(cp)


def test_an_unsigned_bundle_asking_for_host_root_is_refused_too(base, engine_b, tmp_path):
    hostile = asking_for_host_root(base, tmp_path / "root.dolly")
    assert_refused(errors.PolicyRefused, hostile, engine_b, allow_unsigned=True, image_source=default_client())


def test_an_unknown_policy_item_is_an_invalid_argument(base, engine_b):
    with pytest.raises(errors.InvalidArgument, match="unknown restore policy item"):
        dolly.import_bundle(base, client=engine_b, allow_unsigned=True, allow=["root"])


def test_a_clone_is_held_to_the_policy_its_checkpoint_was_imported_with(base, engine_b, client, tmp_path):
    cp = dolly.import_bundle(base, client=engine_b, allow_unsigned=True, image_source=default_client())
    try:
        assert cp.origin["allowed"] == [] and cp.origin["signer"] is None
        # A checkpoint value whose configuration changed after the import (say, from code that
        # builds one by hand) is checked again before the engine sees a create body.
        forged = dataclasses.replace(cp, config={**cp.config, "HostConfig": {**cp.config["HostConfig"], **HOST_ROOT}})
        containers = {c.id for c in engine_b.containers.list(all=True)}
        with pytest.raises(errors.PolicyRefused):
            dolly.clone(forged, 1, client=engine_b)
        assert {c.id for c in engine_b.containers.list(all=True)} == containers
    finally:
        dolly.remove_checkpoint(cp)


# --- memory and time before any check ----------------------------------------------------------------


def pax_bundle(out: Path, payload: bytes, *, compress: bool) -> Path:
    """A tar whose first header is a pax header carrying ``payload``, then a manifest.json."""
    raw = io.BytesIO()
    header = tarfile.TarInfo("PaxHeaders/manifest.json")
    header.type, header.size = tarfile.XHDTYPE, len(payload)
    raw.write(header.tobuf(format=tarfile.USTAR_FORMAT))
    raw.write(payload + b"\0" * (-len(payload) % 512))
    body = b"{}"
    manifest = tarfile.TarInfo("manifest.json")
    manifest.size = len(body)
    raw.write(manifest.tobuf(format=tarfile.USTAR_FORMAT) + body + b"\0" * (512 - len(body)) + b"\0" * 1024)
    out.write_bytes(gzip.compress(raw.getvalue(), 9) if compress else raw.getvalue())
    return out


def test_a_huge_tar_header_is_refused_before_it_is_read(engine_b, tmp_path):
    size = 200 << 20
    value = b" comment="
    length = len(value) + size + 1
    length += len(str(length + 10))
    bomb = tmp_path / "bomb.dolly"
    with gzip.open(bomb, "wb", compresslevel=9) as out:  # written in pieces: the test stays small too
        header = tarfile.TarInfo("PaxHeaders/manifest.json")
        header.type, header.size = tarfile.XHDTYPE, length
        out.write(header.tobuf(format=tarfile.USTAR_FORMAT) + str(length).encode() + value)
        for _ in range(size >> 20):
            out.write(b"a" * (1 << 20))
        out.write(b"\n" + b"\0" * (-length % 512) + b"\0" * 1024)
    assert bomb.stat().st_size < 1 << 20  # a small file that would grow to 200 MB in memory
    script = (
        "import docker, dolly\n"
        "from dolly import errors\n"
        f"client = docker.DockerClient(base_url={ENGINE_B_URL!r})\n"
        "try:\n"
        f"    dolly.import_bundle({str(bomb)!r}, client=client, allow_unsigned=True)\n"
        "except errors.UnsafeArchive as e:\n"
        "    print('UnsafeArchive', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    kind, peak_kib = out.stdout.split()
    assert kind == "UnsafeArchive"
    assert int(peak_kib) < 150 * 1024, f"the import grew to {int(peak_kib) >> 10} MiB"


def test_a_header_that_would_parse_in_quadratic_time_is_refused(engine_b, tmp_path):
    # CVE-2024-6232: records whose lengths do not match make tarfile's parser rescan the header.
    payload = b"5 aa\n" * ((60 << 10) // 5) + b"="
    slow = pax_bundle(tmp_path / "slow.dolly", payload, compress=False)
    assert_refused(errors.UnsafeArchive, slow, engine_b, allow_unsigned=True)
    # Well-formed, but a long run of digits makes tarfile's search for hdrcharset backtrack.
    record = b" comment=" + b"1" * 60_000 + b"\n"
    digits = str(len(record) + 5).encode() + record
    assert int(digits.split(b" ")[0]) == len(digits)
    slow = pax_bundle(tmp_path / "digits.dolly", digits, compress=False)
    assert_refused(errors.UnsafeArchive, slow, engine_b, allow_unsigned=True)


# --- one read of the caller's file ------------------------------------------------------------------


def test_the_bundle_file_is_read_once(base, engine_b, keys, tmp_path):
    """A file that changes between two reads (here a FIFO that serves a different bundle to a
    second reader) cannot get unlisted members into the checkpoint: it is read once."""
    private, public = keys
    good = rebuild(base, tmp_path / "good.dolly", signer=private)
    evil = rebuild(base, tmp_path / "evil.dolly", signer=private,
                   extra=[member("checkpoint/evil.img", payload=b"planted")])
    fifo = tmp_path / "swap.dolly"
    os.mkfifo(fifo)
    served = []

    def serve() -> None:
        for payload, wait in ((good.read_bytes(), 60.0), (evil.read_bytes(), 3.0)):
            deadline = time.monotonic() + wait
            while True:
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                    break
                except OSError as e:
                    if e.errno != errno.ENXIO or time.monotonic() > deadline:
                        return
                    time.sleep(0.01)
            served.append(len(served))
            os.set_blocking(fd, True)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view[:65536]):]
                # Wait until the reader has closed its end: only a new open can read again.
                poller = select.poll()
                poller.register(fd, select.POLLERR)
                poller.poll(60_000)
            except BrokenPipeError:
                pass
            finally:
                os.close(fd)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    cp = dolly.import_bundle(fifo, client=engine_b, trusted_keys=[public], image_source=default_client())
    server.join(timeout=30)
    try:
        assert served == [0], "the import opened the bundle more than once"
        assert not (cp.images_dir / "evil.img").exists()
    finally:
        dolly.remove_checkpoint(cp)


# --- downgrades --------------------------------------------------------------------------------------


def test_trusted_keys_require_a_signature_even_with_allow_unsigned(base, engine_b, keys, tmp_path):
    private, public = keys
    signed = rebuild(base, tmp_path / "signed.dolly", signer=private)
    stripped = rebuild(signed, tmp_path / "stripped.dolly", drop_signature=True,
                       manifest_edit=lambda m: m.update(signer=None))
    assert_refused(errors.UnsignedBundle, stripped, engine_b, trusted_keys=[public], allow_unsigned=True)
    stripped_sig_only = rebuild(signed, tmp_path / "nosig.dolly", drop_signature=True)
    assert_refused(errors.UnsignedBundle, stripped_sig_only, engine_b, trusted_keys=[public], allow_unsigned=True)


def test_a_lineage_belongs_to_its_signer(source_cp, base, engine_b, keys, tmp_path):
    """An accepted unsigned bundle that claims a container's lineage with a later date does not
    block that container's signed bundles."""
    private, public = keys
    squatter = with_checkpoint_fields(base, tmp_path / "squat.dolly", name="squatter")
    ahead = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()  # within the clock skew allowed
    squatter = rebuild(squatter, tmp_path / "squat2.dolly",
                       manifest_edit=lambda m: m.update(created_at=ahead, expires_at="2999-12-31T00:00:00+00:00"))
    squatted = dolly.import_bundle(squatter, client=engine_b, allow_unsigned=True, image_source=default_client())
    try:
        legit = dolly.export(source_cp, tmp_path / "legit.dolly", signer=private)
        cp = dolly.import_bundle(legit, client=engine_b, trusted_keys=[public], image_source=default_client())
        assert cp.origin["signer"] == trust.key_id(public)
        dolly.remove_checkpoint(cp)
    finally:
        dolly.remove_checkpoint(squatted)


@pytest.mark.parametrize("field", ["expires_at", "created_at"])
def test_a_time_without_a_zone_is_a_bundle_error(base, engine_b, keys, tmp_path, field):
    private, public = keys
    naive = rebuild(base, tmp_path / "naive.dolly", signer=private,
                    manifest_edit=lambda m: m.update({field: "2999-01-01T00:00:00"}))
    assert_refused(errors.BundleError, naive, engine_b, trusted_keys=[public])


# --- images ------------------------------------------------------------------------------------------


@pytest.fixture
def victim_tag(engine_b, client):
    """engine b with ``victim-<run>:latest`` naming the Python image, and without busybox."""
    b = Engine.of(engine_b)
    python_id = client.images.get(PYTHON).id
    b.ensure_image(python_id, None, source=Engine.of(client))
    repo = f"victim-{RUN_ID}"
    engine_b.api.tag(python_id, repo, "latest")
    busybox_id = client.images.get(BUSYBOX).id
    if b.has_image(busybox_id):
        engine_b.images.remove(busybox_id, force=True)
    yield f"{repo}:latest", python_id, busybox_id
    engine_b.images.remove(f"{repo}:latest")


def test_an_import_never_takes_over_a_tag(base, engine_b, keys, tmp_path, victim_tag):
    private, public = keys
    tag, python_id, busybox_id = victim_tag

    def named(m):
        m["image"]["name"] = tag

    # Refused after the image was named: nothing loaded, the tag unmoved.
    hostile = rebuild(base, tmp_path / "refused.dolly", signer=private, manifest_edit=named,
                      replace={"rootfs-diff.tar": rootfs_tar(member("dev/kmem2", type=tarfile.CHRTYPE, devmajor=1))})
    assert_refused(errors.UnsafeArchive, hostile, engine_b, trusted_keys=[public], image_source=default_client())
    assert engine_b.images.get(tag).id == python_id
    assert not Engine.of(engine_b).has_image(busybox_id), "a refused import loaded its image"
    # Accepted: the image comes by ID, the name stays with the image that had it, and no free
    # name is added either (a bundle does not name this engine's images).
    accepted = rebuild(base, tmp_path / "accepted.dolly", signer=private, manifest_edit=named)
    cp = dolly.import_bundle(accepted, client=engine_b, trusted_keys=[public], image_source=default_client())
    try:
        assert engine_b.images.get(tag).id == python_id
        assert Engine.of(engine_b).has_image(busybox_id)
        assert engine_b.images.get(busybox_id).tags == []
    finally:
        dolly.remove_checkpoint(cp)


# --- the writable layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["hardlink-to-symlink", "deleted-beneath-symlink", "beneath-a-file"])
def test_the_layer_cannot_reach_through_links(base, engine_b, keys, tmp_path, case):
    private, public = keys
    entries, deleted = {
        "hardlink-to-symlink": ([member("l", type=tarfile.SYMTYPE, linkname="/etc"),
                                 member("h", type=tarfile.LNKTYPE, linkname="l"),
                                 member("h/dolly-pwned", payload=b"pwned")], []),
        "deleted-beneath-symlink": ([member("s", type=tarfile.SYMTYPE, linkname="/etc")], ["/s/passwd"]),
        "beneath-a-file": ([member("f", payload=b"x"), member("f/g", payload=b"y")], []),
    }[case]
    hostile = rebuild(base, tmp_path / "hostile.dolly", signer=private,
                      replace={"rootfs-diff.tar": rootfs_tar(*entries), "deleted.files": json.dumps(deleted).encode()})
    assert_refused(errors.UnsafeArchive, hostile, engine_b, trusted_keys=[public], image_source=default_client())


# --- no plaintext beside the bundle ------------------------------------------------------------------

_writes: list = []
_watching = threading.Event()


def _audit(event: str, args: tuple) -> None:
    if _watching.is_set() and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        if ((isinstance(mode, str) and any(c in mode for c in "wax+"))
                or (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))):
            _writes.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def writes_during(fn):
    _writes.clear()
    _watching.set()
    try:
        result = fn()
    finally:
        _watching.clear()
    return result, list(_writes)


def test_encrypted_bundles_never_meet_the_disk_in_plaintext(source_cp, client, tmp_path):
    key = trust.generate_encryption_key()
    out = tmp_path / "sealed.dolly"
    spool = str(Engine.of(client).spool_dir)
    _, written = writes_during(lambda: dolly.export(source_cp, out, encryption_key=key, compression="none"))
    beside = [w for w in written if not w.startswith(spool + "/")]
    assert len(beside) == 1 and Path(beside[0]).parent == tmp_path, written
    assert b"manifest.json" not in out.read_bytes()
    manifest, written = writes_during(lambda: dolly._manifest.read_manifest(out, encryption_key=key))
    assert manifest["checkpoint"]["name"] == source_cp.name
    assert written == [], "reading the manifest wrote a decrypted copy"


# --- names of removed containers ---------------------------------------------------------------------


def test_a_name_shared_by_two_removed_containers_is_ambiguous(run, client):
    name = f"dolly-test-twice-{RUN_ID}"
    ids = []
    for _ in range(2):
        c = run(BUSYBOX, ["sh", "-c", COUNTER], name=name)
        dolly.checkpoint(c, "same")
        ids.append(c.id)
        c.remove(force=True)
    try:
        with pytest.raises(errors.InvalidArgument, match="full ID"):
            dolly.get_checkpoint(name, "same")
        assert {dolly.get_checkpoint(i, "same").container_id for i in ids} == set(ids)
    finally:
        for i in ids:
            dolly.remove_checkpoint(dolly.get_checkpoint(i, "same"))


def test_the_command_line_refuses_host_access_unless_allowed(base, engine_b, tmp_path):
    dolly_bin = Path(sys.executable).with_name("dolly")
    hostile = asking_for_host_root(base, tmp_path / "root.dolly")
    before = {str(p) for p in Engine.of(engine_b).store_dir.glob("**/*")}

    def run_import(*extra):
        return subprocess.run([str(dolly_bin), "-H", ENGINE_B_URL, "--json", "import", str(hostile), "--allow-unsigned",
                               "--image-from", "unix:///var/run/docker.sock", *extra],
                              capture_output=True, text=True, timeout=300)

    refused = run_import("--allow", "privileged")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "host-mounts" in refused.stderr and "capabilities" in refused.stderr
    assert {str(p) for p in Engine.of(engine_b).store_dir.glob("**/*")} == before
    accepted = run_import("--allow", "privileged", "--allow", "host-mounts", "--allow", "capabilities")
    assert accepted.returncode == 0, accepted.stderr
    (row,) = json.loads(accepted.stdout)
    cp = dolly.get_checkpoint(row["container_id"], row["name"], engine_b)
    assert cp.origin["allowed"] == ["capabilities", "host-mounts", "privileged"]
    dolly.remove_checkpoint(cp)


# --- what the recorded configuration and the process images may not smuggle ------------------------


def test_field_names_in_another_case_are_refused(base, engine_b, keys, tmp_path):
    """Docker's decoder matches field names in any case: ``binds`` is ``Binds`` to the engine."""
    private, public = keys

    def config_edit(meta):
        meta["config"]["HostConfig"].update({"binds": ["/:/host"], "capadd": ["SYS_ADMIN"]})

    hostile = rebuild(base, tmp_path / "case.dolly", signer=private,
                      replace={"config.dump": edit_config(base, config_edit)})
    with pytest.raises(errors.PolicyRefused) as refused:
        dolly.import_bundle(hostile, client=engine_b, trusted_keys=[public], allow=list(dolly.policy.ITEMS),
                            image_source=default_client())
    assert refused.value.items == ["unknown-fields"] and "HostConfig.binds" in str(refused.value)
    assert_refused(errors.PolicyRefused, hostile, engine_b, trusted_keys=[public], image_source=default_client())


def edited_image(path, member_name, edit) -> bytes:
    """A CRIU image of the bundle at ``path``, loaded with pycriu, changed by ``edit``, dumped."""
    import pycriu.images

    with tarfile.open(path) as tar:
        img = pycriu.images.load(io.BytesIO(tar.extractfile(member_name).read()))
    edit(img)
    out = io.BytesIO()
    pycriu.images.dump(img, out)
    return out.getvalue()


def first_core(path) -> str:
    with tarfile.open(path) as tar:
        return sorted(n for n in tar.getnames() if n.startswith("checkpoint/core-"))[0]


@pytest.mark.parametrize("case,item", [("capabilities", "capabilities"), ("seccomp", "security-options"),
                                       ("unmasked", "security-options")])
def test_process_images_cannot_grant_what_the_configuration_does_not(base, engine_b, keys, tmp_path, case, item):
    private, public = keys
    if case == "unmasked":
        with tarfile.open(base) as tar:
            member = next(n for n in tar.getnames() if n.startswith("checkpoint/mountpoints-"))

        def edit(img):
            img["entries"] = [m for m in img["entries"] if m["mountpoint"] not in ("/proc/keys", "/sys/firmware")]
    else:
        member = first_core(base)

        def edit(img):
            core = img["entries"][0]["thread_core"]
            if case == "capabilities":
                core["creds"]["cap_eff"] = core["creds"]["cap_prm"] = core["creds"]["cap_bnd"] = [0xFFFFFFFF, 0x1FF]
            else:
                core["seccomp_mode"] = "disabled"

    hostile = rebuild(base, tmp_path / "images.dolly", signer=private,
                      replace={member: edited_image(base, member, edit)})
    with pytest.raises(errors.PolicyRefused) as refused:
        dolly.import_bundle(hostile, client=engine_b, trusted_keys=[public], image_source=default_client())
    assert refused.value.items == [item]
    assert_refused(errors.PolicyRefused, hostile, engine_b, trusted_keys=[public], image_source=default_client())


def test_a_bundle_cannot_pass_for_a_checkpoint_of_this_engines_container(source_cp, base, client, engine_b, keys,
                                                                          tmp_path):
    private, public = keys
    signed = rebuild(base, tmp_path / "claim.dolly", signer=private)
    # On the engine that runs the container it claims: refused, and the container's own
    # checkpoints stay the only ones listed for it.
    assert_refused(errors.CheckpointExists, signed, client, trusted_keys=[public])
    assert dolly.list_checkpoints(source_cp.container_id) == [source_cp]
    # Elsewhere the same bundle imports; resume refuses it all the same.
    cp = dolly.import_bundle(signed, client=engine_b, trusted_keys=[public], image_source=default_client())
    try:
        with pytest.raises(errors.InvalidArgument):
            dolly.resume(cp, client=engine_b)
    finally:
        dolly.remove_checkpoint(cp)


def test_a_bundle_from_the_future_is_refused(base, engine_b, keys, tmp_path):
    private, public = keys
    future = rebuild(base, tmp_path / "future.dolly", signer=private,
                     manifest_edit=lambda m: m.update(created_at="2099-01-01T00:00:00+00:00",
                                                      expires_at="2099-12-31T00:00:00+00:00"))
    with pytest.raises(errors.BundleError, match="future"):
        dolly.import_bundle(future, client=engine_b, trusted_keys=[public], image_source=default_client())


def test_export_refuses_a_layer_that_a_bundle_would_blow_up(run, tmp_path):
    """A sparse file allocates next to nothing, but a bundle holds it whole."""
    source = run(BUSYBOX, ["sh", "-c", "truncate -s 100G /huge; " + COUNTER])
    time.sleep(0.5)
    cp = dolly.checkpoint(source, "sparse")
    spool = Engine.of(default_client()).spool_dir
    before = {p.name for p in spool.iterdir()}
    with pytest.raises(errors.InvalidArgument, match="max_bytes"):
        dolly.export(cp, tmp_path / "huge.dolly", compression="zstd")
    assert {p.name for p in spool.iterdir()} == before and list(tmp_path.iterdir()) == []


@pytest.mark.engine  # root: it mounts in a mount namespace of its own
def test_a_remote_engines_paths_are_never_taken_for_local_ones(tmp_path):
    """An engine whose data root is another folder under the same name (its own mount namespace,
    as on another host) is told apart by the folder itself, seen through the process at the other
    end of its socket, not by path names."""
    from dolly._peer import peer_shares_our_files as _peer_shares_our_files

    sock, root = tmp_path / "other.sock", tmp_path / "data-root"
    root.mkdir()
    server = ("import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1); "
              "print('ready', flush=True); c, _ = s.accept(); time.sleep(2)")
    over = f"mount -t tmpfs none {root} && exec {sys.executable} -c \"$0\" \"$1\""
    cases = ((["unshare", "--mount", "--propagation", "private", "sh", "-c", over], False),  # its own folder there
             (["unshare", "--mount", "--propagation", "private", sys.executable, "-c"], True),  # same folder
             ([sys.executable, "-c"], True))
    for command, local in cases:
        sock.unlink(missing_ok=True)
        proc = subprocess.Popen([*command, server, str(sock)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            assert _peer_shares_our_files(str(sock), str(root)) is local
        finally:
            proc.kill()
            proc.wait()


def test_a_working_set_of_more_pages_than_a_record_holds_is_ignored(tmp_path: Path) -> None:
    # split() holds every page at once: a run of 10**15 pages would exhaust the caller's memory.
    from dolly import _working_set as working_set
    record = tmp_path / working_set.FILE
    record.write_text(json.dumps({"format": working_set.FORMAT, "page_size": working_set.PAGE_SIZE,
                                  "binding": "b", "processes": {"1": [[0, 10**15]]}}))
    assert working_set.load(record, "b") is None
    record.write_text(json.dumps({"format": working_set.FORMAT, "page_size": working_set.PAGE_SIZE,
                                  "binding": "b", "processes": {"1": [[0, working_set.MAX_PAGES]]}}))
    assert working_set.load(record, "b") == {1: [(0, working_set.MAX_PAGES)]}


@pytest.mark.parametrize("attrs", [[1], "kept", {"kept": 5}, {"log_path": None}])
def test_an_agent_error_line_with_odd_attributes_is_still_its_dolly_error(attrs: object) -> None:
    # Relay threads catch DollyError, OSError and ValueError: an AttributeError or TypeError from a
    # malformed line would end the thread without breaking the relay off.
    from dolly._hosts.channel import _result
    line = json.dumps({"error": "CheckpointFailed", "message": "it failed", "attrs": attrs}).encode()
    with pytest.raises(errors.CheckpointFailed, match="it failed") as e:
        _result(b"", line + b"\n", 1)
    assert not isinstance(getattr(e.value, "kept", None), int)
