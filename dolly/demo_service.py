"""The demo service: a Python HTTP server that holds state it built at start-up.

Run inside the ``dolly/python`` image as ``python3 -c <this file's text>``; knobs by environment:
STATE_MB (size of the in-memory table, default 64), WARMUP_S (CPU seconds spent after that building
an index of the table: real work, standing in for a service's cache or JIT warm-up, and CPU time,
not wall time, so that services warming up side by side take longer, as real ones do; default 0),
RANDOM_STATE (non-empty: fill the table with random bytes rather than repeating digests),
PORT (default 8000). ``GET /`` answers JSON: the kernel hostname, the token drawn at start-up (a
clone shares its source's), the table's size and checksum, and how many requests it has served.
"""
import hashlib
import http.server
import json
import os
import socket
import time

started = time.time()
rows = int(os.environ.get("STATE_MB", "64")) * 1024
if os.environ.get("RANDOM_STATE"):  # incompressible, like most real state
    table = [os.urandom(1024) for _ in range(rows)]
else:
    table = [hashlib.sha256(i.to_bytes(8, "little")).digest() * 32 for i in range(rows)]  # 1 KiB rows
checksum = hashlib.sha256(b"".join(table[:: max(1, rows // 64)])).hexdigest()[:16]
token = os.urandom(8).hex()
index: dict[bytes, int] = {}
deadline = time.process_time() + float(os.environ.get("WARMUP_S", "0"))
while time.process_time() < deadline:
    for _ in range(1000):
        n = len(index)
        index[hashlib.sha256(table[n % rows]).digest()[:8]] = n
warm_s = round(time.time() - started, 3)
served = 0


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global served
        served += 1
        body = json.dumps({
            "hostname": socket.gethostname(),
            "token": token,
            "rows": len(table),
            "indexed": len(index),
            "checksum": checksum,
            "served": served,
            "warm_s": warm_s,
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8000"))), Handler)
print(f"listening on {server.server_port} after {warm_s} s", flush=True)
server.serve_forever()
