"""A failed start is an answer, not a wait (real processes): a corrupt model, a server that stays up and
reports a failed load, a child killed with SIGKILL mid-start and while serving, the backoff between starts,
and the progress of a slow start in the answers given while it goes on."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx

from tests.activator.conftest import ActivatorProcess, alive, infer, wait_until

Start = Callable[..., ActivatorProcess]
_STAMP = re.compile(r"^(\S+ \S+) INFO zeroserve.activator: cold start", re.MULTILINE)


def start_times(dev: ActivatorProcess) -> list[float]:
    return [datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() for stamp in _STAMP.findall(dev.log())]


def test_a_corrupt_model_is_answered_with_its_reason_at_once(activator: Start, corrupt_model_dir: Path) -> None:
    dev = activator("--model_name", "mlp", "--model_dir", str(corrupt_model_dir))
    began = time.monotonic()
    response = infer(dev.url)
    took = time.monotonic() - began

    assert response.status_code == 503
    assert took < 15  # one start, not a wait for the request timeout
    assert response.headers["zeroserve-start"] == "failed"
    assert response.headers["retry-after"] == "1"
    body = response.json()
    start = body["start"]
    assert start["state"] == "failed"
    assert "INVALID_PROTOBUF" in start["reason"] and "Protobuf parsing failed" in start["reason"]
    assert start["exit_status"] == 1 and start["starts"] == 1
    assert 0 < start["retry_after_s"] <= 1
    assert body["error"].startswith("the model server failed to start: ") and "INVALID_PROTOBUF" in body["error"]

    # During the backoff: the same answer at once, and no new process.
    again = httpx.get(f"{dev.url}/v2/health/ready", timeout=10)
    assert again.status_code == 503 and again.headers["zeroserve-start"] == "failed"
    assert again.json()["start"]["reason"] == start["reason"]
    assert dev.starts() == 1
    assert "INVALID_PROTOBUF" in dev.log()  # the server's own log is echoed too


def test_the_backoff_doubles_between_starts(activator: Start, corrupt_model_dir: Path) -> None:
    """A client that honours Retry-After for 12 s gets a start at about 0, 2, 5 and 10 s: never more often
    than the doubling backoff (1, 2, 4 s after each failure) allows."""
    dev = activator("--model_name", "mlp", "--model_dir", str(corrupt_model_dir))
    answers: list[httpx.Response] = []
    first_answer = None
    began = time.monotonic()
    with httpx.Client(timeout=30) as client:
        while time.monotonic() - began < 12:
            response = client.post(f"{dev.url}/v2/models/mlp/infer", json={})
            first_answer = first_answer or time.monotonic() - began
            answers.append(response)
            time.sleep(float(response.headers["retry-after"]) / 4)  # an impatient client: 4x too often
    assert first_answer is not None and first_answer < 15
    assert {(r.status_code, r.headers["zeroserve-start"]) for r in answers} == {(503, "failed")}
    assert 2 <= dev.starts() <= 4, dev.log()  # 4 when a failed start takes a second or less
    times = start_times(dev)
    failed_at = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp()
                 for s in re.findall(r"^(\S+ \S+) ERROR zeroserve.activator: server process \d+ failed to start",
                                     dev.log(), re.MULTILINE)]
    for n, (failure, next_start) in enumerate(zip(failed_at, times[1:])):
        assert next_start - failure >= 2**n - 0.05  # 1, 2, 4 s after the n-th failure
    assert [r.json()["start"]["starts"] for r in answers][-1] == dev.starts()


def test_starts_per_minute_are_bounded(activator: Start, corrupt_model_dir: Path) -> None:
    dev = activator("--model_name", "mlp", "--model_dir", str(corrupt_model_dir), "--backoff_initial", "0.05",
                      "--backoff_max", "0.05", "--max_starts_per_minute", "3")
    last = None
    began = time.monotonic()
    while time.monotonic() - began < 8 and dev.starts() < 4:
        last = infer(dev.url)
        time.sleep(0.1)
    assert dev.starts() == 3
    assert last is not None and last.status_code == 503 and last.headers["zeroserve-start"] == "failed"
    assert int(last.headers["retry-after"]) > 45  # the next start waits for the minute to pass


def test_a_server_that_stays_up_after_a_failed_load_is_stopped(activator: Start, corrupt_model_dir: Path) -> None:
    dev = activator("--model_name", "mlp", "--model_dir", str(corrupt_model_dir), "--no-exit_on_error")
    response = httpx.get(f"{dev.url}/v2/models/mlp/ready", timeout=30)
    assert response.status_code == 503 and response.headers["zeroserve-start"] == "failed"
    start = response.json()["start"]
    assert "INVALID_PROTOBUF" in start["reason"] and "exit_status" not in start
    [pid] = dev.server_pids()
    wait_until(lambda: not alive(pid), 15, "the failed server process stopped")


def test_a_child_killed_mid_start_fails_its_held_requests(
    activator: Start, gated_model_server: tuple[str, threading.Event], tmp_path: Path
) -> None:
    uri, gate = gated_model_server
    dev = activator("--model_name", "mlp", "--model_dir", uri, "--cache_dir", str(tmp_path / "cache"))
    held: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: held.append(infer(dev.url))) for _ in range(3)]
    for thread in threads:
        thread.start()
    dev.wait_log("cold start: server process")
    [pid] = dev.server_pids()
    wait_until(lambda: dev.log().count("Uvicorn running on") >= 1, 30, "the server listening")
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    for thread in threads:
        thread.join(30)
    assert time.monotonic() - killed < 5  # answered, not left hanging
    assert [r.status_code for r in held] == [503] * 3
    for response in held:
        assert response.headers["zeroserve-start"] == "failed"
        assert response.json()["start"]["reason"] == "killed by SIGKILL"
        assert response.json()["start"]["exit_status"] == 137

    gate.set()
    wait_until(lambda: time.monotonic() - killed > 1.2, 5)  # past the 1 s backoff
    assert infer(dev.url).status_code == 200  # the next start, after the backoff
    assert dev.starts() == 2


def test_a_child_that_dies_while_serving_is_replaced(activator: Start, model_dir: Path) -> None:
    dev = activator("--model_name", "mlp", "--model_dir", str(model_dir))
    assert infer(dev.url).status_code == 200
    [pid] = dev.server_pids()
    os.kill(pid, signal.SIGKILL)
    dev.wait_log("exited with status 137")
    response = infer(dev.url)  # held through the crash backoff and the next start, not failed
    assert response.status_code == 200, response.text
    assert dev.starts() == 2


def test_a_slow_start_shows_its_progress(
    activator: Start, gated_model_server: tuple[str, threading.Event], tmp_path: Path
) -> None:
    uri, gate = gated_model_server
    dev = activator("--model_name", "mlp", "--model_dir", uri, "--cache_dir", str(tmp_path / "cache"),
                      "--probe_hold", "0.3")
    phases = []
    for _ in range(100):  # a readiness probe is held 0.3 s, then told where the start is
        probe = httpx.get(f"{dev.url}/v2/health/ready", timeout=10)
        assert probe.status_code == 503, probe.text
        assert probe.headers["zeroserve-start"] == "loading" and probe.headers["retry-after"] == "1"
        body = probe.json()
        assert body["ready"] is False and body["error"].startswith("the model server is still loading")
        phases.append(body["start"]["phase"])
        if phases[-1] == "fetch":
            break
    assert phases[-1] == "fetch", phases  # the server's own phase, read from its readiness answer
    assert body["start"]["elapsed_s"] > 0
    assert dev.starts() == 1

    began = time.monotonic()
    waited = infer(dev.url, headers={"Prefer": "wait=1"})  # any request may bound its hold
    assert waited.status_code == 503 and waited.headers["zeroserve-start"] == "loading"
    assert 0.9 < time.monotonic() - began < 5
    assert "ready" not in waited.json()

    gate.set()
    ready = httpx.get(f"{dev.url}/v2/health/ready", timeout=30)
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    assert dev.starts() == 1
