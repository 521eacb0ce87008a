"""What a request may cost the server, measured on a real process: BYTES tensors of many tiny elements, and
the budget for request bytes in flight. While each runs, another client keeps asking /v2/health/live, which must
be answered within a second throughout."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

import models as test_models
from conftest import ServerProcess, start_server

MiB = 2**20


def peak_rss_mib(server: ServerProcess) -> float:
    """The process's high-water mark of resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def rss_mib(server: ServerProcess) -> float:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@contextmanager
def liveness_watch(server: ServerProcess) -> Iterator[list[float]]:
    """Ask /v2/health/live every 50 ms meanwhile; yields the list of answer times (seconds)."""
    times: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                started = time.perf_counter()
                assert client.get(f"{server.url}/v2/health/live").status_code == 200
                times.append(time.perf_counter() - started)
                stop.wait(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield times
    finally:
        stop.set()
        thread.join(35)


def bytes_body(count: int) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body of ``count`` empty BYTES elements for identity_bytes, asking for one output."""
    raw = b"\0\0\0\0" * count
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, count], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "output"}]}).encode()
    headers = {"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"}
    return header + raw, headers


@pytest.fixture(scope="module")
def bytes_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bytes-repository")
    test_models.identity_model(root / "identity_bytes" / "1" / "model.onnx", "BYTES")
    test_models.identity_model(root / "identity_fp32" / "1" / "model.onnx", "FP32")
    return root


def test_sixteen_mib_of_empty_bytes_elements_is_refused_at_once(bytes_repository: Path, tmp_path: Path) -> None:
    server = start_server(["--model_dir", str(bytes_repository)], tmp_path / "log")
    try:
        body, headers = bytes_body(4 * MiB)  # 16 MiB of 4-byte lengths: 4 Mi elements
        before = peak_rss_mib(server)
        with liveness_watch(server) as live:
            started = time.perf_counter()
            answer = httpx.post(f"{server.url}/v2/models/identity_bytes/infer", content=body, headers=headers,
                                timeout=60)
            took = time.perf_counter() - started
        assert answer.status_code == 413 and "--max_bytes_elements" in answer.json()["error"]
        assert took < 10
        assert peak_rss_mib(server) - before < 128
        assert live and max(live) < 1.0
    finally:
        server.stop()


def test_four_mi_bytes_elements_when_allowed_stay_within_512_mib_and_off_the_loop(
    bytes_repository: Path, tmp_path: Path
) -> None:
    """The issue's case with the element limit raised to let it through: decoded by numpy, the run and the
    answer off the event loop, peak memory bounded."""
    count = 4 * MiB
    server = start_server(["--model_dir", str(bytes_repository), "--max_bytes_elements", str(count)],
                          tmp_path / "log")
    try:
        body, headers = bytes_body(count)
        before = peak_rss_mib(server)
        with liveness_watch(server) as live:
            answer = httpx.post(f"{server.url}/v2/models/identity_bytes/infer", content=body, headers=headers,
                                timeout=120)
        assert answer.status_code == 200, answer.text[:300]
        outputs = answer.json()["outputs"][0]
        assert outputs["shape"] == [1, count] and set(outputs["data"]) == {""}
        grew = peak_rss_mib(server) - before
        assert grew <= 512, f"peak RSS grew {grew:.0f} MiB"
        assert live and max(live) < 1.0, f"liveness waited {max(live):.2f} s"
    finally:
        server.stop()


def test_request_bytes_in_flight_are_bounded_and_refused_before_their_body(
    bytes_repository: Path, tmp_path: Path
) -> None:
    """--max_inflight_mib 64: a 40 MiB request whose body is still arriving holds its bytes; a second one that
    would pass the budget is answered 503 with Retry-After without its body being read; once the first is
    answered, the second goes through."""
    server = start_server(["--model_dir", str(bytes_repository), "--max_inflight_mib", "64"], tmp_path / "log")
    try:
        tensor = np.zeros(10 * MiB, np.float32)  # 40 MiB
        header = json.dumps({"inputs": [{"name": "input", "shape": [1, tensor.size], "datatype": "FP32",
                                         "parameters": {"binary_data_size": tensor.nbytes}}]}).encode()
        body = header + tensor.tobytes()
        headers = {"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"}
        url = f"{server.url}/v2/models/identity_fp32/infer"
        gate = threading.Event()

        def slow_body() -> Iterator[bytes]:
            yield body[: 1 * MiB]
            gate.wait(30)
            for offset in range(1 * MiB, len(body), 4 * MiB):
                yield body[offset : offset + 4 * MiB]

        first: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: first.append(httpx.post(url, content=slow_body(),
                                                   headers={**headers, "content-length": str(len(body))}, timeout=60))
        )
        sender.start()
        try:
            deadline = time.monotonic() + 10
            while "zeroserve_inference_receiving 1" not in httpx.get(f"{server.url}/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            refused = httpx.post(url, content=body, headers=headers, timeout=60)
            assert refused.status_code == 503, refused.text[:200]
            assert int(refused.headers["retry-after"]) >= 1
            assert "--max_inflight_mib" in refused.json()["error"]
        finally:
            gate.set()
            sender.join(60)
        assert first and first[0].status_code == 200
        assert httpx.post(url, content=body, headers=headers, timeout=60).status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize(("limit_mib", "most_mib"), [(256, 400), (32, 80)])
def test_a_gzip_bomb_is_refused_as_it_inflates_and_off_the_event_loop(
    bytes_repository: Path, tmp_path: Path, limit_mib: int, most_mib: int
) -> None:
    """257 MiB of zeros in a 256 KiB gzip body: inflated a piece at a time, in a thread, each piece counted against
    the request limit, so it is refused once past --max_request_mib (not after inflating all of it), while
    liveness answers."""
    server = start_server(["--model_dir", str(bytes_repository), "--max_request_mib", str(limit_mib)],
                          tmp_path / "log")
    try:
        bomb = gzip.compress(b"\0" * (257 * MiB), compresslevel=9)
        before = peak_rss_mib(server)
        with liveness_watch(server) as live:
            time.sleep(0.2)
            answer = httpx.post(f"{server.url}/v2/models/identity_fp32/infer", content=bomb, timeout=60,
                                headers={"content-encoding": "gzip", "content-type": "application/json"})
            time.sleep(0.2)
        assert answer.status_code == 413, answer.text
        assert f"decompressed request body is over the limit of {limit_mib * MiB} bytes" in answer.json()["error"]
        grew = peak_rss_mib(server) - before
        print(f"peak RSS grew {grew:.0f} MiB, liveness at most {max(live):.3f} s")
        assert grew < most_mib, f"peak RSS grew {grew:.0f} MiB"
        assert live and max(live) < 0.5, f"liveness waited {max(live):.2f} s"
    finally:
        server.stop()
