"""The restore policy and the naming rules: pure logic, no engine needed."""
from __future__ import annotations

from pathlib import Path

import pytest

from dolly import _names as names, errors, policy

# What `docker inspect` records for `docker run busybox` on Docker 20.10 (the fields the policy reads).
PLAIN = {
    "Image": "sha256:" + "0" * 64,
    "Config": {"Image": "busybox"},
    "HostConfig": {
        "Binds": None, "NetworkMode": "default", "PortBindings": {}, "VolumesFrom": None,
        "CapAdd": None, "CapDrop": None, "CgroupnsMode": "private", "IpcMode": "private", "Cgroup": "",
        "PidMode": "", "Privileged": False, "SecurityOpt": None, "UTSMode": "", "UsernsMode": "",
        "CgroupParent": "", "Devices": [], "DeviceCgroupRules": None, "DeviceRequests": None,
        "LogConfig": {"Type": "json-file", "Config": {}}, "Sysctls": None, "Mounts": None,
        "MaskedPaths": ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                        "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                        "/sys/firmware"],
        "ReadonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    },
}


def asking(**host) -> dict:
    return {**PLAIN, "HostConfig": {**PLAIN["HostConfig"], **host}}


def test_a_plain_container_asks_for_nothing():
    assert policy.violations(PLAIN) == []
    policy.check(PLAIN, ())


@pytest.mark.parametrize("host,item", [
    ({"Privileged": True}, "privileged"),
    ({"Binds": ["/:/host"]}, "host-mounts"),
    ({"Binds": ["/var/run/docker.sock:/var/run/docker.sock:ro"]}, "host-mounts"),
    ({"Mounts": [{"Type": "bind", "Source": "/etc", "Target": "/x"}]}, "host-mounts"),
    ({"Mounts": [{"Type": "volume", "Source": "", "Target": "/x",
                  "VolumeOptions": {"DriverConfig": {"Name": "local", "Options": {"o": "bind", "device": "/"}}}}]},
     "host-mounts"),
    ({"Binds": ["prod-data:/data"]}, "volumes"),
    ({"Mounts": [{"Type": "volume", "Source": "prod-data", "Target": "/data"}]}, "volumes"),
    ({"VolumesFrom": ["db"]}, "volumes"),
    ({"Devices": [{"PathOnHost": "/dev/sda", "PathInContainer": "/dev/sda", "CgroupPermissions": "rwm"}]}, "devices"),
    ({"DeviceCgroupRules": ["c *:* rwm"]}, "devices"),
    ({"DeviceRequests": [{"Driver": "nvidia", "Count": -1}]}, "devices"),
    ({"CapAdd": ["SYS_ADMIN"]}, "capabilities"),
    ({"PidMode": "host"}, "host-namespaces"),
    ({"IpcMode": "host"}, "host-namespaces"),
    ({"NetworkMode": "host"}, "host-namespaces"),
    ({"NetworkMode": "container:victim"}, "host-namespaces"),
    ({"UsernsMode": "host"}, "host-namespaces"),
    ({"UTSMode": "host"}, "host-namespaces"),
    ({"SecurityOpt": ["seccomp=unconfined"]}, "security-options"),
    ({"MaskedPaths": []}, "security-options"),
    ({"ReadonlyPaths": ["/proc/bus"]}, "security-options"),
    ({"Sysctls": {"kernel.core_pattern": "|/tmp/x"}}, "sysctls"),
    ({"CgroupParent": "/system.slice"}, "cgroup-parent"),
    ({"LogConfig": {"Type": "syslog", "Config": {"syslog-address": "tcp://203.0.113.1:514"}}}, "log-driver"),
    ({"VolumeDriver": "someplugin"}, "volumes"),
    ({"OomScoreAdj": -1000}, "resources"),
    ({"OomKillDisable": True}, "resources"),
    ({"Ulimits": [{"Name": "memlock", "Soft": -1, "Hard": -1}]}, "resources"),
    ({"ShmSize": 1 << 40}, "resources"),
    ({"Links": ["/db:/web/db"]}, "links"),
])
def test_each_kind_of_host_access_is_an_item(host, item):
    config = asking(**host)
    assert [i for i, _ in policy.violations(config)] == [item]
    with pytest.raises(errors.PolicyRefused) as refused:
        policy.check(config, ())
    assert refused.value.items == [item]
    policy.check(config, [item])  # allowed on purpose


def test_the_refusal_names_every_item_in_order():
    config = asking(CapAdd=["ALL"], Binds=["/:/host"], Privileged=True)
    with pytest.raises(errors.PolicyRefused) as refused:
        policy.check(config, ["host-mounts"])
    assert refused.value.items == ["privileged", "capabilities"]
    assert "--allow privileged --allow capabilities" in str(refused.value)


def test_a_config_without_host_config_is_refused():
    with pytest.raises(errors.PolicyRefused):
        policy.check({"Config": {}}, ())


def test_unknown_items_are_invalid_arguments():
    with pytest.raises(errors.InvalidArgument, match="unknown restore policy item"):
        policy.items(["everything"])
    assert policy.items("privileged") == {"privileged"}
    assert policy.items(policy.ALL) == set(policy.ITEMS)


@pytest.mark.parametrize("check,good,bad", [
    (names.checkpoint_name, ["cp-1", "a", "A.b_c-d", "x" * 128],
     ["", ".", "..", "../x", "a/b", "-a", "x" * 129, None, 3]),
    (names.container_id, ["a" * 64, "0123456789abcdef" * 4], ["A" * 64, "a" * 63, ".", "../" + "a" * 61, None]),
    (names.container_name, ["web", "web-clone-1", "a.b_c"], ["", "..", "a/b", "/web", " web"]),
    (names.image_id, ["sha256:" + "f" * 64], ["f" * 64, "sha256:" + "F" * 64, "sha256:../x"]),
    (names.image_name, ["busybox", "dolly/python:latest", "localhost:5000/a/b:v1.2", "a_b__c-d"],
     ["", "../x", "Busybox", "a:b:c", "a//b", "a b", "a@sha256:00"]),
    (names.lineage, ["a" * 64, "team:web.1"], ["", "../x", "a/b", "x" * 129]),
])
def test_name_rules(check, good, bad):
    for value in good:
        assert check(value) == value
    for value in bad:
        with pytest.raises(errors.InvalidArgument):
            check(value)
    with pytest.raises(errors.BundleError):
        check(bad[0], error=errors.BundleError)


def test_inside_keeps_paths_in_their_folder(tmp_path):
    assert names.inside(tmp_path, "a", "b") == tmp_path / "a" / "b"
    for parts in [("..",), ("a", ".."), (".",), ("",), ("a/../..",), ("/etc",)]:
        with pytest.raises(errors.InvalidArgument):
            names.inside(tmp_path, *parts)
    (tmp_path / "out").symlink_to("/etc")
    with pytest.raises(errors.UnsafeArchive):
        names.inside(tmp_path, "out", "passwd", error=errors.UnsafeArchive)
    assert not Path("/etc/passwd").is_relative_to(tmp_path)


@pytest.mark.parametrize("section,key", [("HostConfig", "binds"), ("HostConfig", "PRIVILEGED"),
                                         ("HostConfig", "Capadd"), ("Config", "hostconfig")])
def test_fields_docker_would_read_in_another_case_cannot_be_allowed(section, key):
    config = {**PLAIN, section: {**PLAIN[section], key: ["/:/host"]}}
    with pytest.raises(errors.PolicyRefused) as refused:
        policy.check(config, policy.ALL)
    assert refused.value.items == [policy.UNKNOWN_FIELDS]


def test_odd_types_are_refusals_not_crashes():
    for host in ({"Mounts": [{"Type": "volume", "Source": "x", "VolumeOptions": ["o"]}]},
                 {"LogConfig": "syslog"}, {"Mounts": "bind"}):
        policy.violations(asking(**host))  # no AttributeError


DEFAULT_MASK = 0xA80425FB  # Docker's default capabilities, as CRIU records them
PROCESS = {"name": "sh (1)", "cap_prm": DEFAULT_MASK, "cap_eff": DEFAULT_MASK, "cap_bnd": DEFAULT_MASK,
           "cap_inh": 0, "cap_amb": 0, "seccomp_mode": "filter"}
MOUNTS = {"/", "/proc", "/proc/keys", "/sys/firmware", "/proc/sys"}
HOST = ["/proc/keys", "/sys/firmware", "/proc/sys"]


def test_process_images_within_the_configuration_pass():
    assert policy.capability_mask(PLAIN, ()) == DEFAULT_MASK
    policy.check_images([PROCESS], MOUNTS, PLAIN, (), host_paths=HOST)


@pytest.mark.parametrize("change,item", [
    ({"cap_eff": DEFAULT_MASK | 1 << 21}, "capabilities"),          # SYS_ADMIN
    ({"cap_bnd": (1 << 41) - 1}, "capabilities"),
    ({"cap_amb": 1 << 16}, "capabilities"),                         # SYS_MODULE
    ({"seccomp_mode": "disabled"}, "security-options"),
])
def test_process_images_cannot_grant_more(change, item):
    with pytest.raises(errors.PolicyRefused) as refused:
        policy.check_images([{**PROCESS, **change}], MOUNTS, PLAIN, (), host_paths=HOST)
    assert refused.value.items == [item]


def test_allowed_capabilities_and_unmasked_paths():
    admin = asking(CapAdd=["SYS_ADMIN"])
    policy.check_images([{**PROCESS, "cap_eff": DEFAULT_MASK | 1 << 21}], MOUNTS, admin, ["capabilities"],
                        host_paths=HOST)
    with pytest.raises(errors.PolicyRefused):
        policy.check_images([{**PROCESS, "cap_eff": DEFAULT_MASK | 1 << 21}], MOUNTS, admin, (), host_paths=HOST)
    with pytest.raises(errors.PolicyRefused, match="/proc/keys"):
        policy.check_images([PROCESS], MOUNTS - {"/proc/keys"}, PLAIN, (), host_paths=HOST)
    policy.check_images([PROCESS], MOUNTS - {"/proc/keys"}, PLAIN, ["security-options"], host_paths=HOST)


def test_a_mount_tree_of_a_containers_own_types_passes():
    policy.check_mount_types([("/", 17, False), ("/proc", 1, False), ("/dev", 5, False), ("/etc/hosts", 0, True)], [])


def test_a_devtmpfs_or_a_host_file_system_in_the_mount_tree_is_refused_unless_privileged():
    for mount in [("/dev", 3, False), ("/data", 0, False)]:  # devtmpfs; a file system CRIU does not type
        with pytest.raises(errors.PolicyRefused) as info:
            policy.check_mount_types([("/", 17, False), mount], [])
        assert info.value.items == ["privileged"]
        policy.check_mount_types([mount], ["privileged"])
