"""What Dolly's agent runs beside an engine's files (see :mod:`dolly._agent`): the same local
functions a caller on that host would run, with arguments and results as JSON."""
from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Dict

import docker
from cryptography.hazmat.primitives import serialization

from . import _host, policy
from ._bundle import export, import_bundle
from ._checkpoint import Checkpoint, checkpoint, get_checkpoint, list_checkpoints, remove_checkpoint
from ._engine import Engine
from ._restore import clone, resume
from .errors import InvalidArgument

STREAMED = object()
_CHUNK = 1 << 20


def checkpoint_json(cp: Checkpoint) -> Dict[str, Any]:
    """A checkpoint as it travels back to the caller."""
    return {**cp._metadata(), "path": str(cp.path)}


def run(op: str, args: Dict[str, Any], *, stdin: IO[bytes], stdout: IO[bytes]) -> Any:
    """Run one operation against the engine at /var/run/docker.sock (the agent's own engine).

    Raises:
        the Dolly errors of the function it runs; InvalidArgument for an unknown operation.
    """
    client = docker.from_env()
    engine = Engine.of(client)
    if op == "checkpoint":
        return checkpoint_json(checkpoint(args["container"], args["name"], leave_running=args["leave_running"],
                                          max_layer_bytes=args["max_layer_bytes"], client=client))
    if op == "list":
        return [checkpoint_json(cp) for cp in list_checkpoints(args.get("container"), client)]
    if op == "get":
        return checkpoint_json(get_checkpoint(args["container"], args["name"], client))
    if op == "remove":
        remove_checkpoint(get_checkpoint(args["container_id"], args["name"], client))
        return None
    if op == "clone":
        cp = get_checkpoint(args["container_id"], args["name"], client)
        made = clone(cp, args["n"], name_prefix=args.get("name_prefix"), labels=args.get("labels"),
                     max_workers=args["max_workers"], client=client, _names=args.get("names"))
        return [c.id for c in made]
    if op == "resume":
        cp = get_checkpoint(args["container_id"], args["name"], client)
        return resume(cp, args.get("container"), client=client).id
    if op == "check_host":
        return [dataclasses.asdict(c) for c in _host.check_host(client).checks]
    if op == "export":
        cp = get_checkpoint(args["container_id"], args["name"], client)
        with _private_dir(engine) as tmp:
            path = export(cp, tmp / "out.dolly", compression="none", expires_in=_seconds(args["expires_in_s"]),
                          lineage=args.get("lineage"), max_bytes=args["max_bytes"], client=client)
            with open(path, "rb") as f:
                shutil.copyfileobj(f, stdout, _CHUNK)
            stdout.flush()
        return STREAMED
    if op == "import":
        key = serialization.load_pem_public_key(base64.b64decode(args["transit_key"]))
        with _private_dir(engine) as tmp:
            with open(tmp / "in.dolly", "wb") as f:
                shutil.copyfileobj(stdin, f, _CHUNK)
            cp = import_bundle(tmp / "in.dolly", client=client, trusted_keys=[key],  # type: ignore[list-item]
                               allow=policy.items(args["allow"]), max_bytes=args["max_bytes"],
                               _between_own_engines=args["between_own_engines"],
                               _relayed=True, _relayed_for=args["signed_by"])
        return checkpoint_json(cp)
    raise InvalidArgument(f"Dolly's agent knows no operation {op!r}")


def _seconds(value: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=value)


class _private_dir:
    """A root-only folder in the engine's spool, removed afterwards."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __enter__(self) -> Path:
        self.engine.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix="agent-", dir=self.engine.spool_dir))
        os.chmod(self.path, 0o700)
        return self.path

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
