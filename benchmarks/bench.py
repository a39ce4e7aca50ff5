"""`make bench`: Dolly against Podman, same machine, same run, then density.

Side by side, for each workload: the cold start (one run per tool), then --repeats rounds, the
tools in a rotated order each round: checkpoint (source left running), and clone to first correct
answer for N at once (every clone answers HTTP with the source's state on its own IP). Medians and
p90s. CRIU's own restore time of a one-clone restore comes from CRIU's restore statistics (the
same figure Podman's `restore --print-stats` reports). The peers: **podman** is `podman container
checkpoint --leave-running --export` and `podman container restore --import --name` with its
default zstd export; **podman-none** the same with `--compress=none`, Podman's fastest; **docker**
(only with --peers docker) is `docker checkpoint create`, the folder copied into a new container
by hand, `docker start --checkpoint`.

Dolly's clone modes (``lazy=True``, ``share_memory=True``) are columns of their own,
**dolly-lazy** and **dolly-share**: in each of Dolly's rounds, clones of the same checkpoint as
plain Dolly's, the modes in a rotated order.

By default the workloads and peers that issue 25's goals name: W128 and W1G, Podman
``--compress none``; ``--workloads busybox,W128,warm10,W1G --peers podman,podman-none`` is the
full set. Before each tool's checkpoint the host's dirty pages are written out (``sync``, not
timed), so that no tool's checkpoint pays for the writeback of another tool's files.

Then density (benchmarks/density.py): --density busybox httpd clones alive at once, each answering
on its own IP.

Writes benchmarks/results/latest.json and latest.png after every workload, before density.
"""
from __future__ import annotations

import argparse
import contextlib
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
from typing import Callable, Dict, Iterator, List, Optional

import docker

import dolly
from dolly._criu_log import CRIU_LOG_DIR
from dolly._engine import Engine
from dolly.demo import SERVICE

sys.path.insert(0, str(Path(__file__).resolve().parent))
import density

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LABEL = "dolly.bench"
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
    # Per peer, the clone counts measured (the slow ones skip the large N); absent: the peer skips
    # the workload.
    peers: Dict[str, List[int]] = field(default_factory=dict)
    # Per Dolly clone mode (MODES), the clone counts measured from plain Dolly's checkpoint.
    modes: Dict[str, List[int]] = field(default_factory=dict)


# Dolly's clone modes, as columns of their own: name -> dolly.clone's keyword arguments.
MODES: Dict[str, Dict[str, bool]] = {"dolly-lazy": {"lazy": True}, "dolly-share": {"share_memory": True}}


WORKLOADS = {
    "busybox": Workload("busybox", BB_IMAGE, ["sh", "-c", BUSYBOX_HTTP],
                        peers={"podman": [1, 4], "podman-none": [1, 4, 16]}),
    "W128": Workload("W128", PY_IMAGE, ["python3", "-c", SERVICE], {"STATE_MB": "128", "RANDOM_STATE": "1"},
                     [1, 16], peers={"podman": [1, 4], "podman-none": [1], "docker": [1]},
                     modes={"dolly-lazy": [1, 16], "dolly-share": [1, 16]}),
    "warm10": Workload("warm10", PY_IMAGE, ["python3", "-c", SERVICE], {"STATE_MB": "32", "WARMUP_S": "10"},
                       [1, 4], peers={"podman": [1, 4], "podman-none": [1, 4]}),
    # Podman's zstd export of 1 GB takes about 28 s a round (checkpoint, then restore): left out.
    "W1G": Workload("W1G", PY_IMAGE, ["python3", "-c", SERVICE], {"STATE_MB": "1024", "RANDOM_STATE": "1"},
                    [1], peers={"podman-none": [1]}, modes={"dolly-lazy": [1]}),
}


# --- answering -------------------------------------------------------------------------------------


def fetch(ip: str, port: int = 8000) -> Optional[bytes]:
    conn = http.client.HTTPConnection(ip, port, timeout=1)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.read() if resp.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()


def state_of(body: Optional[bytes]) -> Optional[object]:
    """What must be the same in the source's answer and a clone's: the demo service's token and
    checksum (not its hostname or request count), or busybox's whole page."""
    if body is None:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    return (doc.get("token"), doc.get("checksum"), doc.get("rows")) if isinstance(doc, dict) else body


def wait_state(ip_of: Callable[[], Optional[str]], expected: object, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ip = ip_of()
        if ip:
            last = state_of(fetch(ip))
            if last is not None and (expected is None or last == expected):
                return
        time.sleep(0.005)
    raise TimeoutError(f"no correct answer (last: {last!r:.80})")


def docker_ip(c) -> Optional[str]:
    c.reload()
    nets = c.attrs["NetworkSettings"]["Networks"]
    return next((n["IPAddress"] for n in nets.values() if n.get("IPAddress")), None)


def all_answer(ips: List[Callable[[], Optional[str]]], expected: object) -> None:
    with ThreadPoolExecutor(max_workers=min(16, len(ips))) as pool:
        list(pool.map(lambda f: wait_state(f, expected), ips))


@contextlib.contextmanager
def criu_logs_kept() -> Iterator[None]:
    """dolly-runc keeps CRIU's logs and restore statistics meanwhile (a file .keep in its log folder,
    removed after unless it was there before)."""
    keep = CRIU_LOG_DIR / ".keep"
    there = keep.exists()
    CRIU_LOG_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    keep.touch()
    try:
        yield
    finally:
        if not there:
            keep.unlink(missing_ok=True)


# --- the tools -------------------------------------------------------------------------------------


class DollyRunner:
    name = "dolly"

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    def start(self, w: Workload) -> tuple:
        """The source, until it answers: (seconds, source, its state)."""
        t = time.perf_counter()
        c = self.client.containers.run(w.image, w.command, environment=w.env, detach=True, labels={LABEL: "1"})
        wait_state(lambda: docker_ip(c), None)
        took = time.perf_counter() - t
        return took, c, state_of(fetch(docker_ip(c) or ""))

    def checkpoint(self, source) -> tuple:
        t = time.perf_counter()
        cp = dolly.checkpoint(source, f"bench-{uuid.uuid4().hex[:6]}")
        return time.perf_counter() - t, cp

    def clone(self, cp, n: int, expected: object, **mode: bool) -> tuple:
        t = time.perf_counter()
        clones = dolly.clone(cp, n, **mode)
        all_answer([lambda c=c: docker_ip(c) for c in clones], expected)
        return time.perf_counter() - t, clones

    def criu_restore_s(self, clones) -> Optional[float]:
        """CRIU's restore time from its statistics, which dolly-runc keeps while .keep exists."""
        return _stats_restore_s(CRIU_LOG_DIR / f"{clones[0].id}.stats-restore")

    def memory_mb(self, clones) -> float:
        return statistics.median(cgroup_rss_mb(c.id) for c in clones)

    def remove(self, containers) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda c: c.remove(force=True), containers))
        for c in containers:
            (CRIU_LOG_DIR / f"{c.id}.stats-restore").unlink(missing_ok=True)
            (CRIU_LOG_DIR / f"{c.id}.restore.log").unlink(missing_ok=True)

    def drop(self, cp) -> None:
        dolly.remove_checkpoint(cp)


def _stats_restore_s(path: Path) -> Optional[float]:
    if not path.exists():
        return None
    import pycriu.images

    with open(path, "rb") as f:
        entry = pycriu.images.load(f)["entries"][0]
    return entry["restore"]["restore_time"] / 1e6


def cgroup_rss_mb(container_id: str) -> float:
    for base in (f"/sys/fs/cgroup/memory/docker/{container_id}",
                 f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope"):
        stat = Path(base) / "memory.stat"
        if stat.exists():
            values = dict(line.split() for line in stat.read_text().splitlines())
            rss = int(values.get("total_rss", values.get("anon", 0)))
            return rss / 2**20
    return float("nan")


class DockerByHand:
    """What a user can do with Docker alone: checkpoint, copy the folder into a new container,
    `docker start --checkpoint`. One clone at a time: identical folders collide in containerd."""

    name = "docker"

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.engine = Engine.of(client)
        self.start = DollyRunner(client).start

    def checkpoint(self, source) -> tuple:
        name = f"bench-{uuid.uuid4().hex[:6]}"
        t = time.perf_counter()
        subprocess.run(["docker", "checkpoint", "create", "--leave-running", source.id, name],
                       check=True, capture_output=True)
        return time.perf_counter() - t, (source, name)

    def clone(self, cp, n: int, expected: object) -> tuple:
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
        all_answer([lambda c=c: docker_ip(c) for c in made], expected)
        return time.perf_counter() - t, made

    def remove(self, containers) -> None:
        DollyRunner.remove(self, containers)  # type: ignore[arg-type]

    def drop(self, cp) -> None:
        source, name = cp
        subprocess.run(["docker", "checkpoint", "rm", source.id, name], capture_output=True)


def podman(*args: str, check: bool = True) -> str:
    return subprocess.run(["podman", *args], check=check, capture_output=True, text=True).stdout.strip()


def podman_ip(name: str) -> Optional[str]:
    return podman("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name, check=False) or None


class PodmanRunner:
    def __init__(self, compress: str) -> None:
        self.compress = compress
        self.name = "podman" if compress == "zstd" else f"podman-{compress}"
        self.dir = Path("/var/tmp/dolly-bench-podman")
        self.dir.mkdir(exist_ok=True)
        self._criu: Dict[str, float] = {}

    def start(self, w: Workload) -> tuple:
        name = f"pb-{uuid.uuid4().hex[:8]}"
        env = [a for k, v in w.env.items() for a in ("-e", f"{k}={v}")]
        t = time.perf_counter()
        podman("run", "-d", *PODMAN_RUN, "--name", name, *env, f"localhost/{w.image}", *w.command)
        wait_state(lambda: podman_ip(name), None)
        took = time.perf_counter() - t
        return took, name, state_of(fetch(podman_ip(name) or ""))

    def checkpoint(self, source: str) -> tuple:
        path = self.dir / f"{source}-{uuid.uuid4().hex[:6]}.tar"
        t = time.perf_counter()
        podman("container", "checkpoint", "--leave-running", f"--export={path}", f"--compress={self.compress}", source)
        return time.perf_counter() - t, path

    def clone(self, path: Path, n: int, expected: object) -> tuple:
        names = [f"pb-{uuid.uuid4().hex[:8]}" for _ in range(n)]

        def restore(name: str) -> None:
            out = podman("container", "restore", "--print-stats", f"--import={path}", "--name", name)
            stats = json.loads(out[out.index("{"):])
            self._criu[name] = stats["container_statistics"][0]["criu_statistics"]["restore_time"] / 1e6

        t = time.perf_counter()
        try:
            with ThreadPoolExecutor(max_workers=n) as pool:
                list(pool.map(restore, names))
            all_answer([lambda nm=nm: podman_ip(nm) for nm in names], expected)
        except BaseException:
            self.remove(names)
            raise
        return time.perf_counter() - t, names

    def criu_restore_s(self, names) -> Optional[float]:
        return self._criu.pop(names[0], None)

    def remove(self, names) -> None:
        if names:
            podman("rm", "-f", "-t", "0", *names, check=False)
        for name in names:
            self._criu.pop(name, None)

    def drop(self, path: Path) -> None:
        path.unlink(missing_ok=True)


# --- the run ---------------------------------------------------------------------------------------


def stats(xs: List[float]) -> Optional[dict]:
    """Median, p90 (nearest rank) and every run, in the order measured."""
    if not xs:
        return None
    ranked = sorted(xs)
    p90 = ranked[min(len(ranked) - 1, round(0.9 * (len(ranked) - 1)))]
    return {"median": round(statistics.median(xs), 3), "p90": round(p90, 3), "n": len(xs),
            "runs": [round(x, 3) for x in xs]}


def side_by_side(w: Workload, runners: list, repeats: int, results: dict) -> None:
    """Each tool's source started once; then `repeats` rounds, the tools' order rotated each round."""
    rows = results.setdefault(w.name, {})
    tools = [r for r in runners if r.name == "dolly" or r.name in w.peers]
    modes = [m for m in w.modes if any(r.name == "dolly" for r in tools)]
    raw: Dict[str, Dict[str, list]] = {r.name: {} for r in tools}
    raw.update({m: {} for m in modes})
    sources: Dict[str, tuple] = {}
    try:
        for r in tools:
            try:
                took, source, state = r.start(w)
                sources[r.name] = (source, state)
                raw[r.name]["cold_s"] = [took]
            except (subprocess.CalledProcessError, docker.errors.DockerException, TimeoutError) as e:
                _failed(rows, w, r, e)
        for i in range(repeats):
            order = _rotated(tools, i)
            for r in order:
                if r.name in sources and "failed" not in rows.get(r.name, {}):
                    try:
                        _round(r, w, *sources[r.name], raw, _rotated(modes, i))
                    except (subprocess.CalledProcessError, dolly.DollyError, docker.errors.DockerException,
                            TimeoutError, KeyError, ValueError) as e:
                        _failed(rows, w, r, e)
    finally:
        for r in tools:
            if r.name in sources:
                r.remove([sources[r.name][0]])
    for name in [r.name for r in tools] + modes:
        row = rows.setdefault(name, {})
        row.update({k: stats(v) for k, v in raw[name].items()})
        print(f"  {w.name:<8} {name:<12} " + "  ".join(
            f"{k}={v['median'] if isinstance(v, dict) else v}" for k, v in row.items()), flush=True)


def _rotated(xs: list, i: int) -> list:
    return xs[i % len(xs):] + xs[:i % len(xs)] if xs else xs


def _round(r, w: Workload, source, state, raw: Dict[str, Dict[str, list]], modes: List[str]) -> None:
    """One tool's round: a checkpoint, then its clones; Dolly's also those of its modes (``modes``,
    in that order) from the same checkpoint, each mode recorded under its own name."""
    os.sync()  # the other tools' writes flushed before this one's timed checkpoint
    took, cp = r.checkpoint(source)
    raw[r.name].setdefault("checkpoint_s", []).append(took)
    runs = [(r.name, n, {}) for n in (w.clone_ns if r.name == "dolly" else w.peers[r.name])]
    if r.name == "dolly":
        runs += [(m, n, MODES[m]) for m in modes for n in w.modes[m]]
    try:
        for name, n, mode in runs:
            cpu = density.host_cpu_seconds()
            took, made = r.clone(cp, n, state, **mode)
            into = raw[name]
            into.setdefault(f"clone{n}_s", []).append(took)
            # The host's CPU time (every process) per clone: N clones at once on two cores are
            # CPU-bound when this times N over the cores comes near the wall time.
            into.setdefault(f"clone{n}_host_cpu_s_per_clone", []).append((density.host_cpu_seconds() - cpu) / n)
            try:
                if n == 1 and hasattr(r, "criu_restore_s"):
                    criu_s = r.criu_restore_s(made)
                    if criu_s is not None:
                        into.setdefault("criu_restore_s", []).append(criu_s)
                if n == max(w.clone_ns) and not mode and hasattr(r, "memory_mb"):
                    into.setdefault("memory_per_clone_mb", []).append(r.memory_mb(made))
            finally:
                r.remove(made)
    finally:
        r.drop(cp)


def _failed(rows: dict, w: Workload, r, e: BaseException) -> None:
    failed_run = isinstance(e, subprocess.CalledProcessError) and e.stderr
    detail = e.stderr.strip().splitlines()[-1] if failed_run else str(e)
    rows.setdefault(r.name, {})["failed"] = f"{type(e).__name__}: {detail}"[:300]
    print(f"  {w.name:<8} {r.name:<12} FAILED {rows[r.name]['failed']}", flush=True)


# --- the report ------------------------------------------------------------------------------------

COLUMNS = ["cold_s", "checkpoint_s", "clone1_s", "criu_restore_s", "clone4_s", "clone16_s", "memory_per_clone_mb"]


def _med(row: dict, key: str) -> Optional[float]:
    v = row.get(key)
    return v.get("median") if isinstance(v, dict) else None


def table(results: dict) -> str:
    lines = [f"{'workload':<9}{'tool':<13}" + "".join(f"{c:>21}" for c in COLUMNS)]
    for wname, tools in results.items():
        if wname not in WORKLOADS:
            continue
        for tool, row in tools.items():
            cells = []
            for c in COLUMNS:
                v = row.get(c)
                cells.append(f"{v['median']} / {v['p90']}" if isinstance(v, dict) else "")
            lines.append(f"{wname:<9}{tool:<13}" + "".join(f"{c:>21}" for c in cells))
            if row.get("failed"):
                lines.append(f"{'':<9}{tool:<13}failed: {row['failed']}")
        none = tools.get("podman-none", {})
        for tool in ("dolly", *MODES):
            if _med(tools.get(tool, {}), "clone1_s") and _med(none, "clone1_s"):
                ratio = _med(tools[tool], "clone1_s") / _med(none, "clone1_s")
                lines.append(f"{'':<9}{'ratio':<13}{tool} clone 1 / podman-none {ratio:.2f}")
    lines.append("(median / p90, seconds; memory in MB; cold start: one run)")
    if "density" in results:
        lines.append("density: " + json.dumps({k: v for k, v in results["density"].items() if k != "batches"}))
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [w for w in results if w in WORKLOADS]
    has_density = bool(results.get("density", {}).get("batches"))
    panels = len(names) + has_density
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8), squeeze=False)
    keys = ["checkpoint_s", "clone1_s", "criu_restore_s", "clone4_s", "clone16_s"]
    tools = ["dolly", *MODES, "podman", "podman-none", "docker"]
    width = 0.8 / len(tools)
    for ax, w in zip(axes[0], names, strict=False):  # the density panel is last
        for i, tool in enumerate(tools):
            row = results[w].get(tool, {})
            vals = [_med(row, k) or 0 for k in keys]
            ax.bar([x + i * width for x in range(len(keys))], vals, width, label=tool)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))],
                      ["ckpt", "clone 1", "CRIU", "clone 4", "clone 16"])
        ax.set_title(w)
        ax.set_ylabel("seconds (median)")
    axes[0][0].legend(fontsize=8)
    if has_density:
        ax = axes[0][-1]
        batches = results["density"]["batches"]
        ax.plot([b["alive"] for b in batches], [b["clones"] / b["seconds"] for b in batches], marker=".")
        ax.set_title("density: busybox clones")
        ax.set_xlabel("clones alive")
        ax.set_ylabel("clones per second (batch)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    chart(results, out.with_suffix(".png"))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workloads", default="W128,W1G", help="of busybox,W128,warm10,W1G")
    ap.add_argument("--peers", default="podman-none", help="of podman,podman-none,docker")
    ap.add_argument("--density", type=int, default=2300, help="busybox clones alive at once (0: skip)")
    ap.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    args = ap.parse_args(argv)

    client = docker.from_env(timeout=600)
    report = dolly.check_host(client)
    if not report.ok:
        print(report, file=sys.stderr)
        return 1
    peers = [p for p in args.peers.split(",") if p]
    runners: list = [DollyRunner(client)]
    runners += [PodmanRunner("zstd")] if "podman" in peers else []
    runners += [PodmanRunner("none")] if "podman-none" in peers else []
    runners += [DockerByHand(client)] if "docker" in peers else []
    results: dict = {"machine": {"cores": os.cpu_count(), "kernel": os.uname().release,
                                 "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "repeats": args.repeats, "sync_before_checkpoint": True}}
    started = time.monotonic()
    with criu_logs_kept():
        for wname in args.workloads.split(","):
            print(f"{wname}:", flush=True)
            side_by_side(WORKLOADS[wname], runners, args.repeats, results)
            write(results, args.out)
    results["machine"]["side_by_side_s"] = round(time.monotonic() - started, 1)
    write(results, args.out)  # before the long density run, so that a failure there loses nothing
    if args.density:
        print(f"density ({args.density} busybox clones):", flush=True)
        results["density"] = density.run(client, args.density, on_batch=lambda b: print(f"  {b}", flush=True))
    results["machine"]["total_s"] = round(time.monotonic() - started, 1)
    write(results, args.out)
    print()
    print(table(results))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in {results['machine']['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
