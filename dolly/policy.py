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
}
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
    """What a recorded ``docker inspect`` asks for, as ``(item, detail)`` pairs, in item order."""
    host = config.get("HostConfig")
    if not isinstance(host, Mapping):
        return [("privileged", "HostConfig is not an object")]
    found: List[Tuple[str, str]] = []

    def add(item: str, detail: str) -> None:
        found.append((item, detail))

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
            driver = (mount.get("VolumeOptions") or {}).get("DriverConfig") or {}
            if driver.get("Options") or driver.get("Name") not in (None, "", "local"):
                add("host-mounts", f"Mounts: volume {mount.get('Source')} with driver options")
            if mount.get("Source"):
                add("volumes", f"Mounts: volume {mount.get('Source')}")
        elif kind not in ("tmpfs",):
            add("host-mounts", f"Mounts: {kind}")
    for other in _list(host.get("VolumesFrom")):
        add("volumes", f"VolumesFrom: {other}")
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
    log = host.get("LogConfig") or {}
    if isinstance(log, Mapping) and str(log.get("Type") or "") not in _LOCAL_LOGS:
        add("log-driver", f"LogConfig: {log.get('Type')}")
    return found


def check(config: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Refuse a recorded configuration that asks for an item not in ``allowed``.

    Raises:
        PolicyRefused: naming every refused item and what asked for it.
    """
    allowed = items(allowed)
    refused = [(item, detail) for item, detail in violations(config) if item not in allowed]
    if refused:
        names = sorted({item for item, _ in refused}, key=list(ITEMS).index)
        raise PolicyRefused(
            "the checkpoint did not come from this engine and asks for "
            + "; ".join(f"{ITEMS[item]} ({detail})" for item, detail in refused)
            + f". Allow it on purpose with allow={names!r} (dolly import --allow "
            + " --allow ".join(names) + ") only if you trust its signer with that",
            items=names,
        )


def _list(value: Any) -> List[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]
