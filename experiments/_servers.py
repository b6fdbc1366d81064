"""Real servers on 127.0.0.1 for object-storage stores, started by the tests and the benchmarks.

- `s3_server()`: moto's S3 server in its own process (the `[remote]` extra), a bucket made, the
  environment pointed at it (AWS_ENDPOINT_URL, region, moto's test credentials) while it runs.
- `http_server(folder, delay_s)`: a static file server that answers Range requests (206) with an
  ETag, conditional requests (If-None-Match: 304, If-Match: 412) and HEAD; every request waits
  `delay_s` before it is answered (an added round trip). `python -m http.server` ignores Range,
  which tensorstore's http driver needs.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


@contextlib.contextmanager
def s3_server(bucket: str = "stores"):
    """Yields the endpoint URL of a fresh moto S3 server holding an empty `bucket`."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(AWS_ENDPOINT_URL=endpoint, AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing")  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    try:
        _wait_for(port, proc)
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"))
        os.environ.update(env)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(10)


class _Handler(http.server.BaseHTTPRequestHandler):
    root: Path
    delay_s: float
    counts: dict

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        time.sleep(self.delay_s)
        self.counts["requests"] += 1
        path = (self.root / self.path.split("?", 1)[0].lstrip("/")).resolve()
        if self.root not in path.parents or not path.is_file():
            return self._status(404)
        st = path.stat()
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        if self.headers.get("If-None-Match") == etag:
            return self._status(304, etag)
        if self.headers.get("If-Match") not in (None, "*", etag):
            return self._status(412)
        data = path.read_bytes()
        start, end, code = 0, len(data), 200
        m = _RANGE.match(self.headers.get("Range", ""))
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start, end = int(m.group(1)), min(len(data), int(m.group(2) or len(data) - 1) + 1)
            else:
                start = max(0, len(data) - int(m.group(2)))
            code = 206
        self.send_response(code)
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(end - start))
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if body:
            self.counts["bytes"] += end - start
            self.wfile.write(data[start:end])

    def _status(self, code: int, etag: str | None = None) -> None:
        self.send_response(code)
        if etag:
            self.send_header("ETag", etag)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(http.server.ThreadingHTTPServer):
    # socketserver's listen backlog of 5 drops connections when tensorstore opens dozens at
    # once, and each dropped one waits a 1 s SYN retransmit: a stall the server made, not the
    # store (seen as 1-second decode steps in bench_remote before this)
    request_queue_size = 256
    daemon_threads = True


@contextlib.contextmanager
def http_server(folder, delay_s: float = 0.0):
    """Yields (base URL, counts {'requests', 'bytes'}) of a Range-capable server of `folder`."""
    counts = {"requests": 0, "bytes": 0}
    handler = type("Handler", (_Handler,), dict(root=Path(folder).resolve(), delay_s=delay_s,
                                                counts=counts))  # fmt: skip
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counts
    finally:
        server.shutdown()
        server.server_close()
