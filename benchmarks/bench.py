"""`make bench`: Dolly against Podman and Docker-by-hand, same machine, same run.

For each workload: cold start to the first correct HTTP answer; checkpoint (leave running);
clone to first correct answer for N = 1, 4 and 16 at once; memory per clone. The peers run the
same workloads: Podman's `checkpoint --export` / `restore --import --name` (its default zstd
export, and `--compress=none`), and Docker's own `docker start --checkpoint` after copying the
checkpoint folder into a new container by hand. Medians over --repeats runs.

Prints a table, writes benchmarks/results/latest.json and draws benchmarks/results/latest.png.
With --scale N, also makes N busybox clones alive at once and reports the rate and memory.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import docker

import dolly
from dolly._engine import Engine
from dolly.demo import SERVICE

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LABEL = "dolly.bench"
PODMAN = ["podman"]
PODMAN_RUN = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
PY_IMAGE = "dolly/python"
BB_IMAGE = "dolly/busybox"
BUSYBOX_HTTP = ("mkdir -p /www && echo $RANDOM > /www/index.html && "
                "exec httpd -f -p 8000 -h /www")


@dataclass
class Workload:
    name: str
    image: str
    command: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    clone_ns: List[int] = field(default_factory=lambda: [1, 4, 16])


WORKLOADS = {
    "W128": Workload("W128", PY_IMAGE, ["python3", "-c", SERVICE], {"STATE_MB": "128", "RANDOM_STATE": "1"}),
    "W1G": Workload("W1G", PY_IMAGE, ["python3", "-c", SERVICE], {"STATE_MB": "1024", "RANDOM_STATE": "1"}, [1, 4]),
    "warm10": Workload("warm10", PY_IMAGE, ["python3", "-c", SERVICE], {"STATE_MB": "32", "WARMUP_S": "10"}, [1, 4]),
    "busybox": Workload("busybox", BB_IMAGE, ["sh", "-c", BUSYBOX_HTTP]),
}


# --- answering -------------------------------------------------------------------------------------


def answers(ip: str, port: int = 8000) -> bool:
    conn = http.client.HTTPConnection(ip, port, timeout=1)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status == 200 and len(resp.read()) > 0
    except OSError:
        return False
    finally:
        conn.close()


def wait_answer(ip_of: Callable[[], Optional[str]], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ip = ip_of()
        if ip and answers(ip):
            return
        time.sleep(0.01)
    raise TimeoutError("no answer")


def docker_ip(c) -> Optional[str]:
    c.reload()
    nets = c.attrs["NetworkSettings"]["Networks"]
    return next((n["IPAddress"] for n in nets.values() if n.get("IPAddress")), None)


def all_answer(ips: List[Callable[[], Optional[str]]]) -> None:
    with ThreadPoolExecutor(max_workers=min(16, len(ips))) as pool:
        list(pool.map(wait_answer, ips))


# --- Dolly -----------------------------------------------------------------------------------------


class DollyRunner:
    name = "dolly"

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    def cold(self, w: Workload) -> tuple:
        t = time.perf_counter()
        c = self.client.containers.run(w.image, w.command, environment=w.env, detach=True, labels={LABEL: "1"})
        wait_answer(lambda: docker_ip(c))
        return time.perf_counter() - t, c

    def checkpoint(self, source) -> tuple:
        t = time.perf_counter()
        cp = dolly.checkpoint(source, f"bench-{uuid.uuid4().hex[:6]}")
        return time.perf_counter() - t, cp

    def clone(self, cp, n: int) -> tuple:
        t = time.perf_counter()
        clones = dolly.clone(cp, n)
        all_answer([lambda c=c: docker_ip(c) for c in clones])
        return time.perf_counter() - t, clones

    def memory_mb(self, containers) -> float:
        return statistics.median(cgroup_rss_mb(c.id) for c in containers)

    def remove(self, containers) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda c: c.remove(force=True), containers))

    def drop(self, cp) -> None:
        dolly.remove_checkpoint(cp)


def cgroup_rss_mb(container_id: str) -> float:
    for base in (f"/sys/fs/cgroup/memory/docker/{container_id}",
                 f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope"):
        stat = Path(base) / "memory.stat"
        if stat.exists():
            values = dict(line.split() for line in stat.read_text().splitlines())
            rss = int(values.get("total_rss", values.get("anon", 0)))
            return rss / 2**20
    return float("nan")


# --- Docker by hand --------------------------------------------------------------------------------


class DockerByHand:
    """What a user can do with Docker alone: checkpoint, copy the folder into a new container,
    `docker start --checkpoint`. One clone at a time: identical folders collide in containerd."""

    name = "docker"

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.engine = Engine.of(client)

    def checkpoint(self, source) -> tuple:
        name = f"bench-{uuid.uuid4().hex[:6]}"
        t = time.perf_counter()
        # --leave-running, as Dolly's.
        subprocess.run(["docker", "checkpoint", "create", "--leave-running", source.id, name],
                       check=True, capture_output=True)
        return time.perf_counter() - t, (source, name)

    def clone(self, cp, n: int) -> tuple:
        source, name = cp
        t = time.perf_counter()
        made = []
        try:
            for _ in range(n):
                c = self.client.containers.create(source.attrs["Config"]["Image"], source.attrs["Config"]["Cmd"],
                                                  environment=source.attrs["Config"]["Env"], labels={LABEL: "1"})
                made.append(c)
                shutil.copytree(self.engine.checkpoints_dir(source.id) / name,
                                self.engine.checkpoints_dir(c.id) / name)
                subprocess.run(["docker", "start", "--checkpoint", name, c.id],
                               check=True, capture_output=True, text=True)
        except BaseException:
            self.remove(made)
            raise
        all_answer([lambda c=c: docker_ip(c) for c in made])
        return time.perf_counter() - t, made

    def remove(self, containers) -> None:
        DollyRunner.remove(self, containers)  # type: ignore[arg-type]

    def drop(self, cp) -> None:
        source, name = cp
        subprocess.run(["docker", "checkpoint", "rm", source.id, name], capture_output=True)


# --- Podman ----------------------------------------------------------------------------------------


def podman(*args: str, check: bool = True) -> str:
    return subprocess.run([*PODMAN, *args], check=check, capture_output=True, text=True).stdout.strip()


def podman_ip(name: str) -> Optional[str]:
    out = podman("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name, check=False)
    return out or None


class PodmanRunner:
    def __init__(self, compress: str) -> None:
        self.compress = compress
        self.name = "podman" if compress == "zstd" else f"podman-{compress}"
        self.dir = Path("/var/tmp/dolly-bench-podman")
        self.dir.mkdir(exist_ok=True)

    def cold(self, w: Workload) -> tuple:
        name = f"pb-{uuid.uuid4().hex[:8]}"
        env = [a for k, v in w.env.items() for a in ("-e", f"{k}={v}")]
        t = time.perf_counter()
        podman("run", "-d", *PODMAN_RUN, "--name", name, *env, f"localhost/{w.image}", *w.command)
        wait_answer(lambda: podman_ip(name))
        return time.perf_counter() - t, name

    def checkpoint(self, source: str) -> tuple:
        path = self.dir / f"{source}-{uuid.uuid4().hex[:6]}.tar"
        t = time.perf_counter()
        podman("container", "checkpoint", "--leave-running", f"--export={path}", f"--compress={self.compress}", source)
        return time.perf_counter() - t, path

    def clone(self, path: Path, n: int) -> tuple:
        names = [f"pb-{uuid.uuid4().hex[:8]}" for _ in range(n)]
        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=n) as pool:
            list(pool.map(lambda nm: podman("container", "restore", f"--import={path}", "--name", nm), names))
        all_answer([lambda nm=nm: podman_ip(nm) for nm in names])
        return time.perf_counter() - t, names

    def remove(self, names) -> None:
        if names:
            podman("rm", "-f", "-t", "0", *names, check=False)

    def drop(self, path: Path) -> None:
        path.unlink(missing_ok=True)


# --- the run ---------------------------------------------------------------------------------------


def measure(runner, w: Workload, repeats: int, clone_ns: List[int], results: dict, *, cold: bool = True) -> None:
    row = results.setdefault(w.name, {}).setdefault(runner.name, {})
    try:
        _measure(runner, w, repeats, clone_ns, row, cold=cold)
    except (subprocess.CalledProcessError, dolly.DollyError, docker.errors.DockerException, TimeoutError) as e:
        failed_run = isinstance(e, subprocess.CalledProcessError) and e.stderr
        detail = e.stderr.strip().splitlines()[-1] if failed_run else str(e)
        row["failed"] = f"{type(e).__name__}: {detail}"[:300]
        print(f"  {w.name:<8} {runner.name:<12} FAILED {row['failed']}", flush=True)


def _measure(runner, w: Workload, repeats: int, clone_ns: List[int], row: dict, *, cold: bool) -> None:
    colds, cps, clones, mems = [], [], {n: [] for n in clone_ns}, []
    for _ in range(repeats):
        source = None
        cp = None
        try:
            if cold:
                took, source = runner.cold(w)
                colds.append(took)
            else:
                source = DollyRunner(runner.client).cold(w)[1]
            took, cp = runner.checkpoint(source)
            cps.append(took)
            for n in clone_ns:
                took, made = runner.clone(cp, n)
                clones[n].append(took)
                try:
                    if n == clone_ns[-1] and hasattr(runner, "memory_mb"):
                        mems.append(runner.memory_mb(made))
                finally:
                    runner.remove(made)
        finally:
            if cp is not None:
                runner.drop(cp)
            if source is not None:
                runner.remove([source])

    def med(xs):
        return round(statistics.median(xs), 3) if xs else None

    row.update({"cold_s": med(colds), "checkpoint_s": med(cps),
                **{f"clone{n}_s": med(v) for n, v in clones.items()},
                "memory_per_clone_mb": med(mems), "runs": repeats})
    print(f"  {w.name:<8} {runner.name:<12} " + "  ".join(f"{k}={v}" for k, v in row.items() if k != "runs"),
          flush=True)


def scale(client: docker.DockerClient, total: int, results: dict) -> None:
    """`total` busybox clones alive at once, spread over networks (a bridge holds 1,023 ports)."""
    per_net = 500
    nets, sources, cps, made = [], [], [], []
    free_before = _mem_available_mb()
    try:
        for i in range((total + per_net - 1) // per_net):
            net = client.networks.create(f"dolly-bench-{i}", driver="bridge", labels={LABEL: "1"},
                                         ipam=docker.types.IPAMConfig(pool_configs=[
                                             docker.types.IPAMPool(subnet=f"10.214.{4 * i}.0/22")]))
            nets.append(net)
            src = client.containers.run(BB_IMAGE, ["sh", "-c", "while sleep 1; do :; done"], detach=True,
                                        network=net.name, labels={LABEL: "1"})
            sources.append(src)
            cps.append(dolly.checkpoint(src, "scale"))
        t = time.perf_counter()
        rates = []
        for i, cp in enumerate(cps):
            k = min(per_net, total - i * per_net)
            t0 = time.perf_counter()
            made.extend(dolly.clone(cp, k, max_workers=8))
            rates.append(k / (time.perf_counter() - t0))
        took = time.perf_counter() - t
        alive = sum(1 for c in client.containers.list(filters={"label": LABEL}) if "dolly.source" in c.labels)
        mem_each = (free_before - _mem_available_mb()) / max(1, alive)
        results["scale"] = {"clones": total, "alive": alive, "seconds": round(took, 1),
                            "per_second": round(total / took, 1), "per_second_min_batch": round(min(rates), 1),
                            "host_memory_per_clone_mb": round(mem_each, 2)}
        print(f"  scale: {results['scale']}", flush=True)
    finally:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda c: c.remove(force=True), made + sources))
        for cp in cps:
            dolly.remove_checkpoint(cp)
        for net in nets:
            _remove_network(net)


def _remove_network(net) -> None:
    """After a mass removal the engine may still count endpoints for a moment."""
    for _ in range(30):
        try:
            net.remove()
            return
        except docker.errors.APIError as e:
            if "active endpoints" not in str(e):
                raise
            time.sleep(1)
    print(f"  could not remove network {net.name}: stale endpoints (restart dockerd to clear them)")


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def table(results: dict) -> str:
    cols = ["cold_s", "checkpoint_s", "clone1_s", "clone4_s", "clone16_s", "memory_per_clone_mb"]
    lines = [f"{'workload':<9}{'tool':<14}" + "".join(f"{c:>20}" for c in cols)]
    for wname, tools in results.items():
        if wname in ("scale", "machine"):
            continue
        for tool, row in tools.items():
            lines.append(f"{wname:<9}{tool:<14}" + "".join(f"{row.get(c, '')!s:>20}" for c in cols))
        d, p = tools.get("dolly", {}), tools.get("podman", {})
        ratios = []
        if d.get("clone1_s") and p.get("clone1_s"):
            ratios.append(f"clone/podman restore {d['clone1_s'] / p['clone1_s']:.2f}")
        if d.get("clone1_s") and d.get("cold_s"):
            ratios.append(f"clone/cold start {d['clone1_s'] / d['cold_s']:.2f}")
        for tool, row in tools.items():
            if row.get("failed"):
                lines.append(f"{'':<9}{tool:<14}failed: {row['failed']}")
        if ratios:
            lines.append(f"{'':<9}{'ratios':<14}" + ", ".join(ratios))
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [w for w in results if w not in ("scale", "machine")]
    tools = ["dolly", "podman", "podman-none", "docker"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
    for ax, w in zip(axes[0], names, strict=True):
        for i, tool in enumerate(tools):
            row = results[w].get(tool, {})
            vals = [row.get(k) or 0 for k in ("cold_s", "checkpoint_s", "clone1_s", "clone4_s")]
            ax.bar([x + i * 0.2 for x in range(4)], vals, 0.2, label=tool)
        ax.set_xticks([x + 0.3 for x in range(4)], ["cold", "checkpoint", "clone 1", "clone 4"])
        ax.set_title(w)
        ax.set_ylabel("seconds (median)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    chart({k: v for k, v in results.items() if k != "machine"}, out.with_suffix(".png"))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", default="busybox,W128,warm10,W1G")
    ap.add_argument("--peers", default="podman,podman-none,docker")
    ap.add_argument("--scale", type=int, default=1000, help="busybox clones alive at once (0: skip)")
    ap.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    args = ap.parse_args(argv)

    client = docker.from_env(timeout=600)
    report = dolly.check_host(client)
    if not report.ok:
        print(report, file=sys.stderr)
        return 1
    results: dict = {}
    peers = [p for p in args.peers.split(",") if p]
    for wname in args.workloads.split(","):
        w = WORKLOADS[wname]
        print(f"{wname}:", flush=True)
        measure(DollyRunner(client), w, args.repeats, w.clone_ns, results)
        if "podman" in peers:
            measure(PodmanRunner("zstd"), w, args.repeats, w.clone_ns, results)
        if "podman-none" in peers:
            measure(PodmanRunner("none"), w, args.repeats, [1, 4], results)
        if "docker" in peers:
            measure(DockerByHand(client), w, args.repeats, [1], results, cold=False)
    results["machine"] = {"cores": os.cpu_count(), "kernel": os.uname().release,
                          "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write(results, args.out)  # before the long scale run, so that a failure there loses nothing
    if args.scale:
        scale(client, args.scale, results)
        write(results, args.out)
    print()
    print(table(results))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
