"""A second Docker Engine on this machine, started and stopped by the tests themselves.

Its own data root, exec root, socket and pid file, and no iptables rules, so that it never
touches the main engine. Used as an engine that lacks experimental mode, and as a second host.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import docker


class SecondEngine:
    def __init__(self, name: str, *, experimental: bool, subnet: str, live_restore: bool = False) -> None:
        """``subnet``: the bridge's address with its prefix length, like ``10.213.100.1/24``.
        ``live_restore``: containers keep running while dockerd is down (for restart tests)."""
        self.name = name
        self.experimental = experimental
        self.live_restore = live_restore
        # Its own bridge, always: dockerd started with `--bridge none` deletes docker0, the main
        # engine's bridge, at start-up.
        self.bridge = f"dt-{name}"[:15]
        self.subnet = subnet
        self.data_root = Path(f"/var/lib/dolly-test-{name}")
        self.exec_root = Path(f"/run/dolly-test-{name}")
        self.socket = Path(f"/run/dolly-test-{name}.sock")
        self.pidfile = Path(f"/run/dolly-test-{name}.pid")
        self.config = Path(f"/run/dolly-test-{name}.json")
        self.log = Path(f"/var/log/dolly/test-engine-{name}.log")
        self.proc: Optional[subprocess.Popen] = None
        self.client: Optional[docker.DockerClient] = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def containerd_socket(self) -> Path:
        return self.exec_root / "containerd" / "containerd.sock"

    def content_blobs(self) -> dict:
        """The blobs containerd's content store holds for this engine: digest -> size in bytes."""
        out = subprocess.run(["ctr", "--address", str(self.containerd_socket), "-n", "moby", "content", "ls"],
                             capture_output=True, text=True, check=True).stdout
        units = {"B": 1, "kB": 1e3, "KiB": 1024, "MB": 1e6, "MiB": 2**20, "GB": 1e9, "GiB": 2**30}
        blobs = {}
        for line in out.splitlines()[1:]:
            digest, size = line.split()[:2]
            number = "".join(ch for ch in size if ch.isdigit() or ch == ".")
            blobs[digest] = float(number) * units.get(size[len(number):], 1)
        return blobs

    def start(self) -> docker.DockerClient:
        config = {"experimental": self.experimental, "live-restore": self.live_restore}
        if self.experimental:
            config.update({"runtimes": {"dolly": {"path": "/usr/local/sbin/dolly-runc"}},
                           "default-runtime": "dolly"})
        self.config.write_text(json.dumps(config))
        self.log.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)  # a stale one
        subprocess.run(["ip", "link", "add", "name", self.bridge, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "add", self.subnet, "dev", self.bridge], check=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)
        return self._launch()

    def restart(self, *, down_for: float = 0.0) -> None:
        """Stop dockerd (SIGTERM) and start it again; with live_restore, containers keep running."""
        self._end_daemon(signal.SIGTERM)
        time.sleep(down_for)
        self._launch()

    def kill(self) -> None:
        """The engine disappears: dockerd and its containerd are killed."""
        self._end_daemon(signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", f"containerd --config {self.exec_root}"], check=False)

    def _end_daemon(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _launch(self) -> docker.DockerClient:
        cmd = [
            "dockerd", "--config-file", str(self.config),
            "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
            "-H", f"unix://{self.socket}", "--pidfile", str(self.pidfile),
            "--bridge", self.bridge, "--iptables=false", "--ip-masq=false",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd {self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                client = docker.DockerClient(base_url=f"unix://{self.socket}", timeout=120)
                client.ping()
                self.client = client
                return client
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"dockerd {self.name} did not answer within 60 s")

    def stop(self) -> None:
        if self.client is not None:
            try:
                for c in self.client.containers.list(all=True):
                    c.remove(force=True, v=True)
            except Exception:  # the engine was killed; its leftovers go with its folders below
                pass
            self.client.close()
            self.client = None
        self._end_daemon(signal.SIGTERM)
        # Shims and containerd outlive a killed dockerd.
        subprocess.run(["pkill", "-KILL", "-f", str(self.exec_root)], check=False)
        # Anything still mounted below the data root (overlays, netns) goes before the folder.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith((str(self.data_root), str(self.exec_root)))]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        for p in (self.data_root, self.exec_root):
            shutil.rmtree(p, ignore_errors=True)
        for p in (self.socket, self.pidfile, self.config):
            p.unlink(missing_ok=True)
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)
