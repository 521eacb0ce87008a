"""The local scale-to-zero front (`zeroserve dev`), as real processes: a cold start held and answered, a warm
request, the idle scale-down, and Knative's answers when the queue is full (503) or time runs out (504)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import models as test_models
from conftest import unused_port

BODY = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


class Front:
    def __init__(self, args: list[str], log: Path) -> None:
        self.port = unused_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "zeroserve.activator", "--port", str(self.port), *args],
                stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(),
            )
        deadline = time.monotonic() + 30
        while "holding http" not in self.log() or not self._listening():
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def _listening(self) -> bool:
        # A TCP connect, not a request: any request would start a server process.
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    test_models.mlp_model(tmp_path / "model" / "model.onnx")
    return tmp_path / "model"


@pytest.fixture
def front_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    fronts: list[Front] = []

    def make(*args: str) -> Front:
        front = Front(list(args), tmp_path / f"front{len(fronts)}.log")
        fronts.append(front)
        return front

    yield make
    for front in fronts:
        front.stop()
        assert "Traceback" not in front.log(), front.log()


def activator_ms(response: httpx.Response) -> float:
    """The front's ``activator;dur=`` entry (the server's own Server-Timing entries come with it)."""
    entries = [part.strip() for part in response.headers["server-timing"].split(",")]
    return float(next(entry for entry in entries if entry.startswith("activator;")).split("dur=")[1])


def wait_for_log(front: Front, text: str, count: int = 1, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while front.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} x{count} not in log:\n{front.log()}"
        time.sleep(0.05)


def test_cold_start_warm_request_and_scale_down(front_factory, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    front = front_factory("--model_name", "mlp", "--model_dir", str(model_dir), "--idle_timeout", "1")
    assert "cold start" not in front.log()  # nothing runs before the first request

    cold = httpx.post(f"{front.url}/v2/models/mlp/infer", json=BODY, timeout=60)
    assert cold.status_code == 200, cold.text
    assert cold.json()["outputs"][0]["shape"] == [1, 4]
    cold_wait = activator_ms(cold)
    assert cold_wait > 50  # held while the process started and loaded the model

    warm = httpx.post(f"{front.url}/v2/models/mlp/infer", json=BODY, timeout=10)
    assert warm.json() == cold.json()
    assert activator_ms(warm) < cold_wait / 5

    wait_for_log(front, "scaled to zero", timeout=15)
    again = httpx.post(f"{front.url}/v2/models/mlp/infer", json=BODY, timeout=60)
    assert again.status_code == 200
    assert front.log().count("cold start: server process") == 2


def test_full_queue_answers_503_and_held_requests_are_answered(  # type: ignore[no-untyped-def]
    front_factory, gated_model_server, tmp_path: Path
) -> None:
    uri, gate = gated_model_server
    front = front_factory("--model_name", "mlp", "--model_dir", uri, "--cache_dir", str(tmp_path / "cache"),
                          "--queue_depth", "1")
    held: list[httpx.Response] = []
    first = threading.Thread(
        target=lambda: held.append(httpx.post(f"{front.url}/v2/models/mlp/infer", json=BODY, timeout=60))
    )
    first.start()
    wait_for_log(front, "cold start: server process")
    overflow = httpx.post(f"{front.url}/v2/models/mlp/infer", json=BODY, timeout=10)
    assert overflow.status_code == 503
    assert overflow.text == "pending request queue full"
    gate.set()
    first.join(60)
    assert held[0].status_code == 200


def test_request_timeout_answers_504(front_factory, gated_model_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    uri, gate = gated_model_server
    front = front_factory("--model_name", "mlp", "--model_dir", uri, "--cache_dir", str(tmp_path / "cache"),
                          "--request_timeout", "1")
    started = time.monotonic()
    response = httpx.post(f"{front.url}/v2/models/mlp/infer", json=BODY, timeout=30)
    assert response.status_code == 504
    assert response.text == "activator request timeout"
    assert time.monotonic() - started < 10
    gate.set()
    wait_for_log(front, "ready after")
    assert httpx.post(f"{front.url}/v2/models/mlp/infer", json=BODY, timeout=30).status_code == 200


def test_a_server_that_cannot_start_answers_502(front_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    front = front_factory("--model_dir", str(tmp_path / "nowhere"))
    response = httpx.post(f"{front.url}/v2/models/model/infer", json=BODY, timeout=60)
    assert response.status_code == 502
    assert "exited with status 1 during start" in response.text


def test_more_processes_start_when_all_are_busy(front_factory, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    front = front_factory("--model_name", "mlp", "--model_dir", str(model_dir), "--max_concurrency", "1",
                          "--max_processes", "2")
    results: list[int] = []

    def call() -> None:
        results.append(httpx.post(f"{front.url}/v2/models/mlp/infer", json=BODY, timeout=60).status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [200] * 6
    assert 1 <= front.log().count("cold start: server process") <= 2
