"""Docker's network hook beside CRIU's memory restore (scripts/dolly-runc, issue 25 item 2).

Docker configures a container's network in a prestart hook (``libnetwork-setkey``) that runc runs
while CRIU waits. On a restore from Dolly's spool, dolly-runc starts that hook in the background
and lets CRIU restore the memory meanwhile; CRIU's post-restore action (dolly-runc again) waits
for it before any restored process runs. The engine tests check what a restored process sees
from its first instant; the others run the script's two halves (the hook runner and the action)
with hooks of their own, which is logic of the script, not of Docker or CRIU.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

import dolly
from dolly._archive import tarfile
from dolly._criu_log import CRIU_LOG_DIR
from helpers import PYTHON

DOLLY_RUNC = Path(__file__).resolve().parent.parent / "scripts" / "dolly-runc"

# Holds 48 MiB (past dolly._start.HOOK_BESIDE_BYTES: only such restores set the hook aside) and
# appends the number of lines of its own routing table (/proc/net/route: a header, then a line a
# route) to /routes whenever it changes, every 2 ms. A process that runs before its network is
# configured sees the header alone ("1") and writes it.
WATCH = """
import os, time
state = bytearray(os.urandom(48 << 20))
seen = None
while True:
    with open("/proc/net/route") as f:
        lines = len(f.readlines())
    if lines != seen:
        with open("/routes", "a") as f:
            f.write(f"{lines}\\n")
        seen = lines
    time.sleep(0.002)
"""


def _file_of(container, path: str) -> str:
    stream, _ = container.get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.next()
        assert member is not None
        f = tar.extractfile(member)
        assert f is not None
        return f.read().decode()


def _settled(container, path: str = "/routes") -> str:
    """The file once the watcher has been running for a while (it writes only on a change)."""
    deadline = time.monotonic() + 30
    while True:
        container.reload()
        assert container.status == "running", container.logs()[-2000:]
        out = container.exec_run(["cat", path]).output.decode()
        if out.strip() or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    return container.exec_run(["cat", path]).output.decode()


@pytest.fixture
def criu_logs() -> Iterator[Path]:
    """CRIU's restore logs, kept by dolly-runc while CRIU_LOG_DIR/.keep exists."""
    keep = CRIU_LOG_DIR / ".keep"
    made = not keep.exists()
    keep.touch()
    yield CRIU_LOG_DIR
    if made:
        keep.unlink(missing_ok=True)


@pytest.mark.parametrize("where", ["default bridge", "user network"])
def test_a_clone_s_processes_never_run_before_its_network(run, network, engine, criu_logs: Path,
                                                           where: str) -> None:
    kwargs = {"network": network().name} if where == "user network" else {}
    src = run(PYTHON, ["python3", "-c", WATCH], **kwargs)
    routes = _settled(src)
    assert routes.splitlines()[-1] != "1", "the source itself has no route"
    cp = dolly.checkpoint(src, "net-hook")  # the source stops: its /routes is the checkpoint's
    at_checkpoint = _file_of(src, "/routes")
    clones = dolly.clone(cp, 3)
    for c in clones:
        # No line was added: the watcher, resumed with the checkpoint's count, never saw its
        # routing table empty.
        assert _settled(c) == at_checkpoint
        c.reload()
        assert c.attrs["NetworkSettings"]["Networks"], "the clone is on no network"
        # The hook was set aside: CRIU ran dolly-runc as its post-restore action.
        log = (criu_logs / f"{c.id}.restore.log").read_text()
        assert re.search(r"Running post-restore scripts\n.*\n.*\t\[/usr/local/sbin/dolly-runc\]", log)
        # The bundle's config.json is Docker's again (for a later checkpoint's spec), and the
        # runtime's folders for this start are gone.
        bundle = Path(f"/var/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby/{c.id}")
        hooks = json.loads((bundle / "config.json").read_text())["hooks"]["prestart"]
        assert [h["args"][0] for h in hooks] == ["libnetwork-setkey"]
        assert not list(engine.spool_dir.glob(f"{c.id}.*"))


# The script's two halves, with hooks of this test's own.

def _hooks_dir(tmp_path: Path, hooks: List[Dict]) -> Path:
    """The folder dolly-runc makes from a bundle's config.json holding ``hooks``, and what it leaves
    in the config (checked here: the one hook that runc then runs is dolly-runc's own)."""
    config = tmp_path / "config.json"
    spec = {"ociVersion": "1.0.2", "process": {"rlimits": [{"type": "RLIMIT_MEMLOCK", "hard": 2**64 - 1,
                                                            "soft": 2**64 - 1}]},
            "hooks": {"prestart": hooks, "poststop": [{"path": "/bin/true"}]}}
    config.write_text(json.dumps(spec))
    d = tmp_path / "hooks"
    subprocess.run([str(DOLLY_RUNC), "--dolly-take-hooks", str(config), str(d)], check=True, timeout=30)
    assert json.loads((d / "config.json").read_text()) == spec  # the original, to be put back
    self = str(DOLLY_RUNC.resolve())
    assert json.loads(config.read_text()) == {**spec, "hooks": {"prestart": [
        {"path": self, "args": [self, "--dolly-hooks", str(d)]}], "poststop": [{"path": "/bin/true"}]}}
    return d


def _start(d: Path, state: Dict) -> subprocess.CompletedProcess:
    """What runc does with the one prestart hook dolly-runc left: run it with the state on stdin
    and its output on pipes that runc reads to their end (timeout: a hang detector)."""
    return subprocess.run([str(DOLLY_RUNC), "--dolly-hooks", str(d)], input=json.dumps(state).encode(),
                          capture_output=True, timeout=30)


def _post_restore(d: Path) -> subprocess.CompletedProcess:
    """CRIU's post-restore action script."""
    env = {**os.environ, "CRTOOLS_SCRIPT_ACTION": "post-restore", "DOLLY_HOOKS_DIR": str(d)}
    return subprocess.run([str(DOLLY_RUNC)], env=env, capture_output=True, timeout=30)


def test_the_runner_returns_while_the_hooks_run_and_the_action_waits_for_them(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    # The first hook blocks until the test opens the gate, which it does only once the runner has
    # returned: a runner that waited for its hooks would never return. It gets the state on stdin
    # and its argv[0] as given (busybox runs the applet argv[0] names).
    d = _hooks_dir(tmp_path, [
        {"path": "/bin/sh", "args": ["sh", "-c", f"cat > {tmp_path}/state; cat {gate} > {tmp_path}/opened"]},
        {"path": "/bin/busybox", "args": ["basename", "/a/b/second"]},
    ])
    done = _start(d, {"pid": 4242, "id": "x"})
    assert done.returncode == 0 and done.stdout == b"" and done.stderr == b"", done
    assert not (d / "rc").exists()
    with open(gate, "w") as g:
        g.write("go\n")
    action = _post_restore(d)
    assert action.returncode == 0, action.stderr
    assert json.loads((tmp_path / "state").read_text()) == {"pid": 4242, "id": "x"}
    assert (tmp_path / "opened").read_text() == "go\n"
    assert (d / "rc").read_text() == "0"
    assert (d / "out").read_text() == "second\n"  # the second hook ran after the first


def test_a_failed_hook_aborts_the_restore_with_its_words_and_the_next_does_not_run(tmp_path: Path) -> None:
    d = _hooks_dir(tmp_path, [
        {"path": "/bin/sh", "args": ["sh", "-c", "echo no such sandbox >&2; exit 3"]},
        {"path": "/bin/sh", "args": ["sh", "-c", f"touch {tmp_path}/second"]},
    ])
    assert _start(d, {"pid": 1}).returncode == 0
    action = _post_restore(d)
    assert action.returncode != 0
    assert b"no such sandbox" in action.stderr and b"ended with 768" in action.stderr
    assert (d / "rc").read_text() == "3"
    assert not (tmp_path / "second").exists()


def test_hooks_that_never_ran_abort_the_restore(tmp_path: Path) -> None:
    d = _hooks_dir(tmp_path, [{"path": "/bin/true", "args": ["true"]}])
    action = _post_restore(d)
    assert action.returncode != 0
    assert b"prestart hooks failed or did not run" in action.stderr


def test_other_actions_and_other_restores_pass_through(tmp_path: Path) -> None:
    d = _hooks_dir(tmp_path, [])
    for env in ({"CRTOOLS_SCRIPT_ACTION": "setup-namespaces", "DOLLY_HOOKS_DIR": str(d)},
                {"CRTOOLS_SCRIPT_ACTION": "post-restore"}):
        assert subprocess.run([str(DOLLY_RUNC)], env={**os.environ, **env}, timeout=30).returncode == 0


def test_a_hook_s_environment_keeps_its_pairs_and_a_huge_timeout_does_not_wrap(tmp_path: Path) -> None:
    # An entry without "=" once shifted every pair after it (NOEQUALS=A, 1=B): the hook got neither
    # A nor B. A timeout of 2**32 + 1 s once became alarm(1): the hook was killed after a second.
    d = _hooks_dir(tmp_path, [
        {"path": "/bin/sh", "args": ["sh", "-c", f"echo \"$A $B\" > {tmp_path}/env"],
         "env": ["NOEQUALS", "A=1", "B=2"]},
        {"path": "/bin/sh", "args": ["sh", "-c", f"sleep 1.5; touch {tmp_path}/slept"], "timeout": 2**32 + 1},
    ])
    assert _start(d, {"pid": 1}).returncode == 0
    action = _post_restore(d)
    assert action.returncode == 0, action.stderr
    assert (tmp_path / "env").read_text() == "1 2\n"
    assert (tmp_path / "slept").exists()
