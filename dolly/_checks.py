"""What is and is not ready on an engine's host for checkpoints, line by line, and how to fix it:
the checks run beside the engine's files (here, or in its agent). dolly._doctor puts them in a
report with the engine's own line.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from . import _criu as criu
from ._engine import RUNTIME, Engine

MAKE_HOST = "run `make host` as root"


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, whether it passed, what was seen, the fix."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def local_checks(engine: Engine) -> List[Check]:
    """The lines of an engine whose files this process sees: experimental mode, the ``dolly``
    runtime, the data root, dumping other users' processes, CRIU's version, ``criu check``, lazy
    pages (userfaultfd, which only post-copy migrations to this host need), pycriu.

    Raises:
        Nothing for what it finds: each finding is a line.
    """
    checks: List[Check] = []
    make_host = MAKE_HOST
    info = engine.info()
    exp = engine.experimental()
    checks.append(Check("experimental mode", exp, "on" if exp else "off",
                        'set {"experimental": true} in /etc/docker/daemon.json and restart dockerd'))
    runtimes = info.get("Runtimes") or {}
    has = RUNTIME in runtimes
    default = info.get("DefaultRuntime")
    if not has:
        detail = "not registered"
    elif default == RUNTIME:
        detail = "registered, the engine's default"
    else:
        detail = (f"registered; the engine's default is {default!r}: its containers are "
                  "checkpointed by the slower path (README, \"Runtimes\")")
    checks.append(Check(f"'{RUNTIME}' runtime", has, detail, make_host))
    root = info.get("DockerRootDir")
    local = (engine.root_dir / "containers").is_dir()
    checks.append(Check("data root", local,
                        f"{root} {'is' if local else 'is not'} visible to this process",
                        "run Dolly as root, or make the engine's data root readable to this process"))
    checks.append(_other_users_check(engine, make_host))
    return checks + machine_checks()


def machine_checks() -> List[Check]:
    """The lines of this machine whatever its engine: CRIU's version, ``criu check``, lazy pages
    and pycriu.

    Raises:
        Nothing for what it finds: each finding is a line.
    """
    checks: List[Check] = []
    make_host = MAKE_HOST
    v = criu.version()
    new_enough = v is not None and v[:2] >= criu.MIN_VERSION
    checks.append(Check("CRIU version", new_enough,
                        "not installed" if v is None else ".".join(map(str, v)) + " (4.2 or newer needed)",
                        make_host))
    if v is not None:
        try:
            res = subprocess.run([*(criu.criu_command() or ["criu"]), "check"], capture_output=True, text=True,
                                 timeout=120)
            text = (res.stdout + res.stderr).strip().splitlines()
            checks.append(Check("criu check", res.returncode == 0,
                                text[-1] if text else f"exit {res.returncode}", make_host))
        except (OSError, subprocess.TimeoutExpired) as e:
            checks.append(Check("criu check", False, f"could not run: {e}", make_host))
        checks.append(_lazy_pages_check())
    try:
        import pycriu.images  # noqa: F401 - imported only to see that it can be

        checks.append(Check("pycriu", True, "importable"))
    except ImportError as e:
        checks.append(Check("pycriu", False, str(e), make_host + " (installs it into .venv)"))
    return checks


CAP_SYS_RESOURCE = 24


def _lazy_pages_check() -> Check:
    """Whether CRIU can restore lazily here (userfaultfd with fork and remap events), which a
    post-copy migration to this host needs; nothing else does."""
    name = "lazy pages (post-copy target)"
    try:
        res = subprocess.run([*(criu.criu_command() or ["criu"]), "check", "--feature", "uffd-noncoop"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check(name, False, f"could not run: {e}", "")
    text = (res.stdout + res.stderr).strip().splitlines()
    return Check(name, res.returncode == 0, text[-1] if text else f"exit {res.returncode}",
                 "a kernel with userfaultfd (CONFIG_USERFAULTFD); only post-copy migrations to this host need it")


def _other_users_check(engine: Engine, make_host: str) -> Check:
    """Whether CRIU, run by this engine's runc, can dump processes of other users (Postgres as
    ``postgres``, ``docker run --user``): reading their resource limits takes CAP_SYS_RESOURCE,
    which root lacks where the bounding set leaves it out, unless CRIU reads /proc/<pid>/limits
    instead (the patch ``make host`` builds CRIU with)."""
    name = "dump other users' processes"
    caps = _effective_caps(engine.daemon_pid())
    if caps is not None and caps >> CAP_SYS_RESOURCE & 1:
        return Check(name, True, "the engine's dockerd has CAP_SYS_RESOURCE")
    build = criu.build()
    lacking = "the engine's dockerd lacks CAP_SYS_RESOURCE" if caps is not None else "CAP_SYS_RESOURCE unknown"
    if build is not None and build.startswith("dolly-"):
        return Check(name, True, f"{lacking}; CRIU {build} reads /proc/<pid>/limits instead")
    return Check(name, False, f"{lacking}, and CRIU ({build or 'an unnamed build'}) needs it to read the "
                 "limits of processes of non-root users", make_host + " (builds CRIU with scripts/criu-patches)")


def _effective_caps(pid: Optional[int]) -> Optional[int]:
    """A process's effective capabilities (a bit set), or None when it cannot be read."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None
