"""`make demo`: a warm Python HTTP service, checkpointed, cloned into three replicas.

Prints each replica's name, kernel hostname, IP and HTTP answer, with the time each step took,
then removes everything it made (pass --keep to leave it all).
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from pathlib import Path

import docker

import dolly
from dolly import ready

SERVICE = Path(__file__).with_name("demo_service.py").read_text()
IMAGE = "dolly/python"
LABEL = "dolly.demo"


def start_service(client: docker.DockerClient, name: str, *, state_mb: int = 64, warmup_s: float = 0.0):
    """Start the demo service cold and wait until it answers; returns the container."""
    return client.containers.run(
        IMAGE,
        ["python3", "-c", SERVICE],
        name=name,
        detach=True,
        environment={"STATE_MB": str(state_mb), "WARMUP_S": str(warmup_s)},
        labels={LABEL: "1"},
    )


def get(container, path: str = "/") -> dict:
    conn = http.client.HTTPConnection(ready.ip_address(container), 8000, timeout=5)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3, help="how many replicas (default 3)")
    parser.add_argument("--state-mb", type=int, default=128, help="in-memory state of the service, MB")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up work after that")
    parser.add_argument("--keep", action="store_true", help="leave the source, the checkpoint and the replicas")
    args = parser.parse_args(argv)

    report = dolly.check_host()
    if not report.ok:
        print(report, file=sys.stderr)
        return 1
    client = docker.from_env()
    for old in client.containers.list(all=True, filters={"label": LABEL}):
        old.remove(force=True)

    made: list = []
    cp = None
    try:
        t = time.perf_counter()
        source = start_service(client, "dolly-demo-web", state_mb=args.state_mb, warmup_s=args.warmup)
        made.append(source)
        ready.wait(source, ready.http(8000), timeout=120)
        cold = time.perf_counter() - t
        answer = get(source)
        print(f"cold start   {cold:6.2f} s  {source.name}: {args.state_mb} MB table, "
              f"{answer['indexed']} index entries, token {answer['token']}")

        t = time.perf_counter()
        cp = dolly.checkpoint(source, "demo")
        print(f"checkpoint   {time.perf_counter() - t:6.2f} s  {cp.name} ({_size_mb(cp.path):.0f} MB), "
              "source keeps running")

        t = time.perf_counter()
        replicas = dolly.clone(cp, args.n)
        made.extend(replicas)
        took = time.perf_counter() - t
        print(f"clone x{args.n}     {took:6.2f} s  ({took / args.n:.2f} s per replica)")
        print()
        print(f"{'replica':<22} {'hostname':<14} {'IP':<15} HTTP answer")
        for r in replicas:
            a = get(r)
            print(f"{r.name:<22} {a['hostname']:<14} {ready.ip_address(r):<15} "
                  f"token {a['token']} indexed {a['indexed']} served {a['served']}")
        if args.keep:
            made, cp = [], None
        return 0
    finally:
        for c in made:
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass
        if cp is not None:
            dolly.remove_checkpoint(cp)


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


if __name__ == "__main__":
    sys.exit(main())
