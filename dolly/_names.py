"""The rules for every name and ID that Dolly turns into a path, a tag or an engine request.

One set of rules for values from the caller and for values read from a bundle: a bundle is checked
against exactly what Dolly itself would have written. Each check takes the error class to raise,
so that a caller's bad argument is an :class:`InvalidArgument` and a bundle's is a
:class:`BundleError`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, List, Type

from .errors import DollyError, InvalidArgument

# Every rule ends in \Z, never $: with re.match, "$" also matches just before a final "\n", so
# "name\n" would pass and reach a path, a tag or an engine request. _check uses fullmatch as well,
# so a rule written with "$" by mistake still cannot let a trailing newline through.
# Docker's own rule for checkpoint names; it also keeps names out of paths ("..", "/").
CHECKPOINT_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}\Z")
# Docker's rule for container names.
CONTAINER_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,200}\Z")
CONTAINER_ID = re.compile(r"^[0-9a-f]{64}\Z")
IMAGE_ID = re.compile(r"^sha256:[0-9a-f]{64}\Z")
# A lineage names a series of bundles: Dolly's default is a container ID.
LINEAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")
# docker/distribution's reference grammar, without digests: [host[:port]/]path[:tag].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?"
IMAGE_NAME = re.compile(rf"^{_HOST}{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?\Z")


def _check(value: Any, rule: re.Pattern[str], what: str, error: Type[DollyError], hint: str = "") -> str:
    if not isinstance(value, str) or not rule.fullmatch(value):
        raise error(f"not a valid {what}: {value!r}{hint}")
    return value


def checkpoint_name(value: Any, *, error: Type[DollyError] = InvalidArgument) -> str:
    """Raises:
        error: not a checkpoint name (letters, digits and ``_.-``, starting with a letter or
            digit, at most 128).
    """
    return _check(value, CHECKPOINT_NAME, "checkpoint name", error,
                  " (letters, digits and _.-, starting with a letter or digit, at most 128)")


def container_name(value: Any, *, error: Type[DollyError] = InvalidArgument) -> str:
    """Raises:
        error: not a container name Docker accepts.
    """
    return _check(value, CONTAINER_NAME, "container name", error,
                  " (letters, digits and _.-, starting with a letter or digit)")


def container_id(value: Any, *, error: Type[DollyError] = InvalidArgument) -> str:
    """Raises:
        error: not a full container ID (64 lower-case hex digits).
    """
    return _check(value, CONTAINER_ID, "container ID", error, " (64 hex digits)")


def image_id(value: Any, *, error: Type[DollyError] = InvalidArgument) -> str:
    """Raises:
        error: not an image ID (``sha256:`` and 64 hex digits).
    """
    return _check(value, IMAGE_ID, "image ID", error, " (sha256: and 64 hex digits)")


def image_name(value: Any, *, error: Type[DollyError] = InvalidArgument) -> str:
    """Raises:
        error: not an image reference (``[host[:port]/]path[:tag]``).
    """
    return _check(value, IMAGE_NAME, "image name", error)


def lineage(value: Any, *, error: Type[DollyError] = InvalidArgument) -> str:
    """Raises:
        error: not a lineage (letters, digits and ``_.:-``, at most 128).
    """
    return _check(value, LINEAGE, "lineage", error, " (letters, digits and _.:-, at most 128)")


def inside(base: Path, *parts: str, error: Type[DollyError] = InvalidArgument) -> Path:
    """``base/parts...``, after checking that it resolves inside ``base``: no part is empty, ".",
    ".." or holds a "/", and no symlink on the way leads out. Call it before writing or removing.

    Raises:
        error: the path would leave ``base``.
    """
    for part in parts:
        if not isinstance(part, str) or part in ("", ".", "..") or "/" in part or "\0" in part:
            raise error(f"{part!r} cannot be a folder name under {base}")
    path = Path(base).joinpath(*parts)
    real_base = os.path.realpath(base)
    real = os.path.realpath(path)
    if os.path.commonpath([real_base, real]) != real_base or real == real_base:
        raise error(f"{path} resolves to {real}, outside {base}")
    return path


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
