"""A slow start shows its progress: the log says how the fetch goes at a steady pace, and so does every 503 while
it loads (the ``start`` object of zeroserve.protocol.start), through a real server fetching from a slow HTTP server
on 127.0.0.1 that honours Range requests."""

from __future__ import annotations

import http.server
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import models as test_models
from conftest import start_server

RATE = 12 * 2**20  # bytes per second, per connection


@pytest.fixture
def slow_model(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """``(url, size)`` of a ~32 MiB model served at RATE bytes/s per connection, with Range support."""
    path = test_models.mlp_model(tmp_path / "served" / "model.onnx", hidden=400_000)
    data = path.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _range(self) -> tuple[int, int]:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if match is None:
                return 0, len(data)
            end = int(match.group(2)) + 1 if match.group(2) else len(data)
            return int(match.group(1)), min(end, len(data))

        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", '"v1"')
            self.end_headers()

        def do_GET(self) -> None:
            start, end = self._range()
            partial = "Range" in self.headers
            self.send_response(206 if partial else 200)
            self.send_header("Content-Length", str(end - start))
            if partial:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.send_header("ETag", '"v1"')
            self.end_headers()
            step = 256 * 1024
            try:
                for offset in range(start, end, step):
                    self.wfile.write(data[offset : min(offset + step, end)])
                    time.sleep(step / RATE)
            except ConnectionError:  # the reader stopped early (its process ended): nothing to send to
                pass

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/model.onnx", len(data)
    httpd.shutdown()
    httpd.server_close()


def test_a_slow_fetch_reports_bytes_throughput_and_time_left(slow_model: tuple[str, int], tmp_path: Path) -> None:
    url, size = slow_model
    server = start_server(
        ["--model_name", "mlp", "--model_dir", url, "--cache_dir", str(tmp_path / "cache"), "--progress_interval",
         "0.2"],
        tmp_path / "log", wait_ready=False,
    )  # fmt: skip
    try:
        seen = None
        deadline = time.monotonic() + 60
        while seen is None and time.monotonic() < deadline:
            try:
                answer = httpx.get(f"{server.url}/v2/health/ready", timeout=2)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            assert answer.status_code == 503, "the fetch ended before any progress was seen"
            start = answer.json()["start"]
            assert answer.headers["zeroserve-start"] == "loading" and start["state"] == "loading"
            if start.get("done_bytes"):
                seen = start
            time.sleep(0.05)
        assert seen is not None, server.log()
        assert seen["phase"] == "fetch" and seen["total_bytes"] == size
        assert 0 < seen["done_bytes"] < size
        assert seen["bytes_per_s"] > 0 and seen["eta_s"] >= 0 and seen["elapsed_s"] > 0
        # A request for the model is told the same, with when to ask again.
        body = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
        infer = httpx.post(f"{server.url}/v2/models/mlp/infer", json=body, timeout=5)
        assert infer.status_code == 503 and int(infer.headers["retry-after"]) >= 1
        assert infer.json()["start"]["phase"] in ("fetch", "session", "warmup")

        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/v2/health/ready", timeout=2).status_code != 200:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
    finally:
        server.stop()
    lines = [line for line in server.log().splitlines() if "still starting: fetch" in line]
    assert lines, server.log()
    assert re.search(r"still starting: fetch, [\d.]+ MiB of 3\d\.\d MiB, [\d.]+ MiB/s", "\n".join(lines))
