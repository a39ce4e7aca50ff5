"""Bundles beside an engine's files: a checkpoint's members read out of the store for an export,
and an import's members laid out into it. The format, and everything about keys, is
dolly._manifest's and the caller's (dolly._transfer): what reaches this module was verified by the
caller (signature, freshness) and is checked here once more as it is written.

An import goes in three steps, each on the engine's host, whichever host that is:

1. :func:`stage`: each member, in order: of the bundle layout, listed, once, of its listed size,
   written into a private staging folder in the engine's root-only spool while it is hashed (a
   digest that differs stops the import); then the layout: the writable layer checked and
   converted (:func:`dolly._rootfs.to_overlay_form`), the recorded configuration parsed and held
   to the restore policy (:mod:`dolly.policy`), the bundle's claims on this engine's containers
   refused, and the images that decide privilege rebuilt (:mod:`dolly._rebuild`);
2. (the caller copies the image to the engine, only now);
3. :func:`commit`: the staging folder renamed into the store, under the lineage lock; or
   :func:`discard`.

A refusal at any step removes the staging folder: nothing of the bundle remains.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import types
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple

from filelock import FileLock

from . import (
    _archive as archive,
    _criu as criu,
    _formats as formats,
    _images as criu_images,
    _names as names,
    _rebuild,
    _rootfs as rootfs,
    policy,
)
from ._archive import tarfile
from ._checkpoint import METADATA, Checkpoint
from ._engine import Engine
from ._manifest import (
    DEFAULT_MAX_BYTES,
    MEMBER_RE,
    Member,
    entry,
    lineage_key,
    new_manifest,
    opened,
    source_fields,
    too_large,
)
from ._store import require, seal
from .errors import (
    BundleError,
    CheckpointExists,
    DigestMismatch,
    HostNotReady,
    ImageRewriteError,
    RollbackRefused,
    UnsafeArchive,
)

log = logging.getLogger("dolly")

_TOKEN_RE = re.compile(r"^[0-9a-f]{32}\Z")
_STAGED = "staged.json"


@dataclasses.dataclass(frozen=True)
class Staged:
    """An import verified and laid out in the engine's spool, not yet in the store (see the
    module's docstring). ``token`` names it there; ``image`` is ``(id, name)`` of the image its
    clones need, which the caller copies to the engine before :func:`commit`; ``needs_reference``:
    its images are to be rebuilt at the commit, from a reference the caller makes sure of too
    (:func:`dolly._rebuild.reference_image`)."""

    token: str
    container_id: str
    name: str
    image: Tuple[str, Optional[str]]
    needs_reference: bool = False

    def to_json(self) -> Dict[str, Any]:
        return {"token": self.token, "container_id": self.container_id, "name": self.name,
                "image": list(self.image), "needs_reference": self.needs_reference}

    @classmethod
    def from_json(cls, data: Any) -> Staged:
        """Raises:
            BundleError: not a staged import's record.
        """
        try:
            image = data["image"]
            staged = cls(str(data["token"]), names.container_id(data["container_id"], error=BundleError),
                         names.checkpoint_name(data["name"], error=BundleError),
                         (names.image_id(image[0], error=BundleError),
                          None if image[1] is None else names.image_name(image[1], error=BundleError)),
                         bool(data.get("needs_reference")))
        except (KeyError, TypeError, IndexError) as e:
            raise BundleError(f"not a staged import: {e}") from None
        if not _TOKEN_RE.match(staged.token):
            raise BundleError("not a staged import's token")
        return staged


# --- export ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def bundle_members(checkpoint: Checkpoint, engine: Engine, *, expires_in: timedelta, lineage: Optional[str],
                   max_bytes: int) -> Iterator[Tuple[Dict[str, Any], Iterator[Member]]]:
    """The manifest (unsigned, not compressed: the caller signs and seals it) and the members of
    ``checkpoint``'s bundle, each opened as it is read; the layer converted in the engine's
    root-only spool, which is cleared when the block ends.

    Raises:
        CheckpointNotFound: the checkpoint's files are gone.
        InvalidArgument: the layer takes more than ``max_bytes`` in the bundle.
    """
    require(checkpoint)
    engine.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=engine.spool_dir, prefix="export-") as tmp:
        work = Path(tmp)
        members: List[Tuple[str, Path]] = [
            (f"checkpoint/{p.name}", p) for p in sorted(checkpoint.images_dir.iterdir()) if p.is_file()
        ]
        deleted = rootfs.to_bundle_form(checkpoint.rootfs_diff, work / "rootfs-diff.tar", max_bytes=max_bytes)
        (work / "deleted.files").write_text(json.dumps(deleted))
        (work / "network.status").write_text(
            json.dumps((checkpoint.config.get("NetworkSettings") or {}).get("Networks") or {}))
        # The fields checkpointctl shows (Podman's names: ``name`` is the container's), and
        # Dolly's own metadata under ``dolly``.
        metadata = json.loads((checkpoint.path / METADATA).read_text())
        (work / "config.dump").write_text(json.dumps({
            "dolly": metadata, "id": checkpoint.container_id, "name": checkpoint.container_name,
            "rootfsImage": checkpoint.config["Config"].get("Image"),
            "rootfsImageRef": checkpoint.image_id.removeprefix("sha256:"),
            "rootfsImageName": checkpoint.config["Config"].get("Image"),
            "runtime": "runc", "createdTime": checkpoint.config.get("Created"),
            "checkpointedTime": checkpoint.created_at.isoformat().replace("+00:00", "Z")}))
        members += [
            ("config.dump", work / "config.dump"),
            ("network.status", work / "network.status"),
            ("rootfs-diff.tar", work / "rootfs-diff.tar"),
            ("deleted.files", work / "deleted.files"),
        ]
        members += [(n, checkpoint.path / n) for n in ("spec.dump", "stats-dump") if (checkpoint.path / n).exists()]

        manifest = new_manifest(checkpoint, info=engine.info(), members=[entry(name, p) for name, p in members],
                                lineage=lineage, expires_in=expires_in,
                                criu_version=".".join(map(str, criu.version() or ())), kernel=os.uname().release)
        yield manifest, opened(members)


# --- import ----------------------------------------------------------------------------------------


def stage(engine: Engine, manifest: Dict[str, Any], signer: Optional[str], members: Iterable[Member], *,
          allowed: FrozenSet[str], max_bytes: Optional[int], between_own_engines: bool, rebuild: bool,
          token: Optional[str] = None) -> Staged:
    """Step 1 of an import (see the module's docstring) of a bundle whose ``manifest`` the caller
    parsed and whose signature it verified (``signer``: the verified key's id, or None). A copy
    between the caller's engines (``between_own_engines``) is marked as one, and neither refused
    for its claims nor recorded in a lineage. ``rebuild``: the images that decide privilege are to be
    remade at the commit (everything from outside: see :func:`commit`). ``token``: the staging's
    name, when the caller chose it (an agent's caller, which discards it should the agent die
    mid-way: see :meth:`dolly._hosts.remote.AgentHost.stage_import`); else a new one.

    Raises:
        DigestMismatch, UnsafeArchive: a member that breaks the layout or its manifest entry.
        PolicyRefused: what the configuration or the images ask for beyond ``allowed``.
        CheckpointExists: the engine has that checkpoint, or the bundle claims one of its
            containers.
        RollbackRefused: an older bundle of a lineage this engine imported newer.
        BundleError: a damaged rollback record, or fields that break Dolly's rules.
    """
    lineages = Lineages.of(engine)
    engine.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if max_bytes is None:
        max_bytes = default_max_bytes(engine)
    meta = manifest["checkpoint"]
    lineage = lineage_key(manifest, signer)
    lineages.check(lineage, manifest["created_at"])  # early; again under the lock when committed
    final = names.inside(engine.store_dir, meta["container_id"], meta["name"], error=BundleError)
    if final.exists():
        raise CheckpointExists(f"this engine already has checkpoint {meta['name']!r} of {meta['container_name']}")
    if (declared := sum(m["size"] for m in manifest["members"])) > max_bytes:  # before a byte is written
        raise UnsafeArchive(too_large(declared, max_bytes))
    staged = Staged(token or uuid.uuid4().hex, meta["container_id"], meta["name"],
                    (manifest["image"]["id"], manifest["image"]["name"]))
    staging = _staging(engine, staged.token)
    staging.mkdir(mode=0o700)
    try:
        extract(members, staging / "in", manifest, max_bytes)
        origin: Dict[str, Any] = {
            "bundle_id": manifest["bundle_id"],
            "signer": signer,
            "source": source_fields(manifest.get("source")),
            "imported_at": datetime.now(UTC).isoformat(),
            "allowed": sorted(allowed),
        }
        if between_own_engines:
            # A copy made between the caller's engines: the next clone spread over this engine
            # uses it again instead of copying the checkpoint once more.
            origin["copy"] = True
        cp = _make_checkpoint(staging / "in", staging / "cp", manifest, final, origin, max_bytes)
        needs = _finish_staging(engine, cp, staging, allowed, between_own_engines=between_own_engines, rebuild=rebuild,
                                lineage=None if between_own_engines else (lineage, manifest["created_at"]))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataclasses.replace(staged, needs_reference=needs)


def stage_foreign(engine: Engine, tar: tarfile.TarFile, head: tarfile.TarInfo, members: Iterator[tarfile.TarInfo], *,
                  allow_unsigned: bool, allowed: FrozenSet[str], max_bytes: Optional[int], between_own_engines: bool,
                  signer: Optional[str], rebuild: bool,
                  verify: Optional[Any] = None) -> Staged:
    """Step 1 of an import of a Podman or kubelet archive (no manifest, no signature: see
    :mod:`dolly._formats`), held to the same rules as a bundle's members. ``signer``: the key id
    of a detached signature the caller checked, whose digest ``verify()`` checks once the archive
    is read.

    Raises:
        UnsignedBundle: neither ``signer`` nor ``allow_unsigned``; and the errors of :func:`stage`.
    """
    engine.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if max_bytes is None:
        max_bytes = default_max_bytes(engine)
    token = uuid.uuid4().hex
    staging = _staging(engine, token)
    staging.mkdir(mode=0o700)
    try:
        formats.extract(tar, head, members, staging / "in", max_bytes=max_bytes)
        if verify is not None:
            verify()
        cp, final, image_id, image_name, kind = formats.make_checkpoint(
            staging / "in", staging / "cp", engine.store_dir, allow_unsigned=allow_unsigned or signer is not None,
            max_bytes=max_bytes)
        if final.exists():
            raise CheckpointExists(f"checkpoint {cp.name!r} of {cp.container_name} exists already")
        origin = {**(cp.origin or {}), "signer": signer, "imported_at": datetime.now(UTC).isoformat(),
                  "allowed": sorted(allowed)}
        cp = dataclasses.replace(cp, origin=origin)
        for item in origin["not_applied"]:
            log.warning("import of a %s archive: %s", kind, item)
        needs = _finish_staging(engine, cp, staging, allowed, between_own_engines=between_own_engines,
                                rebuild=rebuild, lineage=None, sealed=False)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Staged(token, cp.container_id, cp.name, (image_id, image_name), needs)


def _finish_staging(engine: Engine, cp: Checkpoint, staging: Path, allowed: FrozenSet[str], *,
                    between_own_engines: bool, rebuild: bool, lineage: Optional[Tuple[str, str]],
                    sealed: bool = True) -> bool:
    """What every staged import goes through once laid out: the policy and the claims, then the
    record :func:`commit` reads (in the root-only spool, written here). Returns whether the
    images are to be rebuilt at the commit (:func:`dolly._rebuild.needed`)."""
    if not sealed:
        seal(cp, staging / "cp")
    _check_policy(cp, staging / "cp" / "criu", allowed)
    if not between_own_engines:
        _refuse_claims(engine, cp.container_id)
    needs = rebuild and _rebuild.needed(cp.config, allowed)
    record = {"final": str(cp.path), "lineage": list(lineage) if lineage else None, "rebuild": needs,
              "allowed": sorted(allowed)}
    fd = os.open(staging / _STAGED, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    return needs


def commit(engine: Engine, staged: Staged, *, reference: Optional[str]) -> Checkpoint:
    """Step 3, once the caller copied the image: the images that decide privilege rebuilt, when
    the staging said so, from a reference container of ``reference`` (the ID of Dolly's busybox
    image on the engine, :func:`dolly._rebuild.reference_image`), then the staged import into the
    store, under the lineage lock. The staging is gone afterwards, whatever happened.

    Raises:
        UnsafeArchive: images asking for what the accepted configuration does not make.
        HostNotReady: a rebuild without a ``reference``.
        CheckpointExists: the checkpoint appeared meanwhile.
        RollbackRefused: a newer bundle of its lineage was imported meanwhile.
        BundleError: no such staged import.
    """
    staging = _staging(engine, staged.token)
    try:
        try:
            record = json.loads((staging / _STAGED).read_text())
        except (OSError, ValueError) as e:
            raise BundleError(f"no staged import {staged.token}: {e}") from None
        final = Path(record["final"])
        if final != names.inside(engine.store_dir, staged.container_id, staged.name, error=BundleError):
            raise BundleError("the staged import is not the checkpoint it was staged as")
        if record["rebuild"]:
            if reference is None:
                raise HostNotReady(f"the engine has no image {_rebuild.REFERENCE_IMAGE}, which Dolly checks imported "
                                   "checkpoints against: run `make host` on its host, or pass image_source=")
            cp = Checkpoint.load(staging / "cp", engine.client)
            _rebuild_images(engine, cp, staging / "cp" / "criu", frozenset(record["allowed"]), reference)
        lineages = Lineages.of(engine)
        with lineages.lock:
            if record["lineage"]:
                lineages.check(*record["lineage"])
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if final.exists():
                raise CheckpointExists(f"checkpoint {staged.name!r} of container {staged.container_id[:12]} "
                                       "appeared meanwhile")
            os.rename(staging / "cp", final)
            if record["lineage"]:
                lineages.record(*record["lineage"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Checkpoint.load(final, engine.client)


def discard(engine: Engine, staged: Staged) -> None:
    """Drop a staged import (the image copy failed, or the caller gave up)."""
    shutil.rmtree(_staging(engine, staged.token), ignore_errors=True)


def _staging(engine: Engine, token: str) -> Path:
    if not _TOKEN_RE.match(token):
        raise BundleError("not a staged import's token")
    return engine.spool_dir / f"import-{token}"


def extract(members: Iterable[Member], into: Path, manifest: Dict[str, Any], max_bytes: int) -> None:
    """Every member after the manifest and signature (held to :func:`checked_members`' rules),
    hashed while written into the new folder ``into``.

    Raises:
        DigestMismatch, UnsafeArchive: naming the first member that breaks those rules.
    """
    into.mkdir(mode=0o700)
    (into / "checkpoint").mkdir(mode=0o700)
    for name, size, data, sha256 in checked_members(members, manifest, max_bytes):
        dest = names.inside(into, *name.split("/"), error=UnsafeArchive)
        archive.write_data(name, data, dest, sha256=sha256, size=size)


def checked_members(members: Iterable[Member], manifest: Dict[str, Any],
                    max_bytes: int) -> Iterator[Tuple[str, int, IO[bytes], str]]:
    """Each member with the SHA-256 its data must hash to, once it is of the bundle layout,
    listed, not seen before, of its listed size, and within ``max_bytes`` in all; at the end,
    every listed member seen. The caller hashes the data as it reads it.

    Raises:
        DigestMismatch, UnsafeArchive: naming the first member that breaks those rules.
    """
    expected = {m["name"]: m for m in manifest["members"]}
    seen = set()
    total = 0
    for name, size, data in members:
        if not MEMBER_RE.match(name):
            raise UnsafeArchive(f"the bundle holds {name!r}, which is not part of the bundle layout")
        want = expected.get(name)
        if want is None or name in seen:
            raise DigestMismatch(f"the bundle holds {name!r}, which its manifest does not list (once)")
        seen.add(name)
        total += size
        if size != want["size"]:
            raise DigestMismatch(f"{name} is {size} bytes, the manifest says {want['size']}")
        if total > max_bytes:
            raise UnsafeArchive(too_large(total, max_bytes))
        yield name, size, data, want["sha256"]
    missing = set(expected) - seen
    if missing:
        raise DigestMismatch(f"the bundle lacks {', '.join(sorted(missing))}, which its manifest lists")


def default_max_bytes(engine: Engine) -> int:
    """What an import into ``engine`` may unpack to by default: the smaller of
    :data:`DEFAULT_MAX_BYTES` and half the free space of the engine's data root (the bundle is
    unpacked in its spool, and its writable layer may be converted once more), so that one
    bundle cannot fill the disk the engine and its containers need.

    Raises:
        OSError: the data root cannot be measured.
    """
    st = os.statvfs(engine.spool_dir)
    return max(1, min(DEFAULT_MAX_BYTES, st.f_bavail * st.f_frsize // 2))


def _check_policy(cp: Checkpoint, images: Path, allowed: FrozenSet[str]) -> None:
    """The restore policy on what came from outside: the recorded configuration, and CRIU's
    images against it (capabilities, seccomp, masked paths, the mount tree's types).

    Raises:
        PolicyRefused: what it asks for beyond ``allowed``; UnsafeArchive: unreadable images.
    """
    policy.check(cp.config, allowed)
    try:
        policy.check_images(criu_images.processes(images), criu_images.mountpoints(images), cp.config, allowed,
                            host_paths=[p for p in policy.masked_paths() if os.path.exists(p)])
        policy.check_mount_types(criu_images.mount_types(images), allowed)
    except ImageRewriteError as e:
        raise UnsafeArchive(f"the checkpoint's process images cannot be read: {e}") from e


def _rebuild_images(engine: Engine, cp: Checkpoint, images: Path, allowed: FrozenSet[str], reference: str) -> None:
    """The images that decide privilege made again from what this engine makes for the accepted
    configuration (:mod:`dolly._rebuild`), after the policy.

    Raises:
        UnsafeArchive: images asking for what the accepted configuration does not make, or
            unreadable ones; HostNotReady: the engine has no reference image (the caller copies
            it there before the import is staged).
    """
    if not _rebuild.needed(cp.config, allowed):
        return
    try:
        _rebuild.rebuild(images, _rebuild.make_reference(engine, cp.config, image=reference))
    except ImageRewriteError as e:
        raise UnsafeArchive(f"the checkpoint's process images cannot be read: {e}") from e


def _refuse_claims(engine: Engine, container_id: str) -> None:
    """A bundle may not pass for a checkpoint of one of this engine's containers: it would be
    listed, and picked by name, among that container's own."""
    if engine.has_container(container_id):
        raise CheckpointExists(f"the bundle claims to be of container {container_id[:12]}, which this engine "
                               "runs: an imported checkpoint never passes for one of its own")
    folder = engine.store_dir / container_id
    for meta in folder.glob(f"*/{METADATA}") if folder.is_dir() else []:
        try:
            own = json.loads(meta.read_text()).get("origin") is None
        except (OSError, ValueError):
            own = True
        if own:
            raise CheckpointExists(f"the bundle claims to be of container {container_id[:12]}, which has "
                                   "checkpoints taken on this engine")


def _make_checkpoint(extracted: Path, folder: Path, manifest: Dict[str, Any], final: Path,
                     origin: Dict[str, Any], max_bytes: int) -> Checkpoint:
    """Dolly's checkpoint folder (see dolly._checkpoint) from a verified bundle's members, with
    the recorded configuration checked and its metadata written by Dolly, not copied."""
    formats.unpack_layout(extracted, folder, max_bytes=max_bytes)
    if manifest.get("flavor") == "podman":
        try:
            formats.undo_podman_images(folder / "criu")
        except ImageRewriteError as e:
            raise UnsafeArchive(f"the bundle's CRIU images cannot be made Docker's again: {e}") from e
    config = recorded_config(archive.small_json(extracted / "config.dump"), manifest)
    want = manifest["checkpoint"]
    cp = Checkpoint(
        container_id=want["container_id"],
        container_name=want["container_name"],
        name=want["name"],
        created_at=datetime.fromisoformat(want["created_at"]),
        hostname=want["hostname"],
        config=types.MappingProxyType(config),
        path=final,
        origin=origin,
    )
    seal(cp, folder)
    return cp


def recorded_config(meta: Any, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """The source's ``docker inspect`` from a bundle's ``config.dump`` (parsed), held to the
    manifest: the checkpoint it names, its image.

    Raises:
        DigestMismatch: config.dump describes another checkpoint, or is no checkpoint's.
    """
    if isinstance(meta, dict) and "dolly" in meta:  # beside checkpointctl's fields (older bundles: alone)
        meta = meta["dolly"]
    want = manifest["checkpoint"]
    try:
        if not isinstance(meta, dict):
            raise TypeError("not an object")
        config = meta["config"]
        if not (isinstance(config, dict) and isinstance(config.get("Config"), dict)
                and isinstance(config.get("HostConfig"), dict)):
            raise TypeError("config is not a docker inspect")
        for key in ("container_id", "name", "container_name", "created_at", "hostname"):
            if meta[key] != want[key]:
                raise ValueError(f"its {key} is not the manifest's")
        if config.get("Image") != manifest["image"]["id"]:
            raise ValueError("its image is not the manifest's")
    except (KeyError, TypeError, ValueError) as e:
        raise DigestMismatch(f"config.dump does not describe the checkpoint the manifest names ({e})") from None
    return config


class Lineages:
    """The newest ``created_at`` imported per (signer, lineage) on one engine: no rollback.
    Checked and recorded under one lock, with the import's final rename between them."""

    @classmethod
    def of(cls, engine: Engine) -> Lineages:
        """The record of an engine whose files are here, beside its checkpoints."""
        return cls(engine.store_dir.parent / "lineages.json")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.lock = FileLock(str(self.path) + ".lock")

    def _load(self) -> Dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise BundleError(f"the rollback record {self.path} is damaged ({e}): refusing imports "
                              "until it is repaired or removed") from None
        if not isinstance(data, dict):
            raise BundleError(f"the rollback record {self.path} is damaged")
        return data

    def check(self, key: str, created_at: str) -> None:
        seen = self._load().get(key)
        if seen and datetime.fromisoformat(seen) > datetime.fromisoformat(created_at):
            raise RollbackRefused(
                f"a bundle of lineage {key} made at {seen} was already imported here; this one "
                f"was made earlier, at {created_at}"
            )

    def record(self, key: str, created_at: str) -> None:
        """Call with :attr:`lock` held."""
        data = self._load()
        seen = data.get(key)
        if not seen or datetime.fromisoformat(seen) < datetime.fromisoformat(created_at):
            data[key] = created_at
            self._write(json.dumps(data, indent=1).encode())

    def _write(self, payload: bytes) -> None:
        """Replace the record at once. The temporary file has a random name and is created
        exclusively, never through a link: a fixed ``lineages.tmp`` could be a symlink planted
        beforehand, and writing through it would overwrite whatever it points at as root.

        Raises:
            OSError: it cannot be written.
        """
        tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
