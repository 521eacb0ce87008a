"""Shared fixtures: synthetic models, free loopback ports, and real server processes."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import models as test_models

V2_DATATYPES = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def start_server(
    args: Sequence[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 60.0,
) -> ServerProcess:
    """Start ``python -m zeroserve.runtime`` on a free loopback port; wait (bounded) until ready."""
    port = unused_port()
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "zeroserve.runtime", "--host", "127.0.0.1", "--http_port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    server = ServerProcess(process, port, log_path)
    if wait_ready:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"server not ready after {timeout} s:\n{server.log()}")
            time.sleep(0.05)
    return server


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Triton-style repository: add (versions 1: a+b, 2: a*b), identity_<dt> per datatype, mlp, gather
    (fixed shape), lookup (gather over a dynamic batch)."""
    root = tmp_path_factory.mktemp("repository")
    test_models.add_model(root / "add" / "1" / "model.onnx", "Add")
    test_models.add_model(root / "add" / "2" / "model.onnx", "Mul")
    for datatype in V2_DATATYPES:
        test_models.identity_model(root / f"identity_{datatype.lower()}" / "1" / "model.onnx", datatype)
    test_models.mlp_model(root / "mlp" / "1" / "model.onnx")
    test_models.gather_model(root / "gather" / "1" / "model.onnx")
    test_models.lookup_model(root / "lookup" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="session")
def server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server process for the whole session, serving ``model_repository``."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    process = start_server(["--model_dir", str(model_repository)], log_path)
    yield process
    process.stop()


@pytest.fixture
def gated_model_server(tmp_path: Path) -> Iterator[tuple[str, threading.Event]]:
    """A loopback HTTP server whose model download blocks until the test opens the gate: a model server
    started on its URL stays in its loading state (503 with Retry-After) until then."""
    test_models.mlp_model(tmp_path / "gated" / "model.onnx")
    gate = threading.Event()
    root = str(tmp_path / "gated")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=root, **kwargs)

        def do_GET(self) -> None:
            gate.wait(30)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/model.onnx", gate
    gate.set()
    httpd.shutdown()
    httpd.server_close()
