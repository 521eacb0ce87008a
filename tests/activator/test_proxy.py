"""What the activator forwards, and how (real processes): origin-form targets only, no request it never
delivered answered 502 when a child dies under load, bodies streamed within the server's size limit."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from tests.activator.conftest import ActivatorProcess, infer

Start = Callable[..., ActivatorProcess]


def raw_request(port: int, request_line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_only_origin_form_targets_are_forwarded(activator: Start, model_dir: Path) -> None:
    hits: list[str] = []

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        dev = activator("--model_name", "mlp", "--model_dir", str(model_dir))
        other_port = other.server_address[1]
        for target in (f"*@127.0.0.1:{other_port}/x", "*"):
            answer = raw_request(dev.port, f"GET {target} HTTP/1.1".encode())
            assert answer.startswith(b"HTTP/1.1 400 "), answer
            assert b"the request target must be a path starting with '/'" in answer
        # Absolute-form names a host, but only the path is used: the activator's own process answers.
        answer = raw_request(dev.port, f"GET http://127.0.0.1:{other_port}/v2/health/live HTTP/1.1".encode())
        assert answer.startswith(b"HTTP/1.1 200 ") and b'{"live":true}' in answer
        assert hits == []
    finally:
        other.shutdown()
        other.server_close()


def test_a_child_killed_under_load_fails_only_what_it_was_running(activator: Start, model_dir: Path) -> None:
    """Requests that reach the dead port are not 502: the connection was refused, so they never ran, and
    they go to the next process. Only requests in flight on the killed process may get 502."""
    clients = 8
    dev = activator("--model_name", "mlp", "--model_dir", str(model_dir), "--max_concurrency", "16")
    assert infer(dev.url).status_code == 200
    [pid] = dev.server_pids()
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                statuses.append(client.post(f"{dev.url}/v2/models/mlp/infer",
                                            json={"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                                              "data": [0.5] * 16}]}).status_code)

    threads = [threading.Thread(target=load) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    before = len(statuses)
    os.kill(pid, signal.SIGKILL)
    dev.wait_log("cold start: server process", count=2)
    dev.wait_log("ready after", count=2)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(60)
    after = statuses[before:]
    failed = [status for status in after if status != 200]
    assert before > 0 and after.count(200) > clients
    assert set(failed) <= {502}
    assert len(failed) <= clients, failed  # at most the requests in flight at the kill
    assert dev.starts() == 2


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_bodies_are_streamed_within_the_size_limit(activator: Start, model_dir: Path) -> None:
    dev = activator("--model_name", "mlp", "--model_dir", str(model_dir), "--max_request_mib", "64")
    limit = 64 * 2**20

    # Declared too large: answered before any process starts.
    response = httpx.post(f"{dev.url}/v2/models/mlp/infer", content=b"x" * (limit + 1), timeout=60)
    assert response.status_code == 413
    assert response.json()["error"] == f"request body of {limit + 1} bytes is over the limit of {limit} bytes " \
                                       "(--max_request_mib)"
    assert dev.starts() == 0

    # Not declared (chunked), and too large: cut off while streaming.
    def chunks(total: int) -> Iterator[bytes]:
        piece = b"x" * 2**20
        for _ in range(total // len(piece)):
            yield piece

    assert infer(dev.url).status_code == 200
    baseline = _peak_rss_mib(dev.process.pid)
    response = httpx.post(f"{dev.url}/v2/models/mlp/infer", content=chunks(limit + 2**20), timeout=60)
    assert response.status_code == 413
    assert "over the limit" in response.json()["error"]

    # Within the limit: the activator passes it on without holding it (the server answers, here 400).
    response = httpx.post(f"{dev.url}/v2/models/mlp/infer", content=chunks(limit - 2**20), timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert _peak_rss_mib(dev.process.pid) - baseline < 32  # a 63 MiB body never sat in the activator
