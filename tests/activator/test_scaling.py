"""Scaling with real processes: a cold start held and answered, a warm request, the idle scale-down, more
processes under load, and Knative's answers when the queue is full (503) or time runs out (504)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.activator.conftest import ActivatorProcess, activator_ms, infer

Start = Callable[..., ActivatorProcess]


def test_cold_start_warm_request_and_scale_down(activator: Start, model_dir: Path) -> None:
    dev = activator("--model_name", "mlp", "--model_dir", str(model_dir), "--idle_timeout", "1")
    assert dev.starts() == 0  # nothing runs before the first request

    cold = infer(dev.url)
    assert cold.status_code == 200, cold.text
    assert cold.json()["outputs"][0]["shape"] == [1, 4]
    cold_wait = activator_ms(cold)
    assert cold_wait > 50  # held while the process started and loaded the model

    # Held through a start, the answer says so: a client whose quick probe was held knows it met a cold start.
    assert f"activator.start;dur={cold_wait:.1f}" in cold.headers["server-timing"]

    warm = infer(dev.url, timeout=10)
    assert warm.json() == cold.json()
    assert activator_ms(warm) < cold_wait / 5
    assert "activator.start" not in warm.headers["server-timing"]

    dev.wait_log("scaled to zero", timeout=15)
    again = infer(dev.url)
    assert again.status_code == 200
    assert dev.starts() == 2
    # One Date header (the activator's), no Server header: the process's own are not passed on as well.
    assert len(again.headers.get_list("date")) == 1 and "server" not in again.headers


def test_full_queue_answers_503_and_held_requests_are_answered(
    activator: Start, gated_model_server: tuple[str, threading.Event], tmp_path: Path
) -> None:
    uri, gate = gated_model_server
    dev = activator("--model_name", "mlp", "--model_dir", uri, "--cache_dir", str(tmp_path / "cache"),
                      "--queue_depth", "1")
    held: list[httpx.Response] = []
    first = threading.Thread(target=lambda: held.append(infer(dev.url)))
    first.start()
    dev.wait_log("cold start: server process")
    overflow = infer(dev.url, timeout=10)
    assert overflow.status_code == 503
    assert overflow.json() == {"error": "pending request queue full"}  # Knative's words
    assert "zeroserve-start" not in overflow.headers
    gate.set()
    first.join(60)
    assert held[0].status_code == 200


def test_request_timeout_answers_504_with_the_progress(
    activator: Start, gated_model_server: tuple[str, threading.Event], tmp_path: Path
) -> None:
    uri, gate = gated_model_server
    dev = activator("--model_name", "mlp", "--model_dir", uri, "--cache_dir", str(tmp_path / "cache"),
                      "--request_timeout", "2")
    started = time.monotonic()
    response = infer(dev.url, timeout=30)
    assert response.status_code == 504
    assert 1.9 < time.monotonic() - started < 10
    body = response.json()
    assert body["error"].startswith("activator request timeout")
    assert "was not delivered" in body["error"]
    assert body["start"]["state"] == "loading" and body["start"]["elapsed_s"] > 1.5
    assert body["start"]["phase"] in ("process", "fetch")
    assert response.headers["zeroserve-start"] == "loading"
    gate.set()
    dev.wait_log("ready after")
    assert infer(dev.url, timeout=30).status_code == 200


def test_more_processes_start_when_all_are_busy(activator: Start, model_dir: Path) -> None:
    dev = activator("--model_name", "mlp", "--model_dir", str(model_dir), "--max_concurrency", "1",
                      "--max_processes", "2")
    results: list[int] = []

    def call() -> None:
        results.append(infer(dev.url).status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [200] * 6
    assert 1 <= dev.starts() <= 2
