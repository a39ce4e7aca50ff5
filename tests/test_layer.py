"""The writable layer at checkpoint time, and the checkpoint's failure paths, on the real engine:
sparse files stay sparse, a layer over its cap or without room is refused before anything is
dumped, a checkpoint that stopped its container never deletes the only images, checkpoints of one
container do not mix, and the runtime hands CRIU no folder but the container's own."""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List

import pytest

import dolly
from dolly import _rootfs as rootfs, errors
from dolly._archive import tarfile  # the one Dolly reads with: 3.12's, backported to 3.11
from dolly._criu_log import CRIU_LOG_DIR
from dolly._engine import Engine
from dolly._start import clone_config
from helpers import BUSYBOX, COUNTER

checkpoint_module = importlib.import_module("dolly._checkpoint")

MiB = 1 << 20


# --- helpers -----------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def logged(container) -> List[int]:
    """The numbers the COUNTER wrote to stdout, in order."""
    return [int(x) for x in container.logs(stdout=True, stderr=False).decode().split()]


def first_logged(container) -> int:
    wait_for(lambda: logged(container), f"{container.name} to log")
    return logged(container)[0]


def layer_count(cp: dolly.Checkpoint) -> int:
    """The counter's file as the checkpoint's writable layer holds it."""
    with tarfile.open(cp.rootfs_diff) as tar:
        return int(tar.extractfile("./tmp/count").read())


def allocated_bytes(folder: Path) -> int:
    """What the runtime measures: allocated bytes of every entry, hard links once."""
    seen, total = set(), 0
    for path in [folder, *folder.rglob("*")]:
        st = path.lstat()
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        total += st.st_blocks * 512
    return total


def digest_tree(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def nothing_kept(engine: Engine, source) -> None:
    """No checkpoint, staging folder, spool entry or Docker checkpoint folder is left of ``source``."""
    assert dolly.list_checkpoints(source) == []
    store = engine.store_dir / source.id
    assert not store.exists() or list(store.iterdir()) == []
    assert list(engine.checkpoints_dir(source.id).glob("*")) == []
    assert list(engine.spool_dir.glob(f"{source.id}.*")) == []


@contextlib.contextmanager
def spool_on_tmpfs(engine: Engine, source, size: str):
    """The container's own spool folder on a tmpfs of ``size``: a filesystem of its own, small
    if asked. Unmounted and removed afterwards."""
    spool = engine.spool_dir / f"{source.id}.checkpoint"
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "dolly-test-layer", str(spool)],
                   check=True)
    try:
        yield spool
    finally:
        subprocess.run(["umount", str(spool)], check=True)
        shutil.rmtree(spool, ignore_errors=True)


def counter(run, extra: str = ""):
    """A busybox COUNTER, after ``extra`` shell commands; waits until it has counted."""
    c = run(BUSYBOX, ["sh", "-c", (extra + "; " if extra else "") + COUNTER])
    wait_for(lambda: c.exec_run(["cat", "/tmp/count"]).exit_code == 0, "the counter to start")
    c.reload()
    return c


def created_like(engine: Engine, cp: dolly.Checkpoint) -> str:
    """A created (not started) container made like a clone of ``cp``, its layer in place: what
    Docker then starts from a checkpoint folder."""
    image = engine.image_ref(cp.image_id, cp.config["Config"].get("Image"))
    config, _ = clone_config(cp.config, image=image, labels={})
    cid = engine.create(config, f"dolly-test-layer-{uuid.uuid4().hex[:8]}")
    rootfs.apply_diff(cp.rootfs_diff, engine.upper_dir(engine.container(cid)))
    return cid


def name_images(engine: Engine, cid: str, target: str) -> None:
    """Put a checkpoint folder into ``cid``'s own checkpoints folder whose `dolly-images` names
    ``target``, as restore._start_from does with the spool folder."""
    folder = engine.checkpoints_dir(cid) / "hostile"
    folder.mkdir(mode=0o700, parents=True)
    (folder / "dolly-images").write_text(target)


# --- 1. the host made to write without limit --------------------------------------------------


def test_sparse_file_is_taken_sparse_and_restored_sparse(run, engine):
    size, mark_at = 2 << 30, 1_000_000_000
    source = counter(run, f"truncate -s {size} /tmp/sparse && "
                          f"printf MARK | dd of=/tmp/sparse bs=1 seek={mark_at} conv=notrunc")
    cp = dolly.checkpoint(source, "sparse")
    # The archive holds the data, not the holes (without --sparse it was 2 GiB).
    assert cp.rootfs_diff.stat().st_size < 1 * MiB
    (clone,) = dolly.clone(cp, 1)
    held = engine.upper_dir(clone) / "tmp" / "sparse"
    st = held.stat()
    assert st.st_size == size
    assert st.st_blocks * 512 < 1 * MiB  # GNU tar unpacked it sparse
    with open(held, "rb") as f:
        f.seek(mark_at)
        assert f.read(4) == b"MARK"
    res = clone.exec_run(["dd", "if=/tmp/sparse", "bs=1", f"skip={mark_at}", "count=4"], stderr=False)
    assert res.output == b"MARK"


@pytest.mark.parametrize("leave_running", [True, False])
def test_layer_over_the_cap_is_refused_and_the_source_untouched(run, engine, leave_running):
    source = counter(run, "dd if=/dev/urandom of=/tmp/blob bs=1M count=4 2>/dev/null")
    pid, started = source.attrs["State"]["Pid"], source.attrs["State"]["StartedAt"]
    with pytest.raises(errors.CheckpointFailed) as info:
        dolly.checkpoint(source, "capped", leave_running=leave_running, max_layer_bytes=1 * MiB)
    message = str(info.value)
    # The layer's size (its 4 MiB file, the counter's few bytes), the cap, and how to raise it.
    layer = int(re.search(r"\((\d+) bytes allocated\)", message).group(1))
    assert 4 * MiB <= layer <= allocated_bytes(engine.upper_dir(source)) + 64 * 1024
    assert f"over the cap of 1.0 MiB ({1 * MiB} bytes)" in message
    assert "max_layer_bytes=" in message
    assert info.value.kept is None
    source.reload()
    # The very same process: never dumped, stopped or restored.
    assert source.status == "running"
    assert (source.attrs["State"]["Pid"], source.attrs["State"]["StartedAt"]) == (pid, started)
    nothing_kept(engine, source)
    # With the cap raised, the same container is checkpointed.
    cp = dolly.checkpoint(source, "roomy", leave_running=leave_running, max_layer_bytes=64 * MiB)
    assert (cp.path / "criu" / "inventory.img").is_file()
    with tarfile.open(cp.rootfs_diff) as tar:
        assert tar.getmember("./tmp/blob").size == 4 * MiB


def test_max_layer_bytes_must_be_a_positive_int(run):
    source = counter(run)
    for bad in (0, -1, 1.5, True, "1", 10**19):
        with pytest.raises(errors.InvalidArgument):
            dolly.checkpoint(source, "bad", max_layer_bytes=bad)


def test_no_room_for_the_layer_is_refused_and_the_source_untouched(run, engine):
    source = counter(run, "dd if=/dev/urandom of=/tmp/blob bs=1M count=8 2>/dev/null")
    pid = source.attrs["State"]["Pid"]
    # The destination's filesystem, made small: this container's own spool folder on a tmpfs.
    with spool_on_tmpfs(engine, source, "4m"):
        with pytest.raises(errors.CheckpointFailed) as info:
            dolly.checkpoint(source, "full", leave_running=False)
        assert info.value.kept is None
    message = str(info.value)
    found = re.search(r"needs .* \((\d+) bytes\) in .* has .* \((\d+) bytes\) free", message)
    assert found, message
    need, avail = int(found.group(1)), int(found.group(2))
    assert need >= 8 * MiB and avail <= 4 * MiB
    assert "Nothing was dumped" in message
    source.reload()
    assert source.status == "running" and source.attrs["State"]["Pid"] == pid
    nothing_kept(engine, source)


def test_layer_is_taken_at_the_instant_of_the_dump(run):
    """The runtime archives the layer before CRIU dumps, both inside containerd's pause: the
    file and the memory of a counter agree."""
    source = counter(run)
    cp = dolly.checkpoint(source, "instant", leave_running=False)
    source.reload()
    assert source.status == "exited"
    last = logged(source)[-1]  # the value in memory when it was dumped (it echoes, then writes)
    assert layer_count(cp) in (last - 1, last)
    (clone,) = dolly.clone(cp, 1)
    assert first_logged(clone) == last + 1


# --- 2. lost data -----------------------------------------------------------------------------


# A host without pycriu: Dolly cannot read the UTS image after the dump.
WITHOUT_PYCRIU = """
import importlib, json, sys
sys.modules["pycriu"] = None
sys.modules["pycriu.images"] = None
import dolly
from dolly import errors
"""
CHECKPOINT_WITHOUT_PYCRIU = WITHOUT_PYCRIU + """
try:
    dolly.checkpoint(sys.argv[1], "stopped", leave_running=False)
    print(json.dumps({"error": None}))
except errors.CheckpointFailed as e:
    print(json.dumps({"error": type(e).__name__, "kept": str(e.kept) if e.kept else None, "message": str(e)}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "kept": None, "message": str(e)}))
"""
RESUME_WITHOUT_PYCRIU = WITHOUT_PYCRIU + """
cp = importlib.import_module("dolly._checkpoint").Checkpoint.load(sys.argv[2])
print(dolly.resume(cp, sys.argv[1]).status)
"""


def test_a_stopping_checkpoint_that_fails_after_the_dump_keeps_the_images(run, engine):
    source = counter(run)
    before = logged(source)[-1]
    res = subprocess.run([sys.executable, "-c", CHECKPOINT_WITHOUT_PYCRIU, source.id],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["error"] == "CheckpointFailed", out
    assert out["kept"] == str(engine.store_dir / source.id / "stopped"), out
    kept = Path(out["kept"])
    assert (kept / "criu" / "inventory.img").is_file()
    meta = json.loads((kept / "dolly.json").read_text())
    assert meta["complete"] is False
    assert meta["hostname"] == source.attrs["Config"]["Hostname"]  # pycriu could not read the image
    assert "pycriu" in meta["failure"]
    source.reload()
    assert source.status == "exited"
    at_checkpoint = logged(source)
    assert at_checkpoint[-1] >= before
    # Its own writable layer still holds what the process wrote last.
    held = int((engine.upper_dir(source) / "tmp" / "count").read_text())
    assert held in (at_checkpoint[-1] - 1, at_checkpoint[-1])

    cp = checkpoint_module.Checkpoint.load(kept)
    assert dolly.list_checkpoints(source) == [cp]
    # Started again from the kept images, on the same host without pycriu.
    res = subprocess.run([sys.executable, "-c", RESUME_WITHOUT_PYCRIU, source.id, str(kept)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.split()[-1] == "running", res.stderr
    resumed = engine.container(source.id)
    wait_for(lambda: len(logged(resumed)) > len(at_checkpoint), "the resumed counter to log")
    # It continues from the value it had at the checkpoint, not from 1.
    assert logged(resumed)[len(at_checkpoint)] == at_checkpoint[-1] + 1


def test_images_kept_when_they_cannot_be_moved_into_the_store(run, engine):
    """The spool on a filesystem of its own: its rename into the store fails after the dump stopped
    the container; the images are copied into the store instead of deleted."""
    source = counter(run)
    with spool_on_tmpfs(engine, source, "256m"):
        with pytest.raises(errors.CheckpointFailed) as info:
            dolly.checkpoint(source, "moved", leave_running=False)
    kept = info.value.kept
    assert kept == engine.store_dir / source.id / "moved"
    assert isinstance(info.value.__cause__, OSError)  # a mount point cannot be renamed (EBUSY)
    assert (kept / "criu" / "inventory.img").is_file() and (kept / "rootfs-diff.tar").is_file()
    assert json.loads((kept / "dolly.json").read_text())["complete"] is False
    source.reload()
    at_checkpoint = logged(source)
    assert layer_count(checkpoint_module.Checkpoint.load(kept)) in (at_checkpoint[-1] - 1, at_checkpoint[-1])
    resumed = dolly.resume(checkpoint_module.Checkpoint.load(kept), source.id)
    wait_for(lambda: len(logged(resumed)) > len(at_checkpoint), "the resumed counter to log")
    assert logged(resumed)[len(at_checkpoint)] == at_checkpoint[-1] + 1


def test_a_stopping_checkpoint_refused_before_the_dump_keeps_nothing(run, engine):
    source = counter(run, "dd if=/dev/urandom of=/tmp/blob bs=1M count=2 2>/dev/null")
    with pytest.raises(errors.CheckpointFailed) as info:
        dolly.checkpoint(source, "refused", leave_running=False, max_layer_bytes=1 * MiB)
    assert info.value.kept is None
    source.reload()
    assert source.status == "running"
    nothing_kept(engine, source)


# --- 3. concurrent checkpoints of one container -----------------------------------------------


def test_two_threads_checkpoint_one_container(run, engine):
    source = counter(run)
    made: Dict[str, dolly.Checkpoint] = {}
    failures: List[BaseException] = []

    def take(name: str) -> None:
        try:
            made[name] = dolly.checkpoint(source, name)
        except BaseException as e:  # collected: the assertion below shows them
            failures.append(e)

    threads = [threading.Thread(target=take, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert sorted(cp.name for cp in dolly.list_checkpoints(source)) == ["one", "two"]
    assert not (engine.spool_dir / f"{source.id}.checkpoint").exists()
    for cp in made.values():
        # Each checkpoint's memory is its own, matching its own layer.
        (clone,) = dolly.clone(cp, 1)
        assert layer_count(cp) in (first_logged(clone) - 1, first_logged(clone) - 2)
    source.reload()
    assert source.status == "running"


# --- 4. the runtime's image folders -----------------------------------------------------------


@pytest.mark.parametrize("how", ["dotdot", "symlink", "other-container"])
def test_restore_only_from_the_containers_own_spool_folder(run, engine, tmp_path, how, busybox_checkpoint):
    cp = busybox_checkpoint
    cid = created_like(engine, cp)
    own = engine.spool_dir / f"{cid}.restore"
    if how == "other-container":
        elsewhere = engine.spool_dir / f"{cp.container_id}.restore"
        assert not elsewhere.exists()
    else:
        # Shaped like a spool folder, to pass a check of the name alone.
        elsewhere = tmp_path / "dolly" / "spool" / f"{cid}.restore"
    elsewhere.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(cp.images_dir, elsewhere)  # images CRIU could restore from
    before = digest_tree(elsewhere)
    try:
        if how == "dotdot":
            target = str(engine.spool_dir) + "/.." * 8 + str(elsewhere)
        elif how == "symlink":
            own.parent.mkdir(parents=True, exist_ok=True)
            own.symlink_to(elsewhere)
            target = str(own)
        else:
            target = str(elsewhere)
        name_images(engine, cid, target)
        with pytest.raises(errors.RestoreFailed) as info:
            engine.start_from_checkpoint(cid, "hostile")
        assert "refusing image folder" in str(info.value)
        assert not engine.container(cid).attrs["State"]["Running"]
        assert digest_tree(elsewhere) == before
    finally:
        if own.is_symlink():
            own.unlink()
        shutil.rmtree(elsewhere, ignore_errors=True)
        engine.remove(cid)


def test_restore_from_the_own_spool_folder_still_works(engine, busybox_checkpoint):
    cp = busybox_checkpoint
    cid = created_like(engine, cp)
    own = engine.spool_dir / f"{cid}.restore"
    try:
        shutil.copytree(cp.images_dir, own)
        name_images(engine, cid, str(own))
        engine.start_from_checkpoint(cid, "hostile")
        assert engine.container(cid).attrs["State"]["Running"]
    finally:
        shutil.rmtree(own, ignore_errors=True)
        engine.remove(cid)


def test_checkpoint_spool_reached_by_a_symlink_is_refused(run, engine, tmp_path):
    source = counter(run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spool = engine.spool_dir / f"{source.id}.checkpoint"
    spool.parent.mkdir(parents=True, exist_ok=True)
    spool.symlink_to(elsewhere)
    try:
        with pytest.raises(errors.CheckpointFailed) as info:
            engine.create_checkpoint(source.id, "hostile", exit=False)
        assert "refusing spool folder" in str(info.value)
        assert list(elsewhere.iterdir()) == []
    finally:
        spool.unlink()
    source.reload()
    assert source.status == "running"
    assert dolly.checkpoint(source, "after").name == "after"  # Dolly's own spool folder is fine


# --- root-only files ---------------------------------------------------------------------------


def test_spool_store_and_criu_logs_are_root_only(run, engine, busybox_checkpoint):
    source = counter(run)
    cp = dolly.checkpoint(source, "private")
    assert stat.S_IMODE(engine.spool_dir.stat().st_mode) == 0o700
    for path in [cp.path, *cp.path.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path

    # A restore CRIU fails (images without their process tree): the runtime keeps CRIU's log.
    cid = created_like(engine, busybox_checkpoint)
    own = engine.spool_dir / f"{cid}.restore"
    shutil.copytree(busybox_checkpoint.images_dir, own)
    (own / "pstree.img").unlink()
    try:
        name_images(engine, cid, str(own))
        with pytest.raises(errors.RestoreFailed) as info:
            engine.start_from_checkpoint(cid, "hostile")
        log = info.value.log_path
        assert log == CRIU_LOG_DIR / f"{cid}.restore.log" and log.is_file()
        assert stat.S_IMODE(CRIU_LOG_DIR.stat().st_mode) == 0o700
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
    finally:
        shutil.rmtree(own, ignore_errors=True)
        engine.remove(cid)
        (CRIU_LOG_DIR / f"{cid}.restore.log").unlink(missing_ok=True)


# --- bundles -----------------------------------------------------------------------------------


def test_sparse_layer_survives_a_bundle(run, engine, tmp_path):
    from dolly import _transfer as bundle

    source = counter(run, "truncate -s 64M /tmp/sparse && "
                          "printf MARK | dd of=/tmp/sparse bs=1 seek=1000000 conv=notrunc")
    cp = dolly.checkpoint(source, "bundled")
    out = bundle.export(cp, tmp_path / "b.dolly", compression="zstd")
    dolly.remove_checkpoint(cp)
    source.remove(force=True)  # a bundle never passes for a checkpoint of a container the engine runs
    imported = bundle.import_bundle(out, allow_unsigned=True)
    try:
        (clone,) = dolly.clone(imported, 1)
        res = clone.exec_run(["dd", "if=/tmp/sparse", "bs=1", "skip=1000000", "count=4"], stderr=False)
        assert res.output == b"MARK"
    finally:
        dolly.remove_checkpoint(imported)


def test_a_restore_leaves_no_containerd_temporary_folder(run):
    """containerd unpacks a start's checkpoint into /tmp/ctrd-checkpoint* and never removes it
    (containerd#10166); with Dolly's spool that folder holds only the pointer file, which the
    runtime removes after the restore."""
    cp = dolly.checkpoint(counter(run), "tmp")
    clones = dolly.clone(cp, 2)
    pointers = [p for p in Path("/tmp").glob("ctrd-checkpoint*/dolly-images")
                if any(f"{c.id}.restore" in p.read_text(errors="replace") for c in clones)]
    assert pointers == [], "containerd's temporary folders of these clones were left in /tmp"


def test_a_stopping_checkpoint_of_a_container_with_a_restart_policy_keeps_it_stopped(run, client):
    """Docker restarts a container with a restart policy when a dump stops it, from scratch, on
    its own files: the checkpoint would no longer match anything. The policy is set aside for the
    dump and put back after."""
    source = run(BUSYBOX, ["sh", "-c", COUNTER], restart_policy={"Name": "always"})
    time.sleep(0.5)
    cp = dolly.checkpoint(source, "stop", leave_running=False)
    time.sleep(2)  # Docker's restart manager acts within a second of the exit
    source.reload()
    assert source.status == "exited" and source.attrs["RestartCount"] == 0
    assert source.attrs["HostConfig"]["RestartPolicy"]["Name"] == "always"
    resumed = dolly.resume(cp)
    assert resumed.status == "running"


def test_a_large_writable_layer_is_shared_by_clones_as_an_image_layer(run, client, engine):
    # 24 MiB of data, a deleted file, and a folder deleted and made again (opaque in overlayfs).
    source = run(BUSYBOX, ["sh", "-c", "mkdir /data; head -c 25165824 /dev/urandom > /data/big; rm /etc/group; "
                                       "rm -rf /var; mkdir /var; echo v > /var/new; " + COUNTER])
    time.sleep(1.5)
    digest = source.exec_run(["sha256sum", "/data/big"]).output.split()[0]
    cp = dolly.checkpoint(source, "large")
    with tarfile.open(cp.rootfs_diff) as tar:
        at = int(tar.extractfile("./tmp/count").read())
    clones = dolly.clone(cp, 2)
    time.sleep(0.5)
    for c in clones:
        # The layer came as an image layer: the one under cp.layer_image, by ID (see shared_layer).
        assert c.attrs["Image"] == engine.image_id(cp.layer_image)
        assert not (engine.upper_dir(c) / "data").exists(), "the layer was unpacked into the clone too"
        assert c.exec_run(["sha256sum", "/data/big"]).output.split()[0] == digest
        assert c.exec_run(["test", "-e", "/etc/group"]).exit_code == 1, "a deleted file came back"
        assert c.exec_run(["ls", "/var"]).output.split() == [b"new"], "the image's /var came back under it"
        logged = [int(x) for x in c.logs().decode().split()]
        assert logged and min(logged) in (at + 1, at + 2), (at, logged[:3])
    # A clone's writes are its own: overlayfs copies the file up.
    clones[0].exec_run(["sh", "-c", "echo more >> /data/big"])
    assert clones[1].exec_run(["sha256sum", "/data/big"]).output.split()[0] == digest
    assert clones[0].exec_run(["sha256sum", "/data/big"]).output.split()[0] != digest

    # The shared layer outlives the checkpoint while a clone runs on it, and while a checkpoint
    # taken of such a clone records it as its image; prune removes it after.
    clones[0].remove(force=True)
    of_clone = dolly.checkpoint(clones[1], "of-a-clone")
    dolly.remove_checkpoint(cp)
    assert engine.has_image(cp.layer_image)
    assert clones[1].exec_run(["sha256sum", "/data/big"]).output.split()[0] == digest
    clones[1].remove(force=True)
    dolly.prune(labels={"nothing": "matches"})  # prunes no checkpoint, but unused layer images
    assert engine.has_image(cp.layer_image), "removed the image a checkpoint records"
    (again,) = dolly.clone(of_clone, 1)
    assert again.exec_run(["sha256sum", "/data/big"]).output.split()[0] == digest
    again.remove(force=True)
    dolly.remove_checkpoint(of_clone)
    dolly.prune(labels={"nothing": "matches"})
    assert not engine.has_image(cp.layer_image) and not engine.has_image(of_clone.layer_image)
