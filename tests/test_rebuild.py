"""Imported checkpoints restore only what Docker would have made (dolly._rebuild).

Each test crafts one of the images that decide privilege in a real checkpoint's bundle, imports
it unsigned with nothing allowed into a second engine, and checks what the clone got against what
Docker makes for the recorded configuration: refused where the checkpoint asks for a mount Docker
would not make, rebuilt where it edits one Docker does make, its cgroups or its seccomp filter.
"""
from __future__ import annotations

import base64
import contextlib
import io
import uuid

import docker
import pytest
from test_hostile import edited_image

import dolly
from dolly import errors
from dolly._archive import tarfile
from dolly._engine import Engine, default_client
from bundles import assert_refused, edit_config, rebuild
from helpers import BUSYBOX, RUN_ID, TEST_LABEL

# Tries unshare(CLONE_NEWUSER), which Docker's seccomp profile refuses to a container without
# CAP_SYS_ADMIN, and records whether it worked, 10 times a second; counts beside it.
UNSHARE = ("i=0; while true; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/count; "
           "if unshare -U true 2>/dev/null; then echo yes > /tmp/u.new; else echo no > /tmp/u.new; fi; "
           "mv /tmp/u.new /tmp/u; sleep 0.1; done")


@pytest.fixture
def unshare_bundle(run, tmp_path):
    source = run(BUSYBOX, ["sh", "-c", UNSHARE])
    _wait_file(source, "/tmp/u")
    assert _read(source, "/tmp/u") == "no", "Docker's seccomp profile should refuse unshare -U"
    cp = dolly.checkpoint(source, "seccomp")
    return dolly.export(cp, tmp_path / "base.dolly", compression="none")


@pytest.fixture
def base(source_cp, tmp_path):
    return dolly.export(source_cp, tmp_path / "base.dolly", compression="none")


def _read(container, path: str) -> str:
    code, out = container.exec_run(["cat", path])
    return out.decode().strip() if code == 0 else ""


def _wait_file(container, path: str, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not _read(container, path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def _member(path, prefix: str) -> str:
    with tarfile.open(path) as tar:
        return next(n for n in tar.getnames() if n.startswith(prefix))


def _import(bundle, engine_b):
    return dolly.import_bundle(bundle, client=engine_b, allow_unsigned=True, image_source=default_client())


def _clone(cp, engine_b):
    (clone,) = dolly.clone(cp, 1, labels={TEST_LABEL: RUN_ID})
    return clone


@pytest.fixture
def b_cleanup(engine_b):
    """Removes what a test made on the second engine: clones and imported checkpoints."""
    made = []
    yield made
    for cp in made:
        for c in engine_b.containers.list(all=True, filters={"label": f"dolly.source={cp.container_id}"}):
            c.remove(force=True, v=True)
        dolly.remove_checkpoint(cp)


# --- mounts -----------------------------------------------------------------------------------------


def _add_mount(same_dev_as=None, **entry):
    """An edit adding a mount below the root; with ``same_dev_as``, a bind of the file system
    mounted there (CRIU takes mounts of one device for binds of one another)."""
    def edit(img):
        entries = img["entries"]
        root = next(e for e in entries if e["mountpoint"] == "/")
        if same_dev_as is not None:
            entry["root_dev"] = next(e for e in entries if e["mountpoint"] == same_dev_as)["root_dev"]
        new = {"mnt_id": max(e["mnt_id"] for e in entries) + 1, "parent_mnt_id": root["mnt_id"], "root": "/",
               "flags": 0, "sb_flags": 0, "source": "none", "options": "", "shared_id": 0, "master_id": 0,
               "root_dev": 4242}
        new.update(entry)
        entries.insert(0, new)
    return edit


@pytest.mark.parametrize("case", ["second procfs", "bind climbing out of the root", "overlay of host folders"])
def test_a_mount_docker_would_not_make_is_refused(base, engine_b, tmp_path, case):
    if case == "second procfs":
        edit = _add_mount(mountpoint="/mnt/proc", fstype=1, source="proc")
    elif case == "bind climbing out of the root":
        edit = _add_mount(mountpoint="/mnt/host", fstype=17, root="/../../../../../..", source="overlay",
                          same_dev_as="/")
    else:
        edit = _add_mount(mountpoint="/mnt/o", fstype=17, source="overlay",
                          options="lowerdir=/etc,upperdir=/tmp/u,workdir=/tmp/w")
    member = _member(base, "checkpoint/mountpoints-")
    hostile = rebuild(base, tmp_path / "mounts.dolly", replace={member: edited_image(base, member, edit)})
    with pytest.raises(errors.UnsafeArchive, match="mounts that Docker does not make"):
        _import(hostile, engine_b)
    assert_refused(errors.UnsafeArchive, hostile, engine_b, allow_unsigned=True, image_source=default_client())


def test_a_mount_docker_makes_is_made_again_from_the_configuration(base, engine_b, tmp_path, b_cleanup):
    """/proc/bus is a read-only bind of the container's procfs at its /bus; the bundle points it
    at the procfs's root with '..' and makes it writable: the clone gets Docker's."""
    member = _member(base, "checkpoint/mountpoints-")
    original = {}

    def edit(img):
        entry = next(e for e in img["entries"] if e["mountpoint"] == "/proc/bus")
        original.update(entry)
        entry["root"] = "/bus/../.."
        entry["flags"] = entry["flags"] & ~1  # MS_RDONLY off

    hostile = rebuild(base, tmp_path / "bus.dolly", replace={member: edited_image(base, member, edit)})
    cp = _import(hostile, engine_b)
    b_cleanup.append(cp)
    from dolly import _images as criu_images

    stored = criu_images.load_image(next(cp.images_dir.glob("mountpoints-*.img")))["entries"]
    bus = next(e for e in stored if e["mountpoint"] == "/proc/bus")
    assert (bus["root"], bus["flags"]) == (original["root"], original["flags"])
    clone = _clone(cp, engine_b)
    code, out = clone.exec_run(["sh", "-c", "grep ' /proc/bus ' /proc/1/mountinfo"])
    assert code == 0 and " ro," in out.decode() + ",", out


# --- cgroups ----------------------------------------------------------------------------------------


def test_cgroup_paths_are_the_clones_own(base, engine_b, tmp_path, b_cleanup):
    member = "checkpoint/cgroup.img"

    def edit(img):
        entry = img["entries"][0]
        for cg_set in entry["sets"]:
            for ctl in cg_set["ctls"]:
                ctl["path"] = "/"
        for controller in entry["controllers"]:
            controller.pop("dirs", None)  # pycriu writes no empty list

    hostile = rebuild(base, tmp_path / "cgroup.dolly", replace={member: edited_image(base, member, edit)})
    cp = _import(hostile, engine_b)
    b_cleanup.append(cp)
    clone = _clone(cp, engine_b)
    code, out = clone.exec_run(["cat", "/proc/1/cgroup"])
    lines = [line.split(":", 2) for line in out.decode().splitlines()]
    assert code == 0 and lines
    for _, controllers, path in lines:
        if controllers in ("devices", "memory", "pids", "cpu,cpuacct", "blkio", "freezer"):
            assert clone.id in path, f"the restored process is in {path!r} for {controllers}, not the clone's own"


# --- seccomp ----------------------------------------------------------------------------------------

# A classic BPF program of one instruction: return SECCOMP_RET_ALLOW (BPF_RET|BPF_K, k=0x7fff0000).
# pycriu carries bytes fields as base64 text.
ALLOW_ALL = base64.b64encode(bytes([0x06, 0, 0, 0, 0, 0, 0xFF, 0x7F])).decode()


def test_a_filter_that_allows_everything_is_replaced_by_dockers(unshare_bundle, engine_b, tmp_path, b_cleanup):
    member = "checkpoint/seccomp.img"

    def edit(img):
        for f in img["entries"][0]["seccomp_filters"]:
            f["filter"] = ALLOW_ALL

    hostile = rebuild(unshare_bundle, tmp_path / "seccomp.dolly",
                      replace={member: edited_image(unshare_bundle, member, edit)})
    cp = _import(hostile, engine_b)
    b_cleanup.append(cp)
    clone = _clone(cp, engine_b)
    before = int(_read(clone, "/tmp/count") or 0)
    import time

    deadline = time.monotonic() + 10
    while int(_read(clone, "/tmp/count") or 0) < before + 3:  # the restored loop ran unshare again
        assert time.monotonic() < deadline, "the clone's loop does not run"
        time.sleep(0.1)
    assert _read(clone, "/tmp/u") == "no", "the clone's process may create user namespaces: its filter is not Docker's"


# --- networks ---------------------------------------------------------------------------------------


@pytest.fixture
def victim_network(engine_b):
    net = engine_b.networks.create(f"dolly-test-{uuid.uuid4().hex[:8]}", driver="bridge", internal=True,
                                   ipam=docker.types.IPAMConfig(pool_configs=[
                                       docker.types.IPAMPool(subnet="10.213.131.0/24")]),
                                   labels={TEST_LABEL: RUN_ID})
    yield net
    net.reload()
    for c in net.containers:
        c.remove(force=True, v=True)
    net.remove()


def test_recorded_networks_and_aliases_are_not_joined_unless_allowed(base, engine_b, tmp_path, b_cleanup,
                                                                       victim_network):
    def edit(meta):
        meta["config"]["HostConfig"]["NetworkMode"] = victim_network.name
        meta["config"]["NetworkSettings"]["Networks"] = {
            victim_network.name: {"Aliases": ["db"], "DriverOpts": {"com.docker.network.endpoint.x": "1"}}}

    hostile = rebuild(base, tmp_path / "net.dolly", replace={"config.dump": edit_config(base, edit)})
    cp = _import(hostile, engine_b)
    b_cleanup.append(cp)
    clone = _clone(cp, engine_b)
    clone.reload()
    assert set(clone.attrs["NetworkSettings"]["Networks"]) == {"bridge"}
    victim_network.reload()
    assert [c.id for c in victim_network.containers] == []


def test_recorded_networks_are_joined_when_allowed(base, engine_b, tmp_path, b_cleanup, victim_network):
    def edit(meta):
        meta["config"]["HostConfig"]["NetworkMode"] = victim_network.name
        meta["config"]["NetworkSettings"]["Networks"] = {victim_network.name: {"Aliases": ["db"]}}

    hostile = rebuild(base, tmp_path / "net.dolly", replace={"config.dump": edit_config(base, edit)})
    cp = dolly.import_bundle(hostile, client=engine_b, allow_unsigned=True, allow=["networks"],
                             image_source=default_client())
    b_cleanup.append(cp)
    clone = _clone(cp, engine_b)
    clone.reload()
    endpoints = clone.attrs["NetworkSettings"]["Networks"]
    assert set(endpoints) == {victim_network.name} and "db" in (endpoints[victim_network.name]["Aliases"] or [])


def test_a_reference_leaves_nothing_on_the_engine(base, engine_b, b_cleanup):
    before = {c.id for c in engine_b.containers.list(all=True)}
    store = Engine.of(engine_b).store_dir
    cp = _import(base, engine_b)
    b_cleanup.append(cp)
    assert {c.id for c in engine_b.containers.list(all=True)} == before
    assert not list(store.glob("*/reference")), "the reference checkpoint was left in the store"


# --- namespaces -------------------------------------------------------------------------------------


def _first_task_ids(path) -> dict:
    import pycriu.images

    with tarfile.open(path) as tar:
        def load(name):
            return pycriu.images.load(io.BytesIO(tar.extractfile(f"checkpoint/{name}").read()))["entries"][0]

        return load(f"ids-{load('pstree.img')['pid']}.img")


@pytest.mark.parametrize("keys", [("mnt_ns_id",), ("ipc_ns_id", "uts_ns_id"), ("net_ns_id",), ("pid_ns_id",)])
def test_a_first_task_in_the_hosts_namespaces_is_refused(base, engine_b, tmp_path, keys):
    """CRIU makes no namespace where the first task's id equals the inventory's root_ids: the
    task would stay in CRIU's own, the host's (its mount namespace: the host's files as its root)."""
    first = _first_task_ids(base)

    def edit(img):
        for key in keys:
            img["entries"][0]["root_ids"][key] = first[key]

    member = "checkpoint/inventory.img"
    hostile = rebuild(base, tmp_path / "ns.dolly", replace={member: edited_image(base, member, edit)})
    with pytest.raises(errors.UnsafeArchive, match="namespaces other than those Docker makes"):
        _import(hostile, engine_b)
    assert_refused(errors.UnsafeArchive, hostile, engine_b, allow_unsigned=True, image_source=default_client())


def test_a_user_namespace_docker_does_not_make_is_refused(base, engine_b, tmp_path):
    """A root_ids user namespace that no task shares has CRIU make one, with maps of the
    checkpoint's choosing: root in it holds every capability over what it maps."""
    def edit(img):
        img["entries"][0]["root_ids"]["user_ns_id"] = 4242

    member = "checkpoint/inventory.img"
    hostile = rebuild(base, tmp_path / "userns.dolly", replace={member: edited_image(base, member, edit)})
    with pytest.raises(errors.UnsafeArchive, match="namespaces other than those Docker makes"):
        _import(hostile, engine_b)
    assert_refused(errors.UnsafeArchive, hostile, engine_b, allow_unsigned=True, image_source=default_client())


# --- files ------------------------------------------------------------------------------------------

FOWN = {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0}


def _add_file(entry):
    def edit(img):
        entry["id"] = max(e["id"] for e in img["entries"]) + 1
        img["entries"].append(entry)
    return edit


@pytest.mark.parametrize("case", ["fanotify", "namespace file", "inotify without a path", "separate image"])
def test_descriptors_criu_would_open_beyond_the_container_are_refused(base, engine_b, tmp_path, case):
    """A fanotify mark on a whole file system (the host's, through a bind Docker makes) hands
    the clone every file of it, writable: CRIU restores it as root. Refused, with its kin."""
    member = "checkpoint/files.img"
    if case == "fanotify":
        edit = _add_file({"type": "FANOTIFY", "ffy": {"id": 0, "flags": 2, "fown": FOWN, "faflags": 0,
                                                       "evflags": 2}})
    elif case == "namespace file":
        edit = _add_file({"type": "NS", "nsf": {"id": 0, "ns_id": 1, "ns_cflag": 0x20000, "flags": 0}})
    elif case == "inotify without a path":
        edit = _add_file({"type": "INOTIFY", "ify": {"id": 0, "flags": 0, "fown": FOWN, "wd": [
            {"id": 0, "i_ino": 2, "mask": 0x20, "ignored_mask": 0, "s_dev": 0xFE00000, "wd": 1,
             "f_handle": {"bytes": 8, "type": 1, "handle": [2, 0]}}]}})
    if case == "separate image":
        import pycriu.images

        out = io.BytesIO()
        pycriu.images.dump({"magic": "FANOTIFY_FILE", "entries": [
            {"id": 1, "flags": 2, "fown": FOWN, "faflags": 0, "evflags": 2}]}, out)
        replace = {"checkpoint/fanotify.img": out.getvalue()}
    else:
        replace = {member: edited_image(base, member, edit)}
    hostile = rebuild(base, tmp_path / "files.dolly", replace=replace)
    with pytest.raises(errors.UnsafeArchive, match=r"beyond the container|outside the container"):
        _import(hostile, engine_b)
    assert_refused(errors.UnsafeArchive, hostile, engine_b, allow_unsigned=True, image_source=default_client())


# --- what an agent sends ----------------------------------------------------------------------------


def test_a_copy_an_agent_sends_is_rebuilt_too(client, host_b, host_b_engine):
    """clone(..., engines=[client]) of a checkpoint on another host: the copy streams from that
    engine's agent, and is from outside like any import. Its cgroup image, edited on that host
    (a lying agent would send the same), puts the process in the host's root cgroups; the clone
    here is in its own."""
    source = host_b.containers.run(BUSYBOX, ["sh", "-c", "while true; do sleep 0.2; done"], detach=True,
                                   labels={TEST_LABEL: RUN_ID})
    cp = None
    try:
        cp = dolly.checkpoint(source.id, "lying", client=host_b)
        image = host_b_engine.data_root / cp.images_dir.relative_to("/var/lib/docker") / "cgroup.img"
        import pycriu.images

        with open(image, "rb") as f:
            img = pycriu.images.load(f)
        for cg_set in img["entries"][0]["sets"]:
            for ctl in cg_set["ctls"]:
                ctl["path"] = "/"
        for controller in img["entries"][0]["controllers"]:
            controller.pop("dirs", None)
        with open(image, "wb") as f:
            pycriu.images.dump(img, f)
        (clone,) = dolly.clone(cp, 1, engines=[client], labels={TEST_LABEL: RUN_ID})
        code, out = clone.exec_run(["cat", "/proc/1/cgroup"])
        lines = [line.split(":", 2) for line in out.decode().splitlines()]
        assert code == 0 and lines
        for _, controllers, path in lines:
            if controllers in ("devices", "memory", "pids"):
                assert clone.id in path, f"the restored process is in {path!r} for {controllers}"
    finally:
        source.remove(force=True)
        if cp is not None:
            dolly.remove_checkpoint(cp)
            with contextlib.suppress(errors.ContainerNotFound):  # none made here
                for copy in dolly.list_checkpoints(cp.container_id, client=client):  # kept by the spread
                    dolly.remove_checkpoint(copy)


# --- limits -----------------------------------------------------------------------------------------


def test_oom_score_and_limits_are_dockers_not_the_checkpoints(base, engine_b, tmp_path, b_cleanup):
    """CRIU writes a task's oom_score_adj and sets its rlimits as root, before it drops the
    task's capabilities: -1000 would make it unkillable, and a hard limit above Docker's is one
    the container could not raise itself. The stored images hold the values of the checkpoint
    as Docker made it, not the bundle's."""
    import pycriu.images

    cores = sorted(n for n in _names(base) if n.startswith("checkpoint/core-"))
    with tarfile.open(base) as tar:
        original = {n: pycriu.images.load(io.BytesIO(tar.extractfile(n).read()))["entries"][0] for n in cores}

    def edit(img):
        tc = img["entries"][0]["tc"]
        tc["oom_score_adj"] = -1000
        if "rlimits" in tc:
            tc["rlimits"]["rlimits"][7] = {"cur": 1 << 20, "max": 1 << 20}  # RLIMIT_NOFILE

    replace = {n: edited_image(base, n, edit) for n in cores}
    hostile = rebuild(base, tmp_path / "limits.dolly", replace=replace)
    cp = _import(hostile, engine_b)
    b_cleanup.append(cp)
    from dolly import _images as criu_images

    for name, entry in original.items():
        if criu_images.is_zombie(entry):
            continue
        stored = criu_images.load_image(cp.images_dir / name.removeprefix("checkpoint/"))["entries"][0]["tc"]
        assert stored["oom_score_adj"] == entry["tc"]["oom_score_adj"] != -1000
        assert stored["rlimits"]["rlimits"][7] == entry["tc"]["rlimits"]["rlimits"][7]


def _names(path):
    with tarfile.open(path) as tar:
        return tar.getnames()
