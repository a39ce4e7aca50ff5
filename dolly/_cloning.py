"""Restore and clone, as the caller sees them: a checkpoint started in new containers, each with its
own identity, on its engine or spread over several (the checkpoint copied once to each engine that
lacks it, and kept there). Names are chosen here, through the engine's API; the clones are
started beside the engine's files by its host (:mod:`dolly._start`, through
:func:`dolly._hosts.host_of`).
"""
from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import docker
from docker.models.containers import Container

from . import _names as names, _retry as retry, policy
from ._catalog import engine_of, require
from ._checkpoint import Checkpoint
from ._engine import ContainerRef, Engine, id_of
from ._hosts import host_of
from ._start import CloneRequest, Identity, restored_from
from ._transfer import transfer
from .errors import CheckpointNotFound, ContainerNotFound, DollyError, EngineError, InvalidArgument, RestoreFailed

__all__ = ["restore", "clone", "resume", "reset", "MAX_WORKERS"]

log = logging.getLogger("dolly")

MAX_WORKERS = 8


def restore(
    checkpoint: Checkpoint,
    *,
    name: Optional[str] = None,
    labels: Optional[Dict[str, str]] = None,
    on_create: Optional[Callable[[str], None]] = None,
    network: Optional[str] = None,
    client: Optional[docker.DockerClient] = None,
    share_memory: bool = False,
    lazy: bool = False,
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
        share_memory: the new container's pages identical to those of other containers restored
            with ``share_memory`` are shared with them (as :func:`clone`).
        lazy: the new container starts before its memory is in, which arrives as it touches it
            (as :func:`clone`).

    Returns:
        The running container, with its own name, hostname, IP and MAC, labelled with its source
        and checkpoint. Ports the source published are published on free host ports
        (``container.ports``).

    Raises:
        InvalidArgument: ``checkpoint`` is not a Checkpoint, ``name`` is not a valid name, or
            ``share_memory`` or ``lazy`` is not a bool.
        CheckpointNotFound: the checkpoint's files are gone.
        PolicyRefused: the checkpoint was imported and its configuration asks for more than its
            importer allowed (see :mod:`dolly.policy`).
        NameConflict: ``name`` is taken.
        ImageNotFound: the engine lacks the source's image.
        HostNotReady: the engine or CRIU cannot restore (see :func:`dolly.check_host`), or
            ``share_memory`` was asked for and the kernel's KSM is missing or not running.
        RestoreFailed: CRIU failed; carries CRIU's log. No container is left behind.
    """
    if name is not None:
        names.container_name(name)
    _check_share_memory(share_memory)
    _check_lazy(lazy)
    return _place(checkpoint, 1, client=client, engines=None, network=network, name_prefix=None, labels=labels,
                  on_create=on_create, max_workers=1, progress=None, chosen=[name] if name else None,
                  share_memory=share_memory, lazy=lazy)[0]


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
    share_memory: bool = False,
    lazy: bool = False,
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
            copied to each engine that holds no copy of it (its members streamed host to host,
            with its image) and the copy is kept there, so that the next spread clones from it
            (``dolly.prune`` on that engine removes it). The list is in engine order, then name
            order.
        max_workers: how many clones are prepared and started concurrently (per engine).
        progress: called with each clone as soon as it runs (from a worker thread).
        network: the network (a name or ID on the engine) every clone joins instead of the
            source's networks, or a list of them to spread the clones over in turn (clone k joins
            ``network[k % len(network)]``): a Linux bridge takes at most 1,023 containers, so
            thousands of clones need several networks. Each clone gets a new address there. Not
            for a source with ``--network host``, ``none`` or ``container:...``.
        share_memory: the clones' memory pages that are identical (those they have not written
            since the checkpoint) are held once, shared by every container restored with
            ``share_memory`` on this host, rather than once per clone: the kernel's samepage
            merging (KSM) scans their processes in the background, so the sharing grows over
            seconds after the clones start. A write to a shared page gives the writer its own
            copy again. Processes that share pages can tell, by timing a write, whether another
            of them holds a page of the same content; Dolly asks for these clones only, but any
            process on the host may ask for itself while KSM runs: use it for clones that may
            see each other's memory, on a host whose tenants trust one another. Needs KSM
            running (``make host`` turns it on; docs/clones.md, "Shared memory").
        lazy: each clone starts before its memory is in: CRIU restores everything but the
            memory, and a lazy-pages daemon of the clone's own (CRIU's, through userfaultfd)
            serves the pages from the checkpoint's images on this host, first those the clone
            touches, then the rest in the background, and ends once every page is in. A clone
            holding much memory starts in the time of its working set. Should the daemon end
            before every page is in, the clone is killed (it never runs on memory that did not
            arrive): its container exits.

    Returns:
        The running clones, in name order.

    Raises:
        InvalidArgument: ``n`` is not an int of 1 or more, ``name_prefix`` is not valid, or
            ``share_memory`` or ``lazy`` is not a bool.
        CheckpointNotFound, PolicyRefused, ImageNotFound, HostNotReady, RestoreFailed: as
            :func:`restore`. If any clone fails, every container this call created is removed
            before the error is raised; the source and the checkpoint are not touched.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgument(f"n must be an int of 1 or more, got {n!r}")
    if name_prefix is not None:
        names.container_name(name_prefix)
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise InvalidArgument(f"max_workers must be an int of 1 or more, got {max_workers!r}")
    _check_share_memory(share_memory)
    _check_lazy(lazy)
    return _place(checkpoint, n, client=client, engines=engines, network=network, name_prefix=name_prefix,
                  labels=labels, on_create=on_create, max_workers=max_workers, progress=progress, chosen=None,
                  share_memory=share_memory, lazy=lazy)


def _place(checkpoint: Checkpoint, n: int, *, client: Optional[docker.DockerClient],
           engines: Optional[Sequence[docker.DockerClient]], network: Union[str, Sequence[str], None],
           name_prefix: Optional[str], labels: Optional[Dict[str, str]], on_create: Optional[Callable[[str], None]],
           max_workers: int, progress: Optional[Callable[[Container], None]],
           chosen: Optional[List[str]], share_memory: bool = False, lazy: bool = False) -> List[Container]:
    """Where :func:`clone`'s and :func:`restore`'s containers go: on ``engines`` (the checkpoint
    copied to each that holds none), on ``client``'s engine when that is another than the
    checkpoint's (copied there first), else on the checkpoint's own engine.

    Raises:
        the errors of :func:`clone`.
    """
    spread = _networks(network)
    require(checkpoint)
    if engines is None and client is not None and checkpoint.client is not None and not _holds(client, checkpoint):
        engines = [client]  # another engine than the checkpoint's: it is copied there first
    if engines is not None:
        if spread is not None:
            raise InvalidArgument("network= is not for clones copied to another engine than the checkpoint's, or "
                                  "spread over several (each engine has networks of its own)")
        return _clone_across(checkpoint, n, list(engines), home=checkpoint.client or client, name_prefix=name_prefix,
                             labels=labels, on_create=on_create, max_workers=max_workers, progress=progress,
                             chosen=chosen, share_memory=share_memory, lazy=lazy)
    return start_on(Engine.of(client if client is not None else checkpoint.client), checkpoint, n,
                    name_prefix=name_prefix, labels=labels, on_create=on_create, max_workers=max_workers,
                    progress=progress, network=network, chosen=chosen, share_memory=share_memory, lazy=lazy)


def start_on(engine: Engine, checkpoint: Checkpoint, n: int, *, name_prefix: Optional[str] = None,
             labels: Optional[Dict[str, str]] = None, on_create: Optional[Callable[[str], None]] = None,
             max_workers: int = MAX_WORKERS, progress: Optional[Callable[[Container], None]] = None,
             network: Union[str, Sequence[str], None] = None, chosen: Optional[List[str]] = None,
             page_port: Optional[int] = None, same_as: Optional[datetime] = None,
             keep: Optional[Identity] = None, share_memory: bool = False, lazy: bool = False) -> List[Container]:
    """:func:`clone` on one engine, which holds ``checkpoint``: names chosen here (``chosen``:
    the caller's own, as :func:`restore` and a migration give them), the clones started by the
    engine's host. ``page_port``: a post-copy migration's (see :class:`dolly._start.CloneRequest`).
    ``same_as``: ``checkpoint`` is another engine's; the clones start from this engine's own copy
    (see :meth:`dolly._hosts.base.Host.start_clones`). ``keep``: a reset's identity (one clone).
    ``share_memory``, ``lazy``: as :func:`clone`'s.

    Raises:
        the errors of :func:`clone`.
    """
    require(checkpoint)
    if checkpoint.origin is not None:
        # Checked at import already; again here, because the clone's create body is built from
        # what the bundle recorded, and this is the last step before the engine sees it.
        policy.check(checkpoint.config, checkpoint.origin.get("allowed") or ())
    spread = _networks(network)
    prefix = name_prefix or f"{checkpoint.container_name}-clone"
    picked = list(chosen) if chosen is not None else engine.reserve_names(prefix, n)
    request = CloneRequest(tuple(picked), chosen is not None, prefix, _check_labels(labels), max_workers,
                           tuple(spread) if spread else None, page_port, keep, share_memory, lazy)
    try:
        return host_of(engine).start_clones(checkpoint, request, on_create=on_create, progress=progress,
                                            same_as=same_as)
    finally:
        if chosen is None:
            engine.release_names(picked)


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
    chosen: Optional[List[str]] = None,
    share_memory: bool = False,
    lazy: bool = False,
) -> List[Container]:
    if not engines:
        raise InvalidArgument("engines must name at least one engine")
    owners = [c for c in [home, *engines] if c is not None and _holds(c, cp)]
    source = owners[0] if owners else Engine.of(home).client
    counts = [n // len(engines) + (1 if i < n % len(engines) else 0) for i in range(len(engines))]

    def on(engine_client: docker.DockerClient, count: int) -> List[Container]:
        engine = Engine.of(engine_client)
        options: Dict[str, Any] = {"name_prefix": name_prefix, "labels": labels, "on_create": on_create,
                                   "max_workers": max_workers, "progress": progress, "chosen": chosen,
                                   "share_memory": share_memory, "lazy": lazy}
        if _holds(engine_client, cp):
            return start_on(engine, cp, count, **options)
        try:
            # From the engine's own copy (the original cp came from, or one a spread kept there),
            # looked up by the host in the same call: one exec for an agent.
            return start_on(engine, cp, count, same_as=cp.created_at, **options)
        except (CheckpointNotFound, ContainerNotFound):
            pass
        # Kept there: the next spread of this checkpoint over that engine uses it again
        # (``dolly.prune`` on that engine removes it, its container being elsewhere).
        return start_on(engine, transfer(cp, engine_client, source=source), count, **options)

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
    return host_of(engine_of(checkpoint, client)).resume(checkpoint, container)


def reset(
    container: ContainerRef,
    checkpoint: Checkpoint,
    *,
    client: Optional[docker.DockerClient] = None,
) -> Container:
    """Put ``container`` back at ``checkpoint``, as itself to whoever talks to it: a container
    restored from the checkpoint takes its place under its name, hostname, MAC address and
    published host ports, and its IPv4 address on every network where Docker lets a container
    ask for one (a user-defined network whose subnet the user set; on the default bridge it gets
    the next free address, as a restarted container does). A stopped container holds no host
    ports: its replacement gets new ones, as ``docker start`` would give it. For the snapshot-once,
    restore-before-each-test pattern: checkpoint a warm container once, reset it before each test.

    It is a new container (a new ID): use the one returned. The container it replaces is stopped
    first (what it ran since is discarded), then removed, its volumes kept (a named volume is not
    part of a checkpoint: what the container wrote there stays). Its files are the checkpoint's.

    Args:
        container: a Container, a name or an ID: the container ``checkpoint`` was taken of, or
            one restored or reset from it (Dolly labels those).
        checkpoint: from :func:`dolly.checkpoint` or :func:`dolly.list_checkpoints`, on the
            container's engine.
        client: the engine; default the one the checkpoint knows, else ``docker.from_env()``.

    Returns:
        The running container, restored from the checkpoint.

    Raises:
        InvalidArgument: ``checkpoint`` is not a Checkpoint, or ``container`` is neither its
            container nor restored from it.
        ContainerNotFound: no such container.
        CheckpointNotFound, PolicyRefused, ImageNotFound, HostNotReady, RestoreFailed: as
            :func:`restore`. The container is then back under its name, stopped (``docker start``
            starts it afresh; ``dolly.reset`` may be tried again), and the checkpoint is kept.
    """
    require(checkpoint)
    engine = engine_of(checkpoint, client)
    old = engine.container(container)
    labels = old.attrs["Config"].get("Labels") or {}
    if old.id != checkpoint.container_id and not restored_from(checkpoint).items() <= labels.items():
        raise InvalidArgument(
            f"container {old.name} was neither checkpointed as {checkpoint.name!r} nor restored from it: reset puts "
            "a container back at its own checkpoint; dolly.restore makes a new container from any")
    old_id, name = id_of(old), str(old.name)
    identity = Identity.of(old.attrs)
    engine.rename(old_id, f"{name}-dolly-reset-{uuid.uuid4().hex[:8]}")
    try:
        engine.stop(old_id)  # frees its address and host ports for the container that replaces it
        try:
            (made,) = start_on(engine, checkpoint, 1, chosen=[name], keep=identity)
        except (EngineError, RestoreFailed) as e:
            # Docker says so only when it starts the container: its network inspect shows a subnet
            # either way.
            if not identity.addresses or "user configured subnets" not in str(e):
                raise
            # A network without a subnet of the user's takes no fixed address: the next free one.
            log.info("reset of %s: %s takes no fixed address; the container gets a new one", name,
                     ", ".join(identity.addresses))
            (made,) = start_on(engine, checkpoint, 1, chosen=[name], keep=identity.without_addresses())
    except BaseException:
        try:
            for attempt in retry.name_freed():
                with attempt:
                    engine.rename(old_id, name)
        except DollyError as e:  # the reset's own error is the one to raise; this one is said
            log.error("reset of %s failed, and the container could not get its name back (%s): it is "
                      "stopped, named %s", name, e, engine.container(old_id).name)
        raise
    try:
        engine.remove(old_id, volumes=False)
    except DollyError as e:  # the reset is done: the new container runs under the name
        log.warning("reset of %s: the container it replaced (%s, stopped) could not be removed: %s", name,
                    old_id[:12], e)
    return made


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


def _check_share_memory(share_memory: Any) -> None:
    if not isinstance(share_memory, bool):
        raise InvalidArgument(f"share_memory must be True or False, got {share_memory!r:.100}")


def _check_lazy(lazy: Any) -> None:
    if not isinstance(lazy, bool):
        raise InvalidArgument(f"lazy must be True or False, got {lazy!r:.100}")


def _check_labels(labels: Any) -> Dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise InvalidArgument(f"labels must be a dict of str to str, got {labels!r}")
    return dict(labels)
