"""``zeroserve dev`` as real processes: the activator on a free loopback port, its server children, models
(good, corrupt), and an OTLP/HTTP receiver for the spans and metrics of both.

Every activator a test starts is stopped at the end, and every server process it started (read from its
log) must be gone by then: a test that leaves a child behind fails.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from otlp_receiver import Receiver

import models as test_models
from conftest import unused_port

BODY = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
_STARTED = re.compile(r"cold start: server process (\d+) starting")


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class ActivatorProcess:
    """``python -m zeroserve.activator`` in a session of its own (so a test can send SIGINT to its whole
    process group, as a terminal's Ctrl-C does), its stdout and stderr in one log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 port: int | None = None, wait: bool = True) -> None:
        self.port = port or unused_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "zeroserve.activator", "--port", str(self.port), *args],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True,
            )
        if wait:
            wait_until(lambda: self._up(), 30, f"activator holding port {self.port}:\n{self.log()}")

    def _up(self) -> bool:
        assert self.process.poll() is None, self.log()
        if "holding http" not in self.log():
            return False
        try:  # a TCP connect, not a request: a request would start a server process
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def server_pids(self) -> list[int]:
        return [int(pid) for pid in _STARTED.findall(self.log())]

    def starts(self) -> int:
        return len(self.server_pids())

    def wait_log(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        wait_until(lambda: self.log().count(text) >= count, timeout, f"{text!r} x{count} in the log:\n{self.log()}")

    def signal_group(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 45.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise AssertionError(f"the activator did not stop within {timeout} s:\n{self.log()}") from None
        return self.process.returncode

    def leftover_children(self) -> list[int]:
        return [pid for pid in self.server_pids() if alive(pid)]


@pytest.fixture
def activator(tmp_path: Path) -> Iterator[Callable[..., ActivatorProcess]]:
    """Factory: ``activator(*args, env=None)`` starts one; all are stopped afterwards, and none may leave a
    server process running."""
    made: list[ActivatorProcess] = []

    def make(*args: str, env: dict[str, str] | None = None, port: int | None = None,
             wait: bool = True) -> ActivatorProcess:
        made.append(ActivatorProcess(list(args), tmp_path / f"activator{len(made)}.log", env, port, wait))
        return made[-1]

    yield make
    leftovers: list[int] = []
    for item in made:
        item.stop()
        wait_until(lambda item=item: not item.leftover_children(), 10, "server processes gone")  # type: ignore[misc]
        leftovers += item.leftover_children()
    for pid in leftovers:  # never leave one behind, even when failing
        os.kill(pid, signal.SIGKILL)
    assert not leftovers


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    test_models.mlp_model(tmp_path / "model" / "model.onnx")
    return tmp_path / "model"


@pytest.fixture
def corrupt_model_dir(tmp_path: Path) -> Path:
    """An .onnx cut short: ONNX Runtime fails to parse it (INVALID_PROTOBUF) and the server exits with 1."""
    whole = test_models.mlp_model(tmp_path / "whole" / "model.onnx").read_bytes()
    path = tmp_path / "corrupt" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(whole[: len(whole) // 3])
    return path.parent


def infer(url: str, timeout: float = 60.0, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/mlp/infer", json=BODY, timeout=timeout, **kwargs)  # type: ignore[arg-type]


def activator_ms(response: httpx.Response) -> float:
    """The activator's ``activator;dur=`` entry (the server's own Server-Timing entries come with it)."""
    entries = [part.strip() for part in response.headers["server-timing"].split(",")]
    return float(next(entry for entry in entries if entry.startswith("activator;")).split("dur=")[1])


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    collector = Receiver()
    yield collector
    collector.close()
