"""CRIU's logs: where Dolly's runtime has CRIU write them, and the lines of one that explain a
failure, carried by the error Dolly raises."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

from .errors import CriuError

# Where scripts/dolly-runc copies CRIU's log when CRIU fails (Docker deletes its own copy).
CRIU_LOG_DIR = Path("/var/log/dolly/criu")


def criu_log(container_id: str, command: str, *, limit: int = 25) -> tuple[list[str], Optional[Path]]:
    """The lines of CRIU's log that explain a failure (see :func:`criu_excerpt`), and where the
    whole log is."""
    path = CRIU_LOG_DIR / f"{container_id}.{command}.log"
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return [], None
    return criu_excerpt(lines, limit=limit), path


# CRIU's own error lines: "(00.040129) Error (criu/cr-dump.c:389): Can't get rlimit 0: ..." (its
# log_prefix, then pr_err's "Error (file:line): "); other lines that merely mention an error (a
# library named libgpg-error.so, say) are not.
_CRIU_ERROR = re.compile(r"^(\(\s*[\d.]+\)\s+)?\s*(pie: )?(\d+: )?Error \(")

# How CRIU says what to do about a failure ("Connected TCP socket, consider using --tcp-established").
_HINT = "consider using"


def criu_excerpt(lines: Sequence[str], *, limit: int = 25, before: int = 3) -> list[str]:
    """CRIU's ``Error (...)`` lines with the ``before`` lines ahead of each (what it was doing),
    at most ``limit`` lines, the last ones; the last ``limit`` lines of the log when it has none.
    An error line that says what to do (CRIU's "consider using ...") comes first, whatever it
    follows: it is the one a reader needs (issue 24: it was below an unrelated rlimit line)."""
    keep: list[int] = []
    for i, line in enumerate(lines):
        if _CRIU_ERROR.match(line):
            keep.extend(j for j in range(max(0, i - before), i + 1) if not keep or j > keep[-1])
    if not keep:
        return list(lines[-limit:])
    excerpt = [lines[i] for i in keep][-limit:]
    hints = [line for line in excerpt if _CRIU_ERROR.match(line) and _HINT in line]
    return hints + [line for line in excerpt if line not in hints]


# CRIU's refusal of a socket in a connected state when not asked for --tcp-established
# (criu/sk-inet.c): "Connected TCP socket, consider using --tcp-established option." at a dump,
# "Connected TCP socket in image" at a restore.
_CONNECTED_TCP = "Connected TCP socket"


def refuses_tcp_connections(lines: Sequence[str]) -> bool:
    """Whether CRIU failed because the process holds established TCP connections that it was
    not asked to dump (or restore): one of CRIU's error lines says so."""
    return any(_CONNECTED_TCP in line and (_CRIU_ERROR.match(line) is not None or _HINT in line)
               for line in lines)


def forget_criu_log(container_id: str, command: str) -> None:
    """A log left by an earlier failure of the same container must not be read as this one's."""
    (CRIU_LOG_DIR / f"{container_id}.{command}.log").unlink(missing_ok=True)


def criu_error(cls: type[CriuError], container_id: str, command: str, cause: Exception) -> CriuError:
    """A :class:`CriuError` of ``cls`` for a failed ``command``, with CRIU's log."""
    lines, path = criu_log(container_id, command)
    return cls(f"{command} of container {container_id[:12]} failed: {cause}", log_lines=lines, log_path=path)
