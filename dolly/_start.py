"""Clones started beside an engine's files: a checkpoint started in new containers, each with its
own identity (the public operations that choose names and engines are dolly._cloning's).

A clone is an ordinary Docker container, created from the source's recorded configuration, then
prepared before its first start:

1. the source's writable layer is unpacked into the clone's (``rootfs.apply_diff``);
2. the checkpoint's CRIU images are hard-linked into the clone's own checkpoints folder (Docker
   restores only from there), except the UTS image, rewritten with the clone's own hostname;
3. Docker starts it from that checkpoint (``start?checkpoint=``), and the folder is removed.

Docker gives the clone its own name, IP, MAC, ``/etc/hostname`` and free host ports; the rewritten
UTS image gives it its own kernel hostname. Because every clone's UTS image differs, no two clones
upload byte-identical checkpoints, which containerd would refuse as "already exists".
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import docker
from docker.models.containers import Container
from filelock import FileLock

from . import _criu as criu, _images as criu_images, _rootfs as rootfs, _working_set as working_set, policy
from ._checkpoint import Checkpoint
from ._criu_log import CRIU_LOG_DIR
from ._engine import RUNTIME, ContainerRef, Engine, id_of
from ._store import made_layer_image, record_layer_image, require
from .errors import DollyError, HostNotReady, InvalidArgument, NameConflict

log = logging.getLogger("dolly")

LABEL_SOURCE = "dolly.source"
LABEL_CHECKPOINT = "dolly.checkpoint"
LABEL_OPERATION = "dolly.operation"
# Labels that say who made a container and for which run (the pytest plugin's run and owner,
# an operation's ID): a clone is not that container, so it never inherits them.
NOT_INHERITED = (LABEL_SOURCE, LABEL_CHECKPOINT, LABEL_OPERATION)
NOT_INHERITED_PREFIXES = ("dolly.pytest.",)
# Whether the kernel's samepage merging runs (0 off, 1 on, 2 off and every page unmerged).
KSM_RUN = "/sys/kernel/mm/ksm/run"

@dataclass(frozen=True)
class Identity:
    """Who a container is on its engine, which :func:`dolly.reset` gives the container that replaces
    it: its hostname, its MAC address, the host ports it publishes on, and its IPv4 address on each
    network where a container may ask for one (a user-defined network with a subnet of the user's:
    Docker refuses fixed addresses elsewhere, the default bridge included)."""

    hostname: str
    mac_address: str = ""
    # PortBindings, with the host ports the container was given.
    ports: Dict[str, List[Dict[str, str]]] = field(default_factory=dict)
    addresses: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, attrs: Dict[str, Any]) -> Identity:
        """The identity of a container whose ``docker inspect`` is ``attrs``."""
        settings = attrs.get("NetworkSettings") or {}
        published = settings.get("Ports") or {}
        ports: Dict[str, List[Dict[str, str]]] = {}
        for port, bindings in ((attrs.get("HostConfig") or {}).get("PortBindings") or {}).items():
            given = [b for b in (published.get(port) or []) if b.get("HostPort")]
            ports[port] = [{"HostIp": b.get("HostIp") or "",
                            "HostPort": b.get("HostPort") or (given[0]["HostPort"] if given else "")}
                           for b in (bindings or [])]
        mode = (attrs.get("HostConfig") or {}).get("NetworkMode") or "default"
        shared = mode in ("host", "none") or mode.startswith("container:")
        addresses = {} if shared else {
            net: ep["IPAddress"] for net, ep in (settings.get("Networks") or {}).items()
            if net != "bridge" and ep.get("IPAddress")}
        return cls(str((attrs.get("Config") or {}).get("Hostname") or ""),
                   "" if shared else str(settings.get("MacAddress") or ""), ports, addresses)

    def without_addresses(self) -> Identity:
        return replace(self, addresses={})

    def to_json(self) -> Dict[str, Any]:
        return {"hostname": self.hostname, "mac_address": self.mac_address, "ports": self.ports,
                "addresses": self.addresses}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> Identity:
        return cls(str(data["hostname"]), str(data.get("mac_address") or ""),
                   {str(p): [{"HostIp": str(b.get("HostIp") or ""), "HostPort": str(b.get("HostPort") or "")}
                             for b in bindings] for p, bindings in (data.get("ports") or {}).items()},
                   {str(n): str(a) for n, a in (data.get("addresses") or {}).items()})


@dataclass(frozen=True)
class CloneRequest:
    """What :func:`start_clones` makes: containers ``names`` (``explicit``: the caller's choice,
    so a taken one is an error; else the next free ``<prefix>-<k>`` is taken instead), with
    ``labels`` (the caller's and its operation's) over the checkpoint's, clone k on
    ``networks[k % len(networks)]`` when given, at most ``max_workers`` at once. ``page_port``
    is post-copy's: the clone's memory comes from the lazy-pages daemon listening there. ``keep``
    is a reset's: the one container takes the identity of the container it replaces.
    ``share_memory``: the clones' processes have the kernel merge their identical pages (KSM;
    see :func:`dolly.clone`).
    ``lazy``: each clone's memory comes, as it touches it, from a lazy-pages daemon of its own
    serving the checkpoint's images (see :func:`dolly.clone`)."""

    names: Tuple[str, ...]
    explicit: bool
    prefix: str
    labels: Dict[str, str]
    max_workers: int
    networks: Optional[Tuple[str, ...]] = None
    page_port: Optional[int] = None
    keep: Optional[Identity] = None
    share_memory: bool = False
    lazy: bool = False

    def to_json(self) -> Dict[str, Any]:
        return {"names": list(self.names), "explicit": self.explicit, "prefix": self.prefix, "labels": self.labels,
                "max_workers": self.max_workers, "networks": list(self.networks) if self.networks else None,
                "page_port": self.page_port, "keep": self.keep.to_json() if self.keep else None,
                "share_memory": self.share_memory, "lazy": self.lazy}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> CloneRequest:
        networks = data.get("networks")
        keep = data.get("keep")
        return cls(tuple(data["names"]), bool(data["explicit"]), str(data["prefix"]), dict(data["labels"]),
                   int(data["max_workers"]), tuple(networks) if networks else None, data.get("page_port"),
                   Identity.from_json(keep) if keep else None, bool(data.get("share_memory")),
                   bool(data.get("lazy")))


def start_clones(engine: Engine, checkpoint: Checkpoint, request: CloneRequest, *,
                 on_create: Optional[Callable[[str], None]] = None,
                 progress: Optional[Callable[[Container], None]] = None) -> List[Container]:
    """Start the clones ``request`` names from ``checkpoint``, on ``engine``, whose files are
    here. If any fails, every container made for it is removed before its error is raised.

    Raises:
        CheckpointNotFound, PolicyRefused, ImageNotFound, HostNotReady, RestoreFailed,
        NameConflict: as :func:`dolly.clone`.
    """
    require(checkpoint)
    if checkpoint.origin is not None:
        # Checked at import already; again here, because the clone's create body is built from
        # what the bundle recorded, and this is the last step before the engine sees it.
        policy.check(checkpoint.config, checkpoint.origin.get("allowed") or ())
    criu.require_version()
    engine.require_checkpoint_support()
    if request.share_memory:
        require_ksm()
    image = engine.image_ref(checkpoint.image_id, checkpoint.config["Config"].get("Image"))
    # A large writable layer is made an image layer once, shared by every clone (overlayfs copies
    # a file up only when a clone writes it), rather than unpacked into each clone's own.
    layer_image = shared_layer(engine, checkpoint)
    # Every container of this call carries its ID, so that a failure can remove them all, even
    # one whose create the engine carried out but never answered (it was restarting, say).
    labels = {**request.labels, **restored_from(checkpoint), LABEL_OPERATION: uuid.uuid4().hex}
    spread = request.networks
    n = len(request.names)
    with ThreadPoolExecutor(max_workers=min(n, request.max_workers), thread_name_prefix="dolly-clone") as pool:
        futures = [pool.submit(_restore_one, engine, checkpoint, layer_image or image, nm, request.explicit,
                               request.prefix, labels, progress, on_create, unpack=layer_image is None,
                               page_port=request.page_port, network=spread[k % len(spread)] if spread else None,
                               keep=request.keep, share_memory=request.share_memory, lazy=request.lazy)
                   for k, nm in enumerate(request.names)]
        results: List[Tuple[Optional[Container], Optional[BaseException]]] = []
        for f in futures:
            try:
                results.append((f.result(), None))
            except BaseException as e:  # collected, then re-raised below
                results.append((None, e))
    errors = [e for _, e in results if e is not None]
    if errors:
        for c, _ in results:
            if c is not None:
                engine.remove(id_of(c))
        engine.remove_labelled(LABEL_OPERATION, labels[LABEL_OPERATION])
        raise errors[0]
    clones = [c for c, _ in results if c is not None]
    # A create that the engine carried out but never answered (it restarted meanwhile) was retried
    # under another name; the first one is an orphan of this call.
    engine.remove_labelled(LABEL_OPERATION, labels[LABEL_OPERATION], keep={id_of(c) for c in clones})
    return clones


def resume(engine: Engine, checkpoint: Checkpoint, container: Optional[ContainerRef]) -> Container:
    """Start ``checkpoint``'s own stopped container from it, on ``engine``, whose files are here
    (the checks and steps :func:`dolly.resume` documents).

    Raises:
        the errors of :func:`dolly.resume`.
    """
    require(checkpoint)
    engine.require_checkpoint_support()
    target = engine.container(container if container is not None else checkpoint.container_id)
    if target.id != checkpoint.container_id:
        raise InvalidArgument(
            f"checkpoint {checkpoint.name!r} was taken of container {checkpoint.container_id[:12]}, "
            f"not of {target.name} ({id_of(target)[:12]}): resume starts a container from its own "
            "checkpoint; dolly.restore makes a new one from any"
        )
    if target.attrs["State"].get("Running"):
        raise InvalidArgument(f"container {target.name} is running: only a stopped container can be resumed")
    started = _started_since(checkpoint, target)
    if started is not None:
        raise InvalidArgument(
            f"container {target.name} was started again ({started}) after checkpoint "
            f"{checkpoint.name!r} was taken ({checkpoint.created_at.isoformat()}): its files have "
            "changed since, and the checkpoint's memory would not match them; dolly.restore makes "
            "a new container from the checkpoint, with its files as they were"
        )
    _start_from(engine, checkpoint, target.id, hostname=None)
    return engine.container(target.id)


def _started_since(cp: Checkpoint, container: Container) -> Optional[str]:
    """When ``container`` (inspected) was started after ``cp`` was taken, that start's time as
    Docker gives it; else None. Two tests, either one enough: the start time differs from the one
    the checkpoint recorded (exact, no clocks compared), or it is later than the checkpoint's own
    time. A start time that cannot be read counts as a start since: refusing is the safe side."""
    started = str((container.attrs.get("State") or {}).get("StartedAt") or "")
    recorded = (cp.config.get("State") or {}).get("StartedAt")
    if recorded and started != recorded:
        return started or "at an unknown time"
    # Docker's form, 2024-05-01T10:00:00.123456789Z: at most 6 digits of a second, and an offset
    # that datetime.fromisoformat reads before Python 3.11 too.
    text = started.replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:
        digits = rest[: len(rest) - len(rest.lstrip("0123456789"))]
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits):]}"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return started or "at an unknown time"
    taken = cp.created_at if cp.created_at.tzinfo else cp.created_at.replace(tzinfo=UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return started if when > taken else None


def _restore_one(
    engine: Engine,
    cp: Checkpoint,
    image: str,
    name: str,
    explicit: bool,
    prefix: str,
    labels: Dict[str, str],
    progress: Optional[Callable[[Container], None]],
    on_create: Optional[Callable[[str], None]] = None,
    *,
    unpack: bool = True,
    page_port: Optional[int] = None,
    network: Optional[str] = None,
    keep: Optional[Identity] = None,
    share_memory: bool = False,
    lazy: bool = False,
) -> Container:
    config, extra_networks = clone_config(cp.config, image=image, labels=labels, network=network,
                                          own_networks=_may_join_recorded_networks(cp), keep=keep)
    # Names the engine refused: taken by another process meanwhile, or still held by a container
    # being removed (the engine lists it no more, but frees its name only once it is gone).
    refused: Set[str] = set()
    for _ in range(20):
        try:
            cid = engine.create(config, name)
            break
        except NameConflict:
            if explicit:
                raise
            refused.add(name)
            engine.release_names([name])
            name = engine.reserve_names(prefix, 1, avoid=refused)[0]
    else:
        raise NameConflict(f"could not find a free name with the prefix {prefix!r}")

    try:
        if on_create is not None:
            on_create(cid)
        for network, endpoint in extra_networks.items():
            engine.connect(cid, network, endpoint)
        created = engine.container(cid)
        if unpack:
            rootfs.apply_diff(cp.rootfs_diff, engine.upper_dir(created))
        _start_from(engine, cp, cid, hostname=created.attrs["Config"]["Hostname"], page_port=page_port,
                    share_memory=share_memory, lazy=lazy)
        container = engine.container(cid)
        if progress is not None:
            progress(container)
        return container
    except BaseException:
        engine.remove(cid)
        raise


# Writable layers from this size up are shared by the clones as an image layer; smaller ones are
# unpacked into each clone (quicker than making an image), and so are those that would take more
# than LAYER_IMAGE_MAX as an image layer (sparse files are written whole there).
LAYER_IMAGE_MIN = 16 << 20
LAYER_IMAGE_MAX = 4 << 30


def shared_layer(engine: Engine, cp: Checkpoint) -> Optional[str]:
    """The image (by ID) holding ``cp``'s image and its writable layer on top, made on first use
    under the tag ``cp.layer_image`` and kept until the checkpoint is removed; None when the layer
    is to be unpacked per clone. An image found under that tag is used only when it is the one
    Dolly made (its ID recorded when made): the tag is predictable, so anyone who may tag images
    could plant one for every clone to run. Anything else under the tag is untagged and the layer
    image made again. The ID, not the tag, goes to the clones: a tag moved after the check does
    not reach them."""
    try:
        size = cp.rootfs_diff.stat().st_size
    except OSError:
        return None  # the unpack reports the missing layer
    if not LAYER_IMAGE_MIN <= size <= LAYER_IMAGE_MAX:
        return None
    tag = cp.layer_image
    engine.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with FileLock(str(engine.lock_dir / f"{tag.rsplit(':', 1)[1]}.layer.lock")):
        if engine.has_image(tag):
            made = made_layer_image(engine, tag)
            if made is not None and engine.image_id(tag) == made:
                return made
            log.warning("the image under %s is not the layer image Dolly made for checkpoint %s: "
                        "untagging it and making the layer image again", tag, cp.name)
            engine.remove_image(tag)  # only the tag when it has others or a container uses it
        engine.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        layer = engine.spool_dir / f"{uuid.uuid4().hex}.layer.tar"
        try:
            fd = os.open(layer, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                rootfs.to_image_layer(cp.rootfs_diff, out, max_bytes=LAYER_IMAGE_MAX)
            made = engine.load_layer_image(cp.image_id, layer, tag)
            record_layer_image(engine, tag, made)
        except InvalidArgument:
            return None  # not expressible as an image layer: unpacked per clone
        except (DollyError, OSError, docker.errors.DockerException) as e:
            # Sharing is an optimisation: a clone still works by unpacking the layer itself.
            log.warning("could not make the shared layer image of checkpoint %s (%s): unpacking it "
                        "into each clone instead", cp.name, e)
            return None
        finally:
            layer.unlink(missing_ok=True)
    return made


def _start_from(engine: Engine, cp: Checkpoint, container_id: str, *, hostname: Optional[str],
                page_port: Optional[int] = None, share_memory: bool = False, lazy: bool = False) -> None:
    """Start a created (or stopped) container from ``cp`` with ``hostname`` in the kernel (None:
    the hostname CRIU recorded, for a container resumed as itself).

    The images go, as hard links, into a spool folder that Dolly's runtime hands to CRIU
    directly; the container's checkpoints folder, which Docker copies through containerd on
    every start, holds only the file naming that folder, in a Docker checkpoint of a name made
    for this start alone: that folder may hold the user's own ``docker checkpoint``s, of any
    name (``cp.name`` too), and only the one made here is removed.

    With ``lazy``, CRIU restores without the memory, which a lazy-pages daemon on the images
    folder serves as the processes touch it (:func:`dolly._criu.start_local_lazy_pages`): the
    folder then stays until every page is in, and the daemon's keeper removes it.
    """
    images = engine.spool_dir / f"{container_id}.restore"
    docker_name = f"dolly-{uuid.uuid4().hex}"
    folder = engine.checkpoints_dir(container_id) / docker_name
    shutil.rmtree(images, ignore_errors=True)
    kept = False
    try:
        _place_images(cp, images, hostname=hostname, share_memory=share_memory,
                      hook_beside=not lazy and page_port is None and _memory_bytes(cp) >= HOOK_BESIDE_BYTES)
        os.makedirs(folder, mode=0o700)
        with open(os.path.join(folder, "dolly-images"), "w") as f:
            f.write(str(images))
        daemon = keeper = None
        if lazy and page_port is None:
            keeper = criu.start_local_lazy_pages(images, log=CRIU_LOG_DIR / f"{container_id}.lazy-pages.log",
                                                 record=_prefetch_working_set(cp, images))
        if page_port is not None:
            daemon = criu.start_lazy_pages(images, relay=page_port, log=CRIU_LOG_DIR / f"{container_id}.lazy-pages.log")
        try:
            engine.start_from_checkpoint(container_id, docker_name)
        except BaseException:
            if daemon is not None:  # nsenter forks it: its whole session goes
                with contextlib.suppress(OSError):
                    os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
            if keeper is not None:
                criu.stop_lazy_pages(keeper)
            raise
        if keeper is not None:
            try:
                criu.keep_lazy_pages(keeper, int(engine.container(container_id).attrs["State"].get("Pid") or 0))
            except BaseException:
                criu.stop_lazy_pages(keeper)
                raise
            kept = True  # the images are the keeper's now: they go once every page is in
    finally:
        for done in ((folder,) if kept else (images, folder)):
            shutil.rmtree(done, ignore_errors=True)


def _prefetch_working_set(cp: Checkpoint, folder: Path) -> Optional[Tuple[Path, str]]:
    """For a lazy start from ``cp``'s images placed in ``folder``: have the working set recorded at
    ``cp``'s first lazy clone restored eagerly (``folder``'s own pagemaps rewritten, see
    dolly._working_set), and None; or, when there is no usable one, where and with what binding
    the keeper is to record it. A working set that does not fit the images is ignored, with a log
    line, and recorded again."""
    record = working_set.path_of(cp.path)
    bound = working_set.binding(cp.images_dir)
    runs = working_set.load(record, bound)
    if runs is None:
        return record, bound
    try:
        working_set.apply(runs, cp.images_dir, folder)
    except (working_set.Mismatch, OSError) as e:
        # Any pagemap already replaced is still right: it only has more pages arrive first.
        log.warning("ignoring the working set of checkpoint %s (%s): %s; this clone records it again",
                    cp.name, record, e)
        return record, bound
    return None


# From how much memory CRIU restores a clone's memory while Docker's network hook runs (see
# _place_images): the hook takes some 0.1 s and CRIU about 0.45 s a GiB, and setting it aside costs
# some 0.015 s and 0.03 CPU-s (benchmarks/hook.py). Lazy restores write too little memory to gain.
HOOK_BESIDE_BYTES = 32 << 20


def _memory_bytes(cp: Checkpoint) -> int:
    """The bytes of memory pages in ``cp``'s images."""
    return sum(p.stat().st_size for p in cp.images_dir.glob("pages-*.img"))


def _place_images(cp: Checkpoint, folder: os.PathLike[str], *, hostname: Optional[str],
                  share_memory: bool = False, hook_beside: bool = False) -> None:
    """The checkpoint's images as hard links in ``folder`` (no data copied), except two new
    files: the UTS image, rewritten with ``hostname``, and the inventory, rewritten to restore
    without CRIU's network lock (see :func:`criu_images.without_network_lock`; Dolly's own checkpoints
    say so already, imported ones may not). With ``hostname`` None (a container resumed as
    itself) every image is linked as is, so that pycriu is not needed: a resume is how images
    rescued after a failure are started again. The checkpoint's own images stay as they are.

    Beside them goes the runtime's request to restore every TCP connection the images hold
    closed (scripts/dolly-runc: CRIU's --tcp-close), whatever the checkpoint says: a started
    container never has the source's address (a clone's is its own; a resumed or migrated one
    gets what its network hands out), and a connection restored to another address would only
    be reset by its peer. Without a connection in the images the request changes nothing. No
    lock is needed for it: a closed socket is never bound nor put in repair mode, so nothing
    reaches it while the restore runs (see :func:`criu_images.without_network_lock`).

    With ``share_memory``, a second request: the restored processes' pages are merged by KSM
    (scripts/dolly-runc: runc, CRIU and the tree CRIU restores run with PR_SET_MEMORY_MERGE).

    With ``hook_beside``, a third: Docker's network hook runs while CRIU restores the memory,
    rather than before (scripts/dolly-runc; CRIU lets no restored process run before it ends)."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(folder, "dolly-request"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("tcp_connections=close\n")
        if share_memory:
            f.write("memory_merge=1\n")
        if hook_beside:
            f.write("network_hook=beside\n")
    uts = set(criu_images.uts_images(cp.images_dir))
    for src in cp.images_dir.iterdir():
        dst = os.path.join(folder, src.name)
        if hostname is not None and src in uts:
            criu_images.rewrite_hostname(src, dst, hostname)
        elif hostname is not None and src.name == "inventory.img":
            criu_images.without_network_lock(src, dst)
        else:
            os.link(src, dst)


def require_ksm() -> None:
    """That this host's kernel merges the pages of processes that ask (KSM running).

    Raises:
        HostNotReady: the kernel has no KSM, or it is not running; says how to turn it on.
    """
    try:
        with open(KSM_RUN) as f:
            state = f.read().strip()
    except OSError as e:
        raise HostNotReady(f"share_memory needs the kernel's KSM (Linux 6.4 or newer, CONFIG_KSM), "
                           f"and this host has none ({KSM_RUN}: {e.strerror}); clone without share_memory") from None
    if state != "1":
        raise HostNotReady(f"share_memory needs KSM running, and {KSM_RUN} says {state!r}: `make host` turns it "
                           f"on (or `echo 1 > {KSM_RUN}` as root); or clone without share_memory")


def restored_from(cp: Checkpoint) -> Dict[str, str]:
    """The labels of every container restored from ``cp``: its clones, restores and resets."""
    return {LABEL_SOURCE: cp.container_id, LABEL_CHECKPOINT: cp.name}


def _may_join_recorded_networks(cp: Checkpoint) -> bool:
    """Whether clones of ``cp`` join the networks it recorded: a checkpoint of this engine's,
    or one imported with the ``networks`` policy item allowed."""
    return cp.origin is None or "networks" in (cp.origin.get("allowed") or ())


def clone_config(
    recorded: Dict[str, Any] | Any, *, image: str, labels: Dict[str, str], network: Optional[str] = None,
    own_networks: bool = True, keep: Optional[Identity] = None,
) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
    """The Engine API create body for a clone of a container whose ``docker inspect`` is
    ``recorded``, and the endpoint configs of the networks to connect after create (the API
    takes one network at create time).

    What makes the clone its own: no hostname or MAC address (Docker assigns new ones), host ports
    left for Docker to choose, no fixed IP addresses, and the source's own ID dropped from its
    network aliases. Everything else, command to mounts to labels, is the source's. With
    ``network``, that network alone instead of the source's. Without ``own_networks`` (an
    imported checkpoint whose importer did not allow ``networks``), the default bridge alone
    (or ``network``), under no alias, link or driver option of the recording's: the network
    mode is rebuilt, not read, but for the host's or another container's namespace, which the
    restore policy decides on (``host-namespaces``). With ``keep`` (a reset), the hostname, MAC
    address, host ports and addresses are that identity's instead of new ones.
    """
    config, endpoints = _new_identity_config(recorded, image=image, labels=labels, network=network,
                                             own_networks=own_networks)
    if keep is not None:
        config["Hostname"] = keep.hostname
        if keep.mac_address:
            config["MacAddress"] = keep.mac_address
        config["HostConfig"]["PortBindings"] = {port: [dict(b) for b in bindings]
                                                for port, bindings in keep.ports.items()}
        for net, endpoint in [*config["NetworkingConfig"]["EndpointsConfig"].items(), *endpoints.items()]:
            if net in keep.addresses:
                endpoint["IPAMConfig"] = {"IPv4Address": keep.addresses[net]}
    return config, endpoints


def _new_identity_config(
    recorded: Dict[str, Any] | Any, *, image: str, labels: Dict[str, str], network: Optional[str],
    own_networks: bool,
) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
    config = {k: v for k, v in recorded["Config"].items() if k not in ("Hostname", "MacAddress")}
    config["Image"] = image
    inherited = {k: v for k, v in (config.get("Labels") or {}).items()
                 if k not in NOT_INHERITED and not k.startswith(NOT_INHERITED_PREFIXES)}
    config["Labels"] = {**inherited, **labels}

    host = dict(recorded["HostConfig"])
    host["Runtime"] = RUNTIME
    host["ContainerIDFile"] = ""
    host["PortBindings"] = {
        port: [{"HostIp": b.get("HostIp", ""), "HostPort": ""} for b in (bindings or [])]
        for port, bindings in (host.get("PortBindings") or {}).items()
    }
    config["HostConfig"] = host

    source_id = recorded.get("Id", "")
    networks = (recorded.get("NetworkSettings") or {}).get("Networks") or {}
    mode = host.get("NetworkMode") or "default"
    if not own_networks and not (mode in ("host", "none") or mode.startswith("container:")):
        host["NetworkMode"] = network or "default"
        config["NetworkingConfig"] = {"EndpointsConfig": {network or "bridge": {}}}
        return config, {}
    primary = "bridge" if mode == "default" else mode
    endpoints = {
        net: {
            "Aliases": [a for a in (ep.get("Aliases") or []) if a != source_id[:12]] or None,
            "Links": ep.get("Links"),
            "DriverOpts": ep.get("DriverOpts"),
        }
        for net, ep in networks.items()
    }
    if mode in ("host", "none") or mode.startswith("container:"):
        if network is not None:
            raise InvalidArgument(f"the source runs with --network {mode}: its clones cannot join {network!r}")
        config["NetworkingConfig"] = {"EndpointsConfig": {}}
        return config, {}
    if network is not None:
        host["NetworkMode"] = network
        config["NetworkingConfig"] = {"EndpointsConfig": {network: {}}}
        return config, {}
    config["NetworkingConfig"] = {"EndpointsConfig": {primary: endpoints.pop(primary, {})}}
    return config, endpoints
