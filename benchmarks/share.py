"""Memory-shared clones: host memory per W128 clone with and without ``share_memory=True``, and how
many W128 clones with it this machine holds, all answering.

    flock /tmp/dolly-tests.lock .venv/bin/python benchmarks/share.py [--clones 30] [--repeats 3]
        [--batch 25] [--density-max 300] [--density-reserve-gib 3] [--density-budget-s 900]
        [--ksm-pages-to-scan 20000] [--ksm-max-page-sharing N] [--out results/share.json]

1. **Per clone.** A W128 source (the demo service holding 128 MiB of random bytes) is checkpointed
   once; then --repeats rounds (0: none), each: --clones clones without share_memory, then as many
   with it (both made by one ``dolly.clone`` call, checked to answer with the source's state,
   measured, removed). Measured once the kernel's samepage merging (KSM) has settled (two full
   scans with nothing more merged; the clones without share_memory get the same wait): the sum of
   the proportional set size (Pss, /proc/<pid>/smaps_rollup: a page shared by k processes counts
   1/k in each) of every process of every clone, per clone; and MemAvailable's drop since before
   the clones, per clone (which also counts each clone's containerd shim, kernel structures and
   page tables). How long merging took: from the moment every clone answered until 90 % of the
   pages finally merged were (``merge_90_s``), and until settled (``merge_s``).
2. **Density.** W128 clones with share_memory made --batch at a time, paced on the host's memory:
   each batch starts as soon as MemAvailable has room for it unmerged (--unmerged-mb a clone) above
   --density-reserve-gib, until --density-max clones (0: no cap) or --density-budget-s seconds of
   making them; and the run stops, figures written, when memory is no longer reclaimed (neither
   MemAvailable nor KSM's pages_sharing grew for --stall-s while KSM made two full scans). Not
   paced on full scans: a full scan covers every clone's memory, so it grows with the clones.
   Then, once KSM has settled: MemAvailable's drop since before the first batch, per clone (and
   what removing the clones gives back, per clone: less exposed to the rest of the machine); the
   clones' Pss, per clone; ksmd's CPU time. Then every clone is asked for its state (density.py's
   ``ask_all``: unanswered ones again, then counted by reason). The first 1,000 join Docker's
   default bridge, the rest user-defined networks of 1,000 each (a Linux bridge takes 1,023).
   KSM's knobs can be set for the density run (--ksm-pages-to-scan, --ksm-sleep-ms,
   --ksm-max-page-sharing) and are put back after; the results say what was set. With the
   defaults (pages_to_scan 5000 every 20 ms) ksmd scans at most 250,000 pages a second, and every
   W128 clone adds 33,000 to each full scan. KSM's max_page_sharing (256) caps the mappings of one
   merged page: past 256 clones the kernel keeps another copy of each.

Every clone, network and the checkpoint is removed at the end, pass or fail. Writes --out
(benchmarks/results/share.json).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import ipaddress
import json
import os
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
from density import _remove_network as remove_network, ask_all, neighbour_table

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


@contextlib.contextmanager
def ksm_tuned(settings: Dict[str, int], record: dict):
    """KSM's knobs set to ``settings`` (0 or absent: left alone) for the run, and put back after:
    ``record`` gets what was there and what was set. ``max_page_sharing`` can only change while
    nothing is merged (the kernel answers EBUSY): putting it back waits for the clones' pages to go."""
    before = {k: ksm(k) for k in ("pages_to_scan", "sleep_millisecs", "max_page_sharing")}
    changed = {k: v for k, v in settings.items() if v and v != before[k]}
    record.update({"ksm_before": before, "ksm_set": changed})
    done: Dict[str, int] = {}
    try:
        for k, v in changed.items():
            (KSM / k).write_text(str(v))
            done[k] = before[k]
        yield
    finally:
        for k, v in done.items():
            deadline = time.monotonic() + 120
            while True:
                try:
                    (KSM / k).write_text(str(v))
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        record.setdefault("ksm_not_restored", {})[k] = f"{v}: {e}"
                        print(f"could not put KSM's {k} back to {v}: {e}", file=sys.stderr)
                        break
                    time.sleep(1)
        record["ksm_after"] = {k: ksm(k) for k in before}


def ksmd_cpu_s() -> float:
    """CPU seconds the kernel's ksmd thread has used since boot (0 if it cannot be found)."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "ksmd":
                fields = (comm.parent / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def wait_for_room(need_mb: float, *, stall_s: float, timeout: float) -> dict:
    """Wait until MemAvailable is at least ``need_mb``. Gives up when nothing is reclaimed any more:
    neither MemAvailable nor KSM's merged pages (pages_sharing) grew for ``stall_s`` while KSM made
    at least two full scans, or after ``timeout``. Returns whether there is room, and the wait."""
    t0 = time.monotonic()
    best_mem, best_sharing, since, scans_at = mem_available_mb(), ksm("pages_sharing"), t0, ksm("full_scans")
    while True:
        now, mem, sharing = time.monotonic(), mem_available_mb(), ksm("pages_sharing")
        if mem >= need_mb:
            return {"room": True, "waited_s": now - t0, "mem_available_mb": mem}
        if mem > best_mem + 16 or sharing > best_sharing + 256:  # 16 MB, or 1 MB more merged
            best_mem, best_sharing = max(mem, best_mem), max(sharing, best_sharing)
            since, scans_at = now, ksm("full_scans")
        # Two full scans: KSM has been over every clone since; or, with nothing for it to scan
        # (its full scans stand still), three times as long.
        stalled = now - since > stall_s and (ksm("full_scans") - scans_at >= 2 or now - since > 3 * stall_s)
        if stalled or now - t0 > timeout:
            return {"room": False, "waited_s": now - t0, "mem_available_mb": mem,
                    "why": "stalled" if stalled else "timeout"}
        time.sleep(0.25)


def density(client: docker.DockerClient, cp, expected: object, out: dict, *, batch: int, reserve_mb: float,
            cap: int, budget_s: float, unmerged_mb: float, stall_s: float) -> None:
    """Fill ``out`` as it goes (a run stopped half-way still has its figures): W128 clones with
    share_memory made ``batch`` at a time, each batch as soon as MemAvailable has room for it
    unmerged above ``reserve_mb``, until ``cap`` clones (0: none), ``budget_s`` seconds of making
    them, or memory that is no longer reclaimed; then every clone asked."""
    tag = uuid.uuid4().hex[:6]
    nets: list = []
    made: list = []
    batches: List[dict] = []
    mem0, ksmd0, shared0 = mem_available_mb(), ksmd_cpu_s(), ksm("pages_shared")
    out.update({"cap": cap, "batch": batch, "reserve_mb": reserve_mb, "unmerged_mb_assumed": unmerged_mb,
                "mem_available_before_mb": round(mem0), "batches": batches, "alive": 0})
    t0 = time.perf_counter()
    try:
        while not cap or len(made) < cap:
            if time.perf_counter() - t0 > budget_s:
                out["stopped_by"] = f"the time budget ({budget_s:.0f} s)"
                break
            k = batch if not cap else min(batch, cap - len(made))
            room = wait_for_room(reserve_mb + k * unmerged_mb, stall_s=stall_s,
                                 timeout=max(0.0, budget_s - (time.perf_counter() - t0)))
            if not room["room"]:
                out["stopped_by"] = (f"memory not reclaimed ({room['why']}): MemAvailable "
                                     f"{room['mem_available_mb']:.0f} MB, under the {reserve_mb:.0f} MB reserve "
                                     f"plus {k} unmerged clones, after {room['waited_s']:.0f} s")
                break
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
            try:
                made += dolly.clone(cp, k, share_memory=True, network=network,
                                    name_prefix=f"dolly-share-{tag}-b{len(batches)}")
            except dolly.DollyError as e:  # the batch left nothing behind (clone's promise)
                out["stopped_by"] = f"{type(e).__name__}: {str(e)[:500]}"
                break
            finally:
                out["alive"] = len(made)
            clone_s = time.perf_counter() - t
            batches.append({"alive": len(made), "at_s": round(t - t0, 2), "waited_s": round(room["waited_s"], 2),
                            "clone_s": round(clone_s, 2), "mem_available_mb": round(mem_available_mb()),
                            "pages_sharing": ksm("pages_sharing"), "pages_shared": ksm("pages_shared"),
                            "full_scans": ksm("full_scans")})
            print(f"  density: {len(made)} alive at {t - t0:.0f} s; waited {room['waited_s']:.1f} s for room, "
                  f"batch {clone_s:.1f} s; MemAvailable {batches[-1]['mem_available_mb']} MB, "
                  f"pages_sharing {batches[-1]['pages_sharing']}, pages_shared {batches[-1]['pages_shared']}",
                  flush=True)
        made_s = time.perf_counter() - t0
        out.update({"made_s": round(made_s, 1), "per_second": round(len(made) / made_s, 2) if made_s else None})
        out.setdefault("stopped_by", f"the cap ({cap} clones)" if cap and len(made) >= cap else "")
        # Measured once KSM has merged what it will: two full scans with nothing more merged.
        out["settle_s"] = round(settle_system(timeout=180), 1)
        out["ksmd_cpu_s"] = round(ksmd_cpu_s() - ksmd0, 1)
        mem1 = mem_available_mb()
        pids = [p for c in made for p in pids_of(c.id)]
        out.update({
            "mem_available_after_mb": round(mem1),
            "mem_available_drop_mb_per_clone": round((mem0 - mem1) / max(1, len(made)), 2),
            "pss_mb_per_clone": round(sum(pss_mb(p) for p in pids) / max(1, len(made)), 2),
            "processes": len(pids),
            "pages_sharing": ksm("pages_sharing"), "pages_shared": ksm("pages_shared"),
            "stable_node_chains": ksm("stable_node_chains"), "stable_node_dups": ksm("stable_node_dups"),
        })
        t = time.perf_counter()
        answers = ask_all(made, expected, port=8000, state=state_of, process="python3")
        unanswered = {name: why for name, why in answers.items() if why != "answered"}
        out.update({"answering": len(made) - len(unanswered), "asked_s": round(time.perf_counter() - t, 1),
                    "unanswered_by_reason": dict(collections.Counter(unanswered.values())),
                    "unanswered_examples": dict(list(unanswered.items())[:20])})
    finally:
        out["seconds"] = round(time.perf_counter() - t0, 1)
        t = time.perf_counter()
        remove(made)
        out["removed_s"] = round(time.perf_counter() - t, 1)
        if made and "mem_available_after_mb" in out:
            # The clones' cost against the host without them, right after: less exposed to what
            # else changed on the machine over the run than the drop since before it.
            deadline = time.monotonic() + 60
            while ksm("pages_shared") > shared0 and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(2)
            back = mem_available_mb()
            out.update({"mem_available_after_removal_mb": round(back),
                        "mem_available_regained_mb_per_clone": round((back - out["mem_available_after_mb"])
                                                                     / len(made), 2)})
        for net in nets:
            remove_network(net)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clones", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="per-clone rounds (0: density only)")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--density-reserve-gib", type=float, default=3.0)
    ap.add_argument("--density-max", type=int, default=300, help="stop density at this many clones (0: none)")
    ap.add_argument("--density-budget-s", type=float, default=900, help="stop making clones after this long")
    ap.add_argument("--unmerged-mb", type=float, default=150, help="host memory of a clone KSM has not merged yet")
    ap.add_argument("--stall-s", type=float, default=60,
                    help="give up when this long (and two full KSM scans) reclaims nothing")
    ap.add_argument("--ksm-pages-to-scan", type=int, default=20000, help="for the density run (0: as it is)")
    ap.add_argument("--ksm-sleep-ms", type=int, default=0, help="for the density run (0: as it is)")
    ap.add_argument("--ksm-max-page-sharing", type=int, default=0, help="for the density run (0: as it is)")
    ap.add_argument("--no-density", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "share.json")
    args = ap.parse_args(argv)
    # A stopped run (kill, or ^C in a background job, where SIGINT is ignored) still cleans up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if ksm("run") != 1:
        print("KSM is not running (/sys/kernel/mm/ksm/run): run `make host`", file=sys.stderr)
        return 2
    client = docker.from_env(timeout=600)
    result: dict = {"ksm": {k: ksm(k) for k in ("pages_to_scan", "sleep_millisecs", "max_page_sharing")},
                    "clones": args.clones, "rounds": []}
    src = client.containers.run(PY_IMAGE, ["python3", "-c", SERVICE], environment=W128_ENV, detach=True,
                                labels={LABEL: "1"})
    cp = None
    t_run = time.perf_counter()
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
        if args.repeats:
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
            d: dict = {}
            result["density"] = d
            knobs = {"pages_to_scan": args.ksm_pages_to_scan, "sleep_millisecs": args.ksm_sleep_ms,
                     "max_page_sharing": args.ksm_max_page_sharing}
            with neighbour_table(8192), ksm_tuned(knobs, d):
                density(client, cp, expected, d, batch=args.batch, reserve_mb=args.density_reserve_gib * 1024,
                        cap=args.density_max, budget_s=args.density_budget_s, unmerged_mb=args.unmerged_mb,
                        stall_s=args.stall_s)
            print(f"density: {d.get('answering')} of {d['alive']} W128 clones with share_memory answering "
                  f"({d.get('unanswered_by_reason')}); made in {d.get('made_s')} s ({d.get('per_second')}/s), "
                  f"stopped by {d.get('stopped_by')!r}; per clone: MemAvailable drop "
                  f"{d.get('mem_available_drop_mb_per_clone')} MB, Pss {d.get('pss_mb_per_clone')} MB", flush=True)
    finally:
        if cp is not None:
            dolly.remove_checkpoint(cp)
        src.remove(force=True)
        result["seconds"] = round(time.perf_counter() - t_run, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
