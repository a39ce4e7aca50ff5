"""Memory-shared clones (``share_memory=True``): the kernel's samepage merging (KSM) holds the pages
that clones of one checkpoint have in common once, for those clones only, and a write gives the
writer its own copy again. On the real engine, CRIU and kernel; the unit tests at the end need
none."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, List

import pytest

import dolly
from dolly import _start, errors
from dolly._start import CloneRequest
from helpers import PYTHON, ask

STATE_MB = 32
STATE_PAGES = STATE_MB * 2**20 // 4096
# Writes over this many MiB of the state, with new random bytes.
WRITE_MB = 8

# A token and STATE_MB of random bytes made at start-up; GET / answers both (the bytes by their
# digest), GET /write replaces the first WRITE_MB of them in place.
SERVICE = f"""
import hashlib, http.server, json, os
token = os.urandom(8).hex()
state = bytearray(os.urandom({STATE_MB} << 20))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/write":
            state[:{WRITE_MB} << 20] = os.urandom({WRITE_MB} << 20)
        body = json.dumps({{"token": token, "digest": hashlib.sha256(state).hexdigest()}}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("", 8000), H).serve_forever()
"""


def ksm_stat(container) -> Dict[str, str]:
    """/proc/<pid>/ksm_stat of the container's (single) process."""
    container.reload()
    pid = container.attrs["State"]["Pid"]
    lines = Path(f"/proc/{pid}/ksm_stat").read_text().splitlines()
    return dict(line.replace(":", "").split(None, 1) for line in lines)


def merging(container) -> int:
    return int(ksm_stat(container)["ksm_merging_pages"])


def wait_merged(containers: List, at_least: int, deadline_s: float = 180) -> List[int]:
    """Each container's merged pages, once every one has ``at_least`` (or the deadline passed)."""
    deadline = time.monotonic() + deadline_s
    while True:
        counts = [merging(c) for c in containers]
        if min(counts) >= at_least or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


@pytest.fixture
def state_cp(run):
    source = run(PYTHON, ["python3", "-c", SERVICE])
    deadline = time.monotonic() + 60
    while True:
        try:
            answer = ask(source)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return source, answer, dolly.checkpoint(source, "share")


@pytest.fixture(autouse=True)
def ksm_running(request):
    if "state_cp" in request.fixturenames and Path(_start.KSM_RUN).read_text().strip() != "1":
        pytest.fail(f"KSM is not running ({_start.KSM_RUN}): `make host` turns it on")


def test_shared_clones_answer_with_the_checkpoint_state_and_are_merged(state_cp):
    source, answer, cp = state_cp
    shared = dolly.clone(cp, 2, share_memory=True)
    private = dolly.clone(cp, 2)

    for c in shared + private:
        assert ask(c) == answer, "a clone does not hold the checkpoint's state"
    assert all(ksm_stat(c)["ksm_merge_any"] == "yes" for c in shared)
    # Every page of the state is identical in the two shared clones: each is merged.
    counts = wait_merged(shared, STATE_PAGES)
    assert min(counts) >= STATE_PAGES, f"KSM merged {counts} pages of the shared clones, not {STATE_PAGES}"
    # The same pages are in the private clones and the source: had KSM scanned them, they would
    # have merged with the shared ones by now.
    for c in [*private, source]:
        stat = ksm_stat(c)
        assert stat["ksm_merge_any"] == "no" and stat["ksm_merging_pages"] == "0", f"{c.name}: {stat}"
    # Merged pages still read as the checkpoint's.
    for c in shared:
        assert ask(c) == answer


def test_a_write_in_one_shared_clone_is_not_seen_by_another(state_cp):
    _, answer, cp = state_cp
    writer, reader = dolly.clone(cp, 2, share_memory=True)
    before = wait_merged([writer, reader], STATE_PAGES)
    assert min(before) >= STATE_PAGES

    written = ask(writer, path="/write")
    assert written["token"] == answer["token"] and written["digest"] != answer["digest"]
    assert ask(reader) == answer, "the reader saw the writer's write"
    assert ask(writer) == written
    # The written pages are the writer's own again (copy on write): no longer merged, while the
    # reader keeps its own. (ksmd updates a process's count when it next scans the page.)
    want = before[0] - WRITE_MB * 2**20 // 4096
    deadline = time.monotonic() + 120
    while merging(writer) > want and time.monotonic() < deadline:
        time.sleep(0.5)
    assert merging(writer) <= want
    assert merging(reader) >= STATE_PAGES


def test_restore_shares_memory_too(state_cp):
    _, answer, cp = state_cp
    one = dolly.restore(cp, share_memory=True)
    two = dolly.restore(cp, share_memory=True)
    assert ask(one) == answer and ask(two) == answer
    assert min(wait_merged([one, two], STATE_PAGES)) >= STATE_PAGES


# --- no engine ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", 1, 0, None])
def test_share_memory_must_be_a_bool(value):
    with pytest.raises(errors.InvalidArgument, match="share_memory must be True or False"):
        dolly.clone(object(), 1, share_memory=value)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument, match="share_memory must be True or False"):
        dolly.restore(object(), share_memory=value)  # type: ignore[arg-type]


def test_the_request_carries_share_memory_to_an_agent():
    request = CloneRequest(("a-1",), False, "a", {}, 8, share_memory=True)
    assert CloneRequest.from_json(request.to_json()) == request
    old = request.to_json()
    del old["share_memory"]  # from an agent of before share_memory
    assert CloneRequest.from_json(old).share_memory is False


def test_ksm_missing_or_off_is_host_not_ready(tmp_path, monkeypatch):
    monkeypatch.setattr(_start, "KSM_RUN", str(tmp_path / "run"))
    with pytest.raises(errors.HostNotReady, match="has none"):
        _start.require_ksm()
    (tmp_path / "run").write_text("0\n")
    with pytest.raises(errors.HostNotReady, match="make host"):
        _start.require_ksm()
    (tmp_path / "run").write_text("1\n")
    _start.require_ksm()


def test_the_request_file_asks_the_runtime_to_merge(tmp_path):
    images = tmp_path / "cp"
    images.mkdir()
    (images / "pages-1.img").write_bytes(b"x")

    class Cp:
        images_dir = images

    for share, want in ((True, "tcp_connections=close\nmemory_merge=1\n"), (False, "tcp_connections=close\n")):
        folder = tmp_path / f"spool-{share}"
        _start._place_images(Cp(), folder, hostname=None, share_memory=share)  # type: ignore[arg-type]
        assert (folder / "dolly-request").read_text() == want
        assert os.path.samefile(folder / "pages-1.img", images / "pages-1.img")
