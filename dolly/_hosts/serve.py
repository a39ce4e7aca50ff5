"""The agent's entry point: ``python -m dolly._hosts.serve OP ARGS`` runs one operation against the
engine beside it (see :mod:`dolly._hosts.channel` for the wire, :mod:`dolly._hosts.agent` for the
container)."""
from __future__ import annotations

import base64
import dataclasses
import json
import select
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, Dict, List, Optional

import docker
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .. import _archive as archive, _criu as criu, _names as names, _postcopy as postcopy, policy, trust
from .._archive import tarfile
from .._bundle import Staged, stage
from .._checkpoint import Checkpoint, User
from .._engine import Engine
from .._manifest import KEY_ID_RE, first_member, parse_manifest, read_signature, tar_members, write_stream
from .._start import CloneRequest
from ..errors import CARRIED, BundleError, DollyError, InvalidArgument
from .local import LocalHost

STREAMED = object()
# How long a warm worker (Channel.prewarm) waits for its operation before it ends.
WARM_IDLE_S = 600.0


def checkpoint_json(cp: Checkpoint) -> Dict[str, Any]:
    """A checkpoint as it travels back to the caller."""
    return {**cp._metadata(), "path": str(cp.path), "size": cp.size}


def run(op: str, args: Dict[str, Any], *, stdin: IO[bytes], stdout: IO[bytes]) -> Any:
    """Run one operation of :class:`LocalHost` against the engine at /var/run/docker.sock (the
    agent's own engine).

    Raises:
        the Dolly errors of the method it runs; InvalidArgument for an unknown operation.
    """
    host = LocalHost(Engine.of(docker.from_env()))
    if op == "checkpoint":
        return checkpoint_json(host.checkpoint(args["container"], args["name"], leave_running=args["leave_running"],
                                               max_layer_bytes=args["max_layer_bytes"],
                                               tcp_established=args.get("tcp_established") is True,
                                               made_by=User.from_json(args.get("made_by"))))
    if op == "list":
        return [checkpoint_json(cp) for cp in host.list_checkpoints(args.get("container"))]
    if op == "get":
        return checkpoint_json(host.get_checkpoint(args["container"], args["name"]))
    if op == "remove":
        host.remove_checkpoint(host.get_checkpoint(args["container_id"], args["name"]))
        return None
    if op == "remove_all_of":
        host.remove_all_of(args["container_id"])
        return None
    if op == "remove_unused_layer_images":
        host.remove_unused_layer_images()
        return None
    if op == "clone":
        cp = host.get_checkpoint(args["container_id"], args["name"])
        same_as = datetime.fromisoformat(args["same_as"]) if args.get("same_as") is not None else None
        made = host.start_clones(cp, CloneRequest.from_json(args["request"]), on_create=None, progress=None,
                                 same_as=same_as)
        return [c.id for c in made]
    if op == "resume":
        cp = host.get_checkpoint(args["container_id"], args["name"])
        return host.resume(cp, args.get("container")).id
    if op == "shared_layer":
        return host.shared_layer(host.get_checkpoint(args["container_id"], args["name"]))
    if op == "check_host":
        return [dataclasses.asdict(c) for c in host.check()]
    if op == "export":  # straight onto stdout, as it is read: no copy the size of the bundle
        cp = host.get_checkpoint(args["container_id"], args["name"])
        with host.export_members(cp, expires_in=timedelta(seconds=args["expires_in_s"]), lineage=args.get("lineage"),
                                 max_bytes=args["max_bytes"]) as (manifest, members):
            write_stream(stdout, manifest, members, signer=None, compression="none", encryption_key=None)
        return STREAMED
    if op == "stage_import":  # straight from stdin, verified as it is extracted
        key = serialization.load_pem_public_key(base64.b64decode(args["transit_key"]))
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidArgument("the transit key is not an Ed25519 key")
        return _stage_relayed(host, stdin, key, signed_by=args["signed_by"], allow=policy.items(args["allow"]),
                              max_bytes=args["max_bytes"], between_own_engines=bool(args["between_own_engines"]),
                              rebuild=bool(args["rebuild"]), token=args.get("token")).to_json()
    if op == "commit_import":
        return checkpoint_json(host.commit_import(Staged.from_json(args["staged"]),
                                                  reference=_image_id(args.get("reference"))))
    if op == "discard_import":
        host.discard_import(Staged.from_json(args["staged"]))
        return None
    if op in ("post_copy_source", "post_copy_target"):  # streams both ways; JSON lines on stderr

        def control(line: Dict[str, Any]) -> None:
            print(json.dumps(line), file=sys.stderr, flush=True)

        if op == "post_copy_source":
            postcopy.serve_source(host.engine, args["container"], args["name"], inp=stdin, out=stdout, control=control,
                                  checkpoint_json=checkpoint_json)
        else:
            postcopy.serve_target(host.engine, inp=stdin, out=stdout, control=control)
        return STREAMED
    raise InvalidArgument(f"Dolly's agent knows no operation {op!r}")


def _image_id(value: Any) -> Optional[str]:
    """Raises:
        BundleError: neither None nor an image ID.
    """
    return None if value is None else names.image_id(value, error=BundleError)


def _stage_relayed(host: LocalHost, stream: IO[bytes], transit_key: Ed25519PublicKey, *, signed_by: Any,
                   allow: Any, max_bytes: Any, between_own_engines: bool,
                   rebuild: bool, token: Any = None) -> Staged:
    """An import its caller verified (see dolly._hosts.remote): the stream is signed by the
    one-time ``transit_key``; ``signed_by`` is the original signer's key id (or None), which the
    lineage and ``origin`` record. ``token``: the staging's name, chosen by the caller, which
    discards it should this process die mid-way (killed, its container stopped).

    Raises:
        the errors of :func:`dolly._bundle.stage`; BundleError for a ``signed_by`` that is no key
        id, a ``token`` that is no staging's, or a stream not signed by the transit key;
        InvalidArgument for a bad ``max_bytes``.
    """
    if signed_by is not None and not (isinstance(signed_by, str) and KEY_ID_RE.match(signed_by)):
        raise BundleError(f"not a key id: {signed_by!r:.40}")
    if token is not None and not isinstance(token, str):
        raise BundleError(f"not a staged import's token: {token!r:.40}")
    if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 1):
        raise InvalidArgument(f"max_bytes must be a positive int, got {max_bytes!r:.40}")
    with tarfile.open(fileobj=stream, mode="r|", tarinfo=archive.BoundedTarInfo) as tar:
        members = iter(tar)
        manifest_bytes = first_member(tar, members)
        manifest = parse_manifest(manifest_bytes)
        signature, first = read_signature(tar, members)
        if signature is None:
            raise BundleError("the relayed bundle is not signed by its transit key")
        trust.verify(manifest_bytes, signature, str(manifest.get("signer")), [transit_key])
        # LocalHost.stage_import's call, with the caller's token.
        return stage(host.engine, manifest, signed_by, tar_members(tar, first, members), allowed=allow,
                     max_bytes=max_bytes, between_own_engines=between_own_engines, rebuild=rebuild, token=token)


def main(argv: List[str]) -> int:
    """``python -m dolly._hosts.serve OP ARGS``: run one operation against the engine beside us."""
    if argv == ["--serve"]:  # a warm worker: the operation comes as the first line of stdin
        criu.preload()
        sys.stderr.buffer.write(b"\n")  # ready: one frame on stderr, read by Channel.prewarm
        sys.stderr.buffer.flush()
        if not select.select([sys.stdin.buffer], [], [], WARM_IDLE_S)[0]:
            return 0  # unused for that long: ends, and its memory with it
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
