"""Engine access: the only module that talks to the Docker Engine or reads its data root.

docker-py has no methods for checkpoints, so the raw calls live here (``POST/GET/DELETE
/containers/{id}/checkpoints``, ``POST /containers/{id}/start?checkpoint=``), on docker-py's
low-level ``APIClient``. Everything above this module speaks in containers and checkpoints, and
every engine error comes out of here already translated into :mod:`dolly.errors`.

Dolly runs on the engine's host, as root: Docker keeps checkpoint images under its data root
(``<DockerRootDir>/containers/<id>/checkpoints/<name>``) and refuses a custom checkpoint folder,
so restoring into another container means placing files there.
"""
from __future__ import annotations

import contextlib
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, ParamSpec, TypeVar, Union

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container

from . import _names as names, _retry as retry
from ._archive import layer_image_archive
from ._criu_log import criu_error, forget_criu_log
from ._peer import peer_pid, peer_shares_our_files, socket_path_of, socket_refused
from .errors import (
    CheckpointFailed,
    ContainerNotFound,
    DollyError,
    EngineError,
    EngineUnavailable,
    HostNotReady,
    ImageNotFound,
    NameConflict,
    RestoreFailed,
)

ContainerRef = Union[Container, str]
_P = ParamSpec("_P")
_T = TypeVar("_T")

RUNTIME = "dolly"

_default_client: Optional[docker.DockerClient] = None
_default_lock = threading.Lock()


def default_client() -> docker.DockerClient:
    """``docker.from_env()``, made once per process.

    Raises:
        EngineUnavailable: the engine does not answer.
    """
    global _default_client
    with _default_lock:
        if _default_client is None:
            with translate_errors():
                _default_client = docker.from_env()
        return _default_client


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn docker-py's and requests' exceptions into :mod:`dolly.errors`."""
    try:
        yield
    except DollyError:
        raise
    except docker.errors.ImageNotFound as e:
        raise ImageNotFound(_explain(e)) from e
    except docker.errors.NotFound as e:
        raise ContainerNotFound(_explain(e)) from e
    except docker.errors.APIError as e:
        if e.status_code in (502, 503, 504):
            raise EngineUnavailable(_explain(e)) from e
        raise EngineError(_explain(e), status_code=e.status_code) from e
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        if "PermissionError" in str(e):
            raise HostNotReady(socket_refused(e)) from e
        raise EngineUnavailable(f"the Docker Engine did not answer: {e}") from e
    except docker.errors.DockerException as e:
        if "PermissionError" in str(e):
            raise HostNotReady(socket_refused(e)) from e
        if "Connection" in str(e) or "FileNotFoundError" in str(e):
            raise EngineUnavailable(f"the Docker Engine did not answer: {e}") from e
        raise


def id_of(container: Container) -> str:
    """``container.id``, which docker-py types as optional: a container the engine listed or
    inspected always has one.

    Raises:
        ContainerNotFound: a container object with no ID, which no engine gave.
    """
    if container.id is None:
        raise ContainerNotFound(f"not a container the engine knows (it has no ID): {container!r}")
    return container.id


def name_of(container: Container) -> str:
    """``container.name``, which docker-py types as optional, like :func:`id_of`."""
    if container.name is None:
        raise ContainerNotFound(f"not a container the engine knows (it has no name): {container!r}")
    return container.name


def _split_tag(name: str) -> tuple[str, Optional[str]]:
    repo, sep, tag = name.rpartition(":")
    if sep and "/" not in tag:
        return repo, tag
    return name, None


@contextlib.contextmanager
def _taken_name_is_a_conflict(name: str) -> Iterator[None]:
    try:
        yield
    except EngineError as e:
        if e.status_code == 409:
            raise NameConflict(f"the container name {name!r} is already taken") from e
        raise


def _explain(e: docker.errors.APIError) -> str:
    return str(e.explanation or e)


def _marker(path: Path) -> str:
    """The random marker at ``path``, made (atomically, once) when there is none."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(uuid.uuid4().hex)
    try:
        os.link(tmp, path)  # fails if another process made it first: then theirs stands
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


class Engine:
    """One Docker Engine as Dolly uses it. Get one with :meth:`of`."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.api = client.api
        self._info: Optional[Dict[str, Any]] = None
        self._local: Optional[bool] = None
        self._identity: Optional[tuple[Any, ...]] = None
        # Names handed out by this process but perhaps not created yet: concurrent clones on this
        # engine must not pick the same ones (other processes are caught by the engine's 409).
        self._reserved: set[str] = set()
        self._reserved_lock = threading.Lock()

    @classmethod
    def of(cls, client: Optional[docker.DockerClient] = None) -> Engine:
        """The :class:`Engine` for ``client`` (default: ``docker.from_env()``), made once and
        kept on the client itself: it lives and dies with it."""
        client = client or default_client()
        with _default_lock:
            engine = getattr(client, "_dolly_engine", None)
            if engine is None:
                engine = cls(client)
                client._dolly_engine = engine  # type: ignore[attr-defined]
            return engine

    # --- facts about the engine ------------------------------------------------------------------

    def info(self, *, refresh: bool = False) -> Dict[str, Any]:
        """``docker info``, cached."""
        if self._info is None or refresh:
            self._info = self._call(self.api.info)
        return self._info

    def experimental(self) -> bool:
        return bool(self._call(self.api.version).get("Experimental"))

    @property
    def identity(self) -> tuple[Any, ...]:
        """What tells two engines apart, so that two are the same only if they really are. The
        engine ID alone does not: engines that share /etc/docker (or a copied key.json) share it,
        and a data root's path names the same folder on every host. So each engine's data root
        gets a random marker, ``dolly/engine-id``, made once: two clients reach the same engine
        exactly when they find the same marker. An engine whose files this process cannot see
        is told apart by its ID, name and data root."""
        if self._identity is None:
            info = self.info()
            if self.files_are_local():
                self._identity = (info.get("ID"), _marker(Path(info["DockerRootDir"]) / "dolly" / "engine-id"))
            else:
                self._identity = (info.get("ID"), info.get("Name"), info.get("DockerRootDir"))
        return self._identity

    @property
    def root_dir(self) -> Path:
        """The engine's data root, as this process sees it.

        Raises:
            HostNotReady: the engine's files are not this process's to see (see
                :meth:`files_are_local`): Dolly does not yet reach another host's files.
        """
        if not self.files_are_local():
            raise HostNotReady(
                f"the engine at {self.api.base_url} keeps its files where this process cannot see "
                "them (another host, or another mount namespace); Dolly needs to run on the "
                "engine's host, beside its files, for now"
            )
        return Path(self.info()["DockerRootDir"])

    def files_are_local(self) -> bool:
        """Whether the engine's files are this process's files, decided by a check, not by path
        names: the engine must answer on a unix socket, and its data root here must be the same
        folder (device and inode) as the data root of the process at the other end of that
        socket (SO_PEERCRED), seen through that process's own root. Over TCP or SSH, or beside a
        dockerd whose data root is another folder under the same name (another mount namespace,
        another host), it is not. Dolly's agent passes the same check beside its engine."""
        if self._local is None:
            self._local = peer_shares_our_files(socket_path_of(self.client), str(self.info()["DockerRootDir"]))
        return self._local

    def daemon_pid(self) -> Optional[int]:
        """The pid of the engine's dockerd in this process's PID namespace, when it answers on a
        unix socket here (SO_PEERCRED) and that process is a dockerd (not systemd holding an
        activated socket, nor a proxy); None otherwise."""
        socket_path = socket_path_of(self.client)
        if not socket_path:
            return None
        try:
            pid = peer_pid(socket_path)
            if Path(f"/proc/{pid}/comm").read_text().strip() != "dockerd":
                return None
        except OSError:
            return None
        return pid

    @property
    def store_dir(self) -> Path:
        """Where Dolly keeps this engine's checkpoints: beside Docker's own folders, on the same
        filesystem, so that taking a checkpoint over from Docker is a rename, not a copy."""
        return self.root_dir / "dolly" / "checkpoints"

    @property
    def spool_dir(self) -> Path:
        """Where CRIU reads and writes images directly, bypassing Docker's copy through containerd
        (see scripts/dolly-runc): ``<id>.checkpoint`` and ``<id>.restore`` folders, short-lived."""
        return self.root_dir / "dolly" / "spool"

    @property
    def lock_dir(self) -> Path:
        """Lock files of operations that must not overlap (one checkpoint of a container at a
        time): one small file per container, kept apart from the spool."""
        return self.root_dir / "dolly" / "locks"

    def require_checkpoint_support(self) -> None:
        """Raises:
            HostNotReady: the engine is not in experimental mode, lacks Dolly's runtime, or its
                data root is not on this machine.
        """
        if not self.experimental():
            raise HostNotReady(
                "the Docker Engine is not in experimental mode, which checkpoints need: "
                'set {"experimental": true} in /etc/docker/daemon.json and restart dockerd '
                "(make host does both)"
            )
        if RUNTIME not in (self.info().get("Runtimes") or {}):
            raise HostNotReady(
                f"the Docker Engine has no '{RUNTIME}' runtime: run `make host`, which registers "
                "scripts/dolly-runc in /etc/docker/daemon.json"
            )
        if self.files_are_local() and not (self.root_dir / "containers").is_dir():
            raise HostNotReady(
                f"the engine's data root {self.root_dir} is not on this machine: Dolly must run "
                "as root on the engine's host"
            )

    # --- containers ------------------------------------------------------------------------------

    def container(self, ref: ContainerRef) -> Container:
        """The container ``ref`` names (a Container, a name or an ID), freshly inspected.

        Raises:
            ContainerNotFound: no such container.
        """
        key = ref.id if isinstance(ref, Container) else ref
        if not isinstance(key, str) or not key:
            raise ContainerNotFound(f"not a container name or ID: {ref!r}")
        try:
            return self._call(self.client.containers.get, key)
        except ContainerNotFound:
            raise ContainerNotFound(f"no such container: {key}") from None

    def container_names(self) -> set[str]:
        rows = self._call(self.api.containers, all=True)
        return {n.lstrip("/") for row in rows for n in (row.get("Names") or [])}

    def reserve_names(self, prefix: str, n: int, *, avoid: Iterable[str] = ()) -> list[str]:
        """The ``n`` free names ``<prefix>-<k>`` with the lowest k's, held for this process until
        :meth:`release_names` (the engine's 409 catches other processes)."""
        with self._reserved_lock:
            picked = names.allocate_names(prefix, n, self.container_names() | self._reserved | set(avoid))
            self._reserved.update(picked)
            return picked

    def release_names(self, picked: Iterable[str]) -> None:
        with self._reserved_lock:
            self._reserved.difference_update(picked)

    def create(self, config: Dict[str, Any], name: str) -> str:
        """Create a container from a raw Engine API config; returns its ID.

        Raises:
            NameConflict: ``name`` is taken.
        """
        with _taken_name_is_a_conflict(name):
            made: Dict[str, Any] = self._call(self.api.create_container_from_config, config, name)
        return str(made["Id"])

    def connect(self, container_id: str, network: str, endpoint: Dict[str, Any]) -> None:
        def call() -> None:
            url = self._raw._url("/networks/{0}/connect", network)
            res = self._raw._post_json(url, data={"Container": container_id, "EndpointConfig": endpoint})
            self._raw._result(res)  # reads the body: the connection goes back to the pool

        self._call(call)

    def pause(self, container_id: str) -> None:
        self._call(self.api.pause, container_id)

    def unpause(self, container_id: str) -> None:
        self._call(self.api.unpause, container_id)

    def set_restart_policy(self, container_id: str, policy: Dict[str, Any]) -> None:
        """Change a container's restart policy in place (``docker update --restart``)."""
        # The stubs' restart policy names only "always" and "on-failure"; the engine takes all four.
        self._call(self.api.update_container, container_id, restart_policy=policy)  # type: ignore[arg-type]

    def rename(self, container_id: str, name: str) -> None:
        """Raises:
            NameConflict: ``name`` is taken."""
        with _taken_name_is_a_conflict(name):
            self._call(self.api.rename, container_id, name)

    def stop(self, container_id: str) -> None:
        """Stop a container at once (SIGKILL: what it ran is being replaced); a stopped one is left as is."""
        self._call(self.api.stop, container_id, timeout=0)

    def remove(self, container_id: str, *, volumes: bool = True) -> None:
        """Remove a container (force: running or not); a missing one is not an error.

        Args:
            volumes: remove its anonymous volumes too. Right for a container Dolly made itself
                (a clone, a plugin's service), whose volumes were made empty with it; a source's
                volumes hold the user's data and are never Dolly's to remove: pass False. Named
                volumes are never removed either way.
        """
        with contextlib.suppress(ContainerNotFound):
            self._call(self.api.remove_container, container_id, force=True, v=volumes)

    def remove_labelled(self, key: str, value: str, *, keep: Iterable[str] = ()) -> None:
        """Remove every container labelled ``key=value``, but those in ``keep``."""
        keep = set(keep)
        for row in self._call(self.api.containers, all=True, filters={"label": f"{key}={value}"}):
            if row["Id"] not in keep:
                self.remove(row["Id"])

    def image_ref(self, image_id: str, name: Optional[str]) -> str:
        """``name`` if it still names the image ``image_id`` (so ``docker ps`` shows a name),
        else the ID itself.

        Raises:
            ImageNotFound: the engine has no image ``image_id``.
        """
        if name:
            with contextlib.suppress(ImageNotFound, ContainerNotFound):
                if self._call(self.client.images.get, name).id == image_id:
                    return name
        try:
            self._call(self.client.images.get, image_id)
        except (ImageNotFound, ContainerNotFound):
            raise ImageNotFound(
                f"the engine has no image {name or ''} ({image_id}), which the checkpoint's "
                "container was created from"
            ) from None
        return image_id

    def has_image(self, ref: str) -> bool:
        """Whether the engine has an image of that ID or name."""
        try:
            self._call(self.client.images.get, ref)
            return True
        except (ImageNotFound, ContainerNotFound):
            return False

    def ensure_image(self, image_id: str, name: Optional[str], *, source: Optional[Engine],
                     tag: bool = True) -> bool:
        """Make sure this engine has the image ``image_id``, copying it from ``source`` (docker
        save | docker load, streamed) when it lacks it; returns whether it was copied now. With
        ``tag``, ``name`` is added to it where that name is free: never moved off another image.

        Raises:
            ImageNotFound: neither this engine nor ``source`` has it.
        """
        copied = False
        if not self.has_image(image_id):
            if source is None or not source.has_image(image_id):
                raise ImageNotFound(
                    f"the engine has no image {name or ''} ({image_id}), which the checkpoint's container "
                    "was created from" + ("" if source is None else ", and neither has image_source")
                    + ": load it, or pass image_source=<a client of an engine that has it>"
                )
            stream = self._call(source.client.images.get, image_id).save(named=False)
            # docker-py sends an iterator of chunks as it comes; its stubs want bytes or a file.
            self._call(self.client.images.load, stream)  # type: ignore[arg-type]
            copied = True
        if tag and name and not name.startswith("sha256:") and not self.has_image(name):
            self._call(self.api.tag, image_id, *_split_tag(name))
        return copied

    def load_layer_image(self, base_image_id: str, layer: Path, tag: str) -> str:
        """Make the image ``tag``: the image ``base_image_id`` with one more layer, the tar at
        ``layer`` (an image layer: OCI's whiteouts, uncompressed); returns its ID. The engine
        gets a ``docker load`` archive, streamed, that carries only the new layer: it has the
        others already (a load looks each layer up before it reads it).

        Raises:
            ImageNotFound: the engine has no image ``base_image_id``.
            EngineError: the engine refused the archive.
        """
        base = self._call(self.api.inspect_image, base_image_id)
        # In chunks of 1 MiB (a file object would be sent line by line), not retried: the
        # stream cannot be read twice.
        with layer_image_archive(base, layer, tag) as chunks, translate_errors():
            try:
                self.client.images.load(chunks)  # type: ignore[arg-type]
            except docker.errors.ImageLoadError as e:
                raise EngineError(f"the engine refused the layer image {tag}: {e}") from e
        return self.image_id(tag)

    def image_id(self, ref: str) -> str:
        """The ID of the image ``ref`` names.

        Raises:
            ImageNotFound: no such image.
        """
        return str(self._call(self.client.images.get, ref).id)

    def image_digests(self, image_id: str) -> list[str]:
        """The registry digests (``name@sha256:...``) the engine knows for an image.

        Raises:
            ImageNotFound: no such image.
        """
        return list(self._call(self.client.images.get, image_id).attrs.get("RepoDigests") or [])

    def image_tags(self, repository: str) -> list[str]:
        """The tags (``repository:tag``) of this engine's images in ``repository``."""
        rows = self._call(self.api.images, name=repository)
        return [t for row in rows for t in (row.get("RepoTags") or []) if t.startswith(repository + ":")]

    def remove_image(self, image_id: str) -> None:
        """Remove an image Dolly copied here, unless something uses it meanwhile."""
        with contextlib.suppress(DollyError):
            self._call(self.api.remove_image, image_id, force=False, noprune=False)

    def has_container(self, container_id: str) -> bool:
        try:
            self._call(self.api.inspect_container, container_id)
            return True
        except ContainerNotFound:
            return False

    def has_labelled(self, labels: Dict[str, str]) -> bool:
        """Whether any container, running or not, carries all these labels."""
        rows = self._call(self.api.containers, all=True, quiet=True,
                          filters={"label": [f"{k}={v}" for k, v in labels.items()]})
        return bool(rows)

    def upper_dir(self, container: Container) -> Path:
        """The writable layer of ``container`` as the storage driver keeps it.

        Raises:
            HostNotReady: the storage driver is not overlay2.
        """
        driver = container.attrs.get("GraphDriver") or {}
        upper = (driver.get("Data") or {}).get("UpperDir")
        if driver.get("Name") != "overlay2" or not upper:
            raise HostNotReady(
                f"container {container.name} uses the storage driver {driver.get('Name')!r}; "
                "Dolly needs overlay2 to carry the writable layer"
            )
        return Path(upper)

    # --- checkpoints -----------------------------------------------------------------------------

    def checkpoints_dir(self, container_id: str) -> Path:
        return self.root_dir / "containers" / container_id / "checkpoints"

    def create_checkpoint(self, container_id: str, name: str, *, exit: bool, unbounded: bool = False) -> Path:
        """Have Docker (runc, CRIU) dump the container; returns the folder of the images.
        ``unbounded``: wait as long as the dump takes (a post-copy dump lasts until the target
        has all the memory), not the client's timeout.

        Raises:
            CheckpointFailed: Docker or CRIU failed; carries CRIU's log.
        """
        timeout = {"timeout": None} if unbounded else {}

        def call() -> None:
            url = self._raw._url("/containers/{0}/checkpoints", container_id)
            res = self._raw._post_json(url, data={"CheckpointID": name, "Exit": exit}, **timeout)
            self._raw._result(res)  # reads the body: the connection goes back to the pool

        forget_criu_log(container_id, "checkpoint")
        try:
            self._call(call)
        except EngineError as e:
            raise criu_error(CheckpointFailed, container_id, "checkpoint", e) from e
        return self.checkpoints_dir(container_id) / name

    def start_from_checkpoint(self, container_id: str, name: str) -> None:
        """Start a created container from the checkpoint in its own checkpoints folder.

        Raises:
            RestoreFailed: Docker or CRIU failed; carries CRIU's log.
        """

        def call() -> None:
            url = self._raw._url("/containers/{0}/start", container_id)
            res = self._raw._post(url, params={"checkpoint": name})
            try:
                self._raw._result(res)  # reads the body: the connection goes back to the pool
            except docker.errors.APIError as e:
                if "already exists" in _explain(e) and "content" in _explain(e):
                    raise retry.ContentConflict(_explain(e)) from e
                raise

        forget_criu_log(container_id, "restore")
        try:
            for attempt in retry.checkpoint_upload():
                with attempt:
                    self._call(call)
        except (EngineError, retry.ContentConflict) as e:
            raise criu_error(RestoreFailed, container_id, "restore", e) from e

    # --- plumbing --------------------------------------------------------------------------------

    @property
    def _raw(self) -> Any:
        """The APIClient's request helpers (``_url``, ``_post``, ``_post_json``, ``_result``), which
        docker-py's type stubs leave out."""
        return self.api

    def _call(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Call the engine, retrying while it is unavailable, with errors translated: returns what
        ``fn`` returns."""
        for attempt in retry.engine_calls():
            with attempt:
                with translate_errors():
                    return fn(*args, **kwargs)
        raise AssertionError("unreachable")  # pragma: no cover

