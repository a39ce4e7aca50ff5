"""In-memory fakes of an engine and its host, for tests of Dolly's public layer without an engine.

    a = FakeEngine("a")                     # an engine, its client (a.client) and its host (a.host)
    c = a.run(memory={"count": 41})         # a running container, its processes' state in memory
    cp = dolly.checkpoint(c, "x", client=a.client)
    a.faults.inject("restore", RestoreFailed("boom"), at=3)   # the 3rd clone's restore fails
    dolly.clone(cp, 5)                      # raises RestoreFailed; no clone is left

:class:`FakeEngine` is an :class:`~dolly._engine.Engine` whose methods answer from dicts, and
:class:`FakeHost` fills the whole :class:`~dolly._hosts.base.Host` protocol in memory.
:class:`FakeClient` is the docker client the public functions are given: ``Engine.of(client)``
returns its FakeEngine (``client._dolly_engine``) and ``host_of(engine)`` its FakeHost
(``engine._host``), so the public layer (:mod:`dolly._catalog`, ``_cloning``, ``_transfer``,
``_migration``) runs unchanged on top of them.

What is modelled, as the real hosts do it (the errors are the ones :class:`LocalHost`'s docstrings
name, from the same situations):

- containers: names, labels, the recorded ``docker inspect`` (``attrs``), state (running, exited,
  paused), start times, images by ID and name; a container's *memory* (a dict: what CRIU would
  dump) and *files* (its writable layer). A stopped container loses its memory, keeps its files.
- the checkpoint store: checkpoints as :class:`dolly.Checkpoint` values of the fake engine's
  client, with their member files as bytes (the memory and files serialised: a clone or a resume
  gets back what the checkpoint took), sizes (measured when listed or got; the value
  ``checkpoint`` returns has size 0, as the real hosts' has), lookups by ID, unique ID prefix or
  a removed container's recorded name; images a failed late dump kept (``CheckpointFailed.kept``).
- clones: the real create body (:func:`dolly._start.clone_config`), explicit names (a taken one is
  :class:`NameConflict`) or the next free ``<prefix>-<k>``, labels, ``on_create``/``progress``, and
  the clean-up of every container of a call when any clone fails; ``resume`` and its refusals.
- bundles: ``export_members`` yields a manifest that passes :func:`dolly._manifest.parse_manifest`
  and members whose digests match; ``stage_import`` checks members as ``_bundle.extract`` does
  (layout, listed once, size, SHA-256), holds the configuration to :func:`dolly.policy.check`,
  refuses claims on the engine's containers and rollbacks of a lineage; ``commit_import`` and
  ``discard_import`` as the real ones (a commit drops the staged import either way).
- failures: :class:`Faults` raises an error at a named point, on every call or on the k-th;
  :meth:`FakeEngine.stop_answering` makes the engine and its host raise ``EngineUnavailable``.

What is not: CRIU and its images (no policy check of process images; the image an import would
be rebuilt against is recorded in ``FakeHost.references``, nothing is rebuilt), shared layer
images (``shared_layer`` is always None), networks beyond their names, volumes' contents,
post-copy (its two methods raise ``HostNotReady``), Podman and kubelet archives
(``stage_foreign`` raises ``BundleError`` as an agent does), concurrency (a host starts its clones
one after another; the engine's state is guarded by a lock so that spreads over several fake
engines may run in threads), and an engine's retries (an unavailable fake engine fails at once).
A method the public layer is not expected to call (its files' folders, a raw API call) raises
AssertionError naming it, so a test that strays off the model says so.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import itertools
import json
import tempfile
import threading
import types
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Set, Tuple, Union

import docker
import docker.errors
from docker.models.containers import Container

from dolly import _names as names, _rebuild, policy
from dolly._archive import tarfile
from dolly._bundle import Lineages, Staged, checked_members, recorded_config
from dolly._checkpoint import Checkpoint, User
from dolly._checks import Check
from dolly._engine import ContainerRef, Engine
from dolly._manifest import DEFAULT_MAX_BYTES, Member, lineage_key, new_manifest, source_fields, too_large
from dolly._postcopy import PageSource, PageTarget
from dolly._start import LABEL_CHECKPOINT, LABEL_OPERATION, LABEL_SOURCE, CloneRequest, clone_config
from dolly.errors import (
    BundleError,
    CheckpointExists,
    CheckpointFailed,
    CheckpointNotFound,
    ContainerNotFound,
    ContainerNotRunning,
    DigestMismatch,
    DollyError,
    EngineUnavailable,
    HostNotReady,
    ImageNotFound,
    InvalidArgument,
    NameConflict,
    RollbackRefused,
    UnsafeArchive,
)

__all__ = ["BUSYBOX", "FakeClient", "FakeContainer", "FakeEngine", "FakeHost", "Faults", "image_id_of"]

BUSYBOX = "dolly/busybox"
# The members a fake checkpoint holds: CRIU's images (the memory, the kernel hostname), the
# writable layer and the list of deleted files, as a real checkpoint's bundle names them.
PAGES = "checkpoint/pages-1.img"
UTS = "checkpoint/utsns-12.img"
INVENTORY = "checkpoint/inventory.img"
LAYER = "rootfs-diff.tar"

ErrorSource = Union[BaseException, Callable[[], Optional[BaseException]]]


def image_id_of(name: str) -> str:
    """The ID every fake engine gives the image ``name``: the same on every engine, as a real
    image's content-derived ID is."""
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def _new_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


_ticks = itertools.count(1)


def _timestamp() -> str:
    """A start time as Docker writes it, distinct from every other one this process made: a
    start is told from another by its time (``dolly.resume``, the migration's settle)."""
    base = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(microseconds=next(_ticks))
    return base.strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


# --- failures ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Rule:
    point: str
    error: ErrorSource
    at: Optional[int]
    start: int


class Faults:
    """Failures to inject at named points, and a count of the calls at each point.

    ``inject(point, error)`` raises ``error`` on every later call at ``point``; with ``at=k``
    only on the k-th call after the injection. ``error`` is an exception, or a callable run at
    that moment that returns one (or None: nothing is raised; the callable's side effect is the
    fault, such as :meth:`FakeEngine.stop_answering`). ``calls[point]`` counts every call.

    The points: a host's operations by their method's name (``list_checkpoints``,
    ``get_checkpoint``, ``remove_checkpoint``, ``checkpoint`` (before the dump: the container is
    left as it was), ``dump`` (after it: see :meth:`FakeHost.checkpoint`), ``start_clones``,
    ``restore`` (each clone, once created), ``resume``, ``export_members``, ``stage_import``,
    ``commit_import``, ``discard_import``, ``prepare``) and an engine's methods as
    ``engine.<name>`` (``engine.container``, ``engine.create``, ``engine.remove``,
    ``engine.ensure_image``, ...).
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._rules: List[_Rule] = []
        self._lock = threading.Lock()

    def inject(self, point: str, error: ErrorSource, *, at: Optional[int] = None) -> None:
        with self._lock:
            self._rules.append(_Rule(point, error, at, self.calls[point]))

    def clear(self, point: Optional[str] = None) -> None:
        """Forget the injected failures (at ``point``, or all)."""
        with self._lock:
            self._rules = [r for r in self._rules if point is not None and r.point != point]

    def hit(self, point: str) -> None:
        """A call at ``point``: counted, then failed when a rule says so."""
        with self._lock:
            self.calls[point] += 1
            n = self.calls[point]
            due = [r for r in self._rules if r.point == point and (r.at is None or n - r.start == r.at)]
        for rule in due:
            error = rule.error if isinstance(rule.error, BaseException) else rule.error()
            if error is not None:
                raise error


# --- the client and its containers ---------------------------------------------------------------


class FakeAPI:
    """The little of docker-py's low-level ``APIClient`` that Dolly's public layer reaches past
    :class:`Engine` for: ``base_url``, ``ping``, ``info`` and ``inspect_container`` (what
    :func:`dolly._transfer.transfer` asks of a source whose host does not vouch)."""

    def __init__(self, engine: FakeEngine) -> None:
        self._engine = engine
        self.base_url = f"fake://{engine.name}"

    def ping(self) -> bool:
        self._engine._answer("api.ping")
        return True

    def info(self) -> Dict[str, Any]:
        return self._engine.info()

    def inspect_container(self, container_id: str) -> Dict[str, Any]:
        self._engine._answer("api.inspect_container")
        try:
            return copy.deepcopy(self._engine._record(container_id).attrs)
        except ContainerNotFound as e:
            raise docker.errors.NotFound(str(e)) from None


class FakeClient(docker.DockerClient):
    """The docker client of a :class:`FakeEngine`: what the public functions take as ``client=``
    and what checkpoints and containers carry as ``.client``. It holds the engine
    (``_dolly_engine``, where :meth:`Engine.of` looks) and a :class:`FakeAPI`; docker-py's
    collections (``client.containers``, ...) are not modelled."""

    def __init__(self, engine: FakeEngine) -> None:  # no super().__init__: there is no socket
        self.api = FakeAPI(engine)  # type: ignore[assignment]
        self._dolly_engine = engine

    def __repr__(self) -> str:
        return f"FakeClient({self._dolly_engine.name})"

    def close(self) -> None:
        pass


class FakeContainer(Container):
    """A docker-py ``Container`` of a fake engine: ``attrs`` as inspected when it was looked up,
    ``reload()`` inspects it again (``EngineUnavailable`` when the engine does not answer,
    ``ContainerNotFound`` when it is gone), ``logs()`` is its log. Nothing else reaches the
    engine (no exec, no attach): read its state with :meth:`FakeEngine.memory_of`."""

    def _engine(self) -> FakeEngine:
        engine = getattr(self.client, "_dolly_engine", None)
        if not isinstance(engine, FakeEngine):
            raise AssertionError("a FakeContainer of no fake engine")
        return engine

    def reload(self) -> None:
        self.attrs = self._engine().inspect(str(self.id))

    def logs(self, **kwargs: Any) -> Any:  # the whole log as bytes: no stream=True
        return "".join(f"{line}\n" for line in self._engine()._record(str(self.id)).logs).encode()


# --- the engine -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Record:
    """A container as the fake engine keeps it."""

    attrs: Dict[str, Any]
    memory: Dict[str, Any]
    files: Dict[str, str]
    logs: List[str] = dataclasses.field(default_factory=list)


def _mounts(host_config: Dict[str, Any]) -> List[Dict[str, Any]]:
    """``docker inspect``'s Mounts for a HostConfig's Binds (a path: a bind mount, else a named
    volume) and Mounts."""
    found = []
    for bind in host_config.get("Binds") or []:
        source, _, rest = str(bind).partition(":")
        destination = rest.split(":")[0]
        if source.startswith("/"):
            found.append({"Type": "bind", "Source": source, "Destination": destination})
        else:
            found.append({"Type": "volume", "Name": source, "Source": f"/volumes/{source}",
                          "Destination": destination})
    for mount in host_config.get("Mounts") or []:
        found.append({"Type": mount.get("Type"), "Name": mount.get("Source"), "Source": mount.get("Source"),
                      "Destination": mount.get("Target")})
    return found


class FakeEngine(Engine):
    """A Docker Engine in memory, with its :class:`FakeClient` (``client``) and :class:`FakeHost`
    (``host``, a host that vouches as a :class:`LocalHost` does unless ``vouches=False``: then
    it is held to what it sends as an agent's host is).

    Answers what :class:`Engine` answers for the public layer: containers (``container``,
    ``container_names``, ``create``, ``remove``, ``remove_labelled``, ``has_container``),
    names (``reserve_names``/``release_names``: Engine's own), images (``has_image``,
    ``image_id``, ``image_ref``, ``ensure_image``, ``remove_image``, ``image_tags``), ``info``,
    ``identity``, ``experimental`` and ``require_checkpoint_support`` (``HostNotReady`` when
    ``experimental`` or ``runtime`` is turned off). Its files (``root_dir`` and the folders
    under it), layer images and raw checkpoint calls are not modelled.
    """

    def __init__(self, name: str = "a", *, images: Iterable[str] = (BUSYBOX,), vouches: bool = True) -> None:
        self.name = name
        self.engine_id = uuid.uuid4().hex
        self.faults = Faults()
        self.down = False
        self.experimental_mode = True
        self.runtime = True
        self._lock = threading.RLock()
        self.records: Dict[str, _Record] = {}
        self.images: Dict[str, Set[str]] = {}
        for image in images:
            self.add_image(image)
        super().__init__(FakeClient(self))
        self.host = FakeHost(self, vouches=vouches)

    def __repr__(self) -> str:
        return f"FakeEngine({self.name})"

    # --- what a test does to the engine -----------------------------------------------------------

    def stop_answering(self) -> None:
        """The engine, and with it its host, stops answering: every call raises EngineUnavailable."""
        self.down = True

    def answer_again(self) -> None:
        self.down = False

    def add_image(self, name: str) -> str:
        """An image ``name`` on this engine (the same ID on every fake engine); its ID."""
        image = image_id_of(name)
        with self._lock:
            self.images.setdefault(image, set()).add(name)
        return image

    def run(self, image: str = BUSYBOX, command: Optional[List[str]] = None, *, name: Optional[str] = None,
            labels: Optional[Dict[str, str]] = None, memory: Optional[Dict[str, Any]] = None,
            files: Optional[Dict[str, str]] = None, host_config: Optional[Dict[str, Any]] = None) -> FakeContainer:
        """A running container (as ``docker run -d``): its processes hold ``memory``, its
        writable layer ``files``. ``host_config`` adds to Docker's HostConfig of a plain run.

        Raises:
            NameConflict: ``name`` is taken. ImageNotFound: no image ``image``.
        """
        body = {"Image": image, "Cmd": list(command or ["sh"]), "Env": ["PATH=/bin"], "Labels": dict(labels or {}),
                "HostConfig": {"NetworkMode": "default", "Runtime": "dolly", "RestartPolicy": {"Name": "no"},
                               "Privileged": False, "PortBindings": {}, "LogConfig": {"Type": "json-file"},
                               **(host_config or {})},
                "NetworkingConfig": {"EndpointsConfig": {"bridge": {}}}}
        cid = self.create(body, name or f"fake_{uuid.uuid4().hex[:8]}")
        with self._lock:
            record = self.records[cid]
            record.memory = dict(memory or {})
            record.files = dict(files or {})
            self._set_running(record)
        return self.container(cid)

    def memory_of(self, ref: ContainerRef) -> Dict[str, Any]:
        """What the container's processes hold now (the live dict: a test may change it)."""
        return self._record(self._key(ref)).memory

    def files_of(self, ref: ContainerRef) -> Dict[str, str]:
        """Its writable layer (the live dict)."""
        return self._record(self._key(ref)).files

    def exit(self, ref: ContainerRef, code: int = 1) -> None:
        """Its processes end: the container stops, its memory gone."""
        with self._lock:
            record = self._record(self._key(ref))
            record.memory = {}
            record.attrs["State"].update(Status="exited", Running=False, Paused=False, ExitCode=code,
                                         FinishedAt=_timestamp())

    def restart(self, ref: ContainerRef) -> None:
        """It is started again from scratch (a restart policy, a ``docker restart``): its memory
        gone, a new start time, one more restart counted."""
        with self._lock:
            record = self._record(self._key(ref))
            record.memory = {}
            self._set_running(record)
            record.attrs["RestartCount"] += 1

    def update(self, ref: ContainerRef, **host_config: Any) -> None:
        """Change its HostConfig as the engine reports it from now on."""
        with self._lock:
            self._record(self._key(ref)).attrs["HostConfig"].update(host_config)

    def labelled(self, key: str, value: Optional[str] = None) -> List[FakeContainer]:
        """The containers that carry the label ``key`` (``=value``), by name."""
        with self._lock:
            ids = [cid for cid, r in self.records.items()
                   if key in (r.attrs["Config"].get("Labels") or {})
                   and (value is None or r.attrs["Config"]["Labels"][key] == value)]
        return sorted((self.container(i) for i in ids), key=lambda c: str(c.name))

    def inspect(self, container_id: str) -> Dict[str, Any]:
        """``docker inspect``, fresh (raises as :meth:`container`)."""
        self._answer("engine.inspect")
        return copy.deepcopy(self._record(container_id).attrs)

    # --- internals the host uses ------------------------------------------------------------------

    def _answer(self, point: str) -> None:
        """Every call: refused when the engine does not answer, then the faults of ``point``."""
        if self.down:
            raise EngineUnavailable(f"the Docker Engine did not answer: fake engine {self.name} is down")
        self.faults.hit(point)

    def _key(self, ref: ContainerRef) -> str:
        key = ref.id if isinstance(ref, Container) else ref
        if not isinstance(key, str) or not key:
            raise ContainerNotFound(f"not a container name or ID: {ref!r}")
        return key

    def _record(self, key: str) -> _Record:
        """By full ID, name or unique ID prefix, as the engine resolves a reference."""
        with self._lock:
            if key in self.records:
                return self.records[key]
            for record in self.records.values():
                if record.attrs["Name"] == "/" + key:
                    return record
            found = [r for cid, r in self.records.items() if cid.startswith(key)]
            if len(found) == 1:
                return found[0]
        raise ContainerNotFound(f"no such container: {key}")

    def _set_running(self, record: _Record) -> None:
        record.attrs["State"].update(Status="running", Running=True, Paused=False, Restarting=False, ExitCode=0,
                                     StartedAt=_timestamp(), Pid=1000 + len(self.records))

    def _stop(self, container_id: str) -> None:
        """A dump that stops its container (``leave_running=False``)."""
        with self._lock:
            record = self._record(container_id)
            record.memory = {}
            record.attrs["State"].update(Status="exited", Running=False, Paused=False, ExitCode=137,
                                         FinishedAt=_timestamp())

    def _start_restored(self, container_id: str, memory: Dict[str, Any], files: Optional[Dict[str, str]]) -> None:
        """Start a container from a checkpoint's memory (and, for a new container, its files)."""
        with self._lock:
            record = self._record(container_id)
            record.memory = copy.deepcopy(memory)
            if files is not None:
                record.files = dict(files)
            record.logs.append(f"restored {json.dumps(memory, sort_keys=True)}")
            self._set_running(record)

    def _image(self, ref: str) -> Optional[str]:
        with self._lock:
            if ref in self.images:
                return ref
            for image, tags in self.images.items():
                if ref in tags:
                    return image
        return None

    # --- Engine ---------------------------------------------------------------------------------------

    def info(self, *, refresh: bool = False) -> Dict[str, Any]:
        self._answer("engine.info")
        return {"ID": self.engine_id, "Name": f"fake-{self.name}", "ServerVersion": "fake",
                "DockerRootDir": f"/fake-engines/{self.name}", "Runtimes": {"dolly": {}, "runc": {}} if self.runtime
                else {"runc": {}}}

    def experimental(self) -> bool:
        self._answer("engine.experimental")
        return self.experimental_mode

    @property
    def identity(self) -> tuple[Any, ...]:
        """Always answered (a real engine's is cached after its first use)."""
        return ("fake", self.name, self.engine_id)

    def files_are_local(self) -> bool:
        return True

    @property
    def root_dir(self) -> Path:
        raise AssertionError(f"{self!r} has no files: the public layer reached for the engine's data root")

    def daemon_pid(self) -> Optional[int]:
        return None

    def require_checkpoint_support(self) -> None:
        self._answer("engine.require_checkpoint_support")
        if not self.experimental_mode:
            raise HostNotReady("the Docker Engine is not in experimental mode, which checkpoints need")
        if not self.runtime:
            raise HostNotReady("the Docker Engine has no 'dolly' runtime: run `make host`")

    def container(self, ref: ContainerRef) -> FakeContainer:
        self._answer("engine.container")
        attrs = copy.deepcopy(self._record(self._key(ref)).attrs)
        return FakeContainer(attrs=attrs, client=self.client)

    def container_names(self) -> set[str]:
        self._answer("engine.container_names")
        with self._lock:
            return {r.attrs["Name"].lstrip("/") for r in self.records.values()}

    def create(self, config: Dict[str, Any], name: str) -> str:
        """A container created (not started) from a raw create body, as the engine makes one."""
        self._answer("engine.create")
        image = self._image(str(config.get("Image")))
        if image is None:
            raise ImageNotFound(f"No such image: {config.get('Image')}")
        names.container_name(name)
        with self._lock:
            if name in {r.attrs["Name"].lstrip("/") for r in self.records.values()}:
                raise NameConflict(f"the container name {name!r} is already taken")
            cid = _new_id()
            host_config = copy.deepcopy(config.get("HostConfig") or {})
            endpoints = (config.get("NetworkingConfig") or {}).get("EndpointsConfig") or {}
            attrs = {
                "Id": cid, "Name": "/" + name, "Created": _timestamp(), "Image": image, "RestartCount": 0,
                "Config": {**{k: copy.deepcopy(v) for k, v in config.items()
                              if k not in ("HostConfig", "NetworkingConfig")},
                           "Hostname": config.get("Hostname") or cid[:12], "Labels": dict(config.get("Labels") or {})},
                "HostConfig": host_config,
                "State": {"Status": "created", "Running": False, "Paused": False, "Restarting": False, "ExitCode": 0,
                          "StartedAt": "0001-01-01T00:00:00Z", "FinishedAt": "0001-01-01T00:00:00Z", "Pid": 0},
                "NetworkSettings": {"Networks": {net: {"Aliases": None, "Links": None, "DriverOpts": None}
                                                 for net in endpoints}, "Ports": {}},
                "Mounts": _mounts(host_config),
            }
            self.records[cid] = _Record(attrs, {}, {})
        return cid

    def connect(self, container_id: str, network: str, endpoint: Dict[str, Any]) -> None:
        self._answer("engine.connect")
        with self._lock:
            self._record(container_id).attrs["NetworkSettings"]["Networks"][network] = dict(endpoint)

    def pause(self, container_id: str) -> None:
        self._answer("engine.pause")
        with self._lock:
            self._record(container_id).attrs["State"].update(Paused=True, Status="paused")

    def unpause(self, container_id: str) -> None:
        self._answer("engine.unpause")
        with self._lock:
            self._record(container_id).attrs["State"].update(Paused=False, Status="running")

    def set_restart_policy(self, container_id: str, policy: Dict[str, Any]) -> None:
        self._answer("engine.set_restart_policy")
        with self._lock:
            self._record(container_id).attrs["HostConfig"]["RestartPolicy"] = dict(policy)

    def rename(self, container_id: str, name: str) -> None:
        self._answer("engine.rename")
        names.container_name(name)
        with self._lock:
            record = self._record(container_id)
            if any(r.attrs["Name"].lstrip("/") == name for r in self.records.values() if r is not record):
                raise NameConflict(f"the container name {name!r} is already taken")
            record.attrs["Name"] = "/" + name

    def stop(self, container_id: str) -> None:
        """As the engine's stop: the processes end, their memory with them."""
        self._answer("engine.stop")
        if self._record(container_id).attrs["State"]["Running"]:
            self._stop(container_id)

    def remove(self, container_id: str, *, volumes: bool = True) -> None:
        self._answer("engine.remove")
        with self._lock:
            with contextlib.suppress(ContainerNotFound):
                del self.records[str(self._record(container_id).attrs["Id"])]

    def remove_labelled(self, key: str, value: str, *, keep: Iterable[str] = ()) -> None:
        keep = set(keep)
        for c in self.labelled(key, value):
            if c.id not in keep:
                self.remove(str(c.id))

    def image_ref(self, image_id: str, name: Optional[str]) -> str:
        self._answer("engine.image_ref")
        with self._lock:
            if image_id not in self.images:
                raise ImageNotFound(f"the engine has no image {name or ''} ({image_id}), which the checkpoint's "
                                    "container was created from")
            return name if name and name in self.images[image_id] else image_id

    def has_image(self, ref: str) -> bool:
        self._answer("engine.has_image")
        return self._image(ref) is not None

    def ensure_image(self, image_id: str, name: Optional[str], *, source: Optional[Engine],
                     tag: bool = True) -> bool:
        self._answer("engine.ensure_image")
        copied = False
        if not self.has_image(image_id):
            if source is None or not source.has_image(image_id):
                raise ImageNotFound(f"the engine has no image {name or ''} ({image_id}), and neither has image_source")
            with self._lock:
                self.images[image_id] = set()
            copied = True
        if tag and name and not name.startswith("sha256:") and not self.has_image(name):
            with self._lock:
                self.images[image_id].add(name)
        return copied

    def image_id(self, ref: str) -> str:
        self._answer("engine.image_id")
        found = self._image(ref)
        if found is None:
            raise ImageNotFound(f"No such image: {ref}")
        return found

    def image_digests(self, image_id: str) -> list[str]:
        self.image_id(image_id)
        return []

    def image_tags(self, repository: str) -> list[str]:
        self._answer("engine.image_tags")
        with self._lock:
            return sorted(t for tags in self.images.values() for t in tags if t.startswith(repository + ":"))

    def remove_image(self, image_id: str) -> None:
        """Removed unless a container uses it (then kept, silently, as the real one does)."""
        self._answer("engine.remove_image")
        with self._lock:
            image = self._image(image_id)
            if image is None or any(r.attrs["Image"] == image for r in self.records.values()):
                return
            del self.images[image]

    def has_labelled(self, labels: Dict[str, str]) -> bool:
        self._answer("engine.has_labelled")
        with self._lock:
            return any(all((r.attrs["Config"].get("Labels") or {}).get(k) == v for k, v in labels.items())
                       for r in self.records.values())

    def has_container(self, container_id: str) -> bool:
        self._answer("engine.has_container")
        try:
            self._record(container_id)
            return True
        except ContainerNotFound:
            return False

    def upper_dir(self, container: Container) -> Path:
        raise AssertionError("FakeEngine has no storage driver: upper_dir is the host's business")

    def load_layer_image(self, base_image_id: str, layer: Path, tag: str) -> str:
        raise AssertionError("FakeEngine does not model shared layer images")

    def checkpoints_dir(self, container_id: str) -> Path:
        raise AssertionError("FakeEngine has no files: checkpoints_dir is the host's business")

    def create_checkpoint(self, container_id: str, name: str, *, exit: bool, unbounded: bool = False) -> Path:
        raise AssertionError("FakeEngine does not dump: FakeHost.checkpoint does")

    def start_from_checkpoint(self, container_id: str, name: str) -> None:
        raise AssertionError("FakeEngine does not restore: FakeHost.start_clones does")

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"FakeEngine was asked for a raw engine call ({getattr(fn, '__name__', fn)})")


# --- the host ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Stored:
    """A checkpoint in the fake store: the value and its member files."""

    checkpoint: Checkpoint
    files: Dict[str, bytes]
    complete: bool = True


@dataclasses.dataclass
class _StagedImport:
    staged: Staged
    checkpoint: Checkpoint
    files: Dict[str, bytes]
    lineage: Optional[Tuple[str, str]]


class FakeHost:
    """The :class:`~dolly._hosts.base.Host` of a :class:`FakeEngine`: the checkpoint store,
    dumps, clones and bundles in memory (see the module's docstring for what is modelled).
    ``clock`` gives the time a checkpoint is taken at (a test may turn it back); ``calls`` (the
    engine's ``faults.calls``) counts each operation."""

    def __init__(self, engine: FakeEngine, *, vouches: bool = True) -> None:
        self.engine: Engine = engine  # the protocol's attribute; the fake's own is _fake
        self._fake = engine
        self.vouches = vouches
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.store: Dict[Tuple[str, str], _Stored] = {}
        self.staged: Dict[str, _StagedImport] = {}
        self.lineages: Dict[str, str] = {}
        self.references: List[Optional[str]] = []  # what each commit_import was to rebuild against
        self.prepared = 0
        self.released = 0
        self._scratch: Optional[tempfile.TemporaryDirectory[str]] = None
        engine._host = self  # type: ignore[attr-defined]  # what host_of(engine) returns

    def __repr__(self) -> str:
        return f"FakeHost({self._fake.name})"

    @property
    def faults(self) -> Faults:
        return self._fake.faults

    @property
    def calls(self) -> Counter[str]:
        return self._fake.faults.calls

    @property
    def checkpoints(self) -> List[Checkpoint]:
        """Every checkpoint held, oldest first (no fault, no engine call)."""
        return sorted((self._value(s) for s in self.store.values()), key=lambda cp: cp.created_at)

    def _op(self, point: str) -> None:
        self._fake._answer(point)

    def _path(self, container_id: str, name: str) -> Path:
        return Path(f"/fake-engines/{self._fake.name}/dolly/checkpoints/{container_id}/{name}")

    def _stored(self, checkpoint: Any) -> _Stored:
        """Raises: InvalidArgument (not a Checkpoint, or not a path of this store),
        CheckpointNotFound (gone)."""
        if not isinstance(checkpoint, Checkpoint):
            raise InvalidArgument(f"expected a dolly.Checkpoint, got {type(checkpoint).__name__}")
        if checkpoint.path != self._path(checkpoint.container_id, checkpoint.name):
            raise InvalidArgument(f"{checkpoint.path} is not a checkpoint folder of Dolly's store")
        stored = self.store.get((checkpoint.container_id, checkpoint.name))
        if stored is None:
            raise CheckpointNotFound(f"checkpoint {checkpoint.name!r} of {checkpoint.container_name} no longer "
                                     f"exists ({checkpoint.path})")
        return stored

    def _source_id(self, container: ContainerRef) -> str:
        """The container's ID, or a removed one's, as :func:`dolly._store._source_folder` finds it.

        Raises: ContainerNotFound, InvalidArgument (a name of several removed containers)."""
        try:
            return str(self._fake.container(container).id)
        except ContainerNotFound:
            if isinstance(container, Container) and container.id is not None:
                return str(container.id)
        ref = str(container)
        if not names.CHECKPOINT_NAME.match(ref):
            raise ContainerNotFound(f"no such container: {ref}")
        held = sorted({cid for cid, _ in self.store})
        found = [c for c in held if c == ref] or [c for c in held if len(ref) >= 12 and c.startswith(ref)]
        if not found:
            found = sorted({cid for (cid, _), s in self.store.items() if s.checkpoint.container_name == ref})
        if len(found) > 1:
            raise InvalidArgument(f"{ref!r} names {len(found)} removed containers that have checkpoints: use the "
                                  "container's full ID")
        if not found:
            raise ContainerNotFound(f"no such container: {ref}")
        return found[0]

    def _value(self, stored: _Stored) -> Checkpoint:
        return dataclasses.replace(stored.checkpoint, client=self._fake.client,
                                   size=sum(len(b) for b in stored.files.values()))

    # --- the checkpoint store ---------------------------------------------------------------------

    def list_checkpoints(self, container: Optional[ContainerRef]) -> List[Checkpoint]:
        self._op("list_checkpoints")
        if container is None:
            held = list(self.store.values())
        else:
            cid = self._source_id(container)
            held = [s for (c, _), s in self.store.items() if c == cid]
        return sorted((self._value(s) for s in held), key=lambda cp: cp.created_at)

    def get_checkpoint(self, container: ContainerRef, name: str) -> Checkpoint:
        self._op("get_checkpoint")
        names.checkpoint_name(name)
        stored = self.store.get((self._source_id(container), name))
        if stored is None:
            raise CheckpointNotFound(f"no checkpoint named {name!r} for container {container}")
        return self._value(stored)

    def remove_checkpoint(self, checkpoint: Checkpoint) -> None:
        self._op("remove_checkpoint")
        self._stored(checkpoint)
        del self.store[(checkpoint.container_id, checkpoint.name)]

    def remove_all_of(self, container_id: str) -> None:
        self._op("remove_all_of")
        names.container_id(container_id)
        for key in [k for k in self.store if k[0] == container_id]:
            del self.store[key]

    def remove_unused_layer_images(self) -> None:
        self._op("remove_unused_layer_images")

    def require(self, checkpoint: Checkpoint) -> None:
        self._stored(checkpoint)

    # --- dumps ------------------------------------------------------------------------------------

    def checkpoint(self, container: ContainerRef, name: str, *, leave_running: bool,
                   max_layer_bytes: int, tcp_established: bool = False,
                   made_by: Optional[User] = None) -> Checkpoint:
        """Take ``container``'s memory and files. Fault point ``checkpoint`` fails before the
        dump (the container as it was); ``dump`` after it: with ``leave_running=False`` the
        container is then stopped and its images kept as an incomplete checkpoint, and the error
        is a ``CheckpointFailed`` whose ``kept`` is its path (as :mod:`dolly._dump` does)."""
        self._op("checkpoint")
        names.checkpoint_name(name)
        self._fake.require_checkpoint_support()
        source = self._fake.container(container)
        state = source.attrs["State"]
        if not state.get("Running") or state.get("Paused"):
            raise ContainerNotRunning(f"container {source.name} is {source.status}, not running")
        cid = str(source.id)
        if (cid, name) in self.store:
            raise CheckpointExists(f"container {source.name} already has a checkpoint named {name!r}")
        record = self._fake._record(cid)
        layer = json.dumps(record.files, sort_keys=True).encode()
        if len(layer) > max_layer_bytes:
            raise CheckpointFailed(f"container {source.name} was not checkpointed: its writable layer holds "
                                   f"{len(layer)} bytes, over max_layer_bytes={max_layer_bytes}")
        hostname = str(source.attrs["Config"]["Hostname"])
        files = {INVENTORY: b"fake CRIU inventory\n", UTS: hostname.encode(),
                 PAGES: json.dumps(record.memory, sort_keys=True).encode(), LAYER: layer,
                 "deleted.files": b"[]", "spec.dump": b"{}"}
        cp = Checkpoint(container_id=cid, container_name=str(source.name), name=name, created_at=self.clock(),
                        hostname=hostname, config=types.MappingProxyType(copy.deepcopy(source.attrs)),
                        path=self._path(cid, name), client=self._fake.client, tcp_established=tcp_established,
                        made_by=made_by)
        if not leave_running:
            self._fake._stop(cid)
        try:
            self._op("dump")
        except BaseException as e:
            if leave_running or not isinstance(e, Exception):
                raise
            self.store[(cid, name)] = _Stored(cp, files, complete=False)
            raise CheckpointFailed(f"checkpoint {name!r} of container {source.name} failed after the dump: "
                                   f"{type(e).__name__}: {e}", kept=cp.path) from e
        self.store[(cid, name)] = _Stored(cp, files)
        return cp  # size 0, as the real hosts return it: measured when listed or got

    def post_copy_source(self, container: ContainerRef, name: str) -> PageSource:
        raise HostNotReady("FakeHost does not model post-copy")

    def post_copy_target(self) -> PageTarget:
        raise HostNotReady("FakeHost does not model post-copy")

    # --- clones -----------------------------------------------------------------------------------

    def start_clones(self, checkpoint: Checkpoint, request: CloneRequest, *,
                     on_create: Optional[Callable[[str], None]],
                     progress: Optional[Callable[[Container], None]],
                     same_as: Optional[datetime] = None) -> List[Container]:
        """The clones ``request`` names, one after another; when any fails, every container of
        the call goes before the first error is raised. With ``same_as``, from this host's own
        copy (the original or a transfer's copy taken at that instant), as
        :func:`dolly._store.find_same` finds it. Fault points ``start_clones`` (before any) and
        ``restore`` (each clone, once created: ``at=k`` fails the k-th)."""
        self._op("start_clones")
        if same_as is not None:
            found = self.store.get((checkpoint.container_id, checkpoint.name))
            if found is None or found.checkpoint.created_at != same_as or not (
                    found.checkpoint.origin is None or found.checkpoint.origin.get("copy") is True):
                raise CheckpointNotFound(f"this engine holds no copy of checkpoint {checkpoint.name!r}")
            checkpoint = found.checkpoint
        stored = self._stored(checkpoint)
        self._fake.require_checkpoint_support()
        image = self._fake.image_ref(checkpoint.image_id, checkpoint.config["Config"].get("Image"))
        labels = {**request.labels, LABEL_SOURCE: checkpoint.container_id, LABEL_CHECKPOINT: checkpoint.name,
                  LABEL_OPERATION: uuid.uuid4().hex}
        own_networks = checkpoint.origin is None or "networks" in (checkpoint.origin.get("allowed") or ())
        spread = request.networks
        results: List[Tuple[Optional[Container], Optional[BaseException]]] = []
        for k, name in enumerate(request.names):
            try:
                results.append((self._restore_one(stored, image, name, request, labels, own_networks,
                                                  spread[k % len(spread)] if spread else None, on_create,
                                                  progress), None))
            except BaseException as e:  # collected, then raised below (as the real pool does)
                results.append((None, e))
        errors = [e for _, e in results if e is not None]
        if errors:
            for c, _ in results:
                if c is not None:
                    self._fake.remove(str(c.id))
            self._fake.remove_labelled(LABEL_OPERATION, labels[LABEL_OPERATION])
            raise errors[0]
        return [c for c, _ in results if c is not None]

    def _restore_one(self, stored: _Stored, image: str, name: str, request: CloneRequest, labels: Dict[str, str],
                     own_networks: bool, network: Optional[str], on_create: Optional[Callable[[str], None]],
                     progress: Optional[Callable[[Container], None]]) -> Container:
        config, extra = clone_config(stored.checkpoint.config, image=image, labels=labels, network=network,
                                     own_networks=own_networks, keep=request.keep)
        refused: Set[str] = set()
        for _ in range(20):
            try:
                cid = self._fake.create(config, name)
                break
            except NameConflict:
                if request.explicit:
                    raise
                refused.add(name)
                self._fake.release_names([name])
                name = self._fake.reserve_names(request.prefix, 1, avoid=refused)[0]
        else:
            raise NameConflict(f"could not find a free name with the prefix {request.prefix!r}")
        try:
            if on_create is not None:
                on_create(cid)
            for net, endpoint in extra.items():
                self._fake.connect(cid, net, endpoint)
            self._op("restore")
            self._fake._start_restored(cid, json.loads(stored.files[PAGES]), json.loads(stored.files[LAYER]))
            container = self._fake.container(cid)
            if progress is not None:
                progress(container)
            return container
        except BaseException:
            self._fake.remove(cid)
            raise

    def resume(self, checkpoint: Checkpoint, container: Optional[ContainerRef]) -> Container:
        """Its own stopped container started again from it, as :func:`dolly._start.resume`
        (a start since the checkpoint is told by the start time alone). Fault point ``resume``."""
        self._op("resume")
        stored = self._stored(checkpoint)
        self._fake.require_checkpoint_support()
        target = self._fake.container(container if container is not None else checkpoint.container_id)
        if target.id != checkpoint.container_id:
            raise InvalidArgument(f"checkpoint {checkpoint.name!r} was taken of container "
                                  f"{checkpoint.container_id[:12]}, not of {target.name}")
        if target.attrs["State"].get("Running"):
            raise InvalidArgument(f"container {target.name} is running: only a stopped container can be resumed")
        recorded = (checkpoint.config.get("State") or {}).get("StartedAt")
        if recorded and target.attrs["State"].get("StartedAt") != recorded:
            raise InvalidArgument(f"container {target.name} was started again after checkpoint "
                                  f"{checkpoint.name!r} was taken")
        self._fake._start_restored(str(target.id), json.loads(stored.files[PAGES]), None)
        return self._fake.container(str(target.id))

    def shared_layer(self, checkpoint: Checkpoint) -> Optional[str]:
        self._stored(checkpoint)
        return None

    # --- bundles ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def export_members(self, checkpoint: Checkpoint, *, expires_in: timedelta, lineage: Optional[str],
                       max_bytes: int) -> Iterator[Tuple[Dict[str, Any], Iterator[Member]]]:
        """The manifest and members of ``checkpoint``'s bundle, as :func:`dolly._bundle.bundle_members`
        lays them out. Fault point ``export_members``."""
        self._op("export_members")
        stored = self._stored(checkpoint)
        cp = stored.checkpoint
        if len(stored.files[LAYER]) > max_bytes:
            raise InvalidArgument(f"the writable layer takes {len(stored.files[LAYER])} bytes in the bundle, over "
                                  f"max_bytes={max_bytes}")
        members = {name: data for name, data in stored.files.items() if name != "spec.dump" or data}
        members["config.dump"] = json.dumps({
            "dolly": cp._metadata(), "id": cp.container_id, "name": cp.container_name,
            "rootfsImage": cp.config["Config"].get("Image"), "rootfsImageRef": cp.image_id.removeprefix("sha256:"),
            "runtime": "runc", "checkpointedTime": cp.created_at.isoformat()}).encode()
        members["network.status"] = json.dumps((cp.config.get("NetworkSettings") or {}).get("Networks") or {}).encode()
        manifest = new_manifest(cp, info=self._fake.info(), lineage=lineage, expires_in=expires_in,
                                criu_version="4.2", kernel="fake",
                                members=[{"name": n, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                                         for n, d in sorted(members.items())])
        yield manifest, ((n, len(d), io.BytesIO(d)) for n, d in sorted(members.items()))

    def stage_import(self, manifest: Dict[str, Any], signer: Optional[str], members: Iterable[Member], *,
                     allowed: FrozenSet[str], max_bytes: Optional[int], between_own_engines: bool,
                     rebuild: bool) -> Staged:
        """Step 1 of an import, held to the rules of :func:`dolly._bundle.stage` (but for the
        process images' checks; whether the images are to be rebuilt at the commit is decided as
        there, by :func:`dolly._rebuild.needed`). Fault point ``stage_import``."""
        self._op("stage_import")
        limit = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        meta = manifest["checkpoint"]
        lineage = lineage_key(manifest, signer)
        self._check_lineage(lineage, manifest["created_at"])
        key = (names.container_id(meta["container_id"], error=BundleError),
               names.checkpoint_name(meta["name"], error=BundleError))
        if key in self.store:
            raise CheckpointExists(f"this engine already has checkpoint {meta['name']!r} of {meta['container_name']}")
        if (declared := sum(m["size"] for m in manifest["members"])) > limit:
            raise UnsafeArchive(too_large(declared, limit))
        files = self._extract(members, manifest, limit)
        config = self._recorded_config(files, manifest)
        origin: Dict[str, Any] = {"bundle_id": manifest["bundle_id"], "signer": signer,
                                  "source": source_fields(manifest.get("source")),
                                  "imported_at": datetime.now(UTC).isoformat(), "allowed": sorted(allowed)}
        if between_own_engines:
            origin["copy"] = True
        cp = Checkpoint(container_id=key[0], container_name=meta["container_name"], name=key[1],
                        created_at=datetime.fromisoformat(meta["created_at"]), hostname=meta["hostname"],
                        config=types.MappingProxyType(config), path=self._path(*key), origin=origin,
                        client=self._fake.client)
        policy.check(cp.config, allowed)
        if not between_own_engines:
            self._refuse_claims(key[0])
        staged = Staged(uuid.uuid4().hex, key[0], key[1], (manifest["image"]["id"], manifest["image"]["name"]),
                        rebuild and _rebuild.needed(config, allowed))
        self.staged[staged.token] = _StagedImport(
            staged, cp, {n: d for n, d in files.items() if n not in ("config.dump", "network.status")},
            None if between_own_engines else (lineage, manifest["created_at"]))
        return staged

    def _check_lineage(self, key: str, created_at: str) -> None:
        seen = self.lineages.get(key)
        if seen and datetime.fromisoformat(seen) > datetime.fromisoformat(created_at):
            raise RollbackRefused(f"a bundle of lineage {key} made at {seen} was already imported here; this one "
                                  f"was made earlier, at {created_at}")

    @staticmethod
    def _extract(members: Iterable[Member], manifest: Dict[str, Any], limit: int) -> Dict[str, bytes]:
        """The members held to the real rules (:func:`dolly._bundle.checked_members`), kept in
        memory, each hashed as the real host hashes it while it writes."""
        files: Dict[str, bytes] = {}
        for name, size, data, sha256 in checked_members(members, manifest, limit):
            content = data.read()
            if len(content) != size or hashlib.sha256(content).hexdigest() != sha256:
                raise DigestMismatch(f"{name} does not match its SHA-256 in the manifest")
            files[name] = content
        return files

    @staticmethod
    def _recorded_config(files: Dict[str, bytes], manifest: Dict[str, Any]) -> Dict[str, Any]:
        """The real rule (:func:`dolly._bundle.recorded_config`) on the member held in memory."""
        try:
            meta = json.loads(files["config.dump"])
        except ValueError:
            meta = None
        return recorded_config(meta, manifest)

    def _refuse_claims(self, container_id: str) -> None:
        if self._fake.has_container(container_id):
            raise CheckpointExists(f"the bundle claims to be of container {container_id[:12]}, which this engine "
                                   "runs: an imported checkpoint never passes for one of its own")
        if any(cid == container_id and s.checkpoint.origin is None for (cid, _), s in self.store.items()):
            raise CheckpointExists(f"the bundle claims to be of container {container_id[:12]}, which has "
                                   "checkpoints taken on this engine")

    def stage_foreign(self, tar: tarfile.TarFile, head: tarfile.TarInfo, members: Iterator[tarfile.TarInfo], *,
                      allow_unsigned: bool, allowed: FrozenSet[str], max_bytes: Optional[int],
                      between_own_engines: bool, signer: Optional[str], rebuild: bool,
                      verify: Optional[Callable[[], None]]) -> Staged:
        raise BundleError("not a Dolly bundle: FakeHost does not model Podman's or the kubelet's archives")

    def commit_import(self, staged: Staged, *, reference: Optional[str]) -> Checkpoint:
        """Step 3; the staged import is dropped whatever happens. Nothing is rebuilt: ``reference``,
        the image a real host would rebuild against, is only recorded in :attr:`references`.
        Fault point ``commit_import``."""
        self._op("commit_import")
        self.references.append(reference)
        found = self.staged.pop(staged.token, None)
        if found is None:
            raise BundleError(f"no staged import {staged.token}")
        if (found.staged.container_id, found.staged.name) != (staged.container_id, staged.name):
            raise BundleError("the staged import is not the checkpoint it was staged as")
        if found.lineage:
            self._check_lineage(*found.lineage)
        key = (staged.container_id, staged.name)
        if key in self.store:
            raise CheckpointExists(f"checkpoint {staged.name!r} of container {staged.container_id[:12]} appeared "
                                   "meanwhile")
        self.store[key] = _Stored(found.checkpoint, found.files)
        if found.lineage:
            lineage, created_at = found.lineage
            seen = self.lineages.get(lineage)
            if not seen or datetime.fromisoformat(seen) < datetime.fromisoformat(created_at):
                self.lineages[lineage] = created_at
        return self._value(self.store[key])

    def discard_import(self, staged: Staged) -> None:
        self._op("discard_import")
        self.staged.pop(staged.token, None)

    # --- the host ---------------------------------------------------------------------------------

    def check(self) -> List[Check]:
        try:
            self._fake.require_checkpoint_support()
        except DollyError as e:
            return [Check("fake host", False, str(e), "make the fake engine ready")]
        return [Check("fake host", True, f"fake engine {self._fake.name} checkpoints in memory")]

    def tag_lineages(self) -> Lineages:
        """A record in a private temporary folder, removed with the process's temporary files."""
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix=f"dolly-fake-{self._fake.name}-")
        return Lineages(Path(self._scratch.name) / "lineages.json")

    def scratch_folder(self, prefix: str) -> contextlib.AbstractContextManager[str]:
        return tempfile.TemporaryDirectory(prefix=f"dolly-{prefix}")

    def prepare(self, n: int) -> Callable[[float], None]:
        self._op("prepare")
        self.prepared += 1
        return lambda timeout: None

    def release(self) -> None:
        self.released += 1
