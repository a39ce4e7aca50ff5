"""The CRIU images that decide privilege, rebuilt for a checkpoint from outside.

A checkpoint that did not come from this engine (an imported bundle, a Podman or kubelet
archive, a pulled artifact) is a set of instructions CRIU carries out as root. Checking a list of
fields in them leaves everything else through: an extra entry in ``mountpoints-*.img`` mounts a
second writable procfs or binds a host folder; a path in ``cgroup.img`` puts the process in the
host's root cgroups; ``seccomp.img`` can hold an allow-everything filter. So for such a
checkpoint these images are not inspected but **made again** from what this engine makes for
the configuration the restore policy accepted:

- a **reference**: a container of Dolly's own busybox image, created on this engine with the
  accepted configuration's mount, device, capability, security and cgroup settings (not its
  image, command, ports or networks), is started and checkpointed by Dolly, then removed. Its
  images are what Docker, runc and CRIU make for that configuration on this host;
- **mounts**: the checkpoint's mount tree must have exactly the reference's mountpoints (Docker's
  masked paths this kernel lacks may be left out); each entry is the reference's entry (type,
  source, ``root``, options, flags, external key, propagation), keeping only the checkpoint's own
  mount IDs, which its open files name. A mountpoint the reference lacks is refused;
- **limits**: each task's OOM score and resource limits are the reference's, which CRIU sets as
  root before it drops the task's capabilities;
- **cgroups**: ``cgroup.img`` is the reference's, and every task's ``cg_set`` the reference's: the
  clone's processes land in the clone's own cgroup (which runc maps the image's root to), with
  no sub-cgroups and no properties of the checkpoint's;
- **seccomp**: a task keeps its own chain of filters only when the chain starts with the very
  filter runc installs for the configuration (what a process adds on top can only restrict it:
  the kernel applies the strictest verdict of a chain); otherwise its chain is that filter alone;
- **namespaces**: every task must share the first task's mount, network, user and cgroup
  namespaces, CRIU must make for the first task exactly the namespaces it makes for the
  reference (where a task's id equals the inventory's ``root_ids``, CRIU makes none and the task
  stays in CRIU's own: the host's), and the checkpoint may hold no network namespace image of
  its own (Docker's dumps name the engine's, which runc hands CRIU);
- **files**: CRIU reopens every file as root. A fanotify descriptor (a mark on a whole file
  system, the host's, with writable event files), a namespace file, a tun device, a BPF map or
  an "external" file is refused, and so is an inotify watch without a path (CRIU would open its
  file handle with ``open_by_handle_at`` on any mount of that device); CRIU's separate images of
  those kinds, which it still reads, are refused outright.
"""
from __future__ import annotations

import base64
import contextlib
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from . import _images as criu_images
from ._dump import DEFAULT_MAX_LAYER_BYTES, take
from ._engine import RUNTIME, Engine, translate_errors
from ._store import remove
from .errors import DollyError, HostNotReady, ImageRewriteError, UnsafeArchive
from .policy import masked_paths

REFERENCE_IMAGE = "dolly/busybox"
REFERENCE_LABEL = "dolly.reference"

# The HostConfig fields that shape a container's mount tree, cgroups, seccomp filter, devices,
# limits or OOM score: the reference takes these from the accepted configuration and nothing else (no ports,
# restart policy, links or networks, whose use by a throwaway container would reach beyond it).
SHAPING_FIELDS = frozenset({
    "Binds", "Mounts", "Tmpfs", "VolumesFrom", "VolumeDriver", "ShmSize", "ReadonlyRootfs",
    "MaskedPaths", "ReadonlyPaths", "Privileged", "CapAdd", "CapDrop", "Capabilities", "SecurityOpt",
    "Devices", "DeviceCgroupRules", "DeviceRequests", "CgroupParent", "Cgroup", "CgroupnsMode", "IpcMode",
    "PidMode", "UTSMode", "UsernsMode", "Init", "Isolation", "Ulimits", "OomScoreAdj"})


# What Podman (containers-common) masks beyond Docker's list. Such a mount in an imported tree is
# left out, like a Docker mask this kernel lacks: the clone is masked as Docker masks.
PODMAN_MASKS = frozenset({"/sys/dev/block", "/sys/fs/selinux", "/proc/interrupts"})


@dataclass(frozen=True)
class Reference:
    """What this engine makes for one configuration, read from a checkpoint of a reference
    container: its first task's mount entries, cgroup image and cg_set, seccomp image and the
    index of its first task's filter (None: no filter)."""

    mounts: Sequence[Mapping[str, Any]]
    cgroup: Mapping[str, Any]
    cg_set: int
    seccomp: Optional[Mapping[str, Any]]
    seccomp_filter: Optional[int]
    seccomp_mode: str
    new_namespaces: frozenset = frozenset()
    oom_score_adj: int = 0
    rlimits: Optional[Mapping[str, Any]] = None


def reference_body(config: Mapping[str, Any], *, image: str = REFERENCE_IMAGE) -> Dict[str, Any]:
    """The Engine API create body of the reference container for an accepted ``docker
    inspect`` ``config``."""
    recorded = config.get("HostConfig") or {}
    host: Dict[str, Any] = {k: v for k, v in recorded.items() if k in SHAPING_FIELDS}
    for key in ("PidMode", "UTSMode", "IpcMode"):
        # Another container's namespace may be gone by now; the reference takes a private one
        # (what it joins does not change the reference's own mounts but for /dev/shm, below).
        if str(host.get(key) or "").startswith("container:"):
            host.pop(key)
    host["Runtime"] = RUNTIME
    host["RestartPolicy"] = {"Name": "no"}
    host["NetworkMode"] = "host" if recorded.get("NetworkMode") == "host" else "none"
    volumes = (config.get("Config") or {}).get("Volumes")
    return {
        "Image": image, "Entrypoint": None, "Cmd": ["sleep", "86400"], "User": "", "WorkingDir": "",
        "Volumes": volumes if isinstance(volumes, dict) else None, "Labels": {REFERENCE_LABEL: "1"},
        "HostConfig": host, "NetworkingConfig": {"EndpointsConfig": {}},
    }


def reference_image(engine: Engine, *, image_source: Optional[Engine] = None) -> str:
    """The ID of Dolly's busybox image on ``engine``, which references are made of: copied from
    ``image_source`` (an engine of the caller's own), untagged, when ``engine`` lacks it. The
    caller of an import runs this before the import is staged, on either host.

    Raises:
        HostNotReady: neither engine has it (``make host`` builds it).
    """
    if engine.has_image(REFERENCE_IMAGE):
        return engine.image_id(REFERENCE_IMAGE)
    if image_source is None or not image_source.has_image(REFERENCE_IMAGE):
        raise HostNotReady(f"the engine has no image {REFERENCE_IMAGE}, which Dolly checks imported "
                           "checkpoints against: run `make host` on its host, or pass image_source=")
    # By ID, untagged: an import never adds or moves a name on the engine.
    image = image_source.image_id(REFERENCE_IMAGE)
    engine.ensure_image(image, None, source=image_source, tag=False)
    return image


def make_reference(engine: Engine, config: Mapping[str, Any], *, image: str) -> Reference:
    """Start, checkpoint and remove a reference container for ``config`` on ``engine``, made of
    ``image`` (:func:`reference_image`'s).

    Raises:
        DollyError: the engine refused the configuration or the checkpoint failed.
    """
    name = f"dolly-reference-{uuid.uuid4().hex[:12]}"
    cid = engine.create(reference_body(config, image=image), name)
    try:
        with translate_errors():
            engine.api.start(cid)
        cp = take(engine, cid, "reference", leave_running=False, max_layer_bytes=DEFAULT_MAX_LAYER_BYTES)
        try:
            return read_reference(cp.images_dir)
        finally:
            with contextlib.suppress(DollyError):
                remove(engine, cp)
    finally:
        engine.remove(cid, volumes=True)


def read_reference(images: Path) -> Reference:
    """The :class:`Reference` in a checkpoint's images (its first task's).

    Raises:
        ImageRewriteError: images pycriu cannot read.
    """
    ids = criu_images.root_task_ids(images)
    mounts = criu_images.load_image(images / f"mountpoints-{ids['mnt_ns_id']}.img")["entries"]
    core_img = criu_images.load_image(images / f"core-{_root_pid(images)}.img")
    core = _core_of(core_img)
    tc = core_img["entries"][0].get("tc") or {}
    seccomp_path = images / "seccomp.img"
    return Reference(
        mounts=mounts, cgroup=criu_images.load_image(images / "cgroup.img"), cg_set=int(core.get("cg_set", 0)),
        new_namespaces=new_namespaces(images), oom_score_adj=int(tc.get("oom_score_adj", 0)),
        rlimits=tc.get("rlimits"),
        seccomp=criu_images.load_image(seccomp_path) if seccomp_path.exists() else None,
        seccomp_filter=core.get("seccomp_filter") if core.get("seccomp_mode") == "filter" else None,
        seccomp_mode=str(core.get("seccomp_mode", "disabled")))


def needed(config: Mapping[str, Any], allowed: Any) -> bool:
    """Whether an imported checkpoint's images are to be rebuilt: always, but for one allowed
    privileged mode, which gives its container everything the images could (mounts, devices,
    every capability, no filter) and which the reference could not show otherwise."""
    return not ("privileged" in allowed and (config.get("HostConfig") or {}).get("Privileged"))


def rebuild(images: Path, ref: Reference) -> None:
    """Make ``images``' mount tree, cgroup and seccomp images from ``ref`` (the module's
    docstring says how), in place.

    Raises:
        UnsafeArchive: the checkpoint asks for what the reference does not hold (a mount, a
            namespace, a network namespace image of its own).
        ImageRewriteError: images pycriu cannot read or write.
    """
    _check_namespaces(images)
    check_files(images)
    made = new_namespaces(images)
    # Every namespace Docker makes must be made (one not made is CRIU's own: the host's); a new
    # time or cgroup namespace only isolates more (CRIU's own time namespace differs from the
    # container's where the engine runs in namespaces of its own), any other (a user namespace
    # with maps of the checkpoint's choosing) is refused.
    if not ref.new_namespaces <= made or not made - ref.new_namespaces <= ISOLATING_ONLY:
        raise UnsafeArchive(
            "the checkpoint's first task would be restored in namespaces other than those Docker makes "
            f"for its configuration (new: {', '.join(sorted(made)) or 'none'}; Docker's: "
            f"{', '.join(sorted(ref.new_namespaces))}): a shared one is the host's. This cannot be allowed")
    ids = criu_images.root_task_ids(images)
    path = images / f"mountpoints-{ids['mnt_ns_id']}.img"
    img = criu_images.load_image(path)
    img["entries"] = rebuild_mounts(img["entries"], ref.mounts)
    criu_images.replace_image(img, path)
    cores = sorted(images.glob("core-*.img"))
    loaded = {p: img for p in cores if not criu_images.is_zombie((img := criu_images.load_image(p))["entries"][0])}
    seccomp = criu_images.load_image(images / "seccomp.img") if (images / "seccomp.img").exists() else None
    new_seccomp, chains = rebuild_seccomp(seccomp, [_core_of(img) for img in loaded.values()], ref)
    for p, core_img in loaded.items():
        thread = _core_of(core_img)
        thread["cg_set"] = ref.cg_set
        # What CRIU sets as root before it drops the task's capabilities: its OOM score (-1000
        # makes it unkillable) and its limits (hard ones a container cannot raise itself). The
        # reference's are what the configuration gives.
        tc = core_img["entries"][0].get("tc")
        if isinstance(tc, dict):
            tc["oom_score_adj"] = ref.oom_score_adj
            if ref.rlimits is not None:
                tc["rlimits"] = ref.rlimits
            else:
                tc.pop("rlimits", None)
        mode, index = chains[id(thread)]
        thread["seccomp_mode"] = mode
        if index is None:
            thread.pop("seccomp_filter", None)
        else:
            thread["seccomp_filter"] = index
        criu_images.replace_image(core_img, p)
    if new_seccomp is None:
        (images / "seccomp.img").unlink(missing_ok=True)
    else:
        criu_images.replace_image(new_seccomp, images / "seccomp.img")
    criu_images.replace_image(dict(ref.cgroup), images / "cgroup.img")


def rebuild_mounts(foreign: Sequence[Mapping[str, Any]],
                   reference: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The mount entries of a restore: the reference's, at the foreign tree's mount IDs.

    Each foreign mountpoint must be one of the reference's, or one of Docker's masked paths
    that this host lacks or one Podman masks beyond Docker (left out: the clone is masked as
    Docker masks it); each of the
    reference's must be in the foreign tree. The entry written is the reference's, with the
    foreign ``mnt_id`` (open files name it), its parent's foreign ``mnt_id``, and a ``root_dev``
    that is shared exactly where the reference's is (CRIU takes mounts of one ``root_dev`` for
    binds of one file system, and finds a tmpfs's files by it).

    Raises:
        UnsafeArchive: a mount the reference does not hold, one missing, or mount IDs that are
            not a tree.
    """
    by_point: Dict[str, Mapping[str, Any]] = {}
    for e in foreign:
        point = e.get("mountpoint")
        if not isinstance(point, str) or not isinstance(e.get("mnt_id"), int) or point in by_point:
            raise UnsafeArchive(f"the checkpoint's mount tree has a malformed or repeated entry ({point!r:.200})")
        by_point[point] = e
    if len({e["mnt_id"] for e in foreign}) != len(foreign):
        raise UnsafeArchive("the checkpoint's mount tree repeats a mount ID")
    ref_by_point = {str(e["mountpoint"]): e for e in reference}
    extra = sorted(set(by_point) - set(ref_by_point) - masked_paths() - PODMAN_MASKS)
    if extra:
        raise UnsafeArchive(
            "the checkpoint's mount tree holds mounts that Docker does not make for its configuration "
            f"on this engine: {', '.join(repr(p)[:200] for p in extra[:5])}. This cannot be allowed")
    missing = sorted(set(ref_by_point) - set(by_point))
    if missing:
        raise UnsafeArchive(
            "the checkpoint's mount tree lacks mounts that Docker makes for its configuration on this "
            f"engine: {', '.join(missing[:5])}")
    ref_by_id = {e["mnt_id"]: e for e in reference}
    # Each of the reference's file systems (root_dev) gets the foreign root_dev of its own mount:
    # the one that is no external bind and shows the file system's root (a tmpfs's files are
    # found by that device), else its first mount. One foreign device per reference device, never
    # shared. (External binds are what runc hands CRIU by key: /dev/null, say, is the container's
    # /dev's on one engine and the host's devtmpfs on another.)
    owners: Dict[int, Mapping[str, Any]] = {}
    for e in reference:
        dev = int(e.get("root_dev", 0))
        own = not e.get("ext_key") and e.get("root") == "/"
        if dev not in owners or (own and (owners[dev].get("ext_key") or owners[dev].get("root") != "/")):
            owners[dev] = e
    devices = {dev: int(by_point[str(e["mountpoint"])].get("root_dev", 0)) for dev, e in owners.items()}
    if len(set(devices.values())) != len(devices):
        raise UnsafeArchive("the checkpoint's mount tree shares a file system between mounts that Docker "
                            "gives file systems of their own")
    rebuilt = []
    for e in reference:
        point = str(e["mountpoint"])
        new = dict(e)
        new["mnt_id"] = by_point[point]["mnt_id"]
        parent = ref_by_id.get(e.get("parent_mnt_id"))
        new["parent_mnt_id"] = (by_point[str(parent["mountpoint"])]["mnt_id"] if parent is not None
                                else by_point[point].get("parent_mnt_id", 0))
        new["root_dev"] = devices[int(e.get("root_dev", 0))]
        rebuilt.append(new)
    return rebuilt


def rebuild_seccomp(foreign: Optional[Mapping[str, Any]], threads: Sequence[Dict[str, Any]], ref: Reference):
    """The seccomp image of a restore and each thread's ``(mode, filter index)``, keyed by
    ``id(thread)``: a thread keeps its chain when the chain's first filter is the reference's
    (byte for byte); any other thread gets the reference's filter alone. The reference's
    filter comes first in the image written.

    Raises:
        UnsafeArchive: a chain that loops or names a filter that is not there.
    """
    if ref.seccomp_filter is None or ref.seccomp is None:
        # The accepted configuration runs unconfined (allowed security options or privileged
        # mode): what the checkpoint's tasks hold can only restrict them further.
        return foreign, {id(t): (t.get("seccomp_mode", "disabled"), t.get("seccomp_filter")) for t in threads}
    ref_filters = _filters(ref.seccomp)
    ref_chain = _chain(ref_filters, ref.seccomp_filter)
    base = [dict(ref_filters[i]) for i in ref_chain]  # root first
    for k, f in enumerate(base):
        f.pop("prev", None)
        if k:
            f["prev"] = k - 1
    top = len(base) - 1
    filters = _filters(foreign) if foreign is not None else []
    out = list(base)
    moved: Dict[int, int] = {}
    chains: Dict[int, Any] = {}
    for t in threads:
        index = t.get("seccomp_filter")
        keep = False
        if t.get("seccomp_mode") == "filter" and isinstance(index, int):
            chain = _chain(filters, index)
            keep = len(chain) >= len(base) and all(
                _same(filters[chain[k]], base[k]) for k in range(len(base)))
        if not keep:
            chains[id(t)] = ("filter", top)
            continue
        prev = top
        for i in chain[len(base):]:
            if i not in moved:
                f = dict(filters[i])
                f["prev"] = prev
                out.append(f)
                moved[i] = len(out) - 1
            prev = moved[i]
        chains[id(t)] = ("filter", prev)
    return {"magic": "SECCOMP", "entries": [{"seccomp_filters": out}]}, chains


def _filters(img: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    try:
        return list(img["entries"][0]["seccomp_filters"])
    except (KeyError, IndexError, TypeError) as e:
        raise UnsafeArchive(f"the checkpoint's seccomp image is not one ({type(e).__name__})") from e


def _chain(filters: Sequence[Mapping[str, Any]], index: int) -> List[int]:
    """The indexes of a chain from its first (outermost) filter to ``index``."""
    chain: List[int] = []
    i: Optional[int] = index
    while i is not None:
        if not isinstance(i, int) or not 0 <= i < len(filters) or i in chain:
            raise UnsafeArchive("the checkpoint's seccomp image has a chain that loops or names no filter")
        chain.append(i)
        i = filters[i].get("prev")
    return chain[::-1]


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    def raw(f: Mapping[str, Any]) -> bytes:
        data = f.get("filter", b"")
        return base64.b64decode(data) if isinstance(data, str) else bytes(data)

    return raw(a) == raw(b) and a.get("flags", 0) == b.get("flags", 0)


# The namespaces CRIU compares between a checkpoint's first task and its inventory's root_ids:
# where they are equal it makes no namespace, and the task stays in CRIU's own, the host's.
ISOLATING_ONLY = frozenset({"time", "cgroup"})
NAMESPACES = ("pid_ns_id", "net_ns_id", "ipc_ns_id", "uts_ns_id", "mnt_ns_id", "user_ns_id", "cgroup_ns_id",
              "time_ns_id")


def new_namespaces(images: Path) -> frozenset:
    """The namespaces a restore makes for the checkpoint's tasks: those in which every task's id
    differs from the inventory's ``root_ids`` (CRIU's ``root_ns_mask``; criu/pstree.c). A
    namespace in which some task equals ``root_ids`` and another does not is named with a
    ``mixed:`` prefix, which no reference has.

    Raises:
        ImageRewriteError: images pycriu cannot read.
    """
    try:
        root = criu_images.load_image(images / "inventory.img")["entries"][0]["root_ids"]
        tasks = [criu_images.load_image(p)["entries"][0] for p in sorted(images.glob("ids-*.img"))]
    except (KeyError, IndexError, TypeError) as e:
        raise ImageRewriteError(f"the checkpoint has no readable namespace ids ({type(e).__name__})") from e
    made = set()
    for key in NAMESPACES:
        differs = {t.get(key) != root.get(key) for t in tasks}
        if differs == {True}:
            made.add(key[:-6])
        elif differs == {True, False}:
            made.add(f"mixed:{key[:-6]}")
    return frozenset(made)


# Descriptor kinds an imported checkpoint may not hold (files.img, CRIU's fd_types), and CRIU's
# older separate images of them (still read by a restore).
REFUSED_FILES = frozenset({"FANOTIFY", "NS", "TUNF", "EXT", "BPFMAP"})
REFUSED_IMAGES = ("fanotify", "fanotify-mark", "inotify", "inotify-wd", "ns-files", "tunfile", "ext-files",
                  "bpfmap-file", "bpfmap-data", "binfmt-misc")


def check_files(images: Path) -> None:
    """Refuse what CRIU would reopen as root beyond the container's own files (the module's
    docstring says which).

    Raises:
        UnsafeArchive: naming the descriptor or image.
        ImageRewriteError: a files image pycriu cannot read.
    """
    pattern = re.compile(rf"({'|'.join(map(re.escape, REFUSED_IMAGES))})(-\d+)?\.img\Z")
    found = sorted(p.name for p in images.iterdir() if pattern.match(p.name))
    if found:
        raise UnsafeArchive(f"the checkpoint holds {found[0]}: CRIU would restore that kind of descriptor as "
                            "root beyond the container's own files. This cannot be allowed")
    path = images / "files.img"
    if not path.exists():
        return
    for entry in criu_images.load_image(path).get("entries") or []:
        kind = entry.get("type")
        if kind in REFUSED_FILES:
            raise UnsafeArchive(f"the checkpoint holds a descriptor of kind {kind} (id {entry.get('id')}), which "
                                "CRIU would open as root beyond the container's own files. This cannot be allowed")
        if kind == "INOTIFY":
            for wd in (entry.get("ify") or {}).get("wd") or []:
                if not (wd.get("f_handle") or {}).get("path"):
                    raise UnsafeArchive(
                        "the checkpoint holds an inotify watch without a path: CRIU would open its file "
                        "handle on any mount of that device, outside the container's tree. This cannot be "
                        "allowed")


def _check_namespaces(images: Path) -> None:
    """Raises:
        UnsafeArchive: a task in a mount, network, user or cgroup namespace of its own, or a
            network namespace image (CRIU would make that namespace, links and all, as root).
    """
    first = criu_images.load_image(images / f"ids-{_root_pid(images)}.img")["entries"][0]
    for path in sorted(images.glob("ids-*.img")):
        ids = criu_images.load_image(path)["entries"][0]
        for key in ("mnt_ns_id", "net_ns_id", "user_ns_id", "cgroup_ns_id"):
            if ids.get(key) != first.get(key):
                raise UnsafeArchive(f"a task of the checkpoint ({path.name}) is in a {key[:-6]} namespace of its "
                                    "own, which a restore would make as root: this cannot be allowed")
    found = sorted(p.name for p in images.glob("netns-*.img"))
    if found:
        raise UnsafeArchive(f"the checkpoint holds a network namespace of its own ({found[0]}), which a restore "
                            "would make as root: Docker's checkpoints join the namespace the engine makes")


def _root_pid(images: Path) -> int:
    try:
        return int(criu_images.load_image(images / "pstree.img")["entries"][0]["pid"])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ImageRewriteError(f"the checkpoint has no readable process tree ({type(e).__name__})") from e


def _core_of(img: Mapping[str, Any]) -> Dict[str, Any]:
    try:
        core = img["entries"][0]["thread_core"]
    except (KeyError, IndexError, TypeError) as e:
        raise ImageRewriteError(f"a core image holds no thread state ({type(e).__name__})") from e
    if not isinstance(core, dict):
        raise ImageRewriteError("a core image holds no thread state")
    return core
