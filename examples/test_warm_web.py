"""A test suite written the way a new user would, from Dolly's README.

Each test gets its own warm clone of a web service that takes seconds to warm up.
Run it with `pytest examples/` (add `-n 2` with pytest-xdist).
"""
import http.client

import dolly.testing
from dolly import ready

SERVICE = """
import http.server, os, socket, time
time.sleep(3)                      # stands in for an expensive warm-up
token = os.urandom(4).hex()        # drawn once: every clone shares it
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{socket.gethostname()} {token}".encode()
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


def get(container):
    conn = http.client.HTTPConnection(ready.ip_address(container), 8000, timeout=5)
    conn.request("GET", "/")
    hostname, token = conn.getresponse().read().decode().split()
    return hostname, token


def test_the_clone_answers_as_itself(web):
    hostname, token = get(web)
    assert hostname == web.attrs["Config"]["Hostname"]
    assert len(token) == 8


def test_each_test_has_its_own_clone(web):
    web.exec_run(["touch", "/tmp/mine"])
    assert web.exec_run(["test", "-e", "/tmp/mine"]).exit_code == 0


def test_a_clone_never_sees_another_tests_files(web):
    assert web.exec_run(["test", "-e", "/tmp/mine"]).exit_code == 1
