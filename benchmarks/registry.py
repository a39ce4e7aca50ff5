"""Checkpoints through an OCI registry: push and pull times of the demo service W128 (128 MB of
random state, as benchmarks/bench.py runs it), and the bytes the first and the second push of the
same service upload.

Per repeat: a fresh W128 source; checkpoint and push it signed to a repository of its own (first
push); five requests later, checkpoint and push again (second push: only the pieces that changed
go up); then the source and its checkpoints go, as on another host, and the second checkpoint is
pulled (signature, pieces and import) and cloned until it answers. The registry is Debian's
docker-registry (distribution 2.8) on loopback, plain HTTP, its storage on this disk. Medians of
--repeats. Writes benchmarks/results/registry.json.

    .venv/bin/python benchmarks/registry.py [--repeats 5] [--state-mb 128]
"""
from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import docker

import dolly
from dolly import ready, trust

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "registry.json"
sys.path.insert(0, str(ROOT / "tests"))
from registries import Registry  # noqa: E402  (the tests' registry, started the same way)


def answer(container) -> dict:
    container.reload()
    ip = container.attrs["NetworkSettings"]["IPAddress"]
    with urllib.request.urlopen(f"http://{ip}:8000/", timeout=10) as r:
        return json.load(r)


def one(client, registry: Registry, private, public, state_mb: int) -> dict:
    source = client.containers.run("dolly/python", ["python3", "-c", (ROOT / "dolly" / "demo_service.py").read_text()],
                                   environment={"STATE_MB": str(state_mb), "RANDOM_STATE": "1"}, detach=True,
                                   name=f"bench-registry-{secrets.token_hex(3)}")
    try:
        ready.wait(source, ready.http(8000), timeout=300)
        before = answer(source)
        repo = f"{registry.address}/bench/w{state_mb}-{secrets.token_hex(3)}"
        first = dolly.push(dolly.checkpoint(source, "first"), f"{repo}:first", signer=private)
        for _ in range(5):
            before = answer(source)
        second = dolly.push(dolly.checkpoint(source, "second"), f"{repo}:second", signer=private)
    finally:
        for cp in dolly.list_checkpoints(source.id, client):
            dolly.remove_checkpoint(cp)
        source.remove(force=True)
    started = time.perf_counter()
    pulled = dolly.pull(f"{repo}:second", client=client, trusted_keys=[public])
    pull_s = time.perf_counter() - started
    try:
        (clone,) = dolly.clone(pulled, 1)
        try:
            after = answer(clone)
            to_answer = time.perf_counter() - started
            assert after["token"] == before["token"] and after["served"] == before["served"] + 1, after
        finally:
            clone.remove(force=True)
    finally:
        dolly.remove_checkpoint(pulled)
    return {"push_first_s": first.seconds, "push_second_s": second.seconds, "pull_s": pull_s,
            "pull_and_clone_to_answer_s": to_answer, "first_bytes": first.bytes,
            "first_uploaded_bytes": first.bytes_uploaded, "first_blobs": first.blobs,
            "first_uploaded_blobs": first.uploaded, "second_uploaded_bytes": second.bytes_uploaded,
            "second_blobs": second.blobs, "second_uploaded_blobs": second.uploaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--state-mb", type=int, default=128)
    args = parser.parse_args()
    client = docker.from_env()
    private, public = trust.generate_keypair()
    runs = []
    with tempfile.TemporaryDirectory(prefix="dolly-bench-registry-") as tmp:
        registry = Registry(Path(tmp)).start()
        try:
            for i in range(args.repeats):
                runs.append(one(client, registry, private, public, args.state_mb))
                print(f"repeat {i + 1}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in runs[-1].items()), flush=True)
        finally:
            registry.stop()
    medians = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"state_mb": args.state_mb, "repeats": args.repeats, "medians": medians,
                                   "runs": runs}, indent=1))
    print(json.dumps(medians, indent=1))


if __name__ == "__main__":
    main()
