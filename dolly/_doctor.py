"""check_host: what is and is not ready for checkpoints, and how to fix it: the engine's own line,
then its host's (:meth:`dolly._hosts.base.Host.check`, beside the engine's files)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import docker

from ._checks import MAKE_HOST, Check, machine_checks
from ._engine import Engine, translate_errors
from ._hosts import host_of
from ._peer import socket_path_of
from .errors import DollyError

__all__ = ["Check", "HostReport", "check_host"]


@dataclass(frozen=True)
class HostReport:
    checks: List[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def __str__(self) -> str:
        width = max((len(c.name) for c in self.checks), default=0)
        lines = []
        for c in self.checks:
            lines.append(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<{width}}  {c.detail}")
            if not c.ok and c.fix:
                lines.append(f"     {'':<{width}}  fix: {c.fix}")
        return "\n".join(lines)


def check_host(client: Optional[docker.DockerClient] = None) -> HostReport:
    """Check the engine and CRIU, line by line, each failing line with its fix.

    Lines: engine reachable, then its host's, checked beside its files (here, or by Dolly's
    agent on its host): experimental mode, the ``dolly`` runtime, the engine's data root, CRIU
    version (4.2 or newer), ``criu check``, lazy pages (userfaultfd, which only post-copy
    migrations to this host need), pycriu importable.

    Raises:
        Nothing for what it finds: an unreachable engine, a missing CRIU, an agent that does not
            answer are failing lines of the report.
    """
    try:
        engine = Engine.of(client)
        with translate_errors():  # once, not retried: a report, not an operation that must succeed
            engine.api.ping()
        info = engine.info(refresh=True)
    except DollyError as e:
        return HostReport([Check("engine", False, f"{_url(client)}: {e}",
                                 f"start dockerd there, or point DOCKER_HOST / -H at one ({MAKE_HOST})"),
                           *machine_checks()])
    engine_line = Check("engine", True, f"Docker {info.get('ServerVersion')} at {engine.api.base_url}")
    return HostReport([engine_line, *host_of(engine).check()])


def _url(client: Optional[docker.DockerClient]) -> str:
    """Where the engine was looked for, as a user would write it."""
    if client is None:
        return "the engine of DOCKER_HOST (or unix:///var/run/docker.sock)"
    socket_path = socket_path_of(client)
    return f"unix://{socket_path}" if socket_path else str(client.api.base_url)
