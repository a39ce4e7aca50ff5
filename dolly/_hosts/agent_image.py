"""The agent's image: ``dolly/agent:<version>``, made of this very Dolly and nothing of the host's.

Dolly's agent (:mod:`dolly._hosts.agent`) runs this image on an engine whose files this process
cannot see. It holds, on top of ``dolly/python`` (Debian 12's ``essential`` root and its
``python3``, which ``make host`` builds), one layer: ``/opt/dolly/lib``, where this installation's
``dolly`` package and the distributions it runs on are copied, file by file, from where this
process imports them: ``install_requires`` and what those need in turn (markers evaluated, extras
left out), and ``pycriu`` (CRIU's own, not on PyPI, installed beside them). Not copied: bytecode
caches, the ``tests`` folders of distributions, and what a distribution installs outside its
site folder (scripts). The image compiles its own bytecode when it is made, and proves there that
its Python imports Dolly's agent and has this process's version (3.11 here): compiled modules are
built for one.

Its version is ``dolly.__version__`` and 12 hex digits of the SHA-256 of every file copied (its
path, mode and bytes): a Dolly that changed anywhere, or runs on other dependencies, is another
image, and one version is the same files on every engine. Computed once per process, on first
use (about 0.1 s for 55 MB).

Where it comes from (:func:`ensure`), when the agent's engine lacks it: copied from an engine of
the caller's that has it (this process's default engine, ``docker.from_env()``), through the
engine API (``docker save`` there, ``docker load`` on the target: :meth:`Engine.ensure_image`);
else made on the agent's engine itself, when that has ``dolly/python``; else made on the default
engine and copied. Made through the API only: a container of ``dolly/python`` with no network, the
layer put into it as a tar stream, its bytecode compiled and the import checked in it, then
committed and tagged. Nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import docker

from .._archive import tarfile
from .._engine import Engine, default_client, translate_errors
from .._version import DISTRIBUTION, __version__
from ..errors import DollyError, HostNotReady

BASE = "dolly/python"
REPOSITORY = "dolly/agent"
# Where Dolly and its dependencies are in the image, and the Python that runs them there.
PREFIX = "/opt/dolly/lib"
PYTHON = "/usr/bin/python3"
VERSION_LABEL = "dolly.agent.version"
# Every container Dolly makes the image in is named so (and removed when done).
BUILDER = "dolly-agent-build"
# Changes when what the image holds changes for another reason than the files (its layout).
_LAYOUT = "dolly-agent-image-1"
_MTIME = 315532800  # 1980-01-01: every file the same time, whenever it was installed here
_SKIPPED_DIRS = frozenset({"__pycache__", "tests", "test"})
# Distributions the agent needs that Dolly does not require from PyPI.
_EXTRA = ("pycriu",)


@dataclass(frozen=True)
class Shipped:
    """One file of the image's layer: its path under :data:`PREFIX`, where it is here."""

    path: str
    source: Path
    executable: bool


@functools.lru_cache(maxsize=1)
def shipped() -> Tuple[Shipped, ...]:
    """The files the image holds under :data:`PREFIX`, by path: Dolly's package (its modules and
    ``py.typed``, from where this process imports it) and every file of the distributions it runs
    on, as their installers recorded them.

    Raises:
        HostNotReady: a distribution Dolly requires is not installed here.
    """
    files: Dict[str, Shipped] = {}
    package = Path(__file__).resolve().parent.parent
    for path in sorted(package.rglob("*")):
        own = path.relative_to(package.parent).as_posix()
        if path.is_file() and (path.suffix == ".py" or path.name == "py.typed") and not _skipped(own.split("/")):
            files[own] = _one(own, path)
    for dist in _distributions():
        for entry in dist.files or []:
            rel = PurePosixPath(str(entry))
            if rel.is_absolute() or ".." in rel.parts or _skipped(rel.parts) or rel.suffix == ".pyc":
                continue
            if rel.parts[0] == package.name:
                continue  # never over Dolly's own package
            source = Path(str(dist.locate_file(entry)))
            if source.is_file():
                files[rel.as_posix()] = _one(rel.as_posix(), source)
    return tuple(files[k] for k in sorted(files))


def _one(rel: str, source: Path) -> Shipped:
    return Shipped(rel, source, bool(source.stat().st_mode & stat.S_IXUSR))


def _skipped(parts: Sequence[str]) -> bool:
    return any(p in _SKIPPED_DIRS for p in parts[:-1])


def _distributions() -> List[importlib.metadata.Distribution]:
    """The installed distributions Dolly runs on: its requirements without extras, those of
    theirs, and :data:`_EXTRA` when installed; each once.

    Raises:
        HostNotReady: a requirement whose marker holds here is not installed.
    """
    found: Dict[str, importlib.metadata.Distribution] = {}
    wanted: List[Tuple[str, bool]] = [(r, True) for r in _requirements(importlib.metadata.requires(DISTRIBUTION))]
    wanted += [(name, False) for name in _EXTRA]
    while wanted:
        name, required = wanted.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found or key == DISTRIBUTION:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            if required:
                raise HostNotReady(f"{name}, which Dolly needs, is not installed where this process runs, so "
                                   "Dolly's agent image cannot be made of it: install Dolly's requirements "
                                   "(`make host`, or pip install)") from None
            continue
        found[key] = dist
        wanted += [(r, True) for r in _requirements(dist.requires)]
    return [found[k] for k in sorted(found)]


_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _requirements(lines: Optional[List[str]]) -> List[str]:
    """The names of the requirements that hold for this interpreter, extras left out: markers
    evaluated with the ``packaging`` library when it is installed, else every requirement that is
    not an extra's."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover (installed with pip)
        return [m.group(1) for line in lines or [] if "extra" not in line.partition(";")[2]
                for m in [_NAME.match(line)] if m]
    names = []
    for line in lines or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names


@functools.lru_cache(maxsize=1)
def content_digest() -> str:
    """The SHA-256 of every file :func:`shipped` lists: its path, whether it is executable, its
    bytes; and of the image's layout."""
    digest = hashlib.sha256(_LAYOUT.encode() + b"\0" + PREFIX.encode() + b"\0")
    for f in shipped():
        digest.update(f"{f.path}\0{int(f.executable)}\0".encode())
        with open(f.source, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            digest.update(f"{size}\0".encode())
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def version() -> str:
    """``<dolly.__version__>-<12 hex digits of content_digest()>``."""
    return f"{__version__}-{content_digest()[:12]}"


def reference() -> str:
    """This Dolly's agent image: ``dolly/agent:<version>``."""
    return f"{REPOSITORY}:{version()}"


def layer(sink: IO[bytes]) -> None:
    """Write the image's layer, a tar of :data:`PREFIX` and the folders above it, to ``sink``:
    owned by root, readable by all, every file of the same time."""
    dirs = {"opt", "opt/dolly"}
    for f in shipped():
        parent = PurePosixPath(PREFIX.lstrip("/")) / f.path
        dirs.update(str(p) for p in parent.parents if str(p) != ".")
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs, key=lambda p: (p.count("/"), p)):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, _MTIME
            tar.addfile(info)
        for f in shipped():
            info = tarfile.TarInfo(f"{PREFIX.lstrip('/')}/{f.path}")
            info.mode, info.mtime = (0o755 if f.executable else 0o644), _MTIME
            with open(f.source, "rb") as src:
                info.size = os.fstat(src.fileno()).st_size
                tar.addfile(info, src)


# --- getting it onto an engine ------------------------------------------------------------------------

def inspect(engine: Engine, ref: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The engine's image ``ref`` (default: :func:`reference`), inspected; None when it has none."""
    with translate_errors():
        try:
            found: Dict[str, Any] = engine.api.inspect_image(ref or reference())
        except docker.errors.NotFound:
            return None
    return found


def ensure(engine: Engine, *, providers: Optional[Sequence[Engine]] = None,
           lock: Optional[Path] = None) -> Dict[str, Any]:
    """The agent image on ``engine`` (its ``docker inspect``), put there when it lacks it: copied
    from a provider that has it, else made on ``engine`` when it has :data:`BASE`, else made on a
    provider that has :data:`BASE` and copied. ``providers``: the engines that may make or give it
    (default: this process's default engine, when it answers and is not ``engine``). ``lock``: a
    file that keeps this machine's processes from making it twice at once.

    Raises:
        HostNotReady: no engine at hand has the image or :data:`BASE` to make it on (the message
            says what is needed), or the image made does not run Dolly's agent.
    """
    found = inspect(engine)
    if found is not None:
        return found
    with _locked(lock):
        found = inspect(engine)
        if found is not None:  # another process put it there meanwhile
            return found
        sources = _providers(engine) if providers is None else list(providers)
        ref = reference()
        for source in sources:
            image = inspect(source, ref)
            if image is not None:
                return _copy(source, engine, str(image["Id"]))
        if engine.has_image(BASE):
            build(engine)
            return _inspect_made(engine)
        for source in sources:
            if source.has_image(BASE):
                return _copy(source, engine, build(source))
    others = (" or on " + ", ".join(str(s.api.base_url) for s in sources)) if sources else ""
    raise HostNotReady(
        f"the engine at {engine.api.base_url} has no {ref}, the image Dolly's agent runs there, and there is no "
        f"{BASE} there{others} to make it on ({BASE} is Debian 12 with python3, as `make host` builds it): run "
        f"`make host` on this machine, or put {BASE} on that engine (docker save | docker load)")


def _inspect_made(engine: Engine) -> Dict[str, Any]:
    found = inspect(engine)
    if found is None:  # removed the moment it was made
        raise HostNotReady(f"the image {reference()} made on {engine.api.base_url} is gone")
    return found


def _copy(source: Engine, target: Engine, image_id: str) -> Dict[str, Any]:
    target.ensure_image(image_id, reference(), source=source, tag=True)
    return _inspect_made(target)


def _providers(engine: Engine) -> List[Engine]:
    """This process's default engine, when it answers and is another engine than ``engine``."""
    try:
        local = Engine.of(default_client())
        if local is engine or local.identity == engine.identity:
            return []
    except (DollyError, docker.errors.DockerException, OSError):
        return []
    return [local]


@contextlib.contextmanager
def _locked(path: Optional[Path]) -> Iterator[None]:
    if path is None:
        yield
        return
    import filelock

    with filelock.FileLock(str(path), timeout=900):
        yield


# Run in the image being made, by its Python: compile the bytecode of what was copied, import
# Dolly's agent and what it needs, and say which Python it is.
_CHECK = """
import compileall, importlib, json, sys
compileall.compile_dir(sys.argv[1], quiet=2, workers=0)
for name in sys.argv[2:]:
    importlib.import_module(name)
print(json.dumps({"python": list(sys.version_info[:2])}))
"""


def build(engine: Engine) -> str:
    """Make the agent image on ``engine`` from :data:`BASE` and tag it :func:`reference`; returns
    its ID. The container it is made in has no network and is removed after.

    Raises:
        HostNotReady: the engine has no :data:`BASE`; the image's Python is not this process's
            version, or cannot import Dolly's agent (its output says why).
        EngineError: the engine refused a step.
    """
    api = engine.api
    ref, ver = reference(), version()
    if not engine.has_image(BASE):
        raise HostNotReady(f"the engine at {api.base_url} has no {BASE} to make {ref} on")
    base = engine.image_id(BASE)
    modules = ["dolly._hosts.serve"] + (["pycriu"] if any(f.path.startswith("pycriu/") for f in shipped()) else [])
    env = {"PYTHONPATH": PREFIX, "PYTHONDONTWRITEBYTECODE": "1"}
    with translate_errors():
        made = api.create_container(
            base, [PYTHON, "-c", _CHECK, PREFIX, *modules], name=f"{BUILDER}-{secrets.token_hex(6)}",
            environment={"PYTHONPATH": PREFIX}, working_dir="/", use_config_proxy=False,
            host_config=api.create_host_config(network_mode="none", runtime="runc"))
    container_id = str(made["Id"])
    try:
        with tempfile.TemporaryFile() as tar, translate_errors():
            layer(tar)
            tar.seek(0)
            api.put_archive(container_id, "/", tar)
            api.start(container_id)
            status = api.wait(container_id, timeout=900)
            out = api.logs(container_id, stdout=True, stderr=False).decode(errors="replace")
            err = api.logs(container_id, stdout=False, stderr=True).decode(errors="replace")
        said = _last_json(out)
        if status.get("StatusCode") != 0 or said is None:
            raise HostNotReady(f"the agent image made on {api.base_url} from {BASE} cannot run Dolly's agent "
                               f"({PYTHON} exited {status.get('StatusCode')}): {err[-2000:]}")
        theirs, ours = tuple(said.get("python") or ()), tuple(sys.version_info[:2])
        if theirs != ours:
            raise HostNotReady(f"{BASE} on {api.base_url} has Python {'.'.join(map(str, theirs))}, but this Dolly "
                               f"runs on {'.'.join(map(str, ours))}: its compiled modules need the same one. Make "
                               f"{BASE} with python{ours[0]}.{ours[1]} (Debian 12's, as `make host` does)")
        with translate_errors():
            committed = api.commit(container_id, pause=False, conf={
                "Cmd": ["sleep", "infinity"], "Entrypoint": None, "WorkingDir": "/",
                "Env": [f"{k}={v}" for k, v in env.items()],
                "Labels": {VERSION_LABEL: ver, "dolly.agent.content": content_digest()},
            })
            image_id = str(committed["Id"])
            api.tag(image_id, REPOSITORY, ver, force=True)
        return image_id
    finally:
        with contextlib.suppress(DollyError, docker.errors.DockerException):
            with translate_errors():
                api.remove_container(container_id, force=True, v=True)


def _last_json(text: str) -> Optional[Dict[str, Any]]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                return value if isinstance(value, dict) else None
    return None
