"""Dolly: checkpoint, restore and clone running Docker containers with CRIU.

    >>> import dolly
    >>> cp = dolly.checkpoint("web")           # memory and files, the container keeps running
    >>> replicas = dolly.clone(cp, 3)          # three warm copies, each its own name, host and IP
    >>> dolly.migrate("web", other_engine)     # live migration to another Docker Engine
"""
from . import policy, trust
from ._catalog import PruneReport, checkpoint, get_checkpoint, list_checkpoints, prune, remove_checkpoint
from ._checkpoint import Checkpoint
from ._cloning import clone, reset, restore, resume
from ._doctor import HostReport, check_host
from ._migration import Migration, migrate
from ._registry import PushReport, pull, push
from ._transfer import export, import_bundle
from ._version import __version__ as __version__
from .errors import DollyError

__all__ = [
    "Checkpoint",
    "DollyError",
    "HostReport",
    "Migration",
    "PruneReport",
    "PushReport",
    "check_host",
    "checkpoint",
    "clone",
    "export",
    "get_checkpoint",
    "import_bundle",
    "list_checkpoints",
    "migrate",
    "policy",
    "prune",
    "pull",
    "push",
    "remove_checkpoint",
    "reset",
    "restore",
    "resume",
    "trust",
]
