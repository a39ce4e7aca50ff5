"""dolly.policy: what is not a violation, what allowing one item leaves refused, and the capability
mask restored processes are held to (tests/test_policy.py has each item's own refusal)."""
from __future__ import annotations

import pytest

from dolly import errors, policy

MASKED = ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
PLAIN = {"Image": "sha256:" + "0" * 64, "Config": {"Image": "busybox", "Labels": {}},
         "HostConfig": {"NetworkMode": "default", "Privileged": False, "LogConfig": {"Type": "json-file"},
                        "MaskedPaths": MASKED, "ReadonlyPaths": READONLY}}
DEFAULT_MASK = 0xA80425FB
ALL_BITS = (1 << 64) - 1


def asking(**host):
    return {**PLAIN, "HostConfig": {**PLAIN["HostConfig"], **host}}


@pytest.mark.parametrize("host", [
    {"CgroupnsMode": "host"},                               # the engine's default on cgroup v1
    {"Mounts": [{"Type": "tmpfs", "Target": "/run"}]},
    {"NetworkMode": "bridge"}, {"NetworkMode": "appnet"},
    {"OomScoreAdj": 500}, {"OomScoreAdj": 0},
    {"ShmSize": 1 << 30},                                   # up to 1 GiB is the container's own
    {"LogConfig": {"Type": "local"}}, {"LogConfig": {"Type": "none"}}, {"LogConfig": {"Type": ""}},
    {"MaskedPaths": [*MASKED, "/proc/extra"]},              # masking more is fine
    {"CapDrop": ["ALL"]},
    {"Binds": None, "Devices": [], "Sysctls": {}, "CapAdd": []},
])
def test_what_is_no_host_access(host):
    assert policy.violations(asking(**host)) == []
    policy.check(asking(**host), ())


def test_a_named_volume_on_the_local_driver_is_a_volume_not_a_host_mount():
    mount = {"Type": "volume", "Source": "data", "Target": "/data",
             "VolumeOptions": {"DriverConfig": {"Name": "local"}}}
    assert [item for item, _ in policy.violations(asking(Mounts=[mount]))] == ["volumes"]


def test_allowing_some_items_leaves_the_others_refused_in_item_order():
    config = asking(Sysctls={"net.core.somaxconn": "1024"}, Privileged=True, Links=["/db:/web/db"],
                    IpcMode="host")
    assert [item for item, _ in policy.violations(config)] == ["privileged", "host-namespaces", "sysctls", "links"]
    with pytest.raises(errors.PolicyRefused) as refused:
        policy.check(config, ["privileged", "links"])
    assert refused.value.items == ["host-namespaces", "sysctls"]
    assert "IpcMode: host" in str(refused.value) and "net.core.somaxconn" in str(refused.value)
    policy.check(config, ["privileged", "links", "host-namespaces", "sysctls"])


@pytest.mark.parametrize("host,allowed,mask", [
    ({}, (), DEFAULT_MASK),
    ({"Privileged": True}, (), DEFAULT_MASK),               # not allowed: no more than the defaults
    ({"Privileged": True}, ["privileged"], ALL_BITS),
    ({"CapAdd": ["NET_ADMIN"]}, (), DEFAULT_MASK),
    ({"CapAdd": ["NET_ADMIN"]}, ["capabilities"], DEFAULT_MASK | 1 << 12),
    ({"CapAdd": ["cap_sys_admin", "CAP_BPF"]}, ["capabilities"], DEFAULT_MASK | 1 << 21 | 1 << 39),
    ({"CapAdd": ["ALL"]}, ["capabilities"], ALL_BITS),
    ({"CapAdd": ["NOT_A_CAPABILITY"]}, ["capabilities"], DEFAULT_MASK),
])
def test_the_capability_mask(host, allowed, mask):
    assert policy.capability_mask(asking(**host), allowed) == mask


def test_privileged_allowed_restores_any_process_image():
    process = {"name": "init (1)", "cap_prm": ALL_BITS, "cap_eff": ALL_BITS, "cap_bnd": ALL_BITS, "cap_inh": 0,
               "cap_amb": 0, "seccomp_mode": "disabled"}
    config = asking(Privileged=True)
    policy.check_images([process], ["/"], config, ["privileged"], host_paths=["/proc/keys", "/proc/sys"])
    with pytest.raises(errors.PolicyRefused) as refused:
        policy.check_images([process], ["/"], config, [], host_paths=[])
    assert refused.value.items == ["capabilities"]


def test_masked_paths_the_host_lacks_are_not_asked_for():
    process = {"name": "sh (1)", "cap_prm": DEFAULT_MASK, "cap_eff": DEFAULT_MASK, "cap_bnd": DEFAULT_MASK,
               "seccomp_mode": "filter"}
    policy.check_images([process], ["/", "/proc"], PLAIN, (), host_paths=[])
    with pytest.raises(errors.PolicyRefused, match="/proc/kcore"):
        policy.check_images([process], ["/", "/proc"], PLAIN, (), host_paths=["/proc/kcore", "/not/docker/s"])


def test_external_mounts_of_any_type_are_the_runtime_s():
    policy.check_mount_types([("/", 17, False), ("/data", 0, True), ("/dev/sda", 3, True)], [])
