"""Memory-shared clones: host memory per W128 clone with and without ``share_memory=True``, and how
many W128 clones with it this machine holds, all answering.

    flock /tmp/dolly-tests.lock .venv/bin/python benchmarks/share.py [--clones 30] [--repeats 3]
        [--density-reserve-gib 2] [--density-max 0] [--batch 20]

1. **Per clone.** A W128 source (the demo service holding 128 MiB of random bytes) is checkpointed
   once; then --repeats rounds, each: --clones clones without share_memory, then as many with it
   (both made by one ``dolly.clone`` call, checked to answer with the source's state, measured,
   removed). Measured once the kernel's samepage merging (KSM) has settled (two full scans with
   nothing more merged; the clones without share_memory get the same wait): the sum of the
   proportional set size (Pss, /proc/<pid>/smaps_rollup: a page shared by k processes counts 1/k
   in each) of every process of every clone, per clone; and MemAvailable's drop since before the
   clones, per clone (which also counts each clone's containerd shim, kernel structures and page
   tables). How long merging took: from the moment every clone answered until 90 % of the pages
   finally merged were (``merge_90_s``), and until settled (``merge_s``).
2. **Density.** W128 clones with share_memory made --batch at a time, KSM let settle after each
   batch, until MemAvailable would drop below --density-reserve-gib with one more batch unmerged
   (or --density-max clones); then every clone is asked (unanswered ones again, up to three
   rounds) and those answering with the source's state counted. The first 1,000 join Docker's
   default bridge, the rest user-defined networks of 1,000 each (a Linux bridge takes 1,023).

Every clone, network and the checkpoint is removed at the end, pass or fail. Writes
benchmarks/results/share.json.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import docker

import dolly

sys.path.insert(0, str(Path(__file__).resolve().parent))
from density import neighbour_table

from bench import LABEL, PY_IMAGE, SERVICE, docker_ip, fetch, state_of, stats, wait_state

HERE = Path(__file__).resolve().parent
KSM = Path("/sys/kernel/mm/ksm")
MB = 2**20
PAGE = 4096
PER_NETWORK = 1000
W128_ENV = {"STATE_MB": "128", "RANDOM_STATE": "1"}


def ksm(name: str) -> int:
    return int((KSM / name).read_text())


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def pids_of(container_id: str) -> List[int]:
    """Every process of a container (its cgroup: cgroup v1 with cgroupfs, or v2 with systemd)."""
    for path in (f"/sys/fs/cgroup/memory/docker/{container_id}/cgroup.procs",
                 f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cgroup.procs"):
        with contextlib.suppress(OSError):
            return [int(p) for p in Path(path).read_text().split()]
    return []


def pss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def merging_pages(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
            if line.startswith("ksm_merging_pages"):
                return int(line.split()[1])
    return 0


def settle(pids: List[int], *, timeout: float = 300) -> Dict[str, float]:
    """Wait until KSM merges nothing more in ``pids``' processes (two full scans without growth,
    or ``timeout``): the seconds until 90 % of the final merged pages, and until settled."""
    t0 = time.perf_counter()
    timeline: List[tuple] = []
    last_scan, last_total, calm = ksm("full_scans"), -1, 0
    while time.perf_counter() - t0 < timeout:
        total = sum(merging_pages(p) for p in pids)
        timeline.append((time.perf_counter() - t0, total))
        scans = ksm("full_scans")
        if scans != last_scan:
            calm = calm + 1 if total <= last_total * 1.005 else 0
            last_scan, last_total = scans, total
            if calm >= 2:
                break
        time.sleep(0.25)
    final = timeline[-1][1]
    t90 = next((t for t, v in timeline if v >= 0.9 * final), timeline[-1][0]) if final else 0.0
    return {"merge_90_s": t90, "merge_s": timeline[-1][0], "merged_pages": final}


def settle_system(*, timeout: float = 300) -> float:
    """As :func:`settle`, by the system's pages_sharing (cheap with a thousand processes)."""
    t0 = time.perf_counter()
    last_scan, last, calm = ksm("full_scans"), -1, 0
    while time.perf_counter() - t0 < timeout:
        scans = ksm("full_scans")
        if scans != last_scan:
            now = ksm("pages_sharing")
            calm = calm + 1 if now <= last * 1.002 else 0
            last_scan, last = scans, now
            if calm >= 2:
                break
        time.sleep(0.25)
    return time.perf_counter() - t0


def answering(clones, expected: object, *, rounds: int = 3) -> int:
    """How many of ``clones`` answer with ``expected`` (those that do not are asked again)."""
    def ok(c) -> bool:
        ip = docker_ip(c)
        return bool(ip) and state_of(fetch(ip)) == expected

    left = list(clones)
    for r in range(rounds):
        with ThreadPoolExecutor(max_workers=16) as pool:
            left = [c for c, good in zip(left, pool.map(ok, left), strict=True) if not good]
        if not left:
            break
        time.sleep(2 * (r + 1))
    return len(clones) - len(left)


def remove(containers) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda c: c.remove(force=True), containers))


def per_clone_round(cp, n: int, expected: object, share: bool) -> dict:
    before = mem_available_mb()
    t = time.perf_counter()
    clones = dolly.clone(cp, n, share_memory=share)
    try:
        ok = answering(clones, expected)
        clone_s = time.perf_counter() - t
        pids = [p for c in clones for p in pids_of(c.id)]
        # Without share_memory nothing is scanned (full_scans stands still): a short look only.
        merge = settle(pids, timeout=300 if share else 5)
        after = mem_available_mb()
        return {"share_memory": share, "n": n, "answering": ok, "clone_s": clone_s, **merge,
                "pss_mb_per_clone": sum(pss_mb(p) for p in pids) / n,
                "mem_available_mb_per_clone": (before - after) / n,
                "merging_pages_min": min(merging_pages(p) for p in pids)}
    finally:
        remove(clones)


def density(client: docker.DockerClient, cp, expected: object, *, batch: int, reserve_mb: float,
            cap: int) -> dict:
    tag = uuid.uuid4().hex[:6]
    nets: list = []
    made: list = []
    batches: List[dict] = []
    unmerged_mb = 150.0  # a W128 clone before KSM has merged it
    t0 = time.perf_counter()
    try:
        while not cap or len(made) < cap:
            if mem_available_mb() - batch * unmerged_mb < reserve_mb:
                break
            k = batch if not cap else min(batch, cap - len(made))
            network = None
            if len(made) + k > PER_NETWORK:
                spill = (len(made) + k - 1) // PER_NETWORK - 1
                while len(nets) <= spill:
                    subnet = str(list(ipaddress.ip_network("10.215.0.0/16").subnets(new_prefix=22))[len(nets)])
                    nets.append(client.networks.create(
                        f"dolly-share-{tag}-{len(nets)}", driver="bridge", labels={LABEL: "1"},
                        ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)])))
                network = nets[spill].name
                k = min(k, PER_NETWORK * (spill + 2) - len(made))
            t = time.perf_counter()
            made += dolly.clone(cp, k, share_memory=True, network=network)
            clone_s = time.perf_counter() - t
            merge_s = settle_system()
            batches.append({"alive": len(made), "clone_s": clone_s, "merge_s": merge_s,
                            "mem_available_mb": mem_available_mb(), "pages_sharing": ksm("pages_sharing"),
                            "pages_shared": ksm("pages_shared")})
            print(f"  density: {len(made)} alive, MemAvailable {batches[-1]['mem_available_mb']:.0f} MB, "
                  f"batch {clone_s:.1f} s + merge {merge_s:.1f} s", flush=True)
        ok = answering(made, expected)
        return {"alive": len(made), "answering": ok, "seconds": time.perf_counter() - t0,
                "reserve_mb": reserve_mb, "batches": batches}
    finally:
        remove(made)
        for net in nets:
            with contextlib.suppress(docker.errors.APIError):
                net.remove()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clones", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--density-reserve-gib", type=float, default=2.0)
    ap.add_argument("--density-max", type=int, default=0, help="stop density at this many clones (0: none)")
    ap.add_argument("--no-density", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "share.json")
    args = ap.parse_args(argv)
    # A stopped run (kill, or ^C in a background job, where SIGINT is ignored) still cleans up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if ksm("run") != 1:
        print("KSM is not running (/sys/kernel/mm/ksm/run): run `make host`", file=sys.stderr)
        return 2
    client = docker.from_env()
    result: dict = {"ksm": {k: ksm(k) for k in ("pages_to_scan", "sleep_millisecs", "max_page_sharing")},
                    "clones": args.clones, "rounds": []}
    src = client.containers.run(PY_IMAGE, ["python3", "-c", SERVICE], environment=W128_ENV, detach=True,
                                labels={LABEL: "1"})
    cp = None
    try:
        wait_state(lambda: docker_ip(src), None)
        expected = state_of(fetch(docker_ip(src) or ""))
        cp = dolly.checkpoint(src, f"share-{uuid.uuid4().hex[:6]}")
        for r in range(args.repeats):
            for share in (False, True):
                row = per_clone_round(cp, args.clones, expected, share)
                row["round"] = r
                result["rounds"].append(row)
                print(f"round {r} share_memory={share}: {row['answering']}/{args.clones} answering, "
                      f"Pss {row['pss_mb_per_clone']:.1f} MB/clone, MemAvailable "
                      f"{row['mem_available_mb_per_clone']:.1f} MB/clone, merged 90 % in "
                      f"{row['merge_90_s']:.1f} s, settled in {row['merge_s']:.1f} s", flush=True)
        summary: dict = {}
        for share in (False, True):
            rows = [x for x in result["rounds"] if x["share_memory"] is share]
            summary["shared" if share else "private"] = {
                k: stats([x[k] for x in rows]) for k in
                ("pss_mb_per_clone", "mem_available_mb_per_clone", "clone_s",
                 *(("merge_90_s", "merge_s") if share else ()))}
        result["summary"] = summary
        print(json.dumps(summary, indent=2))
        if not args.no_density:
            with neighbour_table(8192):
                result["density"] = density(client, cp, expected, batch=args.batch,
                                            reserve_mb=args.density_reserve_gib * 1024, cap=args.density_max)
            d = result["density"]
            print(f"density: {d['answering']} of {d['alive']} W128 clones with share_memory answering, "
                  f"in {d['seconds']:.0f} s", flush=True)
    finally:
        if cp is not None:
            dolly.remove_checkpoint(cp)
        src.remove(force=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
