"""A test suite written the way a new user would, from Dolly's README.

Each test gets its own warm clone of a web service that takes seconds to warm up.
Run it with `pytest examples/` (add `-n 2` with pytest-xdist).
"""
import http.client
import json
from datetime import UTC, datetime

import dolly.testing
from dolly import ready

SERVICE = """
import http.server, json, os, socket, time
started = time.time()
time.sleep(3)                      # stands in for an expensive warm-up
token = os.urandom(4).hex()        # drawn once: every clone shares it
notes = []                         # what tests told it: empty when it was checkpointed
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/note/"):
            notes.append(self.path[len("/note/"):])
        body = json.dumps({"hostname": socket.gethostname(), "token": token,
                           "started": started, "notes": notes}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("", 8000), Handler).serve_forever()
"""

web = dolly.testing.warm_service(
    image="dolly/python",
    command=["python3", "-c", SERVICE],
    ready=ready.http(8000),
)


def get(container, path="/"):
    conn = http.client.HTTPConnection(ready.ip_address(container), 8000, timeout=5)
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


def leave_a_note(container, text):
    """Change the clone, in memory and in its files."""
    container.exec_run(["sh", "-c", f"echo {text} >> /tmp/notes"])
    return get(container, f"/note/{text}")["notes"]


def assert_as_warmed(container):
    """The clone is as the service was when it was checkpointed: no test's notes in its memory,
    no notes file. Every test checks this first, so whichever test runs second (in any order, on
    any xdist worker) would see the first one's notes if clones were shared or reused."""
    assert get(container)["notes"] == []
    assert container.exec_run(["test", "-e", "/tmp/notes"]).exit_code == 1


def test_the_clone_is_warm_and_answers_as_itself(web):
    assert_as_warmed(web)
    answer = get(web)
    assert answer["hostname"] == web.attrs["Config"]["Hostname"]  # its own name, not the source's
    assert len(answer["token"]) == 8
    # Warm, not started over: its process started (and slept its 3 s warm-up) before this
    # clone's container was even created.
    created = datetime.strptime(web.attrs["Created"][:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    assert created.timestamp() - answer["started"] > 2


def test_a_clone_is_this_tests_own_to_change(web):
    assert_as_warmed(web)
    assert leave_a_note(web, "first") == ["first"]
    assert web.exec_run(["cat", "/tmp/notes"]).output == b"first\n"


def test_a_clone_never_sees_another_tests_changes(web):
    assert_as_warmed(web)
    assert leave_a_note(web, "second") == ["second"]
    assert web.exec_run(["cat", "/tmp/notes"]).output == b"second\n"
