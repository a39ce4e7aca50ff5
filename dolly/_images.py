"""CRIU's image files: reading them and rewriting them (with pycriu) before a restore.

CRIU restores a container's UTS namespace from ``utsns-<id>.img``, so without a rewrite every clone
comes up with the kernel hostname of the container it was cloned from (``uname -n`` and
``/proc/sys/kernel/hostname``), even though Docker gives it its own ``/etc/hostname``. The other
readers serve the restore policy and the rebuild of imported checkpoints (what tasks, mounts,
namespaces and descriptors the images hold); the other rewriters, clones and imports.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ._criu import check_hostname
from .errors import HostNotReady, ImageRewriteError


def uts_images(images_dir: Path) -> list[Path]:
    return sorted(Path(images_dir).glob("utsns-*.img"))


def read_hostname(images_dir: Path) -> str:
    """The kernel hostname recorded in a checkpoint's UTS namespace image.

    Raises:
        ImageRewriteError: no UTS image, or one pycriu cannot read.
    """
    images = uts_images(images_dir)
    if not images:
        raise ImageRewriteError(f"no utsns-*.img in {images_dir}")
    return hostname_in(images[0])


def hostname_in(image: Path) -> str:
    """The nodename in one UTS namespace image.

    Raises:
        ImageRewriteError: not a UTS image pycriu can read.
    """
    img = _load(image)
    try:
        nodename = img["entries"][0]["nodename"]
    except (KeyError, IndexError, TypeError) as e:
        raise ImageRewriteError(f"{image} is not a UTS namespace image ({type(e).__name__})") from e
    if img.get("magic") != "UTSNS" or not isinstance(nodename, str):
        raise ImageRewriteError(f"{image} is not a UTS namespace image")
    return nodename


def rewrite_hostname(src: Path, dst: Union[str, Path], hostname: str) -> None:
    """Write ``dst``, a copy of the UTS image ``src`` whose nodename is ``hostname``.

    A new file, never an edit in place: the other files of a clone's checkpoint folder are hard
    links into the shared checkpoint, and this one must not be.

    Raises:
        InvalidArgument: ``hostname`` is not a valid hostname.
        ImageRewriteError: ``src`` is not a UTS image pycriu can read, or ``dst`` cannot be written.
    """
    check_hostname(hostname)
    hostname_in(src)  # it is a UTS image
    img = _load(src)
    entries = img["entries"]
    if len(entries) != 1:
        raise ImageRewriteError(f"{src} is not a UTS namespace image")
    entries[0]["nodename"] = hostname
    _replace_image(img, Path(dst))


# CRIU's enum NETWORK_LOCK_METHOD (criu/include/cr_options.h), as the inventory records it.
NETWORK_LOCK_SKIP = 2


def without_network_lock(src: Path, dst: Union[str, Path]) -> None:
    """Write ``dst``, a copy of the inventory image ``src`` that has CRIU restore without its
    network lock.

    A restore takes its network-lock method from the dump's inventory, not from its own options:
    with iptables (CRIU's default) it locks the new network namespace with iptables-restore at
    the start and unlocks it with four more at the end, about 0.1 s of a restore here, each
    waiting on an nf_tables commit. The lock guards TCP connections restored mid-flight: a
    socket rebuilt in repair mode on its old address, which a peer's packet arriving before the
    restore ends would otherwise meet as no socket, and reset. A checkpoint may carry
    established connections (``dolly.checkpoint(..., tcp_established=True)``), but Dolly
    restores them closed (CRIU's --tcp-close, asked for by every start from its spool: see
    dolly._start's ``_place_images``): a socket made and shut down, never bound to the old
    address nor put in repair mode, so there is nothing for the lock to guard; and the namespace
    is a new one that nothing reaches before the restore is done. A restore that kept the
    connections (runc's --tcp-established, on a container that has the source's address) would
    need the lock: its inventory must not go through here. A new file, as for the UTS image.

    Raises:
        ImageRewriteError: ``src`` is not an inventory image pycriu can read, or ``dst`` cannot
            be written.
    """
    img = _load(src)
    entries = img.get("entries")
    if img.get("magic") != "INVENTORY" or not isinstance(entries, list) or len(entries) != 1:
        raise ImageRewriteError(f"{src} is not a CRIU inventory image")
    entries[0]["network_lock_method"] = NETWORK_LOCK_SKIP
    _replace_image(img, Path(dst))


def processes(images_dir: Path) -> list[dict]:
    """What each task of a checkpoint will hold when restored: its capability sets (64-bit
    masks ``cap_prm``, ``cap_eff``, ``cap_bnd``, ``cap_inh``, ``cap_amb``) and seccomp mode, from
    its ``core-<tid>.img``, with ``name`` = ``comm (tid)``.

    Raises:
        ImageRewriteError: a core image pycriu cannot read, or one without credentials.
    """
    found = []
    for image in sorted(Path(images_dir).glob("core-*.img")):
        try:
            entry0 = _load(image)["entries"][0]
            if is_zombie(entry0):
                continue  # a zombie holds no credentials, and CRIU restores it as one: it never runs
            core = entry0["thread_core"]
            creds = core["creds"]
            entry: dict[str, object] = {key: _mask(creds.get(key))
                                        for key in ("cap_prm", "cap_eff", "cap_bnd", "cap_inh", "cap_amb")}
            entry["seccomp_mode"] = core.get("seccomp_mode", "disabled")
            entry["name"] = f"{core.get('comm', '?')} ({image.stem.removeprefix('core-')})"
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ImageRewriteError(f"{image} holds no task credentials ({type(e).__name__})") from e
        found.append(entry)
    return found


# CRIU's TASK_DEAD (criu/include/pid.h): a zombie, dumped without thread state. pycriu maps only
# some task states to names (and names 3, CRIU's TASK_STOPPED, "Zombie"): this one it leaves a number.
TASK_DEAD = 2


def is_zombie(core: dict) -> bool:
    """Whether a core image's entry is a zombie's: it has no thread state, credentials or
    seccomp filter of its own, and CRIU restores it as a zombie, never running."""
    return "thread_core" not in core and (core.get("tc") or {}).get("task_state") == TASK_DEAD


def mountpoints(images_dir: Path) -> set[str]:
    """Where the checkpoint's mount tree has mounts, from its ``mountpoints-*.img``.

    Raises:
        ImageRewriteError: a mount image pycriu cannot read.
    """
    points = set()
    for image in sorted(Path(images_dir).glob("mountpoints-*.img")):
        try:
            points |= {str(m["mountpoint"]) for m in _load(image)["entries"]}
        except (KeyError, TypeError) as e:
            raise ImageRewriteError(f"{image} is not a mount image ({type(e).__name__})") from e
    return points


def _mask(words: object) -> int:
    """CRIU keeps a capability set as 32-bit words, low first."""
    if words is None:
        return 0
    if not isinstance(words, list) or not all(isinstance(w, int) and 0 <= w < 1 << 32 for w in words):
        raise ValueError(f"not a capability set: {words!r:.60}")
    return sum(w << (32 * i) for i, w in enumerate(words))


# The largest CRIU image Dolly parses. pycriu holds an image as Python objects at about seven
# times its size: a crafted 74 MiB core image took 525 MiB of the importing root process before
# any policy decision. The images Dolly reads (cores, mounts, cgroups, seccomp filters, ids,
# inventory, UTS, files) are a few KiB to a few MiB for any real container; pages are never parsed.
MAX_IMAGE_BYTES = 16 << 20


def load_image(path: Path) -> dict:
    """A CRIU image as pycriu decodes it, read only if it is at most :data:`MAX_IMAGE_BYTES`.

    Raises:
        ImageRewriteError: too large, or not an image pycriu can read.
    """
    return _load(path)


def replace_image(img: dict, path: Path) -> None:
    """Write ``img`` over ``path`` as :func:`_replace_image` does (beside it, then renamed).

    Raises:
        ImageRewriteError: pycriu cannot write ``img``, or ``path`` cannot be replaced.
    """
    _replace_image(img, path)


def _load(path: Path) -> dict:
    try:
        import pycriu.images
    except ImportError as e:
        raise HostNotReady(f"pycriu is not importable ({e}): run `make host`") from e
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_IMAGE_BYTES:
                raise ImageRewriteError(f"CRIU image {path} is {size} bytes, more than the {MAX_IMAGE_BYTES} "
                                        "Dolly reads: no real container's is that large")
            return pycriu.images.load(f)
    except ImageRewriteError:
        raise
    except Exception as e:  # pycriu raises bare Exceptions, KeyErrors and protobuf DecodeErrors
        raise ImageRewriteError(f"cannot read CRIU image {path}: {type(e).__name__}: {e}") from e


# --- images for another engine (dolly._formats) ---------------------------------------------------


def root_task_ids(images_dir: Path) -> dict:
    """The namespace IDs of the checkpoint's first task (``ids-<pid>.img``).

    Raises:
        ImageRewriteError: no pstree or ids image pycriu can read.
    """
    try:
        root = int(_load(Path(images_dir) / "pstree.img")["entries"][0]["pid"])
        ids = dict(_load(Path(images_dir) / f"ids-{root}.img")["entries"][0])
        for key in ("mnt_ns_id", "net_ns_id"):
            ids[key] = int(ids[key])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ImageRewriteError(f"the checkpoint's first task has no readable ids ({type(e).__name__})") from e
    return ids


def external_netns_image(images_dir: Path, out: Path, *, key: str) -> Optional[str]:
    """Write ``out`` (named ``netns-<id>.img`` by the caller from the returned name) marking the
    first task's network namespace as external under ``key``: a restore then joins the namespace
    the runtime hands CRIU under that key (runc: ``extRootNetNS``, the spec's netns path) instead
    of making an empty one. Docker's checkpoints leave the namespace out (its engine makes a new
    one and sets it up in a hook); Podman names the one its network made. Returns the image's
    file name, or None when the checkpoint has its own network namespace image already.

    Raises:
        ImageRewriteError: images pycriu cannot read or write.
    """
    name = f"netns-{root_task_ids(images_dir)['net_ns_id']}.img"
    if (Path(images_dir) / name).exists():
        return None
    _dump({"magic": "NETNS", "entries": [{"ext_key": key}]}, out)
    return name


def root_mode_rewritten(images_dir: Path, out: Optional[Path], *, mode: int) -> int:
    """Write ``out`` (None: ``files.img`` itself), a copy of ``files.img`` whose entries for the
    container's root directory (``/``, a directory) have ``mode``'s permission bits: CRIU checks
    that a reopened directory has the mode it had, and engines give the same image's root
    different modes (Docker 0755, Podman 0555). Returns how many entries changed.

    Raises:
        ImageRewriteError: an image pycriu cannot read or write.
    """
    img = _load(Path(images_dir) / "files.img")
    changed = 0
    for entry in img["entries"]:
        reg = entry.get("reg") or {}
        if reg.get("name") == "/" and isinstance(reg.get("mode"), int) and reg["mode"] & 0o170000 == 0o040000:
            reg["mode"] = (reg["mode"] & ~0o7777) | mode
            changed += 1
    if out is None:
        _replace_image(img, Path(images_dir) / "files.img")
    else:
        _dump(img, out)
    return changed


def without_external_netns(images_dir: Path) -> bool:
    """Remove the first task's network namespace image when it only names an external namespace
    (Podman's and the kubelet's, joined by path): Docker's checkpoints have none, and a Docker
    container's namespace is made by runc and set up by the engine's hook. Returns whether one
    was removed.

    Raises:
        ImageRewriteError: images pycriu cannot read.
    """
    path = Path(images_dir) / f"netns-{root_task_ids(images_dir)['net_ns_id']}.img"
    if not path.exists():
        return False
    entries = _load(path)["entries"]
    if not (len(entries) == 1 and entries[0].get("ext_key")):
        return False
    path.unlink()
    return True


TMPFS = 5  # CRIU's fstype of a tmpfs (images/mnt.proto)


def external_tmpfs_inlined(images_dir: Path, key: str) -> Optional[Path]:
    """Rewrite the first task's ``mountpoints-<id>.img`` in place so that the external tmpfs
    mount under ``key`` (Podman's ``/dev/shm``, a bind of a tmpfs the engine made) is the
    container's own tmpfs, as Docker makes it. Returns where CRIU will look for its files (a
    gzipped tar, ``tmpfs-dev-<device>.tar.gz.img``, for the caller to write), or None when
    there is no such mount.

    Raises:
        ImageRewriteError: images pycriu cannot read or write.
    """
    path = Path(images_dir) / f"mountpoints-{root_task_ids(images_dir)['mnt_ns_id']}.img"
    img = _load(path)
    found = [e for e in img["entries"] if e.get("ext_key") == key and e.get("fstype") == TMPFS]
    if len(found) != 1 or found[0].get("root") != "/" or not isinstance(found[0].get("root_dev"), int):
        return None
    del found[0]["ext_key"]
    _replace_image(img, path)
    return Path(images_dir) / f"tmpfs-dev-{found[0]['root_dev']}.tar.gz.img"


def mount_types(images_dir: Path) -> list:
    """``(mountpoint, fstype, external)`` of every mount in the checkpoint's mount images.

    Raises:
        ImageRewriteError: a mount image pycriu cannot read.
    """
    found = []
    for image in sorted(Path(images_dir).glob("mountpoints-*.img")):
        try:
            found += [(str(m["mountpoint"]), int(m.get("fstype", 0)), bool(m.get("ext_key")))
                      for m in _load(image)["entries"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ImageRewriteError(f"{image} is not a mount image ({type(e).__name__})") from e
    return found


def without_mounts(images_dir: Path, *, keep) -> list:
    """Rewrite the first task's ``mountpoints-<id>.img`` in place without the external (bind)
    mounts whose key ``keep(key)`` refuses, and the mounts below them: what the engine of the
    restore will not hand CRIU (runc maps only its spec's mounts). A restore that finds a file
    open on a dropped mount fails. Returns the dropped mounts' paths.

    Raises:
        ImageRewriteError: images pycriu cannot read or write.
    """
    path = Path(images_dir) / f"mountpoints-{root_task_ids(images_dir)['mnt_ns_id']}.img"
    img = _load(path)
    dropped = {e["mnt_id"] for e in img["entries"] if e.get("ext_key") and not keep(e["ext_key"])}
    while True:
        below = {e["mnt_id"] for e in img["entries"] if e.get("parent_mnt_id") in dropped} - dropped
        if not below:
            break
        dropped |= below
    if not dropped:
        return []
    paths = [e["mountpoint"] for e in img["entries"] if e["mnt_id"] in dropped]
    img["entries"] = [e for e in img["entries"] if e["mnt_id"] not in dropped]
    _replace_image(img, path)
    return paths


def _replace_image(img: dict, path: Path) -> None:
    """Write ``img`` to ``path``, whether an image is there or not: beside it, then renamed over
    it, so that a hard link at ``path`` (into a shared checkpoint) is replaced, never written
    through, and a reader sees the old file or the new one.

    Raises:
        ImageRewriteError: pycriu cannot write ``img``, or ``path`` cannot be replaced.
    """
    new = path.with_name(path.name + ".new")
    new.unlink(missing_ok=True)
    try:
        _dump(img, new)
        os.replace(new, path)
    except OSError as e:
        raise ImageRewriteError(f"cannot write CRIU image {path}: {e}") from e
    finally:
        new.unlink(missing_ok=True)


def _dump(img: dict, out: Path) -> None:
    import pycriu.images

    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            pycriu.images.dump(img, f)
    except Exception as e:  # pycriu raises bare Exceptions
        raise ImageRewriteError(f"cannot write CRIU image {out}: {type(e).__name__}: {e}") from e
