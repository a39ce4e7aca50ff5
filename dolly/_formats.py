"""The ecosystem's checkpoint archives: Podman's, and the kubelet's (CRI-O's and containerd's).

They are one family (../shared/INTEROP-NOTES.md has the sources): a tar, maybe compressed, of

    checkpoint/        CRIU's images, with a directory entry
    config.dump        the engine's container configuration: Podman's ContainerConfig (``id``,
                       ``name``, ``rootfsImageID``, ``rootfsImageName``, ``runtime``, ...), or
                       checkpointctl's reduced one for CRI-O (``rootfsImage``, ``rootfsImageRef``)
    spec.dump          the OCI runtime spec (``io.container.manager``: ``libpod``, ``cri-o``)
    rootfs-diff.tar    files the container changed (plain form), deleted.files those it deleted
    stats-dump         CRIU's dump statistics
    network.status     Podman: the container's addresses
    bind.mounts        CRI-O: the CRI request's mounts; status.dump containerd's container status
    dump.log           CRI-O: CRIU's log

:func:`import_foreign` makes one a Dolly checkpoint on a Docker Engine. Such an archive carries no
Dolly manifest and no signature: it is imported only with ``allow_unsigned=True``, and everything
in it is held to the rules of a Dolly bundle (paths, member kinds, sizes, the restore policy, the
process images against the configuration). What cannot apply to one Docker container (the pod,
the CRI request's mounts, Kubernetes' annotations, the old addresses) is reported in the
checkpoint's ``origin["not_applied"]`` and logged, not dropped silently.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import types
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from . import _images as criu_images, _names as names, _rootfs as rootfs, policy
from ._archive import GZIP_MAGIC, repack_tmpfs, sha256_file, small_json, tarfile, write_member
from ._checkpoint import ROOTFS_DIFF, Checkpoint
from .errors import BundleError, ImageRewriteError, UnsafeArchive, UnsignedBundle

log = logging.getLogger("dolly")

FORMATS = ("podman", "cri-o", "containerd")
_MEMBER_RE = re.compile(r"^(config\.dump|spec\.dump|network\.status|rootfs-diff\.tar|deleted\.files|stats-dump|"
                        r"bind\.mounts|status\.dump|dump\.log|devshm-checkpoint\.tar|ctr\.log|checkpoint/[A-Za-z0-9][A-Za-z0-9._-]{0,200})\Z")
_MAX_MEMBERS = 100_000
_IMAGE_ID_RE = re.compile(r"^(sha256:)?([0-9a-f]{64})\Z")
# The mounts Docker makes in every container itself; any other mount of the spec is reported.
_ENGINE_MOUNTS = {"/proc", "/dev", "/dev/pts", "/sys", "/sys/fs/cgroup", "/dev/mqueue", "/dev/shm",
                  "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv", "/run/secrets",
                  "/dev/termination-log"}
# The external (bind) mounts a Docker container's spec hands CRIU on a restore; others are left
# out of a foreign checkpoint's mount tree.
_DOCKER_MOUNTS = {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/dev/shm", "/dev/null"}
# Annotations of the pod a container belonged to (io.kubernetes.pod.name, io.podman.annotations.pod...)
_POD_ANNOTATION_RE = re.compile(r"^io\.(kubernetes|podman\.annotations)\..*(\bpod|Pod|\bsandbox|Sandbox)")
# Podman's folder for extra files (none are imported); its directory entry is passed over.
_ARTIFACTS_FOLDER = "artifacts"


# CRIU's images sit in this folder of the archive, with a directory entry of their own:
# checkpointctl finds them by it.
IMAGES_FOLDER = "checkpoint"


def images_folder_entry(mtime: int = 0) -> tarfile.TarInfo:
    """The archive's directory entry for :data:`IMAGES_FOLDER`, written before the images."""
    folder = tarfile.TarInfo(IMAGES_FOLDER)
    folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o700, mtime
    return folder


def is_images_folder(member: tarfile.TarInfo) -> bool:
    """Whether ``member`` is the directory entry of :data:`IMAGES_FOLDER` (passed over when
    reading: the images are its regular members)."""
    return member.isdir() and member.name.removeprefix("./").rstrip("/") == IMAGES_FOLDER


def is_foreign(first: Optional[tarfile.TarInfo]) -> bool:
    """Whether an archive whose first member is ``first`` is not a Dolly bundle (which starts
    with its manifest)."""
    return first is not None and first.name != "manifest.json"


def extract(tar: tarfile.TarFile, first: tarfile.TarInfo, members: Iterator[tarfile.TarInfo], into: Path, *,
            max_bytes: int) -> None:
    """Every member, held to the family's layout, into the new folder ``into``.

    Raises:
        UnsafeArchive: a member outside the layout, not a regular file (or the one directory
            ``checkpoint``), twice, unsafe, or more than ``max_bytes`` in all.
    """
    into.mkdir(mode=0o700)
    (into / "checkpoint").mkdir(mode=0o700)
    seen: set = set()
    total = 0
    member: Optional[tarfile.TarInfo] = first
    while member is not None:
        name = member.name[2:] if member.name.startswith("./") else member.name
        if is_images_folder(member) or (member.isdir() and name.rstrip("/") in (".", _ARTIFACTS_FOLDER)):
            folder = name.rstrip("/") or "."
            if folder in seen:  # each once: a stream of folder entries would be endless work
                raise UnsafeArchive(f"the archive holds the folder {folder!r} twice")
            seen.add(folder)
            member = next(members, None)
            continue
        if not _MEMBER_RE.match(name):
            raise UnsafeArchive(f"the archive holds {member.name!r:.200}, which is not part of a checkpoint "
                                "archive (volumes and other extras are not imported)")
        if not member.isfile() or member.sparse is not None:
            raise UnsafeArchive(f"{member.name!r} in the archive is not a regular file (links and devices "
                                "are refused)")
        try:
            tarfile.data_filter(member, str(into))
        except tarfile.FilterError as e:
            raise UnsafeArchive(f"refused while extracting: {e}") from e
        if name in seen:
            raise UnsafeArchive(f"the archive holds {name!r} twice")
        seen.add(name)
        total += member.size
        if total > max_bytes or len(seen) > _MAX_MEMBERS:
            raise UnsafeArchive(f"the archive unpacks to more than {max_bytes} bytes or {_MAX_MEMBERS} files")
        write_member(tar, member, names.inside(into, *name.split("/"), error=UnsafeArchive), sha256=None)
        member = next(members, None)
    for required in ("config.dump", "spec.dump", "checkpoint/inventory.img"):
        if required not in seen:
            raise BundleError(f"not a checkpoint archive: it lacks {required}")


def detect(extracted: Path, spec: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """Which engine wrote the archive: by its content, as checkpointctl tells them apart."""
    manager = _mapping(spec.get("annotations")).get("io.container.manager")
    if (extracted / "status.dump").exists():
        return "containerd"
    if manager == "cri-o" or (extracted / "bind.mounts").exists():
        return "cri-o"
    if manager == "libpod" or "rootfsImageID" in config:
        return "podman"
    raise BundleError("a checkpoint archive of no engine Dolly knows (not Podman's, CRI-O's or containerd's)")


def make_checkpoint(extracted: Path, folder: Path, store_dir: Path, *, allow_unsigned: bool,
                    max_bytes: int) -> Tuple[Checkpoint, Path, str, Optional[str], str]:
    """Dolly's checkpoint folder from an extracted archive of the family: returns the checkpoint
    (its ``origin`` not yet set), its place in the store, the image's ID and name, and the format.

    Raises:
        UnsignedBundle: without ``allow_unsigned`` (these archives carry no signature).
        BundleError, UnsafeArchive: fields that break Dolly's rules, or a layer that does.
    """
    spec = small_json(extracted / "spec.dump")
    config = small_json(extracted / "config.dump")
    if not isinstance(spec, dict) or not isinstance(config, dict):
        raise BundleError("spec.dump and config.dump must be JSON objects")
    kind = detect(extracted, spec, config)
    if not allow_unsigned:
        raise UnsignedBundle(f"a {kind} checkpoint archive carries no signature Dolly can check: import it with "
                             "allow_unsigned=True if you trust where it came from")
    container_id = str(config.get("id") or "")
    if not re.fullmatch(r"[0-9a-f]{64}", container_id):
        raise BundleError(f"config.dump's id is not a container ID: {container_id!r:.80}")
    container_name = str(config.get("name") or "").lstrip("/")
    try:
        names.container_name(container_name)
    except Exception as e:
        raise BundleError(f"config.dump's name is not a container name: {e}") from None
    image_id, image_name = _image(config)
    created_at = _go_time(config.get("checkpointedTime")) or _go_time(config.get("createdTime")) or datetime.now(UTC)
    name = f"{kind.replace('-', '')}-{created_at.strftime('%Y%m%dT%H%M%S.%fZ')}"
    final = names.inside(store_dir, container_id, name, error=BundleError)

    unpack_layout(extracted, folder, max_bytes=max_bytes)
    recorded, not_applied = docker_config(spec, config, container_id=container_id, name=container_name,
                                          image_id=image_id, image_name=image_name)
    not_applied += _extras(extracted, kind)
    try:
        not_applied += docker_images(extracted, folder / "criu", kind, max_bytes=max_bytes)
    except ImageRewriteError as e:
        raise UnsafeArchive(f"the archive's CRIU images cannot be made Docker's: {e}") from e
    cp = Checkpoint(container_id=container_id, container_name=container_name, name=name, created_at=created_at,
                    hostname=criu_images.read_hostname(folder / "criu"), config=types.MappingProxyType(recorded),
                    path=final, origin={"format": kind, "not_applied": not_applied})
    return cp, final, image_id, image_name, kind


def unpack_layout(extracted: Path, folder: Path, *, max_bytes: int) -> None:
    """The new checkpoint folder ``folder`` (see dolly._checkpoint) from the family's members,
    extracted and held to their rules, in ``extracted`` (a Dolly bundle's or another engine's):
    CRIU's images, the writable layer in overlay form (from ``rootfs-diff.tar`` and
    ``deleted.files``, each absent when nothing changed), the spec and CRIU's statistics.

    Raises:
        UnsafeArchive: a deleted.files that is no list of paths, or a layer that breaks the rules
            of :func:`dolly._rootfs.to_overlay_form`.
    """
    folder.mkdir(mode=0o700)
    os.rename(extracted / "checkpoint", folder / "criu")
    deleted: Any = []
    if (extracted / "deleted.files").exists():
        deleted = small_json(extracted / "deleted.files")
    if not isinstance(deleted, list) or not all(isinstance(d, str) for d in deleted) or len(deleted) > rootfs.MAX_FILES:
        raise UnsafeArchive("deleted.files is not a list of paths")
    diff = extracted / "rootfs-diff.tar"
    if not diff.exists():  # the engines leave it out when nothing changed
        with tarfile.open(diff, "w"):
            pass
    rootfs.to_overlay_form(diff, deleted, folder / ROOTFS_DIFF, max_bytes=max_bytes)
    # CRIU unpacks each tmpfs's files with GNU tar, as root: only what a container's own may hold.
    for image in sorted((folder / "criu").glob("tmpfs-*.img")):
        clean = image.with_name(image.name + ".clean")
        repack_tmpfs(image, clean, max_bytes=max_bytes)
        os.replace(clean, image)
    for member in ("spec.dump", "stats-dump"):
        if (extracted / member).exists():
            os.rename(extracted / member, folder / member)


def docker_config(spec: Mapping[str, Any], config: Mapping[str, Any], *, container_id: str, name: str,
                  image_id: str, image_name: Optional[str]) -> Tuple[Dict[str, Any], List[str]]:
    """What ``docker inspect`` would say of a container that runs what the OCI ``spec`` runs,
    for :func:`dolly.clone` to create from (and the restore policy to judge), and the spec's
    settings that it does not carry over.

    Raises:
        BundleError: a spec without a process.
    """
    process = _mapping(spec.get("process"))
    args = process.get("args")
    if not (isinstance(args, list) and args and all(isinstance(a, str) for a in args)):
        raise BundleError("spec.dump has no process.args")
    env = [e for e in process.get("env") or [] if isinstance(e, str)]
    user = _mapping(process.get("user"))
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    bounding = {str(c).removeprefix("CAP_") for c in _mapping(process.get("capabilities")).get("bounding") or []}
    defaults = set(policy.DEFAULT_CAPABILITIES)
    not_applied: List[str] = []
    namespaces = {str(_mapping(n).get("type")): _mapping(n).get("path") for n in
                  _mapping(spec.get("linux")).get("namespaces") or []}
    host = {
        "NetworkMode": "default",
        "CapAdd": sorted(bounding - defaults) or None,
        "CapDrop": sorted(defaults - bounding) or None,
        "Privileged": False,
        "ReadonlyRootfs": bool(_mapping(spec.get("root")).get("readonly")),
    }
    for kind in ("pid", "ipc", "uts", "network"):
        if kind not in namespaces:
            # The host's namespace: Docker's --pid=host and the like, which the policy judges.
            host[{"pid": "PidMode", "ipc": "IpcMode", "uts": "UTSMode", "network": "NetworkMode"}[kind]] = "host"
    for mount in spec.get("mounts") or []:
        m = _mapping(mount)
        dest = str(m.get("destination") or "")
        if dest and dest not in _ENGINE_MOUNTS and not dest.startswith(("/proc/", "/sys/", "/dev/")):
            not_applied.append(f"mount of {m.get('source')!s:.200} at {dest:.200} ({m.get('type')}): "
                               "not made in the Docker container")
    annotations = _mapping(spec.get("annotations"))
    pod = [f"{k}={v!s:.100}" for k, v in annotations.items()
           if _POD_ANNOTATION_RE.match(str(k))]
    if pod:
        not_applied.append("pod-level annotations (the container joins no pod): " + ", ".join(sorted(pod)[:8]))
    if config.get("pod"):
        not_applied.append(f"Podman pod {config.get('pod')!s:.80}: the container joins no pod")
    recorded = {
        "Id": container_id,
        "Name": "/" + name,
        "Image": image_id,
        "Config": {
            "Hostname": str(spec.get("hostname") or ""),
            "User": f"{int(uid)}:{int(gid)}",
            "Env": env,
            "Cmd": args[1:],
            "Entrypoint": args[:1],
            "WorkingDir": str(process.get("cwd") or "/"),
            "Tty": bool(process.get("terminal")),
            "Image": image_name or image_id,
            "Labels": {},
        },
        "HostConfig": host,
        "NetworkSettings": {"Networks": {}},
    }
    return recorded, not_applied


def docker_images(extracted: Path, images: Path, kind: str, *, max_bytes: int) -> List[str]:
    """Rewrite another engine's CRIU images in place into what a Docker container's restore
    hands CRIU: :func:`undo_podman_images`; Podman's ``/dev/shm`` (a bind of a tmpfs the
    engine made, its files in ``devshm-checkpoint.tar``) made the container's own tmpfs with
    those files, as Docker's is; and no other bind mounts than Docker's. Returns the engine's
    own mounts left out (mounts of the spec are reported with it).

    Raises:
        UnsafeArchive: a devshm-checkpoint.tar holding more than regular files and folders.
    """
    undo_podman_images(images)
    shm = extracted / "devshm-checkpoint.tar"
    target = criu_images.external_tmpfs_inlined(images, "/dev/shm")
    if target is not None:
        if shm.exists():
            repack_tmpfs(shm, target, max_bytes=max_bytes)
        else:
            _empty_tmpfs(target)
    dropped = criu_images.without_mounts(
        images, keep=lambda key: key in _DOCKER_MOUNTS or key.startswith("/sys/fs/cgroup/"))
    return [f"{kind}'s mount at {path}: not in the Docker container" for path in dropped if path in _ENGINE_MOUNTS]


def undo_podman_images(images: Path) -> None:
    """Rewrite CRIU's images in place from Podman's set-up (see :func:`podman_members`) to
    Docker's: no external network namespace (runc makes one, Docker's hook sets it up), and the
    root directory's mode as Docker gives it (0755)."""
    criu_images.without_external_netns(images)
    criu_images.root_mode_rewritten(images, None, mode=DOCKER_ROOT_MODE)


def _empty_tmpfs(target: Path) -> None:
    with open(target, "xb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as packed, \
            tarfile.open(fileobj=packed, mode="w|"):
        pass


def _extras(extracted: Path, kind: str) -> List[str]:
    out = []
    if (extracted / "bind.mounts").exists():
        mounts = small_json(extracted / "bind.mounts")
        for m in mounts if isinstance(mounts, list) else []:
            m = _mapping(m)
            out.append(f"CRI mount {m.get('hostPath')!s:.200} at {m.get('containerPath')!s:.200}: not made in the "
                       "Docker container")
    if (extracted / "status.dump").exists():
        out.append("containerd's container status (status.dump): not used")
    if (extracted / "network.status").exists():
        out.append(f"{kind}'s network status: the container gets an address of the Docker network")
    return out


def _image(config: Mapping[str, Any]) -> Tuple[str, Optional[str]]:
    """The image's ID (``sha256:<hex>``) and name, from Podman's or checkpointctl's fields."""
    raw = str(config.get("rootfsImageID") or config.get("rootfsImageRef") or "")
    m = _IMAGE_ID_RE.match(raw)
    if not m:
        raise BundleError(f"config.dump names no image ID (rootfsImageID, rootfsImageRef): {raw!r:.80}")
    image_name = config.get("rootfsImageName") or config.get("rootfsImage")
    if image_name is not None and not (isinstance(image_name, str) and re.fullmatch(r"[\w./:@-]{1,255}", image_name)):
        raise BundleError(f"config.dump's image name is not one: {image_name!r:.80}")
    return "sha256:" + m.group(2), image_name


def _go_time(value: Any) -> Optional[datetime]:
    """Go's RFC 3339 time (nanoseconds, a zone), to a datetime (microseconds, UTC)."""
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", value)
    if not m:
        return None
    fraction = (m.group(2) or ".0")[:7]
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        return datetime.fromisoformat(m.group(1) + fraction + zone).astimezone(UTC)
    except ValueError:
        return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# --- checkpoint OCI images ----------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})\Z")
_MAX_OCI_JSON = 1 << 20


def write_oci_layout(bundle: Path, out: Path, *, annotations: Dict[str, str], architecture: str) -> None:
    """Make the folder ``out`` an OCI image layout of one image: its one layer is ``bundle`` (an
    uncompressed Dolly bundle, whose members are the checkpoint archive's files at ``/``, as
    CRI-O's and Podman's checkpoint images hold them), moved in as a blob; ``annotations`` go on
    its manifest. Written into ``out``'s folder and renamed into place at the end.

    Raises:
        InvalidArgument: ``out`` exists.
    """
    from .errors import InvalidArgument

    if out.exists():
        raise InvalidArgument(f"{out} exists: an OCI image layout is written as a new folder")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    blobs = partial / "blobs" / "sha256"
    blobs.mkdir(parents=True, mode=0o700)
    try:
        layer_digest, layer_size = sha256_file(bundle), bundle.stat().st_size
        os.rename(bundle, blobs / layer_digest)
        config = json.dumps({
            "architecture": architecture, "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        }, sort_keys=True).encode()
        config_digest = _put_blob(blobs, config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": f"sha256:{config_digest}", "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": f"sha256:{layer_digest}", "size": layer_size}],
            "annotations": annotations,
        }, sort_keys=True).encode()
        manifest_digest = _put_blob(blobs, manifest)
        (partial / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        (partial / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
            "mediaType": OCI_MANIFEST, "digest": f"sha256:{manifest_digest}", "size": len(manifest),
            "annotations": annotations}]}, sort_keys=True))
        for p in [partial, *partial.rglob("*")]:
            os.chmod(p, 0o700 if p.is_dir() else 0o600)
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def is_oci_layout(path: Path) -> bool:
    return path.is_dir() and (path / "oci-layout").is_file()


def oci_layer(layout: Path) -> Tuple[Path, Dict[str, str]]:
    """The one layer of the one image in the OCI image layout ``layout`` (a checkpoint image),
    with its manifest's annotations; every blob on the way checked against its digest and size.

    Raises:
        BundleError: not a layout of one image of one uncompressed layer.
        DigestMismatch: a blob that is not what its digest says.
    """
    index = _oci_json(layout / "index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not (isinstance(manifests, list) and len(manifests) == 1 and isinstance(manifests[0], dict)):
        raise BundleError("the OCI image layout does not hold exactly one image")
    manifest = _oci_json(_blob(layout, manifests[0]))
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not (isinstance(layers, list) and len(layers) == 1 and isinstance(layers[0], dict)):
        raise BundleError("a checkpoint image has exactly one layer")
    if layers[0].get("mediaType") != OCI_LAYER:
        raise BundleError(f"the checkpoint image's layer is {layers[0].get('mediaType')!r:.80}, not {OCI_LAYER}")
    annotations = manifest.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise BundleError("the image's annotations are not a map")
    return _blob(layout, layers[0]), {str(k)[:200]: str(v)[:1000] for k, v in annotations.items()}


def _blob(layout: Path, descriptor: Mapping[str, Any]) -> Path:
    from .errors import DigestMismatch

    m = _DIGEST_RE.match(str(descriptor.get("digest", "")))
    size = descriptor.get("size")
    if not m or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BundleError(f"a descriptor of the OCI image layout names no sha256 blob: {descriptor!r:.200}")
    path = layout / "blobs" / "sha256" / m.group(1)
    if path.is_symlink() or not path.is_file():
        raise BundleError(f"the OCI image layout lacks the blob {m.group(0)} (or it is not a plain file)")
    if path.stat().st_size != size or sha256_file(path) != m.group(1):
        raise DigestMismatch(f"the blob {m.group(0)} of the OCI image layout is not what its digest says")
    return path


def _oci_json(path: Path) -> Any:
    if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_OCI_JSON:
        raise BundleError(f"{path.name} of the OCI image layout is missing, not a plain file, or too large")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{path.name} of the OCI image layout is not JSON: {e}") from None


def _put_blob(blobs: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return digest




# --- Podman's checkpoint archive ----------------------------------------------------------------------

# A CRIU configuration file on the Podman host, named by the exported spec's ``org.criu.config``
# annotation (runc hands it to CRIU for that container alone): ``mntns-compat-mode``, without which
# CRIU 4.2 cannot restore a Docker container's mounts into Podman's ("mnt-v2: Failed to copy
# sharing"). ``make host`` writes it; a Podman host without it fails the restore with that error.
PODMAN_CRIU_CONFIG = "/usr/local/lib/dolly/criu-mntns-compat.conf"
# The mode Podman's storage gives a container's root directory (Docker's: 0755).
PODMAN_ROOT_MODE = 0o555
DOCKER_ROOT_MODE = 0o755


def podman_image_name(name: str) -> str:
    """The name ``podman load`` gives an image that Docker calls ``name`` (a name without a
    registry is a local one to Podman: ``localhost/...``; a tag defaults to ``latest``)."""
    first, _, rest = name.partition("/")
    qualified = name if rest and ("." in first or ":" in first or first == "localhost") else f"localhost/{name}"
    last = qualified.rsplit("/", 1)[-1]
    return qualified if (":" in last or "@" in qualified) else f"{qualified}:latest"


def podman_members(bundle_dir: Path, *, meta: Mapping[str, Any], image_name: str,
                   work: Path) -> List[Tuple[str, Path]]:
    """The members, in order, of the Podman flavour of a bundle whose members are unpacked in
    ``bundle_dir`` (Dolly's checkpoint metadata ``meta``): what ``podman container restore
    --import`` (and ``podman container restore IMAGE`` from a checkpoint image) restores:

    - ``checkpoint/``: CRIU's images with two changes for Podman's set-up: the root directory's
      mode as Podman gives it, and the network namespace marked external (runc then joins the
      namespace Podman's network made instead of CRIU making an empty one); and each tmpfs's
      files gzipped, as any CRIU restores them;
    - ``spec.dump`` without Docker's hooks (they call dockerd), naming :data:`PODMAN_CRIU_CONFIG`;
    - ``config.dump``: Podman's fields beside checkpointctl's and Dolly's (Podman ignores the
      others); ``rootfs-diff.tar``, ``deleted.files``, ``stats-dump``. Not ``network.status``:
      Podman reads its own network's results there.

    :func:`docker_images` undoes the image changes on an import into Docker.
    """
    images = bundle_dir / IMAGES_FOLDER
    work.mkdir(mode=0o700)
    replaced: Dict[str, Path] = {}
    criu_images.root_mode_rewritten(images, work / "files.img", mode=PODMAN_ROOT_MODE)
    replaced["files.img"] = work / "files.img"
    netns = criu_images.external_netns_image(images, work / "netns.img", key="extRootNetNS")
    if netns is not None:
        replaced[netns] = work / "netns.img"
    # Dolly's CRIU dumps a tmpfs's files as a plain tar (scripts/criu-patches/0005): every other
    # CRIU unpacks only a gzipped one.
    for image in sorted(images.glob("tmpfs-*.img")):
        with open(image, "rb") as raw:
            if raw.read(2) == GZIP_MAGIC:
                continue
            raw.seek(0)
            with open(work / image.name, "xb") as sink, \
                    gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=1) as packed:
                shutil.copyfileobj(raw, packed, 1 << 20)
        replaced[image.name] = work / image.name

    spec = small_json(bundle_dir / "spec.dump")
    spec.pop("hooks", None)
    spec["annotations"] = {**(spec.get("annotations") or {}), "org.criu.config": PODMAN_CRIU_CONFIG}
    (work / "spec.dump").write_text(json.dumps(spec))
    recorded = _mapping(meta.get("config"))
    config = {
        **small_json(bundle_dir / "config.dump"),
        "id": meta["container_id"], "name": meta["container_name"],
        "rootfsImageID": str(recorded.get("Image", "")).removeprefix("sha256:"), "rootfsImageName": image_name,
        "runtime": "runc", "createNetNS": True, "networkMode": "bridge", "newNetworks": {"podman": {}},
    }
    (work / "config.dump").write_text(json.dumps(config))
    names_in = sorted({p.name for p in images.iterdir() if p.is_file()} | set(replaced))
    members = [(f"{IMAGES_FOLDER}/{n}", replaced.get(n, images / n)) for n in names_in]
    members += [("config.dump", work / "config.dump"), ("spec.dump", work / "spec.dump")]
    members += [(n, bundle_dir / n) for n in ("rootfs-diff.tar", "deleted.files", "stats-dump")
                if (bundle_dir / n).exists()]
    return members
