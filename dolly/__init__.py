"""Dolly: checkpoint, restore and clone running Docker containers with CRIU.

    >>> import dolly
    >>> cp = dolly.checkpoint("web")           # memory and files, the container keeps running
    >>> replicas = dolly.clone(cp, 3)          # three warm copies, each its own name, host and IP
"""
from .checkpoint import Checkpoint, checkpoint, get_checkpoint, list_checkpoints, remove_checkpoint
from .errors import DollyError
from .host import HostReport, check_host
from .restore import clone, restore

__all__ = [
    "Checkpoint",
    "DollyError",
    "HostReport",
    "check_host",
    "checkpoint",
    "clone",
    "get_checkpoint",
    "list_checkpoints",
    "remove_checkpoint",
    "restore",
]
__version__ = "0.1.0"
