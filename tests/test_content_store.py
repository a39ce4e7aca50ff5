"""A checkpoint of a container whose previous checkpoint's blobs containerd has not yet collected.

containerd (1.6/1.7, as Docker 20.10 runs it) stores every checkpoint's OCI spec as a blob of its
content store and refuses to commit a blob it already holds ("content sha256:...: already
exists"; fixed upstream only in containerd 2.0, containerd#8401). That blob's bytes are the
container's spec, the same for every checkpoint of one container, and the previous checkpoint's
copy stays in the store, unreferenced, until containerd's garbage collector next runs: a moment
on a containerd that has run for long, seconds on a fresh one (it spaces its collections by some
fifty times their average length). `make soak` failed that way on a fresh machine.

The test puts the container's spec blob into the store, unreferenced, as the previous checkpoint
leaves it, right after a collection (so that no pending one takes it first): the checkpoint must
succeed, and the clone of it run on.
"""
from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path
from typing import List, Tuple

import pytest

import dolly
from helpers import BUSYBOX, COUNTER, assert_counts_on, read_int

SPEC_TYPE_URL = b"types.containerd.io/opencontainers/runtime-spec/1/Spec"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def shim_of(container) -> Tuple[str, str, Path]:
    """containerd's address and namespace, as the container's shim has them, and its bundle."""
    container.reload()
    pid = container.attrs["State"]["Pid"]
    with open(f"/proc/{pid}/stat") as f:
        shim = int(f.read().rsplit(")", 1)[1].split()[1])
    args = Path(f"/proc/{shim}/cmdline").read_bytes().decode().split("\0")
    return args[args.index("-address") + 1], args[args.index("-namespace") + 1], Path(f"/proc/{shim}/cwd")


def ctr(address: str, namespace: str, *args: str, data: bytes = b"") -> str:
    return subprocess.run(["ctr", "--address", address, "-n", namespace, *args], input=data,
                          capture_output=True, check=True).stdout.decode()


def collect(address: str, namespace: str) -> None:
    """Have containerd collect its garbage now (a lease's synchronous delete does)."""
    lease = ctr(address, namespace, "leases", "create", "-x", "1m").split()[0]
    ctr(address, namespace, "leases", "delete", "--sync", lease)


def blobs(address: str, namespace: str) -> List[str]:
    return ctr(address, namespace, "content", "ls", "-q").split()


@pytest.mark.parametrize("runtime", ["dolly", "runc"])
def test_checkpoint_with_the_previous_checkpoints_spec_blob_still_stored(run, runtime):
    source = run(BUSYBOX, ["sh", "-c", COUNTER], runtime=runtime)
    time.sleep(0.5)  # the counter's file written
    address, namespace, bundle = shim_of(source)
    # The blob containerd writes for the spec: the container's spec as a protobuf Any, whose value
    # is the bundle's config.json.
    spec = (bundle / "config.json").read_bytes()
    blob = (b"\x0a" + _varint(len(SPEC_TYPE_URL)) + SPEC_TYPE_URL + b"\x12" + _varint(len(spec)) + spec)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    collect(address, namespace)
    ctr(address, namespace, "content", "ingest", "--expected-size", str(len(blob)),
        "--expected-digest", digest, f"dolly-test-{source.id[:12]}", data=blob)
    try:
        assert digest in blobs(address, namespace)
        assert_counts_on(source, 1, new=False)
        at = read_int(source)  # the counter at the checkpoint is this or past it
        cp = dolly.checkpoint(source, "stale-spec-blob")
        try:
            (clone,) = dolly.clone(cp, 1)
            try:
                assert_counts_on(clone, at)
            finally:
                clone.remove(force=True)
        finally:
            dolly.remove_checkpoint(cp)
    finally:
        collect(address, namespace)
    assert digest not in blobs(address, namespace)
