"""Restore and clone: a checkpoint started in new containers, each with its own identity.

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
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import docker
from docker.models.containers import Container
from filelock import FileLock

from . import _criu as criu, _names as names, _rootfs as rootfs, policy
from ._checkpoint import Checkpoint
from ._engine import CRIU_LOG_DIR, RUNTIME, ContainerRef, Engine, id_of
from ._store import engine_of, get_checkpoint, made_layer_image, record_layer_image, require
from .errors import DollyError, InvalidArgument, NameConflict

log = logging.getLogger("dolly")

__all__ = ["restore", "clone", "resume", "allocate_names", "clone_config"]

LABEL_SOURCE = "dolly.source"
LABEL_CHECKPOINT = "dolly.checkpoint"
LABEL_OPERATION = "dolly.operation"
# Labels that say who made a container and for which run (the pytest plugin's run and owner,
# an operation's ID): a clone is not that container, so it never inherits them.
NOT_INHERITED = (LABEL_SOURCE, LABEL_CHECKPOINT, LABEL_OPERATION)
NOT_INHERITED_PREFIXES = ("dolly.pytest.",)
MAX_WORKERS = 8

# Names handed out in this process but perhaps not created yet: concurrent clone() calls in one
# process must not pick the same ones. Other processes are caught by the engine's 409.
_reserved: set[str] = set()
_reserved_lock = threading.Lock()


def restore(
    checkpoint: Checkpoint,
    *,
    name: Optional[str] = None,
    labels: Optional[Dict[str, str]] = None,
    on_create: Optional[Callable[[str], None]] = None,
    network: Optional[str] = None,
    client: Optional[docker.DockerClient] = None,
) -> Container:
    """Start a new container from ``checkpoint``: the process continues where it was.

    Args:
        checkpoint: from :func:`dolly.checkpoint` or :func:`dolly.list_checkpoints`.
        name: the new container's name; default ``<source>-clone-<k>`` with the lowest free k.
        labels: more labels for the new container, over the source's.
        on_create: called with the new container's ID as soon as the engine has created it,
            before anything else happens to it (to track what is made; if it raises, the
            container is removed and the error passes).
        network: the network the new container joins instead of the source's (as
            :func:`clone`).
        client: the engine; default the one the checkpoint knows (``checkpoint.client``), else
            ``docker.from_env()``.

    Returns:
        The running container, with its own name, hostname, IP and MAC, labelled with its source
        and checkpoint. Ports the source published are published on free host ports
        (``container.ports``).

    Raises:
        InvalidArgument: ``checkpoint`` is not a Checkpoint, or ``name`` is not a valid name.
        CheckpointNotFound: the checkpoint's files are gone.
        PolicyRefused: the checkpoint was imported and its configuration asks for more than its
            importer allowed (see :mod:`dolly.policy`).
        NameConflict: ``name`` is taken.
        ImageNotFound: the engine lacks the source's image.
        HostNotReady: the engine or CRIU cannot restore (see :func:`dolly.check_host`).
        RestoreFailed: CRIU failed; carries CRIU's log. No container is left behind.
    """
    if name is not None:
        names.container_name(name)
    return clone(checkpoint, 1, name_prefix=None, labels=labels, on_create=on_create, client=client,
                 network=network, _names=[name] if name else None)[0]


def clone(
    checkpoint: Checkpoint,
    n: int,
    *,
    name_prefix: Optional[str] = None,
    labels: Optional[Dict[str, str]] = None,
    on_create: Optional[Callable[[str], None]] = None,
    client: Optional[docker.DockerClient] = None,
    engines: Optional[Sequence[docker.DockerClient]] = None,
    max_workers: int = MAX_WORKERS,
    progress: Optional[Callable[[Container], None]] = None,
    network: Union[str, Sequence[str], None] = None,
    _names: Optional[List[str]] = None,
    _page_port: Optional[int] = None,
) -> List[Container]:
    """Restore ``checkpoint`` into ``n`` new containers at once, each with its own identity.

    Args:
        checkpoint: from :func:`dolly.checkpoint` or :func:`dolly.list_checkpoints`.
        n: how many clones (1 or more).
        name_prefix: clones are named ``<prefix>-<k>`` with the lowest free k's;
            default prefix ``<source>-clone``.
        labels: more labels for the clones. They carry the source's labels too, except those
            that say who made the source (Dolly's ``dolly.pytest.*``, ``dolly.operation``).
        on_create: called with each clone's ID as soon as the engine has created it (as
            :func:`restore`).
        client: the engine; default the one the checkpoint knows (``checkpoint.client``), else
            ``docker.from_env()``.
        engines: spread the clones round-robin over these engines (clients). The checkpoint is
            copied to each engine that lacks it as a signed bundle, with its image, and that copy
            is removed again afterwards. The list is in engine order, then name order.
        max_workers: how many clones are prepared and started concurrently (per engine).
        progress: called with each clone as soon as it runs (from a worker thread).
        network: the network (a name or ID on the engine) every clone joins instead of the
            source's networks, or a list of them to spread the clones over in turn (clone k joins
            ``network[k % len(network)]``): a Linux bridge takes at most 1,023 containers, so
            thousands of clones need several networks. Each clone gets a new address there. Not
            for a source with ``--network host``, ``none`` or ``container:...``.

    Returns:
        The running clones, in name order.

    Raises:
        InvalidArgument: ``n`` is not an int of 1 or more, or ``name_prefix`` is not valid.
        CheckpointNotFound, PolicyRefused, ImageNotFound, HostNotReady, RestoreFailed: as
            :func:`restore`.
        If any clone fails, every container this call created is removed before the error is
        raised; the source and the checkpoint are not touched.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgument(f"n must be an int of 1 or more, got {n!r}")
    if name_prefix is not None:
        names.container_name(name_prefix)
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise InvalidArgument(f"max_workers must be an int of 1 or more, got {max_workers!r}")
    spread = _networks(network)
    require(checkpoint)
    if checkpoint.origin is not None:
        # Checked at import already; again here, because the clone's create body is built from
        # what the bundle recorded, and this is the last step before the engine sees it.
        policy.check(checkpoint.config, checkpoint.origin.get("allowed") or ())
    if engines is None and client is not None and checkpoint.client is not None and not _holds(client, checkpoint):
        engines = [client]  # another engine than the checkpoint's: it is copied there first
    if engines is not None:
        if spread is not None:
            raise InvalidArgument("network= is not for clones spread over several engines (each has its own)")
        return _clone_across(checkpoint, n, list(engines), home=checkpoint.client or client, name_prefix=name_prefix,
                             labels=labels, on_create=on_create, max_workers=max_workers, progress=progress)
    engine = Engine.of(client if client is not None else checkpoint.client)
    if not engine.files_are_local():  # another host's engine: its agent clones there
        from ._hosts import remote as _remote

        return _remote.clone(engine, checkpoint, n, name_prefix=name_prefix, labels=labels, max_workers=max_workers,
                             names=_names, on_create=on_create, progress=progress, page_port=_page_port,
                             network=network)
    criu.require_version()
    engine.require_checkpoint_support()
    image = engine.image_ref(checkpoint.image_id, checkpoint.config["Config"].get("Image"))
    # A large writable layer is made an image layer once, shared by every clone (overlayfs copies
    # a file up only when a clone writes it), rather than unpacked into each clone's own.
    layer_image = shared_layer(engine, checkpoint)

    explicit = _names is not None
    prefix = name_prefix or f"{checkpoint.container_name}-clone"
    chosen = list(_names) if _names is not None else _reserve(prefix, n, engine)
    # Every container of this call carries its ID, so that a failure can remove them all, even
    # one whose create the engine carried out but never answered (it was restarting, say).
    labels = {**_check_labels(labels), **_labels(checkpoint), LABEL_OPERATION: uuid.uuid4().hex}
    try:
        with ThreadPoolExecutor(max_workers=min(n, max_workers), thread_name_prefix="dolly-clone") as pool:
            futures = [pool.submit(_restore_one, engine, checkpoint, layer_image or image, nm, explicit, prefix,
                                   labels, progress, on_create, unpack=layer_image is None, page_port=_page_port,
                                   network=spread[k % len(spread)] if spread else None)
                       for k, nm in enumerate(chosen)]
            results: List[Tuple[Optional[Container], Optional[BaseException]]] = []
            for f in futures:
                try:
                    results.append((f.result(), None))
                except BaseException as e:  # collected, then re-raised below
                    results.append((None, e))
    finally:
        with _reserved_lock:
            _reserved.difference_update(chosen)

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


def _clone_across(
    cp: Checkpoint,
    n: int,
    engines: List[docker.DockerClient],
    *,
    home: Optional[docker.DockerClient],
    name_prefix: Optional[str],
    labels: Optional[Dict[str, str]],
    on_create: Optional[Callable[[str], None]],
    max_workers: int,
    progress: Optional[Callable[[Container], None]],
) -> List[Container]:
    from ._bundle import transfer  # bundles build on checkpoints; only this path needs them

    if not engines:
        raise InvalidArgument("engines must name at least one engine")
    owners = [c for c in [home, *engines] if c is not None and _holds(c, cp)]
    source = owners[0] if owners else Engine.of(home).client
    counts = [n // len(engines) + (1 if i < n % len(engines) else 0) for i in range(len(engines))]

    def on(engine_client: docker.DockerClient, count: int) -> List[Container]:
        there = cp if _holds(engine_client, cp) else _same_on(engine_client, cp)
        if there is None:
            # Kept there: the next spread of this checkpoint over that engine uses it again
            # (``dolly.prune`` on that engine removes it, its container being elsewhere).
            there = transfer(cp, engine_client, source=source)
        return clone(there, count, name_prefix=name_prefix, labels=labels, on_create=on_create,
                     client=engine_client, max_workers=max_workers, progress=progress)

    jobs = [(c, k) for c, k in zip(engines, counts, strict=True) if k > 0]
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="dolly-engine") as pool:
        futures = [pool.submit(on, c, k) for c, k in jobs]
        outcomes: List[Tuple[List[Container], Optional[BaseException]]] = []
        for f in futures:
            try:
                outcomes.append((f.result(), None))
            except BaseException as e:  # collected, then re-raised below
                outcomes.append(([], e))
    errors = [e for _, e in outcomes if e is not None]
    if errors:
        for made, _ in outcomes:
            for c in made:
                Engine.of(c.client).remove(id_of(c))
        raise errors[0]
    return [c for made, _ in outcomes for c in made]


def _same_on(client: docker.DockerClient, cp: Checkpoint) -> Optional[Checkpoint]:
    """The checkpoint ``cp`` is, as ``client``'s engine already holds it: of the same container,
    name and instant, and either taken there (the original ``cp`` was copied from: it is the
    caller's own) or a copy Dolly's own transfer made there. None when there is none; an
    imported checkpoint that only claims the same identity is never taken for it."""
    try:
        found = get_checkpoint(cp.container_id, cp.name, client=client)
    except DollyError:
        return None
    if found.created_at != cp.created_at:
        return None
    if found.origin is None or found.origin.get("copy") is True:
        return found
    return None


def _holds(client: docker.DockerClient, cp: Checkpoint) -> bool:
    """Whether ``cp`` is on ``client``'s engine: the engine it knows is that engine."""
    if cp.client is None:
        return False
    try:
        return Engine.of(cp.client).identity == Engine.of(client).identity
    except Exception:  # an engine that does not answer holds nothing we can use
        return False


def resume(
    checkpoint: Checkpoint,
    container: Optional[ContainerRef] = None,
    *,
    client: Optional[docker.DockerClient] = None,
) -> Container:
    """Start the stopped container that ``checkpoint`` was taken of from that checkpoint, as
    itself: the same container, name, hostname and writable layer, its processes going on where
    the checkpoint left them. For a checkpoint that stopped its container (``leave_running=False``),
    including the images a failed checkpoint kept (``CheckpointFailed.kept``, loaded with
    :meth:`Checkpoint.load`). Migration puts its source back with it.

    The writable layer is not touched: it is the container's own, unchanged since the checkpoint
    stopped it. So the container must not have been started since: a start runs its processes
    from scratch on those files, and the checkpoint's memory would no longer match them; such a
    container is refused (``dolly.restore`` makes a new container from the checkpoint, with the
    files as they were). The kernel hostname is the one CRIU recorded, used as is, so no CRIU
    image is rewritten and pycriu is not needed.

    Args:
        checkpoint: a checkpoint of the container, taken on this engine (not imported).
        container: a Container, a name or an ID; default the checkpoint's own container.
        client: the engine; default the one the checkpoint knows (``checkpoint.client``), else
            ``docker.from_env()``.

    Returns:
        The running container.

    Raises:
        InvalidArgument: ``checkpoint`` is not a Checkpoint or was imported from a bundle (which
            could claim any container's ID), ``container`` is not the container it was taken
            of, that container is running, or it was started again after the checkpoint.
        CheckpointNotFound: the checkpoint's files are gone.
        ContainerNotFound: no such container.
        HostNotReady: the engine cannot restore (see :func:`dolly.check_host`).
        RestoreFailed: CRIU failed; the container stays stopped and the checkpoint is kept.
    """
    require(checkpoint)
    if checkpoint.origin is not None:
        raise InvalidArgument(
            f"checkpoint {checkpoint.name!r} was imported from a bundle: resume starts a container "
            "only from a checkpoint taken of it on this engine (a bundle can name any container's "
            "ID); dolly.restore makes a new container from an imported one"
        )
    engine = engine_of(checkpoint, client)
    if not engine.files_are_local():
        from ._hosts import remote as _remote

        return _remote.resume(engine, checkpoint, container)
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
    from datetime import UTC, datetime

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
) -> Container:
    config, extra_networks = clone_config(cp.config, image=image, labels=labels, network=network,
                                          own_networks=_may_join_recorded_networks(cp))
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
            with _reserved_lock:
                _reserved.discard(name)
            name = _reserve(prefix, 1, engine, avoid=refused)[0]
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
        _start_from(engine, cp, cid, hostname=created.attrs["Config"]["Hostname"], page_port=page_port)
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
                page_port: Optional[int] = None) -> None:
    """Start a created (or stopped) container from ``cp`` with ``hostname`` in the kernel (None:
    the hostname CRIU recorded, for a container resumed as itself).

    The images go, as hard links, into a spool folder that Dolly's runtime hands to CRIU
    directly; the container's checkpoints folder, which Docker copies through containerd on
    every start, holds only the file naming that folder, in a Docker checkpoint of a name made
    for this start alone: that folder may hold the user's own ``docker checkpoint``s, of any
    name (``cp.name`` too), and only the one made here is removed.
    """
    images = engine.spool_dir / f"{container_id}.restore"
    docker_name = f"dolly-{uuid.uuid4().hex}"
    folder = engine.checkpoints_dir(container_id) / docker_name
    shutil.rmtree(images, ignore_errors=True)
    try:
        _place_images(cp, images, hostname=hostname)
        os.makedirs(folder, mode=0o700)
        with open(os.path.join(folder, "dolly-images"), "w") as f:
            f.write(str(images))
        daemon = None
        if page_port is not None:
            daemon = criu.start_lazy_pages(images, relay=page_port, log=CRIU_LOG_DIR / f"{container_id}.lazy-pages.log")
        try:
            engine.start_from_checkpoint(container_id, docker_name)
        except BaseException:
            if daemon is not None:  # nsenter forks it: its whole session goes
                with contextlib.suppress(OSError):
                    os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
            raise
    finally:
        for done in (images, folder):
            shutil.rmtree(done, ignore_errors=True)


def _place_images(cp: Checkpoint, folder: os.PathLike[str], *, hostname: Optional[str]) -> None:
    """The checkpoint's images as hard links in ``folder`` (no data copied), except two new
    files: the UTS image, rewritten with ``hostname``, and the inventory, rewritten to restore
    without CRIU's network lock (see :func:`criu.without_network_lock`; Dolly's own checkpoints
    say so already, imported ones may not). With ``hostname`` None (a container resumed as
    itself) every image is linked as is, so that pycriu is not needed: a resume is how images
    rescued after a failure are started again. The checkpoint's own images stay as they are."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    uts = set(criu.uts_images(cp.images_dir))
    for src in cp.images_dir.iterdir():
        dst = os.path.join(folder, src.name)
        if hostname is not None and src in uts:
            criu.rewrite_hostname(src, dst, hostname)
        elif hostname is not None and src.name == "inventory.img":
            criu.without_network_lock(src, dst)
        else:
            os.link(src, dst)


def _labels(cp: Checkpoint) -> Dict[str, str]:
    return {LABEL_SOURCE: cp.container_id, LABEL_CHECKPOINT: cp.name}


def _may_join_recorded_networks(cp: Checkpoint) -> bool:
    """Whether clones of ``cp`` join the networks it recorded: a checkpoint of this engine's,
    or one imported with the ``networks`` policy item allowed."""
    return cp.origin is None or "networks" in (cp.origin.get("allowed") or ())


def clone_config(
    recorded: Dict[str, Any] | Any, *, image: str, labels: Dict[str, str], network: Optional[str] = None,
    own_networks: bool = True,
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
    restore policy decides on (``host-namespaces``).
    """
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


def _networks(network: Union[str, Sequence[str], None]) -> Optional[List[str]]:
    """``clone``'s ``network``, as a list (None: the source's networks).

    Raises:
        InvalidArgument: an empty list, or a name that is not a string.
    """
    if network is None:
        return None
    spread = [network] if isinstance(network, str) else list(network)
    if not spread or not all(isinstance(n, str) and n and len(n) <= 255 for n in spread):
        raise InvalidArgument(f"network must be a network's name or a non-empty list of them, got {network!r:.100}")
    return spread


def allocate_names(prefix: str, n: int, taken: Iterable[str]) -> List[str]:
    """The ``n`` names ``<prefix>-<k>`` with the lowest k >= 1 not in ``taken``."""
    taken = set(taken)
    free: List[str] = []
    k = 1
    while len(free) < n:
        candidate = f"{prefix}-{k}"
        if candidate not in taken:
            free.append(candidate)
        k += 1
    return free


def _reserve(prefix: str, n: int, engine: Engine, *, avoid: Iterable[str] = ()) -> List[str]:
    with _reserved_lock:
        picked = allocate_names(prefix, n, engine.container_names() | _reserved | set(avoid))
        _reserved.update(picked)
        return picked


def _check_labels(labels: Any) -> Dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise InvalidArgument(f"labels must be a dict of str to str, got {labels!r}")
    return dict(labels)
