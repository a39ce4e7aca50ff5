"""Checkpoint, restore and clone on the real engine and CRIU: state, files and identity."""
from __future__ import annotations

import shutil
import time
import uuid

import pytest

import dolly
from dolly import ready
from dolly._archive import tarfile  # the one Dolly reads with: 3.12's, backported to 3.11
from dolly.demo import SERVICE
from helpers import BUSYBOX, COUNTER, PYTHON, ask, assert_counts_on, get_json, kernel_hostname, read_int


def test_clones_continue_a_counter_from_the_checkpoint(run, client):
    source = run(BUSYBOX, ["sh", "-c", COUNTER])
    time.sleep(2)
    before = read_int(source)
    assert before >= 10  # a clone that started over would be caught below
    cp = dolly.checkpoint(source, "counter")
    clones = dolly.clone(cp, 2)

    time.sleep(0.5)
    for c in clones:
        first = read_int(c)
        assert first >= before
        time.sleep(0.5)
        assert read_int(c) > first, "the clone's counter is not running"
        # An ordinary container: listed, its own log, stoppable and removable by docker.
        assert c.id in {x.id for x in client.containers.list()}
        logged = [int(x) for x in c.logs().decode().split()]
        assert logged and min(logged) >= before
        assert c.labels["dolly.source"] == source.id and c.labels["dolly.checkpoint"] == "counter"
    clones[0].stop(timeout=1)
    clones[0].remove()
    source.reload()
    assert source.status == "running"


def test_a_file_held_open_in_the_writable_layer_is_carried(run):
    script = (
        "echo hello > /greeting; rm /etc/group; mkdir /work; exec 3>>/work/log; "
        "i=0; while true; do i=$((i+1)); echo line$i >&3; sleep 0.1; done"
    )
    source = run(BUSYBOX, ["sh", "-c", script])
    time.sleep(1)
    cp = dolly.checkpoint(source)
    (clone,) = dolly.clone(cp, 1)

    assert clone.exec_run(["cat", "/greeting"]).output == b"hello\n"
    assert clone.exec_run(["test", "-e", "/etc/group"]).exit_code == 1, "a deleted file came back"
    size = int(clone.exec_run(["wc", "-l", "/work/log"]).output.split()[0])
    time.sleep(0.5)
    assert int(clone.exec_run(["wc", "-l", "/work/log"]).output.split()[0]) > size
    head = clone.exec_run(["head", "-n", "3", "/work/log"]).output.decode().split()
    assert head == ["line1", "line2", "line3"]


def test_http_service_clones_answer_with_their_own_identity(run, network):
    net = network("10.213.8.0/24")
    source = run(PYTHON, ["python3", "-c", SERVICE], environment={"STATE_MB": "16"}, network=net.name)
    ready.wait(source, ready.http(8000), timeout=60)
    warm = ask(source)
    cp = dolly.checkpoint(source, "web")

    clones = dolly.clone(cp, 4)
    assert len({c.name for c in clones}) == 4
    seen_ips, seen_macs, seen_hosts = set(), set(), set()
    source.reload()
    src_ep = source.attrs["NetworkSettings"]["Networks"][net.name]
    for c in clones:
        answer = ask(c, network=net.name)
        assert answer["token"] == warm["token"] and answer["rows"] == 16 * 1024
        assert answer["served"] > warm["served"]  # the request count went on, not from zero
        ep = c.attrs["NetworkSettings"]["Networks"][net.name]
        hostname = c.exec_run(["cat", "/etc/hostname"]).output.decode().strip()
        assert answer["hostname"] == hostname == kernel_hostname(c) == c.attrs["Config"]["Hostname"]
        nodename = c.exec_run(["python3", "-c", "import os; print(os.uname().nodename)"]).output.decode().strip()
        assert nodename == hostname
        seen_ips.add(ep["IPAddress"])
        seen_macs.add(ep["MacAddress"])
        seen_hosts.add(hostname)
    assert len(seen_ips) == len(seen_macs) == len(seen_hosts) == 4
    assert src_ep["IPAddress"] not in seen_ips and src_ep["MacAddress"] not in seen_macs
    assert warm["hostname"] not in seen_hosts

    # Clones resolve each other by name on a user-defined network.
    a, b = clones[0], clones[1]
    out = a.exec_run(["python3", "-c", f"import socket; print(socket.gethostbyname({b.name!r}))"])
    assert out.output.decode().strip() == b.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
    # The source is untouched.
    assert ask(source, network=net.name)["hostname"] == warm["hostname"]


def test_clones_spread_over_the_networks_given_each_answer_there(run, network):
    """clone(..., network=[a, b]): clone k joins network k mod 2, alone, with an address of its
    subnet, and answers there with the source's state; the source stays on its own network."""
    nets = [network("10.213.9.0/24"), network("10.213.10.0/24")]
    source = run(PYTHON, ["python3", "-c", SERVICE], environment={"STATE_MB": "4"})
    ready.wait(source, ready.http(8000), timeout=60)
    warm = ask(source)
    cp = dolly.checkpoint(source, "spread")
    clones = dolly.clone(cp, 4, network=[n.name for n in nets])
    for k, c in enumerate(clones):
        joined = c.attrs["NetworkSettings"]["Networks"]
        assert list(joined) == [nets[k % 2].name], joined
        assert joined[nets[k % 2].name]["IPAddress"].startswith(("10.213.9.", "10.213.10.")[k % 2])
        answer = ask(c, network=nets[k % 2].name)
        assert answer["token"] == warm["token"] and answer["served"] == warm["served"] + 1
    source.reload()
    assert list(source.attrs["NetworkSettings"]["Networks"]) == ["bridge"]
    with pytest.raises(dolly.errors.InvalidArgument):
        dolly.clone(cp, 1, network=[])


def test_published_ports_get_free_host_ports(run):
    source = run(PYTHON, ["python3", "-c", SERVICE], environment={"STATE_MB": "1"},
                 ports={"8000/tcp": ("127.0.0.1", None)})
    ready.wait(source, ready.http(8000), timeout=60)
    source.reload()
    src_port = int(source.ports["8000/tcp"][0]["HostPort"])
    cp = dolly.checkpoint(source)
    clones = dolly.clone(cp, 2)
    ports = set()
    for c in clones:
        binding = c.ports["8000/tcp"][0]
        assert binding["HostIp"] == "127.0.0.1"
        port = int(binding["HostPort"])
        assert port != src_port
        assert get_json("127.0.0.1", port)["hostname"] == c.attrs["Config"]["Hostname"]
        ports.add(port)
    assert len(ports) == 2


def test_restore_with_a_name_and_clone_with_a_prefix(run, client, busybox_checkpoint):
    name = f"restored-{time.time_ns()}"
    c = dolly.restore(busybox_checkpoint, name=name)
    assert c.name == name and c.status == "running"
    clones = dolly.clone(busybox_checkpoint, 2, name_prefix=name)
    assert [x.name for x in clones] == [f"{name}-1", f"{name}-2"]
    for x in [c, *clones]:
        x.remove(force=True)


def test_checkpoint_outlives_its_source(run):
    source = run(BUSYBOX, ["sh", "-c", COUNTER])
    time.sleep(1)
    before = read_int(source)
    cp = dolly.checkpoint(source, "keep", leave_running=False)
    source.reload()
    assert source.status == "exited"
    name = source.name
    source.remove()
    listed = dolly.list_checkpoints(name)
    assert [x.name for x in listed] == ["keep"]
    assert dolly.get_checkpoint(cp.container_id, "keep") == cp
    (clone,) = dolly.clone(listed[0], 1)
    assert_counts_on(clone, before)
    dolly.remove_checkpoint(cp)
    with pytest.raises(dolly.errors.ContainerNotFound):
        dolly.list_checkpoints(name)


def test_list_get_and_remove(run):
    source = run(BUSYBOX, ["sh", "-c", COUNTER])
    a = dolly.checkpoint(source, "a")
    b = dolly.checkpoint(source)
    assert [x.name for x in dolly.list_checkpoints(source)] == ["a", b.name]
    assert dolly.get_checkpoint(source.name, "a") == a
    dolly.remove_checkpoint(a)
    assert [x.name for x in dolly.list_checkpoints(source.id)] == [b.name]
    with pytest.raises(dolly.errors.CheckpointNotFound):
        dolly.remove_checkpoint(a)
    with pytest.raises(dolly.errors.CheckpointNotFound):
        dolly.restore(a)


def test_checkpoints_are_readable_by_root_only(busybox_checkpoint, engine):
    for path in [busybox_checkpoint.path, busybox_checkpoint.path.parent, engine.store_dir]:
        assert path.stat().st_mode & 0o077 == 0, path
    assert (busybox_checkpoint.path / "dolly.json").stat().st_mode & 0o077 == 0


def test_the_clone_upload_never_collides_in_containerd(busybox_checkpoint):
    # Eight clones of one checkpoint started at once: identical uploads would collide.
    clones = dolly.clone(busybox_checkpoint, 8)
    assert all(c.status == "running" for c in clones)
    assert len({kernel_hostname(c) for c in clones}) == 8
    for c in clones:
        c.remove(force=True)



def test_a_process_of_another_user_is_checkpointed_and_cloned(run):
    # Reading the limits of a process of another user takes CAP_SYS_RESOURCE, which root lacks on
    # some machines; Dolly's CRIU build reads /proc/<pid>/limits then (scripts/criu-patches).
    source = run(BUSYBOX, ["sh", "-c", "ulimit -n 321; " + COUNTER], user="1000:1000")
    time.sleep(1)
    cp = dolly.checkpoint(source, "as-1000")
    with tarfile.open(cp.rootfs_diff) as tar:
        at = int(tar.extractfile("./tmp/count").read())
    (clone,) = dolly.clone(cp, 1)
    time.sleep(0.5)
    logged = [int(x) for x in clone.logs().decode().split()]
    assert logged and min(logged) in (at + 1, at + 2), (at, logged[:3])
    assert clone.exec_run(["id", "-u"]).output.strip() == b"1000"
    # The limits came with the process: its soft limit on open files is the one it set.
    limits = clone.exec_run(["cat", "/proc/1/limits"]).output.decode()
    assert limits.split("Max open files")[1].split()[0] == "321"


def _lock_method(inventory) -> int:
    import pycriu.images

    with open(inventory, "rb") as f:
        return pycriu.images.load(f)["entries"][0].get("network_lock_method", 0)


def _set_lock_method(inventory, method: int) -> None:
    import pycriu.images

    with open(inventory, "rb") as f:
        img = pycriu.images.load(f)
    img["entries"][0]["network_lock_method"] = method
    with open(inventory, "wb") as f:
        pycriu.images.dump(img, f)


def test_clones_restore_without_criu_s_network_lock(run, engine):
    """CRIU restores with the network-lock method the dump's inventory names (iptables by
    default: forks of iptables-restore into the new namespace, about 0.1 s of a restore). Dolly's
    checkpoints name none; a clone of one that names iptables (an imported one) gets its own
    inventory naming none, and the checkpoint's own stays as it is."""
    from dolly import _images as criu_images
    from dolly._start import _place_images

    source = run(BUSYBOX, ["sh", "-c", COUNTER])
    time.sleep(1)
    counted = read_int(source)
    cp = dolly.checkpoint(source, "nolock")
    inventory = cp.images_dir / "inventory.img"
    assert _lock_method(inventory) == criu_images.NETWORK_LOCK_SKIP

    _set_lock_method(inventory, 0)  # CRIU's NETWORK_LOCK_IPTABLES, as another host's dump says
    # Where a restore places them: in the spool, on the checkpoint's file system (hard links).
    placed = engine.spool_dir / f"test-{uuid.uuid4().hex}.restore"
    try:
        _place_images(cp, placed, hostname="lockless")
        assert _lock_method(placed / "inventory.img") == criu_images.NETWORK_LOCK_SKIP
        assert _lock_method(inventory) == 0
        assert (placed / "inventory.img").stat().st_ino != inventory.stat().st_ino
    finally:
        shutil.rmtree(placed, ignore_errors=True)

    (clone,) = dolly.clone(cp, 1)
    assert_counts_on(clone, counted)
