"""A second Docker Engine on this machine, started and stopped by the tests themselves.

Its own data root, exec root, socket and pid file, and no iptables rules, so that it never
touches the main engine. Used as an engine that lacks experimental mode, and as a second host.

IsolatedEngine goes further: a Docker Engine in a mount namespace of its own, whose files this
process cannot see, like an engine on another host (optionally reached over TCP with TLS).
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import docker
import docker.tls


def _end(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to a dockerd we started and wait for it, killing it after 30 s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
        if self.proc is not None:
            _end(self.proc, sig)
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


# --- Engines that behave like other hosts ----------------------------------------------------------

def _mount_ns(pid: int) -> Optional[tuple]:
    """The mount namespace of process ``pid`` as (device, inode), or None if it is gone."""
    try:
        st = os.stat(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (dead, waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _pids_in_mount_ns(ns: tuple) -> List[int]:
    """The live processes in mount namespace ``ns``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _mount_ns(int(entry)) == ns and _alive(int(entry)):
            pids.append(int(entry))
    return pids


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def make_tls_files(folder: Path, server_ip: str) -> dict:
    """A CA, a server certificate for ``server_ip`` (as an IP SAN) and a client certificate, all
    signed by that CA, written as PEM files into ``folder``; returns their paths by role."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key, cert) -> tuple:
        key_path, cert_path = folder / f"{stem}-key.pem", folder / f"{stem}.pem"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(cert_path), str(key_path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("dolly test CA")).issuer_name(name("dolly test CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    paths = {"ca": write("ca", ca_key, ca_cert)[0]}

    def leaf(stem: str, cn: str, usage, sans=None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert_path, key_path = write(stem, key, builder.sign(ca_key, hashes.SHA256()))
        paths[stem], paths[f"{stem}_key"] = cert_path, key_path

    leaf("server", server_ip, ExtendedKeyUsageOID.SERVER_AUTH, [x509.IPAddress(ipaddress.ip_address(server_ip))])
    leaf("client", "dolly test client", ExtendedKeyUsageOID.CLIENT_AUTH)
    return paths


class IsolatedEngine:
    """A Docker Engine that behaves like one on another host, on this machine.

    dockerd runs in a mount namespace of its own (``unshare --mount``), where its own folders are
    bind-mounted over ``/var/lib/docker`` (data root), ``/run/docker`` (exec root, containerd's
    state), ``/etc/docker`` (its daemon.json, and the key.json that dockerd creates there and
    takes its engine ID from) and ``/run/containerd`` (the shims' sockets). The paths it reports
    are the usual ones, but they are not this process's files: a file it writes in
    ``/var/lib/docker`` is not in the main engine's ``/var/lib/docker``. Copies of other engines'
    container mounts (overlays, network namespaces) are dropped from the new namespace first, so
    that it holds none of them alive.

    Networking is the host's: containers sit on a bridge of their own, with its own subnet,
    reachable from this process; no iptables rules. Its socket, ``/run/dolly-iso-<name>.sock``,
    is visible here. With ``tcp_tls``, it also listens on a loopback address over TCP with TLS,
    client certificates required (:meth:`tls_client`). Its containers run in the cgroup parent
    ``dolly-iso-<name>``, so that :meth:`stop` finds and kills them even when the engine is gone.

    ``images`` are copied into it from ``image_source`` (default: ``docker.from_env()``, the main
    engine) at start, through the API (docker save | docker load).

    With ``hide_checkout``, it is a host prepared without this repository: in its namespace, an
    empty tmpfs is mounted over this checkout, the virtualenv and the Python installation the
    virtualenv was made from (:meth:`checkout_paths`), before dockerd starts, so that nothing it
    runs (Dolly's agent among them) can use them.
    """

    def __init__(self, name: str, *, subnet: str, tcp_tls: bool = False,
                 images: Sequence[str] = ("dolly/busybox", "dolly/python"),
                 image_source: Optional[docker.DockerClient] = None, socket_label: bool = True,
                 hide_checkout: bool = False) -> None:
        """``subnet``: the bridge's address with its prefix length, like ``10.213.111.1/24``.
        ``socket_label``: give the engine its ``dolly.socket`` label; without it, the default
        socket path in its namespace, /var/run/docker.sock, is the *main* engine's (only
        /run/docker is its own), as on a host whose socket is elsewhere and unlabelled.
        ``hide_checkout``: hide :meth:`checkout_paths` from it (see the class)."""
        self.socket_label = socket_label
        self.hidden: tuple = tuple(self.checkout_paths()) if hide_checkout else ()
        self.name = name
        self.subnet = subnet
        self.tcp_tls = tcp_tls
        self.images = tuple(images)
        self.image_source = image_source
        self._own_source = False
        self.bridge = f"di-{name}"[:15]
        self.base = Path(f"/var/lib/dolly-iso-{name}")
        self.binds = {  # folder here -> where dockerd's namespace sees it
            self.base / "docker": "/var/lib/docker",
            self.base / "run": "/run/docker",
            self.base / "etc": "/etc/docker",
            self.base / "containerd": "/run/containerd",
        }
        self.socket = Path(f"/run/dolly-iso-{name}.sock")
        self.pidfile = Path(f"/run/dolly-iso-{name}.pid")
        self.cgroup_parent = f"dolly-iso-{name}"
        self.log = Path(f"/var/log/dolly/test-iso-{name}.log")
        self.tls_dir: Optional[Path] = None
        self.tls_files: dict = {}
        self.tcp_address: Optional[tuple] = None
        self.proc: Optional[subprocess.Popen] = None
        self.mount_ns: Optional[tuple] = None
        self.client: Optional[docker.DockerClient] = None
        self.ready_seconds: Optional[float] = None  # until dockerd answered
        self.startup_seconds: Optional[float] = None  # with the images copied in

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def tcp_url(self) -> str:
        if self.tcp_address is None:
            raise RuntimeError(f"engine {self.name} does not listen on TCP")
        return f"tcp://{self.tcp_address[0]}:{self.tcp_address[1]}"

    @property
    def data_root(self) -> Path:
        """Its data root as this process reaches it (dockerd itself calls it /var/lib/docker)."""
        return self.base / "docker"

    @staticmethod
    def checkout_paths() -> List[str]:
        """What a host prepared without this repository lacks: the checkout these tests run from,
        this process's virtualenv and the Python installation it was made from (not when that is
        a system folder, like Debian's /usr); outermost folders only."""
        import sys

        found = {str(Path(__file__).resolve().parent.parent), os.path.realpath(sys.prefix),
                 os.path.realpath(sys.base_prefix)}
        found -= {"/", "/usr", "/usr/local", "/opt", "/root", "/home"}
        outer: List[str] = []
        for p in sorted(found):
            if not any(p == o or p.startswith(o.rstrip("/") + "/") for o in outer):
                outer.append(p)
        return outer

    def tls_client(self, *, client_cert: bool = True, **kwargs) -> docker.DockerClient:
        """A client over TCP that verifies the engine's certificate against the test CA and
        presents its own (without ``client_cert``: presents none, which the engine refuses)."""
        tls = docker.tls.TLSConfig(
            client_cert=(self.tls_files["client"], self.tls_files["client_key"]) if client_cert else None,
            ca_cert=self.tls_files["ca"], verify=True)
        # The API version is given, so that the constructor makes no request before trust_env is
        # off: with it on, requests takes REQUESTS_CA_BUNDLE (or CURL_CA_BUNDLE) from the
        # environment over the client's own CA, and then rejects the engine's certificate.
        version = self.client.api.api_version if self.client is not None else "1.41"
        client = docker.DockerClient(base_url=self.tcp_url, tls=tls, **{"timeout": 120, "version": version, **kwargs})
        client.api.trust_env = False
        return client

    # --- start ---------------------------------------------------------------------------------

    def start(self) -> docker.DockerClient:
        began = time.monotonic()
        self._reap_stale()
        for folder in self.binds:
            folder.mkdir(parents=True, exist_ok=True)
        # The label tells Dolly's agent where this engine's socket is on its host (as `make host`
        # says /var/run/docker.sock for a host's main engine).
        config = {"experimental": True, "runtimes": {"dolly": {"path": "/usr/local/sbin/dolly-runc"}},
                  "default-runtime": "dolly", "cgroup-parent": self.cgroup_parent,
                  "labels": [f"dolly.socket={self.socket}"] if self.socket_label else []}
        (self.base / "etc" / "daemon.json").write_text(json.dumps(config, indent=2))
        self.log.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ip", "link", "add", "name", self.bridge, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "add", self.subnet, "dev", self.bridge], check=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)
        hosts = ["-H", self.url]
        if self.tcp_tls:
            ip = f"127.0.0.{2 + zlib.crc32(self.name.encode()) % 250}"
            self.tcp_address = (ip, _free_port(ip))
            self.tls_dir = Path(tempfile.mkdtemp(prefix=f"dolly-iso-{self.name}-tls-"))
            self.tls_files = make_tls_files(self.tls_dir, ip)
            hosts += ["-H", f"tcp://{ip}:{self.tcp_address[1]}", "--tlsverify",
                      "--tlscacert", self.tls_files["ca"], "--tlscert", self.tls_files["server"],
                      "--tlskey", self.tls_files["server_key"]]
        dockerd = ["dockerd", *hosts, "--pidfile", str(self.pidfile), "--bridge", self.bridge,
                   "--iptables=false", "--ip-masq=false"]
        # In the new namespace: drop the copies of other engines' mounts (container root
        # filesystems, network namespaces, shm), then put this engine's folders in place.
        script = (
            "awk '$3 == \"overlay\" || $3 == \"nsfs\" || $2 ~ \"^/(var/lib|run)/(docker/|containerd/|dolly-)\""
            " {print $2}' /proc/self/mounts | sort -r | while read -r m; do umount -l \"$m\" 2>/dev/null; done; "
            # A host without this checkout: empty folders where it and its Python are here.
            + "".join(f"mount -t tmpfs -o size=1m,mode=0755 dolly-hidden {shlex.quote(p)} && " for p in self.hidden)
            + "mkdir -p " + " ".join(self.binds.values()) + " && "
            + " && ".join(f"mount --bind {shlex.quote(str(src))} {dst}" for src, dst in self.binds.items())
            + " && exec " + " ".join(shlex.quote(a) for a in dockerd)
        )
        with open(self.log, "ab") as log:
            log.write(f"\n--- {time.ctime()}: {script}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.client = self._wait_for_engine()
            self.ready_seconds = time.monotonic() - began
            self.mount_ns = _mount_ns(self.proc.pid)
            if self.mount_ns is None or self.mount_ns == _mount_ns(os.getpid()):
                raise RuntimeError(f"dockerd {self.name} runs in this process's mount namespace")
            self._check_identity()
            self._copy_images()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self.client

    def _wait_for_engine(self) -> docker.DockerClient:
        deadline = time.monotonic() + 90
        ours = _mount_ns(os.getpid())
        while time.monotonic() < deadline:
            if self.mount_ns is None:  # known as soon as unshare made it: stop() needs it
                ns = _mount_ns(self.proc.pid)
                self.mount_ns = ns if ns != ours else None
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd {self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                client = docker.DockerClient(base_url=self.url, timeout=120)
                client.ping()
                return client
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"dockerd {self.name} did not answer within 90 s: {self.log.read_text()[-3000:]}")

    def _main_client(self) -> docker.DockerClient:
        if self.image_source is None:
            self.image_source = docker.from_env(timeout=300)
            self._own_source = True
        return self.image_source

    def _check_identity(self) -> None:
        """Its own key.json, hence its own engine ID; its own data root, reported as the usual."""
        info = self.client.info()
        if not (self.base / "etc" / "key.json").is_file():
            raise RuntimeError(f"dockerd {self.name} made no key.json in its own /etc/docker")
        if info["DockerRootDir"] != "/var/lib/docker":
            raise RuntimeError(f"dockerd {self.name} reports data root {info['DockerRootDir']}")
        try:
            main_id = self._main_client().info()["ID"]
        except Exception:  # no main engine to compare with
            return
        if info["ID"] == main_id:
            raise RuntimeError(f"dockerd {self.name} has the main engine's ID {main_id}")

    def _copy_images(self) -> None:
        if not self.images:
            return
        from dolly._engine import Engine

        source = Engine.of(self._main_client())
        target = Engine.of(self.client)
        for name in self.images:
            image = self._main_client().images.get(name)
            target.ensure_image(image.id, name, source=source, tag=True)

    # --- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Remove its containers, end dockerd, its containerd and shims (the mount namespace and
        its mounts end with them), kill whatever is left in its cgroups, delete its folders,
        socket and bridge. Safe to call more than once, and after a failed start."""
        if self.client is not None:
            try:
                for c in self.client.containers.list(all=True):
                    c.remove(force=True, v=True)
            except Exception:  # the engine is gone; its containers are killed below
                pass
            self.client.close()
            self.client = None
        if self.proc is not None:
            if self.mount_ns is None:
                self.mount_ns = _mount_ns(self.proc.pid)
            _end(self.proc, signal.SIGTERM)
            self.proc = None
        self._end_everything(self.mount_ns)
        self.mount_ns = None
        if self.tls_dir is not None:
            shutil.rmtree(self.tls_dir, ignore_errors=True)
            self.tls_dir = None
        if self._own_source:
            self.image_source.close()
            self.image_source = None
            self._own_source = False

    def kill(self) -> None:
        """The host disappears: every process of its mount namespace (dockerd, containerd, the
        shims) is killed at once. ``stop`` clears up after it."""
        if self.proc is None:
            return
        if self.mount_ns is None:
            self.mount_ns = _mount_ns(self.proc.pid)
        for pid in _pids_in_mount_ns(self.mount_ns) if self.mount_ns else [self.proc.pid]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _reap_stale(self) -> None:
        """What a crashed run with the same name left behind: any mount namespace where this
        engine's data root is bound over /var/lib/docker (its dockerd, or the containerd and
        shims that outlived it), its containers, folders and bridge."""
        ours = _mount_ns(os.getpid())
        seen = {ours}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            ns = _mount_ns(int(entry))
            if ns is None or ns in seen:
                continue
            seen.add(ns)
            try:
                mountinfo = Path(f"/proc/{entry}/mountinfo").read_text().splitlines()
            except OSError:
                continue
            if any(f[3] == str(self.base / "docker") and f[4] == "/var/lib/docker"
                   for f in (line.split() for line in mountinfo) if len(f) > 4):
                self._end_everything(ns)
        self._end_everything(None)

    def _end_everything(self, ns: Optional[tuple]) -> None:
        if ns is not None and ns != _mount_ns(os.getpid()):
            # containerd, the shims, and any runc or CRIU they run, are all in the namespace.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                pids = _pids_in_mount_ns(ns)
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)
        self._kill_cgroups()
        for _ in range(50):
            try:
                shutil.rmtree(self.base)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        else:
            shutil.rmtree(self.base, ignore_errors=True)
        for p in (self.socket, self.pidfile):
            p.unlink(missing_ok=True)
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)

    def _kill_cgroups(self) -> None:
        """Containers outlive a killed containerd: kill what is in its cgroup parent, thawing
        frozen ones first (a frozen task dies only when thawed), then remove the cgroups."""
        roots = [d for d in Path("/sys/fs/cgroup").glob(f"*/{self.cgroup_parent}") if d.is_dir()]
        roots += [d for d in [Path("/sys/fs/cgroup") / self.cgroup_parent] if d.is_dir()]  # cgroup v2
        deadline = time.monotonic() + 15
        while roots and time.monotonic() < deadline:
            left = False
            for root in roots:
                for group in sorted((d for d in [root, *root.rglob("*")] if d.is_dir()),
                                    key=lambda d: len(d.parts), reverse=True):
                    state = group / "freezer.state"
                    if state.exists():
                        with contextlib.suppress(OSError):
                            state.write_text("THAWED")
                    with contextlib.suppress(OSError):
                        for pid in (group / "cgroup.procs").read_text().split():
                            with contextlib.suppress(OSError):
                                os.kill(int(pid), signal.SIGKILL)
                    try:
                        group.rmdir()
                    except FileNotFoundError:
                        pass
                    except OSError:
                        left = True
            if not left:
                break
            time.sleep(0.1)


def isolated(name: str, subnet: str, **kwargs) -> Iterator[IsolatedEngine]:
    """An :class:`IsolatedEngine` started for a fixture and stopped after it (``yield from`` it)."""
    engine = IsolatedEngine(name, subnet=subnet, **kwargs)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()
