"""Which host an engine gets: the one place Dolly chooses between an engine whose files this
process sees (:class:`~dolly._hosts.local.LocalHost`) and one it reaches through Dolly's agent
(:class:`~dolly._hosts.remote.AgentHost`). See :mod:`dolly._hosts.base` for the seam."""
from __future__ import annotations

import threading

from .._engine import Engine
from .base import Host
from .local import LocalHost
from .remote import AgentHost

__all__ = ["Host", "host_of"]

_lock = threading.Lock()


def host_of(engine: Engine) -> Host:
    """The host of ``engine``, chosen once and kept on the engine object.

    Raises:
        EngineError: the engine does not answer (its files' place is asked of it).
    """
    host = getattr(engine, "_host", None)
    if host is None:
        with _lock:
            host = getattr(engine, "_host", None)
            if host is None:
                host = LocalHost(engine) if engine.files_are_local() else AgentHost(engine)
                engine._host = host  # type: ignore[attr-defined]
    return host
