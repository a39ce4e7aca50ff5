"""Constants and small functions shared by the tests."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from dolly import ready

TEST_LABEL = "dolly.test"
RUN_ID = uuid.uuid4().hex[:10]
BUSYBOX = "dolly/busybox"
PYTHON = "dolly/python"
# The second engine (tests/engines.py): its name and bridge subnet can be changed so that two test
# runs on one machine do not share it.
ENGINE_B = os.environ.get("DOLLY_TEST_ENGINE_B", "b")
ENGINE_B_SUBNET = os.environ.get("DOLLY_TEST_ENGINE_B_SUBNET", "10.213.101.1/24")
ENGINE_B_URL = f"unix:///run/dolly-test-{ENGINE_B}.sock"

# A counter that writes its value to stdout and to a file in the writable layer, 10 times a second
# (by rename, so that a reader never sees the file empty).
COUNTER = "i=0; while true; do i=$((i+1)); echo $i; echo $i > /tmp/c.new; mv /tmp/c.new /tmp/count; sleep 0.1; done"
# A container that wrote, changed and deleted files, and counts.
FILES = "echo hello > /greeting; rm /etc/group; mkdir -p /d; echo x > /d/f; " + COUNTER


# A counter in memory and a file written at start-up: both must survive a move, or a restore
# by another engine.
STATEFUL = """
import http.server, json, os, socket
token = os.urandom(4).hex()
with open("/var/tmp/born", "w") as f:
    f.write(token)
hits = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global hits
        hits += 1
        body = json.dumps({"hits": hits, "token": token, "host": socket.gethostname()}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("", 8000), H).serve_forever()
"""


DOLLY = shutil.which("dolly") or str(Path(sys.executable).with_name("dolly"))


def dolly_cmd(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `dolly` command as a user runs it: the installed console script, in a subprocess."""
    return subprocess.run([DOLLY, *args], capture_output=True, text=True, timeout=300, input=input, env=env)


def read_int(container, path: str = "/tmp/count") -> int:
    res = container.exec_run(["cat", path])
    assert res.exit_code == 0, res.output
    return int(res.output.decode().strip())


def get_json(host: str, port: int, path: str = "/") -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())
    finally:
        conn.close()


def ask(container, port: int = 8000, path: str = "/", network=None) -> dict:
    container.reload()
    return get_json(ready.ip_address(container, network), port, path)


def ask_one_clone(cp) -> dict:
    """What a clone of ``cp`` answers (``ask``); the clone and the checkpoint are removed after."""
    import dolly

    try:
        (clone,) = dolly.clone(cp, 1)
        try:
            return ask(clone)
        finally:
            clone.remove(force=True)
    finally:
        dolly.remove_checkpoint(cp)


def kernel_hostname(container) -> str:
    return container.exec_run(["cat", "/proc/sys/kernel/hostname"]).output.decode().strip()


def assert_counts_on(container, at_least: int, *, new: bool = True) -> None:
    """The counter of COUNTER is at ``at_least`` (its value at the checkpoint, or read just before)
    or past it, not started over, and still counting. A ``new`` container (a clone, a moved one)
    has logged nothing below it either: it never counted from 1."""
    first = read_int(container)
    assert first >= at_least, f"the counter went back from {at_least} to {first}"
    deadline = time.monotonic() + 10
    while read_int(container) <= first and time.monotonic() < deadline:
        time.sleep(0.1)
    assert read_int(container) > first, "the counter stopped"
    if new:
        logged = [int(x) for x in container.logs().decode().split() if x.isdigit()]
        assert logged and min(logged) >= at_least, f"the counter logged {min(logged or [0])} after the checkpoint"
