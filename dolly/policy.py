"""The restore policy: what a checkpoint that did not come from this engine may ask for.

A clone is created from the configuration recorded in its checkpoint (``docker inspect`` of the
source). For a checkpoint taken on this engine that is the caller's own container. For one imported
from a bundle it is whatever the bundle's author wrote: ``Privileged: true`` with ``/`` bind-mounted
would be root on this host. So an imported checkpoint may by default ask for none of these; each
is an *item* that the importer can allow on purpose (``import_bundle(..., allow=[...])``, ``dolly
import --allow ITEM``):

    privileged         privileged mode
    host-mounts        bind mounts of host paths, and volumes whose driver options mount them
    volumes            named volumes of this engine, volumes of other containers (VolumesFrom)
    devices            host devices, device requests (GPUs), device cgroup rules
    capabilities       added capabilities (CapAdd, Capabilities)
    host-namespaces    the host's (or another container's) PID, IPC, network, UTS, user or
                       cgroup namespace
    security-options   SecurityOpt (seccomp, AppArmor, SELinux, ...), unmasked /proc or /sys paths
    sysctls            kernel parameters
    cgroup-parent      a cgroup parent of the bundle's choosing
    log-driver         a log driver other than json-file, local or none (they reach the network)
    resources          a negative OOM score, OOM kill disabled, ulimits, more than 1 GiB of /dev/shm
    links              legacy links to other containers of this engine
    networks           the recorded networks, with their aliases, links and driver options (a
                       clone of an imported checkpoint otherwise joins the default bridge, or the
                       caller's ``network=``, under no alias: a recorded alias would answer for
                       another network's name, such as ``db``)

The recorded configuration must also use Docker's own field names, exactly (Docker's decoder
matches names in any case: ``binds`` would be ``Binds``): any other field is refused, and cannot
be allowed. And the process images must not give the process more than the configuration does:
capabilities beyond Docker's default set (plus allowed ``CapAdd``), no seccomp filter, or a mount
tree without the masked and read-only /proc and /sys paths are refused (:func:`check_images`).

Trusting a signer is trusting it with what the policy allows, and with the process images CRIU
restores. Checkpoints taken on this engine, and copies :func:`dolly.migrate` and ``clone(...,
engines=[...])`` make between engines the caller drives, are the caller's own: no item is refused.
"""
from __future__ import annotations

from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Tuple

from .errors import InvalidArgument, PolicyRefused

ITEMS: Dict[str, str] = {
    "privileged": "privileged mode",
    "host-mounts": "bind mounts of host paths",
    "volumes": "named volumes or another container's volumes",
    "devices": "host devices",
    "capabilities": "added capabilities",
    "host-namespaces": "the host's or another container's namespaces",
    "security-options": "security options or unmasked system paths",
    "sysctls": "kernel parameters (sysctls)",
    "cgroup-parent": "a cgroup parent",
    "log-driver": "a log driver that is not local",
    "resources": "resource settings that can starve the host",
    "links": "links to other containers",
    "networks": "the recorded networks and their aliases",
}
# An item that no ``allow`` can name: a field that is not Docker's.
UNKNOWN_FIELDS = "unknown-fields"

# The fields of `docker inspect`'s Config and HostConfig (Engine API 1.41) that a clone's create
# body may carry, spelled as Docker spells them.
CONFIG_FIELDS = frozenset({
    "Hostname", "Domainname", "User", "AttachStdin", "AttachStdout", "AttachStderr", "ExposedPorts",
    "Tty", "OpenStdin", "StdinOnce", "Env", "Cmd", "Healthcheck", "ArgsEscaped", "Image", "Volumes",
    "WorkingDir", "Entrypoint", "NetworkDisabled", "MacAddress", "OnBuild", "Labels", "StopSignal",
    "StopTimeout", "Shell"})
HOST_CONFIG_FIELDS = frozenset({
    "AutoRemove", "Binds", "BlkioDeviceReadBps", "BlkioDeviceReadIOps", "BlkioDeviceWriteBps",
    "BlkioDeviceWriteIOps", "BlkioWeight", "BlkioWeightDevice", "CapAdd", "CapDrop", "Capabilities", "Cgroup",
    "CgroupParent", "CgroupnsMode", "ConsoleSize", "ContainerIDFile", "CpuCount", "CpuPercent", "CpuPeriod",
    "CpuQuota", "CpuRealtimePeriod", "CpuRealtimeRuntime", "CpuShares", "CpusetCpus", "CpusetMems",
    "DeviceCgroupRules", "DeviceRequests", "Devices", "Dns", "DnsOptions", "DnsSearch", "ExtraHosts",
    "GroupAdd", "IOMaximumBandwidth", "IOMaximumIOps", "Init", "IpcMode", "Isolation", "KernelMemory",
    "KernelMemoryTCP", "Links", "LogConfig", "MaskedPaths", "Memory", "MemoryReservation", "MemorySwap",
    "MemorySwappiness", "Mounts", "NanoCpus", "NetworkMode", "OomKillDisable", "OomScoreAdj", "PidMode",
    "PidsLimit", "PortBindings", "Privileged", "PublishAllPorts", "ReadonlyPaths", "ReadonlyRootfs",
    "RestartPolicy", "Runtime", "SecurityOpt", "ShmSize", "StorageOpt", "Sysctls", "Tmpfs", "UTSMode",
    "Ulimits", "UsernsMode", "VolumeDriver", "VolumesFrom"})

# Docker's default capabilities (moby oci/caps/defaults.go), as bits of the kernel's capability set.
_CAPABILITY_BITS = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6,
    "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10, "NET_BROADCAST": 11,
    "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15, "SYS_MODULE": 16, "SYS_RAWIO": 17,
    "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20, "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23,
    "SYS_RESOURCE": 24, "SYS_TIME": 25, "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29,
    "AUDIT_CONTROL": 30, "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40}
DEFAULT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
                        "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE")
ALL: FrozenSet[str] = frozenset(ITEMS)

# What Docker masks and makes read-only in every container that is not privileged
# (moby oci/defaults.go); a recorded list that lacks one of them unmasks it.
_MASKED = {"/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
           "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"}
_READONLY = {"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
_LOCAL_LOGS = {"", "json-file", "local", "none"}


def items(allow: Iterable[str]) -> FrozenSet[str]:
    """``allow`` as a set of item names.

    Raises:
        InvalidArgument: an unknown item.
    """
    if isinstance(allow, str):
        allow = [allow]
    chosen = frozenset(allow)
    unknown = sorted(x for x in chosen if x not in ITEMS)
    if unknown:
        raise InvalidArgument(f"unknown restore policy item(s) {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(ITEMS)}")
    return chosen


def violations(config: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """What a recorded ``docker inspect`` asks for, as ``(item, detail)`` pairs, in item order;
    fields that are not Docker's come first, as :data:`UNKNOWN_FIELDS`."""
    host = config.get("HostConfig")
    if not isinstance(host, Mapping) or not isinstance(config.get("Config"), Mapping):
        return [(UNKNOWN_FIELDS, "Config or HostConfig is not an object")]
    found: List[Tuple[str, str]] = []

    def add(item: str, detail: str) -> None:
        found.append((item, detail))

    for section, known in (("Config", CONFIG_FIELDS), ("HostConfig", HOST_CONFIG_FIELDS)):
        for key in config[section]:
            if key not in known:
                add(UNKNOWN_FIELDS, f"{section}.{key!s:.40} is not a field of Docker's")
    if found:
        return found

    if host.get("Privileged"):
        add("privileged", "Privileged: true")
    for bind in _list(host.get("Binds")):
        source = str(bind).split(":", 1)[0]
        add("host-mounts" if source.startswith("/") else "volumes", f"Binds: {bind}")
    for mount in _list(host.get("Mounts")):
        kind = mount.get("Type") if isinstance(mount, Mapping) else None
        if kind == "bind":
            add("host-mounts", f"Mounts: bind {mount.get('Source')}")
        elif kind == "volume":
            driver = _mapping(_mapping(mount.get("VolumeOptions")).get("DriverConfig"))
            if driver.get("Options") or driver.get("Name") not in (None, "", "local"):
                add("host-mounts", f"Mounts: volume {mount.get('Source')} with driver options")
            if mount.get("Source"):
                add("volumes", f"Mounts: volume {mount.get('Source')}")
        elif kind not in ("tmpfs",):
            add("host-mounts", f"Mounts: {kind}")
    for other in _list(host.get("VolumesFrom")):
        add("volumes", f"VolumesFrom: {other}")
    if host.get("VolumeDriver"):
        add("volumes", f"VolumeDriver: {host.get('VolumeDriver')}")
    for key in ("Devices", "DeviceRequests", "DeviceCgroupRules"):
        if _list(host.get(key)):
            add("devices", f"{key}: {host.get(key)}")
    for key in ("CapAdd", "Capabilities"):
        if _list(host.get(key)):
            add("capabilities", f"{key}: {host.get(key)}")
    for key in ("PidMode", "IpcMode", "NetworkMode", "UTSMode", "UsernsMode", "CgroupnsMode", "Cgroup"):
        mode = str(host.get(key) or "")
        if mode == "host" or mode.startswith("container:"):
            if key == "CgroupnsMode":
                continue  # "host" is the engine's default on cgroup v1: nothing of the host's to see
            add("host-namespaces", f"{key}: {mode}")
    if _list(host.get("SecurityOpt")):
        add("security-options", f"SecurityOpt: {host.get('SecurityOpt')}")
    for key, defaults in (("MaskedPaths", _MASKED), ("ReadonlyPaths", _READONLY)):
        recorded = host.get(key)
        if recorded is not None and not defaults <= set(_list(recorded)):
            add("security-options", f"{key} lacks {', '.join(sorted(defaults - set(_list(recorded))))}")
    if host.get("Sysctls"):
        add("sysctls", f"Sysctls: {host.get('Sysctls')}")
    if host.get("CgroupParent"):
        add("cgroup-parent", f"CgroupParent: {host.get('CgroupParent')}")
    log = _mapping(host.get("LogConfig"))
    if str(log.get("Type") or "") not in _LOCAL_LOGS:
        add("log-driver", f"LogConfig: {log.get('Type')}")
    if isinstance(host.get("OomScoreAdj"), int) and host["OomScoreAdj"] < 0:
        add("resources", f"OomScoreAdj: {host['OomScoreAdj']}")
    if host.get("OomKillDisable"):
        add("resources", "OomKillDisable: true")
    if _list(host.get("Ulimits")):
        add("resources", f"Ulimits: {host.get('Ulimits')}")
    if isinstance(host.get("ShmSize"), int) and host["ShmSize"] > 1 << 30:
        add("resources", f"ShmSize: {host['ShmSize']}")
    if _list(host.get("Links")):
        add("links", f"Links: {host.get('Links')}")
    found.sort(key=lambda f: list(ITEMS).index(f[0]))
    return found


def check(config: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Refuse a recorded configuration that asks for an item not in ``allowed``.

    Raises:
        PolicyRefused: naming every refused item and what asked for it.
    """
    allowed = items(allowed)
    refused = [(item, detail) for item, detail in violations(config) if item not in allowed]
    if refused and refused[0][0] == UNKNOWN_FIELDS:
        raise PolicyRefused(
            "the checkpoint did not come from this engine and its recorded configuration is not "
            "Docker's: " + "; ".join(detail for _, detail in refused[:5]) + ". This cannot be allowed",
            items=[UNKNOWN_FIELDS])
    if refused:
        names = sorted({item for item, _ in refused}, key=list(ITEMS).index)
        raise PolicyRefused(
            "the checkpoint did not come from this engine and asks for "
            + "; ".join(f"{ITEMS[item]} ({detail})" for item, detail in refused)
            + f". Allow it on purpose with allow={names!r} (dolly import --allow "
            + " --allow ".join(names) + ") only if you trust its signer with that",
            items=names,
        )


def capability_mask(config: Mapping[str, Any], allowed: Iterable[str]) -> int:
    """The capabilities a restored process may hold: Docker's defaults, plus the recorded
    ``CapAdd`` when ``capabilities`` is allowed (all of them when ``privileged`` is)."""
    allowed = items(allowed)
    host = _mapping(config.get("HostConfig"))
    if "privileged" in allowed and host.get("Privileged"):
        return (1 << 64) - 1
    names = set(DEFAULT_CAPABILITIES)
    if "capabilities" in allowed:
        added = {str(c).upper().removeprefix("CAP_")
                 for c in _list(host.get("CapAdd")) + _list(host.get("Capabilities"))}
        if "ALL" in added:
            return (1 << 64) - 1
        names |= added
    return sum(1 << _CAPABILITY_BITS[n] for n in names if n in _CAPABILITY_BITS)


def check_images(processes: Iterable[Mapping[str, Any]], mountpoints: Iterable[str],
                 config: Mapping[str, Any], allowed: Iterable[str], *, host_paths: Iterable[str]) -> None:
    """Refuse process images that give more than the configuration: each process's
    capabilities (``cap_prm``, ``cap_eff``, ``cap_bnd``, ``cap_inh``, ``cap_amb`` as 64-bit
    masks) within :func:`capability_mask`; its seccomp mode ``"filter"`` unless security
    options (or privileged mode) are allowed; and the mount tree holding every masked and
    read-only path of Docker's that exists on this host (``host_paths``), unless allowed likewise.

    Raises:
        PolicyRefused: naming the process or path.
    """
    allowed = items(allowed)
    mask = capability_mask(config, allowed)
    unconfined = bool({"security-options", "privileged"} & allowed)
    for proc in processes:
        for key in ("cap_prm", "cap_eff", "cap_bnd", "cap_inh", "cap_amb"):
            extra = int(proc.get(key, 0)) & ~mask
            if extra:
                names = [n for n, bit in _CAPABILITY_BITS.items() if extra >> bit & 1] or [hex(extra)]
                raise PolicyRefused(
                    f"the checkpoint's process {proc.get('name')} holds capabilities its configuration "
                    f"does not give ({key}: {', '.join(names)}): its images were made to grant them",
                    items=["capabilities"])
        if proc.get("seccomp_mode") != "filter" and not unconfined:
            raise PolicyRefused(
                f"the checkpoint's process {proc.get('name')} runs without a seccomp filter "
                f"(mode {proc.get('seccomp_mode')!r}): allow security-options to restore it",
                items=["security-options"])
    if not unconfined:
        missing = sorted(set(host_paths) & (_MASKED | _READONLY) - set(mountpoints))
        if missing:
            raise PolicyRefused(
                f"the checkpoint's mount tree does not mask {', '.join(missing)} as Docker does: "
                "allow security-options to restore it", items=["security-options"])


# The mount types a container's own mount tree holds, as CRIU numbers them (images/mnt.proto):
# proc, sysfs, tmpfs, devpts, cgroup, mqueue, overlayfs (the root), cgroup2. Not devtmpfs (its
# restore mounts the host's devices) nor a file system of the host's: those come in only as bind
# mounts the runtime hands CRIU from the container's configuration.
CONTAINER_FSTYPES = frozenset({1, 2, 5, 6, 12, 14, 17, 23})


def check_mount_types(mounts: Iterable[Tuple[str, int, bool]], allowed: Iterable[str]) -> None:
    """Refuse a mount tree (``(mountpoint, fstype, external)`` each) with a mount of its own
    that is not of :data:`CONTAINER_FSTYPES`, unless ``privileged`` is allowed.

    Raises:
        PolicyRefused: naming the mount.
    """
    if "privileged" in items(allowed):
        return
    for path, fstype, external in mounts:
        if not external and fstype not in CONTAINER_FSTYPES:
            raise PolicyRefused(f"the checkpoint's mount tree mounts a file system of type {fstype} at "
                                f"{path!s:.200}, which a container's own does not hold: allow privileged to "
                                "restore it", items=["privileged"])


def masked_paths() -> FrozenSet[str]:
    """Docker's masked and read-only paths."""
    return frozenset(_MASKED | _READONLY)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> List[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]
