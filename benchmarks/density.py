"""Density: how many live clones of a busybox httpd checkpoint this machine holds, and how fast.

    .venv/bin/python benchmarks/density.py [--clones 2300] [--batch 100] [--workers 8]

The source is busybox `httpd -f` serving a page it wrote at start: no other process, nothing that
wakes up by itself. Clones are made in batches with `dolly.clone(cp, batch, network=...)`: the
first --on-bridge (1,000) on Docker's default bridge with the source, the rest spread over
user-defined networks of at most 1,000 containers each (a Linux bridge takes at most 1,023 ports).
After each batch the rate, the host's CPU time spent (all processes: Dolly, dockerd, containerd,
its shims, runc, CRIU) and MemAvailable are recorded; then the host's CPU use while all the clones
idle. At the end every clone is asked for the page on its own IP, and the answers are checked
against the source's: a clone that does not answer is asked again (up to three rounds, a pause
between them), and those that never answer are counted by reason (its container or process gone,
no neighbour entry for its address, refused, timed out, a wrong page), so the run's figures are
written whatever happens to some clones. The host's neighbour table is raised for the run and put
back after.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import ipaddress
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List

import docker

import dolly

LABEL = "dolly.bench"
IMAGE = "dolly/busybox"
PAGE_CMD = "mkdir -p /www && echo $RANDOM-$$ > /www/index.html && exec httpd -f -p 80 -h /www"
PER_NETWORK = 1000
ON_BRIDGE = 1000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def host_cpu_seconds() -> float:
    """CPU time every process on the host has spent so far (not idle, not waiting for I/O)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def ip_of(container) -> str:
    nets = container.attrs["NetworkSettings"]["Networks"]
    return next(n["IPAddress"] for n in nets.values() if n.get("IPAddress"))


def fetch(ip: str, port: int = 80) -> bytes:
    with urllib.request.urlopen(f"http://{ip}:{port}/", timeout=10) as resp:
        return resp.read()


def subnets(count: int) -> List[str]:
    """Distinct /22 subnets in 10.214.0.0/16 (1,022 addresses each)."""
    return [str(net) for net in list(ipaddress.ip_network("10.214.0.0/16").subnets(new_prefix=22))[:count]]


NEIGH = Path("/proc/sys/net/ipv4/neigh/default")


@contextlib.contextmanager
def neighbour_table(entries: int):
    """The host's neighbour (ARP) table raised to hold ``entries``, and put back after: asking
    every clone from the host needs an entry for each address, and the kernel's default hard limit
    (gc_thresh3) is 1,024 ("No route to host" past it)."""
    names = ("gc_thresh1", "gc_thresh2", "gc_thresh3")
    before = {n: (NEIGH / n).read_text() for n in names}
    try:
        if int(before["gc_thresh3"]) < entries:
            for n, v in zip(names, (entries // 4, entries // 2, entries), strict=True):
                (NEIGH / n).write_text(str(v))
        yield
    finally:
        for n in reversed(names):
            (NEIGH / n).write_text(before[n])


def run(client: docker.DockerClient, clones: int, *, batch: int = 100, workers: int = 8,
        on_bridge: int = ON_BRIDGE, on_batch=None) -> dict:
    """Make ``clones`` live clones, check that each answers, remove them; returns the figures."""
    with neighbour_table(2 * clones + 1024):
        return _run(client, clones, batch=batch, workers=workers, on_bridge=on_bridge, on_batch=on_batch)


def _run(client: docker.DockerClient, clones: int, *, batch: int, workers: int, on_bridge: int,
         on_batch) -> dict:
    tag = uuid.uuid4().hex[:6]
    # The first ON_BRIDGE clones join Docker's default bridge, with the source: the network a
    # container gets when nothing else is said, and the one without an embedded DNS resolver (on
    # a user-defined network dockerd sets one up in every container's namespace: a dockerd
    # re-exec and 11 iptables runs, 0.04 CPU-s a clone). The rest go over user-defined networks.
    on_bridge = min(clones, on_bridge)
    rest = clones - on_bridge
    nets = [client.networks.create(f"dolly-density-{tag}-{i}", driver="bridge", labels={LABEL: "1"},
                                   ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=s)]))
            for i, s in enumerate(subnets((rest + PER_NETWORK - 1) // PER_NETWORK))]
    source = client.containers.run(IMAGE, ["sh", "-c", PAGE_CMD], detach=True, name=f"dolly-density-{tag}",
                                   labels={LABEL: "1"})
    made: list = []
    cp = None
    result: dict = {}
    try:
        source.reload()
        expected = _wait_page(ip_of(source))
        cp = dolly.checkpoint(source, "density")
        batches = []
        mem0, cpu0, t0 = mem_available_mb(), host_cpu_seconds(), time.perf_counter()
        while len(made) < clones:
            k = min(batch, (on_bridge if len(made) < on_bridge else clones) - len(made))
            t, c = time.perf_counter(), host_cpu_seconds()
            try:
                made += dolly.clone(cp, k, network=["bridge"] if len(made) < on_bridge else [n.name for n in nets],
                                    max_workers=workers, name_prefix=f"dolly-density-{tag}-b{len(batches)}")
            except dolly.DollyError as e:  # the batch left nothing (clone's promise): count what runs
                result["stopped_by"] = f"{type(e).__name__}: {str(e)[:500]}"
                print(f"  batch {len(batches)} failed, stopping at {len(made)} clones: {result['stopped_by']}",
                      flush=True)
                break
            batches.append({"clones": k, "seconds": round(time.perf_counter() - t, 3),
                            "cpu_s": round(host_cpu_seconds() - c, 2), "alive": len(made)})
            if on_batch is not None:
                on_batch(batches[-1])
        took, cpu = time.perf_counter() - t0, host_cpu_seconds() - cpu0
        time.sleep(2)  # let the last shims settle before reading memory
        mem = mem0 - mem_available_mb()
        # What the clones cost while nothing happens: each has a containerd shim (a Go process)
        # that wakes up on its own.
        c, t = host_cpu_seconds(), time.perf_counter()
        time.sleep(5)
        idle = (host_cpu_seconds() - c) / (time.perf_counter() - t)
        answers = ask_all(made, expected)
        right = sum(1 for a in answers.values() if a == "answered")
        unanswered = {name: why for name, why in answers.items() if why != "answered"}
        rates = [b["clones"] / b["seconds"] for b in batches]
        first_n = max(1, 100 // batch)
        thousand = _first(batches, 1000)
        result.update({
            "clones": len(made), "asked_for": clones, "answered_with_the_source_page": right,
            "unanswered_by_reason": dict(collections.Counter(unanswered.values())),
            "unanswered_examples": dict(list(unanswered.items())[:20]),
            "distinct_ips": len({ip_of(c) for c in made}), "networks": len(nets),
            "seconds": round(took, 1), "per_second": round(len(made) / took, 2),
            "first_1000_per_second": thousand,
            "first_100_per_second": round(statistics.fmean(rates[:first_n]), 2),
            "last_100_per_second_of_1000": _last_100_rate(batches, 1000),
            "last_100_per_second": round(statistics.fmean(rates[-first_n:]), 2),
            "host_memory_per_clone_mb": round(mem / max(1, len(made)), 2),
            "host_cpu_s_per_clone": round(cpu / max(1, len(made)), 3),
            "host_cpu_s_per_clone_first_1000": _cpu_per_clone(batches, 1000),
            "idle_host_cpu_per_s": round(idle, 2),
            "on_default_bridge": on_bridge,
            "batches": batches,
        })
    finally:
        t = time.perf_counter()
        steps = remove([*made, source])
        if cp is not None:
            dolly.remove_checkpoint(cp)
        for net in nets:
            _remove_network(net)
        result["removed_s"] = round(time.perf_counter() - t, 1)
        mine = f"dolly-density-{tag}"
        result["left_behind"] = [
            *(c.name for c in client.containers.list(all=True, filters={"label": LABEL, "name": mine})),
            *(n.name for n in client.networks.list(filters={"label": LABEL}) if n.name.startswith(mine)),
            *(f"checkpoint {c.name}" for c in ([cp] if cp is not None and _still_there(cp) else [])),
        ]
        result["removal"] = {**steps, "ms_per_clone": round(1000 * result["removed_s"] / max(1, len(made)), 1)}
    return result


ROUNDS = 3


def ask_all(containers, expected: object, *, port: int = 80, state: Callable[[bytes], object] = bytes,
            process: str = "httpd") -> dict:
    """Every clone's name -> "answered", or why it did not after ROUNDS rounds of asking: its page
    on ``port``, as ``state`` reads it, compared with ``expected``; ``process`` is the server's
    command name, looked for in a clone that does not answer."""
    why: dict = {c.name: "not asked" for c in containers}
    waiting = list(containers)
    for round_ in range(ROUNDS):
        if round_:
            time.sleep(2)  # a neighbour entry that failed is tried again after a moment
        with ThreadPoolExecutor(max_workers=16) as pool:
            outcomes = list(pool.map(lambda c: _ask(c, expected, port, state), waiting))
        for c, outcome in zip(waiting, outcomes, strict=True):
            why[c.name] = outcome
        waiting = [c for c, outcome in zip(waiting, outcomes, strict=True) if outcome != "answered"]
        if not waiting:
            break
    for c in waiting:
        why[c.name] = _diagnose(c, why[c.name], process)
    return why


def _ask(container, expected: object, port: int = 80, state: Callable[[bytes], object] = bytes) -> str:
    try:
        page = fetch(ip_of(container), port)
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, OSError) and reason.errno == errno.EHOSTUNREACH:
            return "no route to host"
        if isinstance(reason, OSError) and reason.errno == errno.ECONNREFUSED:
            return "refused"
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return "timed out"
        return f"error: {reason}"
    except (OSError, ValueError) as e:
        return f"error: {type(e).__name__}"
    return "answered" if state(page) == expected else "a wrong page"


def _diagnose(container, last: str, process: str = "httpd") -> str:
    """The reason a clone never answered: its container or server gone first, then its address."""
    try:
        container.reload()
    except docker.errors.NotFound:
        return "container gone"
    if not container.attrs["State"].get("Running"):
        return f"container exited ({container.attrs['State'].get('ExitCode')})"
    top = container.top(ps_args="-o comm") if last != "a wrong page" else None
    if top is not None and not any(process in " ".join(p) for p in top.get("Processes") or []):
        return f"{process} gone"
    if last == "no route to host":
        neigh = subprocess.run(["ip", "neigh", "show", ip_of(container)], capture_output=True, text=True).stdout
        return f"no route to host (neighbour: {neigh.split()[-1] if neigh.split() else 'none'})"
    return last


def _wait_page(ip: str) -> bytes:
    for _ in range(100):
        try:
            return fetch(ip)
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"the source at {ip} never answered")


def _until(batches: List[dict], upto: int, key: str):
    """(clones, the sum of ``key``) over the first batches that made ``upto`` clones, or None."""
    done, total = 0, 0.0
    for b in batches:
        done, total = done + b["clones"], total + b[key]
        if done >= upto:
            return done, total
    return None


def _first(batches: List[dict], n: int):
    made = _until(batches, n, "seconds")
    return round(made[0] / made[1], 2) if made else None


def _cpu_per_clone(batches: List[dict], upto: int):
    made = _until(batches, upto, "cpu_s")
    return round(made[1] / made[0], 3) if made else None


def _last_100_rate(batches: List[dict], upto: int):
    """The rate of the batches that made clones upto-100 .. upto."""
    done, window = 0, []
    for b in batches:
        done += b["clones"]
        if upto - 100 < done <= upto:
            window.append(b)
    if not window or done < upto:
        return None
    return round(sum(b["clones"] for b in window) / sum(b["seconds"] for b in window), 2)


REMOVERS = 16  # 8 left a fifth of the CPU idle while removing 800 clones; 16: 44.5 s against 47.8 s


def remove(containers, *, workers: int = REMOVERS) -> dict:
    """Every container stopped, then every one removed; returns the seconds of each step.

    Why in two steps: what makes a removal slow is reading the host's mount table (dockerd and
    runc read all of /proc/self/mountinfo several times for each container they stop or remove,
    and every running container adds its root file system and network namespace to it). Stopping
    them all first takes their mounts away, so that the removals that follow read a short table.
    Each is stopped by a SIGKILL to its first process from here (see ``_stop``), at most
    ``workers`` at a time: all at once, dockerd would clean up after thousands of exits at the
    same moment.
    """
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_stop, containers))
    stopped = time.perf_counter() - t
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_remove_one, containers))
    return {"stop_s": round(stopped, 1), "remove_s": round(time.perf_counter() - t - stopped, 1)}


def _stop(container) -> None:
    """SIGKILL to the container's first process, then wait until dockerd has seen it exit.

    The kill is sent from here rather than through dockerd: `docker kill` costs a runc process
    more (its mount-table reads too) for the same signal. The PID is checked to be in the
    container's cgroup first; a container whose PID cannot be confirmed is killed by dockerd.
    """
    pid = (container.attrs.get("State") or {}).get("Pid") or 0
    try:
        if pid and container.id in Path(f"/proc/{pid}/cgroup").read_text():
            os.kill(pid, signal.SIGKILL)
        else:
            container.kill()
    except (ProcessLookupError, FileNotFoundError):
        pass  # already gone
    except docker.errors.APIError as e:
        if e.status_code not in (404, 409):  # gone, or not running
            raise
    try:
        container.wait()
    except docker.errors.NotFound:
        pass


def _still_there(cp) -> bool:
    """Whether Dolly still lists checkpoint ``cp`` (it keeps them past their container)."""
    try:
        return any(c.name == cp.name for c in dolly.list_checkpoints(cp.container_id, cp.client))
    except dolly.errors.ContainerNotFound:
        return False


def _remove_one(container) -> None:
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass


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
    print(f"could not remove network {net.name}: stale endpoints (restart dockerd to clear them)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clones", type=int, default=2300)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--on-bridge", type=int, default=ON_BRIDGE, help="clones on Docker's default bridge")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    client = docker.from_env(timeout=600)
    result = run(client, args.clones, batch=args.batch, workers=args.workers, on_bridge=args.on_bridge,
                 on_batch=lambda b: print(f"  {b}", flush=True))
    print(json.dumps({k: v for k, v in result.items() if k != "batches"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
