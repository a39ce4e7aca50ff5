"""The agent: Dolly's host-side steps, run beside the files of an engine on another host.

Dolly reaches an engine's host through that engine's API only: no SSH of its own, no shared
filesystem. When an engine's files are not this process's to see (:mod:`dolly._hosts` decides:
another host, or another mount namespace), Dolly keeps one small container on that engine, the
agent, and runs its own functions there with ``exec`` (``python3 -m dolly._hosts.serve OP``,
see :mod:`dolly._hosts.channel`), where the engine's data root is mounted at its own path and
the engine's socket is at hand:

    name        dolly-agent-<fingerprint>, labelled dolly.agent=<protocol> and with its digest
                (below); started on demand, kept warm
    image       dolly/agent:<version>: dolly/python (Debian 12's userland and python3) with
                this very Dolly and its dependencies in /opt/dolly/lib, copied from this
                installation (:mod:`dolly._hosts.agent_image`); put on the engine when it lacks
                it, copied from an engine of the caller's or made there, through the API.
                Nothing of the caller's host is mounted: that host needs no checkout, no
                virtualenv, no Python of its own for Dolly
    executes    /usr/bin/python3 -m dolly._hosts.serve OP ARGS, the image's Python, one exec
                per operation
    mounts      the data root (same path), the engine's socket (the engine's label
                ``dolly.socket``, else /var/run/docker.sock), /var/log/dolly, /run/dolly
    runs as     root with the capabilities file work needs (not privileged), the host's PID
                namespace, no network, runtime runc: what Dolly does as root on a local engine's
                host, no more

The agent is known, not named: anyone who can create containers on the engine can create one
under its name. Each install has a secret, made once on the calling side (:func:`secret_dir`,
private to the user); the agent carries an HMAC of its whole configuration and engine under that
secret (``dolly.agent.digest``). Its name, ``dolly-agent-<fingerprint>``, is of the protocol, the
image's version and the secret's key ID: two Dollies (two versions, two users, two machines)
never share or replace each other's agent. Whenever an :class:`Agent` resolves its container it
checks, with one inspect, the digest and every field that decides what the container can do
(image by ID, command, environment, binds and mounts, capabilities, privileges, security options,
namespaces, runtime), against what the engine's labels say now; and, with one exec of the image's
Python (``-I -S``: its standard library only), that the socket the agent mounts reaches the
engine that runs it (it finds itself by its full container ID). An image whose Python does not
run there (exit 126 or 127) is said to be so, with what to do. Anything else under the name is
removed and replaced, never used; an engine whose socket cannot be found (no ``dolly.socket``
label, and the default path is another engine's) is refused. A container's configuration cannot
change once made, so the ID resolved stays checked.

Results come back as one JSON line on stdout; a Dolly error comes back by its class name and
message and is raised here as the same class. Bundles travel over the exec's stdout (export) and
stdin (import) as plain tar streams: signing, verifying, compression and encryption happen in the
calling process, so no key leaves it (see :mod:`dolly._bundle`).
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import docker

from .. import _retry as retry, policy
from .._engine import Engine, translate_errors
from ..errors import HostNotReady
from . import agent_image
from .agent_image import PYTHON

log = logging.getLogger("dolly")

# 3: the agent runs its own image (agent_image), nothing of the caller's host mounted.
PROTOCOL = "3"
NAME = "dolly-agent"
LABEL = "dolly.agent"
# The keyed digest that makes a container Dolly's agent (see AgentSpec.digest). Anyone who can
# reach the engine reads it with `docker inspect`: it proves who made the container for which
# configuration and engine, and copying it onto another container proves nothing more, because
# that container's configuration is checked against the one the digest covers.
DIGEST_LABEL = "dolly.agent.digest"
SOCKET_LABEL = "dolly.socket"
# What root has on the engine's host, as Dolly does there: files (DAC_*, FOWNER, CHOWN, FSETID),
# overlay whiteouts (MKNOD) and trusted.* attributes (SYS_ADMIN), other processes (SYS_PTRACE)
# and what `criu check` looks for. Not CAP_SYS_RESOURCE: some hosts' root lacks it (VMs, CI
# sandboxes), and a container that asks for it (as privileged ones do) is refused there. Only
# names Docker 20.10 knows (not BPF, PERFMON, CHECKPOINT_RESTORE).
AGENT_CAPABILITIES = ["AUDIT_CONTROL", "AUDIT_READ", "AUDIT_WRITE", "BLOCK_SUSPEND", "CHOWN",
                      "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "IPC_LOCK",
                      "IPC_OWNER", "KILL", "LEASE", "LINUX_IMMUTABLE", "MAC_ADMIN", "MAC_OVERRIDE",
                      "MKNOD", "NET_ADMIN", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_RAW",
                      "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_ADMIN", "SYS_BOOT",
                      "SYS_CHROOT", "SYS_MODULE", "SYS_NICE", "SYS_PACCT", "SYS_PTRACE",
                      "SYS_RAWIO", "SYS_TIME", "SYS_TTY_CONFIG", "SYSLOG", "WAKE_ALARM"]


class Agent:
    """The agent of one engine: its container, made and checked. The engine's
    :class:`~dolly._hosts.channel.Channel` holds it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._id: Optional[str] = None
        self._starting = threading.Lock()

    # --- the container ---------------------------------------------------------------------------

    def container_id(self) -> str:
        """The running agent's ID, started on demand. Each Dolly (its image's version and its
        secret) has its own agent, ``dolly-agent-<fingerprint>``: two installs never replace each
        other's; two processes starting it at once share the one the engine made first.

        Raises:
            HostNotReady: the image cannot be put on the engine (see :func:`agent_image.ensure`),
                the agent does not start, a container under its name is not Dolly's agent and
                cannot be replaced, the engine's socket cannot be told (see
                :meth:`_find_or_start`), or this runs inside an agent.
        """
        if self._id is not None:
            return self._id
        if os.environ.get("DOLLY_AGENT") == "1":
            # Inside an agent, its own engine's files are local by construction: when they are
            # not, its socket is another engine's, and an agent started from here would act there.
            raise HostNotReady("Dolly's agent reached an engine whose files it does not hold: the socket it "
                               "mounts is not its own engine's (set the engine's dolly.socket label)")
        with self._starting:  # this process's threads (prewarm's among them) start it once
            if self._id is not None:
                return self._id
            return self._find_or_start()

    def _find_or_start(self) -> str:
        """Find this install's agent and prove it is Dolly's own before anything is run in it,
        else make one (see :func:`_verify` for what is checked, and why).

        Raises:
            HostNotReady: no image, an agent that does not start or whose Python does not run, a
                container under the agent's name that is not Dolly's and cannot be removed, or an
                engine whose socket, as the agent mounts it, reaches another engine (set
                ``dolly.socket``).
        """
        api = self.engine.api
        name = agent_name()
        secret = agent_secret()
        with translate_errors():
            spec = self._spec()
            try:
                found: Optional[Dict[str, Any]] = api.inspect_container(name)
            except docker.errors.NotFound:
                found = None
            if found is not None:
                wrong = _mismatch(found, spec, secret) or ("" if found["State"]["Running"] else "it is not running")
                if not wrong:
                    wrong = self._socket_mismatch(found, spec, secret)
                if wrong:
                    # Dolly's own agent made for another configuration (an older label, another
                    # image), a stopped one, or a container someone else put under this name:
                    # never used; this engine is the caller's to drive, so it is replaced.
                    log.warning("replacing the container %s on %s: %s", name, api.base_url, wrong)
                    self._remove_found(found, wrong)
                    found = None
            if found is None:
                found = self._start(name, spec, secret)
                wrong = _mismatch(found, spec, secret) or self._socket_mismatch(found, spec, secret)
                if wrong:
                    if "reaches another engine" in wrong or "cannot reach" in wrong:
                        self._remove_found(found, wrong)
                        raise HostNotReady(_socket_advice(self.engine, spec, wrong))
                    raise HostNotReady(f"the container {name} on {api.base_url} is not the agent Dolly made: "
                                       f"{wrong}")
        self._id = str(found["Id"])
        return self._id

    def _spec(self) -> AgentSpec:
        """What this install's agent on this engine must be, from the engine's current labels
        (read again, so that an agent made before a label changed is seen to differ), and its
        image, put on the engine first when it lacks it.

        Raises:
            HostNotReady: the image is not there and cannot be put there (see
                :func:`agent_image.ensure`).
        """
        info = self.engine.info(refresh=True)
        image = agent_image.ensure(self.engine, lock=secret_dir() / "image.lock")
        return AgentSpec.of(info, image)

    def _remove_found(self, found: Dict[str, Any], why: str) -> None:
        """Remove a container found under the agent's name.

        Raises:
            HostNotReady: the engine refuses to remove it (the message says what it was).
        """
        try:
            self.engine.api.remove_container(found["Id"], force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            raise HostNotReady(f"the container {found.get('Name', '').lstrip('/')} ({found['Id'][:12]}) on "
                               f"{self.engine.api.base_url} is under the name of Dolly's agent but is not "
                               f"Dolly's agent ({why}), and it cannot be removed: {e}") from e

    def _socket_mismatch(self, found: Dict[str, Any], spec: AgentSpec, secret: bytes) -> str:
        """Why the engine that the agent's mounted socket reaches is not the engine that runs it,
        or "" when it is. Asked from inside the agent: it looks itself up, by its full container
        ID, through that socket. Container IDs are 256 random bits, so finding itself there, with
        the same digest, proves the same engine; the engine ID alone would not (engines sharing
        /etc/docker report the same one). One exec of the stdlib Python, no import of Dolly."""
        api = self.engine.api
        command = [PYTHON, "-I", "-S", "-c", _WHOAMI, found["Id"], DIGEST_LABEL]
        exec_id = api.exec_create(found["Id"], command, stdout=True, stderr=True)["Id"]
        out, err = api.exec_start(exec_id, demux=True)
        code = exit_code(api, exec_id)
        if code in (126, 127):
            # Not the socket: the image's own Python does not run. Replacing the container would
            # not help; the image is what to fix.
            agent = (f"Dolly's agent {found.get('Name', '').lstrip('/')} on {api.base_url} (image "
                     f"{found.get('Image', '')[:19]})")
            raise HostNotReady(cannot_exec(agent, code, command, err or b""))
        try:
            seen = json.loads((out or b"").decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            seen = None
        if code != 0 or not isinstance(seen, dict):
            return (f"the agent cannot reach an engine through the socket it mounts ({spec.socket} on the "
                    f"engine's host): {(err or b'').decode(errors='replace')[-300:]}")
        if seen.get("status") != 200:
            return (f"the socket it mounts ({spec.socket} on the engine's host) reaches another engine: "
                    f"container {found['Id'][:12]} is not there (status {seen.get('status')})")
        if seen.get("id") != found["Id"] or not hmac.compare_digest(str(seen.get("digest")), spec.digest(secret)):
            return (f"the socket it mounts ({spec.socket} on the engine's host) reaches another engine: "
                    "it shows another container under this ID")
        return ""

    def _start(self, name: str, spec: AgentSpec, secret: bytes) -> Dict[str, Any]:
        """Create and start the agent as ``spec`` says, labelled with its digest.

        Raises:
            HostNotReady: through the caller, when what was made does not check out.
            EngineError: the engine refuses to create or start it.
        """
        api = self.engine.api
        # Not privileged: a privileged container asks for every capability, and hosts whose root
        # lacks one (CAP_SYS_RESOURCE, on some VMs and CI sandboxes) refuse to start it.
        host_config = api.create_host_config(binds=list(spec.binds), cap_add=list(spec.capabilities),
                                             pid_mode="host", security_opt=list(spec.security_opt),
                                             network_mode="none", runtime="runc",
                                             restart_policy={"Name": "unless-stopped"})
        try:
            created = api.create_container(
                spec.image_id, list(spec.command), name=name, host_config=host_config, environment=dict(spec.env),
                labels={LABEL: PROTOCOL, DIGEST_LABEL: spec.digest(secret)},
                use_config_proxy=False)  # not the caller's proxies from ~/.docker: the spec's env only
        except docker.errors.APIError as e:
            if e.status_code != 409:
                raise
            # Another process made it first: checked as any found, once that process started it.
            deadline = time.monotonic() + 30
            while True:
                found: Dict[str, Any] = api.inspect_container(name)
                if found["State"]["Running"] or time.monotonic() > deadline:
                    return found
                time.sleep(0.1)
        try:
            api.start(created["Id"])
        except docker.errors.APIError:
            api.remove_container(created["Id"], force=True)
            raise
        return api.inspect_container(created["Id"])

    def forget(self) -> None:
        """Look the container up again on next use (the engine lost it: a restart, a removal)."""
        self._id = None

    def remove(self) -> None:
        """Stop and remove the agent (it is started again when needed)."""
        self._id = None
        with contextlib.suppress(docker.errors.NotFound):
            self.engine.api.remove_container(agent_name(), force=True)


def exit_code(api: Any, exec_id: str) -> Optional[int]:
    """The exec's exit code, once the engine has seen it end (its output ends a moment before)."""
    try:
        for attempt in retry.exec_end():
            with attempt:
                with translate_errors():
                    state = api.exec_inspect(exec_id)
                if state["Running"]:
                    raise retry.StillRunning(exec_id)
                return state["ExitCode"]
    except retry.StillRunning:
        return None
    return None  # pragma: no cover


def _label(info: Mapping[str, Any], key: str) -> Optional[str]:
    for label in info.get("Labels") or []:
        k, _, v = str(label).partition("=")
        if k == key:
            return v
    return None


def cannot_exec(agent: str, code: Optional[int], command: List[str], err: bytes) -> str:
    """What to say when an exec in the agent (``agent`` says which) could not start its command:
    exit 126, found but not executable; 127, not found."""
    why = "is not executable there" if code == 126 else "is not there"
    return (f"{agent} cannot run {' '.join(command[:3])}: {command[0]} {why} (exit {code}). The agent runs its "
            f"image's own Python ({PYTHON}, Dolly in {agent_image.PREFIX}); remove the image "
            f"({agent_image.REPOSITORY}:<version>) and the agent's container, and Dolly makes them again. "
            f"{err.decode(errors='replace')[-500:]}")


def _fingerprint(key_id: str) -> str:
    """Which Dolly an agent runs: its protocol, its image's version (Dolly's version and the
    hash of every file it ships) and the ID of its secret, as a short name part."""
    return hashlib.sha256(f"{PROTOCOL}:{agent_image.version()}:{key_id}".encode()).hexdigest()[:12]


# --- knowing the agent ------------------------------------------------------------------------------

SECRET_FILE = "secret"


def secret_dir() -> Path:
    """Where this side keeps the secret its agents are made with: Dolly's own state folder on the
    calling machine (never the engine's host, which the agent's engine may not be), root's
    ``/var/lib/dolly/agent``, else this user's ``$XDG_STATE_HOME/dolly/agent``."""
    if os.geteuid() == 0:
        return Path("/var/lib/dolly/agent")
    state = os.environ.get("XDG_STATE_HOME")
    if not state:
        try:
            state = str(Path.home() / ".local" / "state")
        except (RuntimeError, KeyError):  # no HOME, and no passwd entry for this user
            raise HostNotReady(f"Dolly keeps the secret it makes its agents with in $XDG_STATE_HOME/dolly/agent "
                               f"or ~/.local/state/dolly/agent, and this user (uid {os.geteuid()}) has neither: "
                               "set XDG_STATE_HOME or HOME") from None
    return Path(state) / "dolly" / "agent"


def agent_secret() -> bytes:
    """This install's 32-byte secret, made once: a folder only its owner can enter (0700), a file
    only its owner can read (0600), both owned by this user. Written beside its place and linked
    there, so that two processes making it at once agree on the first one made.

    Raises:
        HostNotReady: the folder or the file is someone else's, or others can read or write it
            (then the secret is no secret), or the file is damaged.
    """
    folder = secret_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise HostNotReady(f"Dolly keeps the secret it makes its agents with in {folder}, which this user "
                           f"(uid {os.geteuid()}) cannot make: {e.strerror}. Set XDG_STATE_HOME (or HOME) to a "
                           "folder of this user's") from e
    path = folder / SECRET_FILE
    _private(folder, stat.S_ISDIR)
    if not path.exists():
        tmp = folder / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # the first one made wins
        finally:
            tmp.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        _private(path, stat.S_ISREG, os.fstat(f.fileno()))
        data = f.read(64)
    if len(data) != 32:
        raise HostNotReady(f"{path}, the secret Dolly makes its agents with, is damaged ({len(data)} bytes, "
                           "not 32): remove it, and Dolly makes a new one (and new agents)")
    return data


def _private(path: Path, kind: Callable[[int], bool], st: Optional[os.stat_result] = None) -> None:
    """Raises:
        HostNotReady: ``path`` is not of ``kind``, not this user's, or open to others.
    """
    st = st if st is not None else os.lstat(path)
    if not kind(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise HostNotReady(f"{path} holds the secret Dolly makes its agents with, but it is not private to "
                           f"this user (mode {stat.filemode(st.st_mode)}, owner {st.st_uid}): make it "
                           f"{'0700' if kind is stat.S_ISDIR else '0600'} and owned by uid {os.geteuid()}, "
                           "or remove it")


def agent_name() -> str:
    """The agent's name: each install (protocol, image version, secret) has its own, so that two
    never replace each other's, even two machines driving one engine with the same Dolly."""
    key_id = hmac.new(agent_secret(), b"dolly agent name", hashlib.sha256).hexdigest()[:16]
    return f"{NAME}-{_fingerprint(key_id)}"


# Run in the agent with its Python's standard library only (-I -S: no Dolly, no site): look the
# agent's own container up, by the full ID it is given, through the socket it mounts.
_WHOAMI = """
import http.client, json, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect("/var/run/docker.sock")
c = C("localhost")
c.request("GET", "/containers/" + sys.argv[1] + "/json")
r = c.getresponse()
body = r.read()
out = {"status": r.status}
if r.status == 200:
    d = json.loads(body)
    out.update(id=d["Id"], digest=((d.get("Config") or {}).get("Labels") or {}).get(sys.argv[2]))
print(json.dumps(out))
"""


@dataclass(frozen=True)
class AgentSpec:
    """What this install's agent on one engine is: everything about the container that decides
    what it can do and what runs in it, and the engine it is for. Computed from the engine's
    current ``docker info`` and image, compared field by field with the container found."""

    image_id: str
    command: Tuple[str, ...]
    env: Tuple[Tuple[str, str], ...]  # ours, set over the image's
    image_env: Tuple[Tuple[str, str], ...]
    binds: Tuple[str, ...]
    capabilities: Tuple[str, ...]
    security_opt: Tuple[str, ...]
    socket: str
    engine: Tuple[str, str, str]  # the engine's ID, name and data root, as it reports them

    @classmethod
    def of(cls, info: Mapping[str, Any], image: Mapping[str, Any]) -> AgentSpec:
        root = str(info["DockerRootDir"])
        engine_socket = _label(info, SOCKET_LABEL) or "/var/run/docker.sock"
        # Nothing of the caller's host: the image holds Dolly (agent_image).
        binds = [f"{root}:{root}", f"{engine_socket}:/var/run/docker.sock", "/var/log/dolly:/var/log/dolly",
                 "/run/dolly:/run/dolly"]
        env = {"DOLLY_AGENT": "1", "PYTHONPATH": agent_image.PREFIX, "PYTHONDONTWRITEBYTECODE": "1"}
        return cls(image_id=str(image["Id"]), command=("sleep", "infinity"), env=tuple(sorted(env.items())),
                   image_env=tuple(sorted(_env((image.get("Config") or {}).get("Env")).items())),
                   binds=tuple(binds), capabilities=tuple(AGENT_CAPABILITIES),
                   security_opt=("seccomp=unconfined", "apparmor=unconfined"), socket=engine_socket,
                   engine=(str(info.get("ID")), str(info.get("Name")), root))

    def digest(self, secret: bytes) -> str:
        """HMAC-SHA256, keyed with this install's secret, of the whole spec and the agent's name:
        only this install can make it; it binds the configuration and the engine."""
        body = json.dumps({"protocol": PROTOCOL, "name": agent_name(), "spec": self.__dict__}, sort_keys=True,
                          default=list)
        return hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()


def _env(pairs: Any) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for pair in pairs or []:
        k, _, v = str(pair).partition("=")
        out[k] = v
    return out


def _caps(value: Any) -> List[str]:
    return sorted(str(c).upper().removeprefix("CAP_") for c in value or [])


def _own(mode: Any) -> bool:
    """A namespace mode that is the container's own (not the host's, nor another container's)."""
    return not str(mode or "").startswith(("host", "container:"))


def _mismatch(found: Mapping[str, Any], spec: AgentSpec, secret: bytes) -> str:
    """Why the container ``found`` (its ``docker inspect``) is not the agent ``spec`` describes,
    or "" when it is. The digest proves this install made it for this spec; the fields prove the
    container is what the spec says, so that the digest, which anyone can read and copy onto a
    container of their own, is worth nothing on another configuration."""
    config, host = found.get("Config") or {}, found.get("HostConfig") or {}
    labels = config.get("Labels") or {}
    digest = labels.get(DIGEST_LABEL)
    if not digest or not hmac.compare_digest(str(digest), spec.digest(secret)):
        return ("its digest label is missing or was not made by this Dolly for this engine and configuration "
                "(made by someone else, or by this Dolly for another configuration)")
    want_env = {**dict(spec.image_env), **dict(spec.env)}
    mounts = sorted((str(m.get("Type")), str(m.get("Source")), str(m.get("Destination")), bool(m.get("RW")))
                    for m in found.get("Mounts") or [])
    want_mounts = sorted(("bind", b.split(":")[0], b.split(":")[1], not b.endswith(":ro")) for b in spec.binds)
    checks = [
        ("image", found.get("Image"), spec.image_id),
        ("command", list(config.get("Cmd") or []), list(spec.command)),
        ("entrypoint", config.get("Entrypoint") or None, None),
        ("user", config.get("User") or "", ""),
        ("environment", _env(config.get("Env")), want_env),
        ("health check", config.get("Healthcheck") or None, None),
        ("binds", sorted(host.get("Binds") or []), sorted(spec.binds)),
        ("mounts", mounts, want_mounts),
        ("other mounts", [host.get(k) or None for k in ("Mounts", "Tmpfs", "VolumesFrom")], [None] * 3),
        ("capabilities", _caps(host.get("CapAdd")), _caps(spec.capabilities)),
        ("capability set", host.get("Capabilities") or None, None),
        ("privileged", bool(host.get("Privileged")), False),
        # Docker adds label=disable itself to a container in the host's PID namespace.
        ("security options", sorted(set(host.get("SecurityOpt") or []) - {"label=disable"}),
         sorted(spec.security_opt)),
        ("devices", [host.get(k) or None for k in ("Devices", "DeviceRequests", "DeviceCgroupRules")], [None] * 3),
        ("PID namespace", host.get("PidMode"), "host"),
        ("network", host.get("NetworkMode"), "none"),
        # Not the cgroup namespace: the engine's default for it is the host's on some hosts (cgroup v1).
        ("other namespaces", [_own(host.get(k)) for k in ("IpcMode", "UTSMode", "UsernsMode")], [True] * 3),
        ("runtime", host.get("Runtime"), "runc"),
        ("sysctls", host.get("Sysctls") or None, None),
        # Docker's defaults, or more: unmasked, /proc/kcore and the like would be the host's.
        ("masked paths", sorted(set(policy.masked_paths()) - set(host.get("MaskedPaths") or [])
                                - set(host.get("ReadonlyPaths") or [])), []),
    ]
    for what, have, want in checks:
        if have != want:
            return f"its {what} differ{'s' if not what.endswith('s') else ''} from this Dolly's agent's: {have!r:.300}"
    return ""


def _socket_advice(engine: Engine, spec: AgentSpec, wrong: str) -> str:
    """What to do when the agent's socket is not its own engine's."""
    if _label(engine.info(), SOCKET_LABEL) is None:
        return (f"the engine at {engine.api.base_url} has no {SOCKET_LABEL} label, and on its host "
                f"{spec.socket} is not its socket: {wrong}. Dolly does not act there, since it would act on "
                f"that other engine: give the engine the label, \"labels\": [\"{SOCKET_LABEL}=/path/to/its.sock\"] "
                "in its daemon.json, and reload or restart it")
    return (f"the engine at {engine.api.base_url} says its socket is {spec.socket} (its {SOCKET_LABEL} "
            f"label), but {wrong}. Dolly does not act there: correct the label in its daemon.json")
