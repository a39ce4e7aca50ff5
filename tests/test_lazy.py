"""Lazy clones (``lazy=True``): CRIU restores everything but the memory, and a lazy-pages daemon of
each clone's own serves the pages from the checkpoint's images, first those the clone touches,
then the rest; once every page is in it ends and the clone's restore folder goes. A daemon that
dies early takes the clone with it. On the real engine, CRIU and kernel; the unit tests at the
end need none."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import List

import docker
import pytest
from fakes import FakeEngine

import dolly
from dolly import errors
from dolly._criu_log import CRIU_LOG_DIR
from dolly._start import CloneRequest
from helpers import PYTHON, ask

# A token and STATE_MB of random bytes made at start-up; GET / answers both (the bytes by their
# digest): a page that came back as zeros, or not at all, changes the digest.
SERVICE = """
import hashlib, http.server, json, os
token = os.urandom(8).hex()
state = bytearray(os.urandom(int(os.environ["STATE_MB"]) << 20))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"token": token, "digest": hashlib.sha256(state).hexdigest()}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("", 8000), H).serve_forever()
"""


def answered(container, deadline_s: float = 60) -> dict:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return ask(container)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def checkpointed(run, state_mb: int):
    source = run(PYTHON, ["python3", "-c", SERVICE], environment={"STATE_MB": str(state_mb)})
    answer = answered(source)
    return answer, dolly.checkpoint(source, f"lazy-{state_mb}")


def restore_folder(engine, container) -> Path:
    return engine.spool_dir / f"{container.id}.restore"


def lazy_daemons(folder: Path) -> List[int]:
    """The `criu lazy-pages` processes serving ``folder``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lazy-pages" in argv and str(folder).encode() in argv and Path(argv[0].decode()).name == "criu":
            found.append(int(pid))
    return found


def wait_gone(path: Path, deadline_s: float = 120) -> bool:
    deadline = time.monotonic() + deadline_s
    while path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_lazy_clone_has_the_checkpoints_memory_and_leaves_nothing(run, engine):
    at_checkpoint, cp = checkpointed(run, 256)
    (clone,) = dolly.clone(cp, 1, lazy=True)
    folder = restore_folder(engine, clone)
    # Still being served when clone() returns (a plain clone's folder is gone by then).
    assert folder.is_dir()
    assert answered(clone) == at_checkpoint
    assert wait_gone(folder), f"{folder} is still there: the daemon never finished"
    assert not lazy_daemons(folder)
    assert not (CRIU_LOG_DIR / f"{clone.id}.lazy-pages.log").exists()
    assert not [p for p in engine.spool_dir.iterdir() if p.name.startswith(clone.id)]
    # Every page in, and the daemon gone: the memory stays the checkpoint's.
    assert answered(clone) == at_checkpoint
    clone.reload()
    assert clone.status == "running"


def test_two_lazy_clones_at_once(run, engine):
    at_checkpoint, cp = checkpointed(run, 128)
    clones = dolly.clone(cp, 2, lazy=True)
    assert len({c.id for c in clones}) == 2
    for c in clones:
        assert answered(c) == at_checkpoint
    for c in clones:
        assert wait_gone(restore_folder(engine, c))
        assert not [p for p in engine.spool_dir.iterdir() if p.name.startswith(c.id)]
    assert [answered(c) for c in clones] == [at_checkpoint, at_checkpoint]


def test_a_killed_daemon_kills_the_clone(run, engine):
    at_checkpoint, cp = checkpointed(run, 1024)
    (clone,) = dolly.clone(cp, 1, lazy=True)
    folder = restore_folder(engine, clone)
    daemons = lazy_daemons(folder)
    assert len(daemons) == 1, "no daemon serving the clone (it finished 1 GiB at once?)"
    os.kill(daemons[0], signal.SIGKILL)
    # The clone never answers with memory that did not arrive: with the checkpoint's, or not at all.
    try:
        answer = ask(clone)
    except OSError:
        answer = None
    assert answer in (None, at_checkpoint)
    deadline = time.monotonic() + 30
    while True:
        clone.reload()
        if clone.status != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert clone.status == "exited"
    assert wait_gone(folder, 30)
    log = CRIU_LOG_DIR / f"{clone.id}.lazy-pages.log"
    assert "the clone (process" in log.read_text()
    log.unlink()


MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")  # cgroup v1's memory hierarchy, as on this machine


@pytest.mark.skipif(not (MEMORY_CGROUPS / "cgroup.procs").exists(), reason="no cgroup v1 memory hierarchy")
def test_a_lazy_clone_outlives_the_cgroup_of_its_caller(run, engine):
    """The caller (a process in a cgroup of its own, as a CI job or a login session is) clones
    lazily; then every process of that cgroup is killed, as its end kills them. The keeper and its
    daemon left that cgroup: the pages still arrive, and the clone's memory is the checkpoint's."""
    at_checkpoint, cp = checkpointed(run, 1024)
    group = MEMORY_CGROUPS / f"dolly-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    clone_id = ""
    program = (f"import os, time, dolly\n"
               f"open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
               f"cp = dolly.get_checkpoint({cp.container_id!r}, {cp.name!r})\n"
               "(c,) = dolly.clone(cp, 1, lazy=True)\n"
               "print(c.id, flush=True)\n"
               "time.sleep(600)\n")
    caller = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        assert caller.stdout is not None
        clone_id = caller.stdout.readline().strip()
        folder = engine.spool_dir / f"{clone_id}.restore"
        daemons = lazy_daemons(folder)
        # What the cgroup's end does: every process in it, killed.
        while pids := [int(p) for p in (group / "cgroup.procs").read_text().split()]:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        assert len(daemons) == 1, "no daemon served the clone when its caller's cgroup was killed"
        clone = engine.client.containers.get(clone_id)
        assert wait_gone(folder), "the keeper died with its caller's cgroup"
        assert answered(clone) == at_checkpoint
        clone.reload()
        assert clone.status == "running"
    finally:
        caller.kill()
        caller.wait()
        if clone_id:
            with contextlib.suppress(docker.errors.NotFound):
                engine.client.containers.get(clone_id).remove(force=True)
        group.rmdir()


def test_a_clone_without_lazy_starts_with_its_memory(run, engine):
    at_checkpoint, cp = checkpointed(run, 32)
    (clone,) = dolly.clone(cp, 1)
    assert not restore_folder(engine, clone).exists()
    assert answered(clone) == at_checkpoint


# --- no engine -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_lazy_must_be_a_bool(bad):
    a = FakeEngine("a")
    web = a.run(name="web", memory={"count": 1}, files={})
    cp = dolly.checkpoint(web, "warm", client=a.client)
    with pytest.raises(errors.InvalidArgument, match="lazy must be True or False"):
        dolly.clone(cp, 1, lazy=bad, client=a.client)
    with pytest.raises(errors.InvalidArgument, match="lazy must be True or False"):
        dolly.restore(cp, lazy=bad, client=a.client)
    assert a.container_names() == {"web"}


def test_the_request_carries_lazy_to_the_agent():
    request = CloneRequest(("a-1",), False, "a", {}, 1, lazy=True)
    assert CloneRequest.from_json(request.to_json()).lazy is True
    assert CloneRequest.from_json(CloneRequest(("a-1",), False, "a", {}, 1).to_json()).lazy is False
