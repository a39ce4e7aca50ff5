"""The agent's entry point: ``python -m dolly._hosts.serve OP ARGS`` runs one operation against the
engine beside it (see :mod:`dolly._hosts.channel` for the wire, :mod:`dolly._hosts.agent` for the
container)."""
from __future__ import annotations

import base64
import dataclasses
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Dict, List

import docker
from cryptography.hazmat.primitives import serialization

from .. import _criu as criu, _host, _postcopy, policy
from .._bundle import export_stream, import_relayed
from .._checkpoint import Checkpoint
from .._dump import checkpoint
from .._engine import Engine
from .._restore import clone, resume
from .._store import get_checkpoint, list_checkpoints, remove_checkpoint
from ..errors import CARRIED, DollyError, InvalidArgument

STREAMED = object()


def checkpoint_json(cp: Checkpoint) -> Dict[str, Any]:
    """A checkpoint as it travels back to the caller."""
    return {**cp._metadata(), "path": str(cp.path), "size": cp.size}


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
                     max_workers=args["max_workers"], client=client, _names=args.get("names"),
                     _page_port=args.get("page_port"), network=args.get("network"))
        return [c.id for c in made]
    if op == "resume":
        cp = get_checkpoint(args["container_id"], args["name"], client)
        return resume(cp, args.get("container"), client=client).id
    if op == "check_host":
        return [dataclasses.asdict(c) for c in _host.check_host(client).checks]
    if op == "export":  # straight onto stdout, as it is read: no copy the size of the bundle
        cp = get_checkpoint(args["container_id"], args["name"], client)
        export_stream(cp, stdout, engine=engine, expires_in=timedelta(seconds=args["expires_in_s"]),
                      lineage=args.get("lineage"), max_bytes=args["max_bytes"])
        return STREAMED
    if op == "import":  # straight from stdin, verified as it is extracted
        key = serialization.load_pem_public_key(base64.b64decode(args["transit_key"]))
        cp = import_relayed(stdin, client=client, transit_key=key,  # type: ignore[arg-type]
                            signed_by=args["signed_by"], allow=policy.items(args["allow"]),
                            max_bytes=args["max_bytes"], between_own_engines=bool(args["between_own_engines"]),
                            rebuild=bool(args.get("rebuild", True)))
        return checkpoint_json(cp)
    if op in ("post_copy_source", "post_copy_target"):  # streams both ways; JSON lines on stderr

        def control(line: Dict[str, Any]) -> None:
            print(json.dumps(line), file=sys.stderr, flush=True)

        if op == "post_copy_source":
            _postcopy.serve_source(args["container"], args["name"], inp=stdin, out=stdout, control=control,
                                   checkpoint_json=checkpoint_json)
        else:
            _postcopy.serve_target(inp=stdin, out=stdout, control=control)
        return STREAMED
    raise InvalidArgument(f"Dolly's agent knows no operation {op!r}")



def main(argv: List[str]) -> int:
    """``python -m dolly._hosts.serve OP ARGS``: run one operation against the engine beside us."""
    if argv == ["--serve"]:  # a warm worker: the operation comes as the first line of stdin
        criu.preload()
        sys.stderr.buffer.write(b"\n")  # ready: one frame on stderr, read by Agent.prewarm
        sys.stderr.buffer.flush()
        line = sys.stdin.buffer.readline().split()
        if len(line) != 2:
            return 0  # ended unused
        argv = [part.decode() for part in line]
    op, args = argv[0], json.loads(base64.b64decode(argv[1]))
    stdout = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print() must not land in a stream on stdout
    try:
        result = run(op, args, stdin=sys.stdin.buffer, stdout=stdout)
    except DollyError as e:
        # On stderr: stdout may already carry part of a bundle. With the attributes callers use.
        attrs = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(e).items()
                 if k in CARRIED and v is not None}
        print(json.dumps({"error": type(e).__name__, "message": str(e), "attrs": attrs}), file=sys.stderr,
              flush=True)
        return 1
    if result is not STREAMED:
        stdout.write(json.dumps({"result": result}).encode() + b"\n")
        stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
