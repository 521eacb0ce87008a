"""Careless and hostile connections against a real server: huge headers, connections that never send a request
or send one a byte at a time, and more connections than the process can hold. Each is bounded, and valid
requests keep being answered."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import models as test_models
from conftest import ServerProcess, start_server, unused_port

BODY = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("connections") / "model.onnx"
    test_models.mlp_model(path)
    return path


@pytest.fixture
def guarded(model_dir: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_server(["--model_dir", str(model_dir), "--timeout_keep_alive", "1", "--max_connections", "8"],
                          tmp_path / "log")
    yield server
    server.stop()


def answer(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def infer_ok(server: ServerProcess) -> bool:
    return httpx.post(f"{server.url}/v2/models/model/infer", json=BODY, timeout=10).status_code == 200


def test_a_huge_header_is_refused_early_and_costs_others_nothing(guarded: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
        started = time.monotonic()
        sent = 0
        try:
            while sent < 64 * 2**20:  # 64 MiB of one header, in 64 KiB writes
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: it reads no more
        reply = answer(sock)
        assert time.monotonic() - started < 10
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert b"over 65536 bytes" in reply
    assert sent < 64 * 2**20  # it stopped reading long before the end
    assert infer_ok(guarded)


@pytest.mark.parametrize(
    ("request_head", "status", "message"),
    [
        (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Line: " + b"a" * 10_000 + b"\r\n\r\n", 431, b"header line"),
        (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, b"request target"),
        # A body in the same read as the refused head: the parser goes on into it after the refusal.
        (b"POST /v2/models/model/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX-Line: " + b"a" * 10_000
         + b"\r\n\r\n{}", 431, b"header line"),
        # ... and after a request answered on the same connection.
        (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\nGET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
         414, b"request target"),
    ],
)
def test_a_long_header_line_or_target_is_refused(
    guarded: ServerProcess, request_head: bytes, status: int, message: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(request_head)
        reply = answer(sock)
    refusal = reply[reply.index(f"HTTP/1.1 {status} ".encode()):] if reply.startswith(b"HTTP/1.1 200 ") else reply
    assert refusal.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    assert message in refusal
    assert infer_ok(guarded)


def test_a_connection_that_never_sends_a_request_is_closed(guarded: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        started = time.monotonic()
        assert answer(sock, timeout=10) == b""  # closed, without an answer
        assert 0.8 < time.monotonic() - started < 5


def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(guarded: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        started = time.monotonic()
        with pytest.raises(OSError):
            for byte in b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
                assert time.monotonic() - started < 10
        assert time.monotonic() - started < 5


def test_a_connection_idle_after_its_answer_is_closed_and_its_next_head_is_bounded(guarded: ServerProcess) -> None:
    live = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:  # idle after an answer: keep-alive closes it
        sock.sendall(live)
        started = time.monotonic()
        reply = answer(sock, timeout=10)
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert 0.8 < time.monotonic() - started < 5
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:  # a second head, slow: cut off as the first
        sock.sendall(live)
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        with pytest.raises(OSError):
            for byte in b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
                assert time.monotonic() - started < 10
        assert time.monotonic() - started < 5


def test_past_the_connection_cap_idle_connections_make_room(guarded: ServerProcess) -> None:
    idle = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(20)]
    try:
        for _ in range(3):  # each valid request gets in: the connection idle longest is closed for it
            assert infer_ok(guarded)
    finally:
        for sock in idle:
            sock.close()


def test_past_the_connection_cap_with_none_idle_the_newcomer_gets_503(guarded: ServerProcess) -> None:
    busy = []
    try:
        for _ in range(8):  # requests in progress: their bodies never end
            sock = socket.create_connection(("127.0.0.1", guarded.port))
            sock.sendall(b"POST /v2/models/model/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
            busy.append(sock)
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = answer(sock)
        assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
        assert b"limit of 8 connections" in reply
    finally:
        for sock in busy:
            sock.close()
    time.sleep(0.3)
    assert infer_ok(guarded)


def test_under_a_low_open_file_limit_silent_connections_do_not_starve_valid_requests(
    model_dir: Path, tmp_path: Path
) -> None:
    """``ulimit -n 256`` and 300 connections that say nothing: every valid request is still answered."""
    port = unused_port()

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    log_path = tmp_path / "log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "zeroserve.runtime", "--host", "127.0.0.1", "--http_port", str(port),
             "--model_dir", str(model_dir)],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=low_limit, env=os.environ.copy(),
        )  # fmt: skip
    server = ServerProcess(process, port, log_path)
    silent: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{server.url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, server.log()
            time.sleep(0.05)
        for _ in range(300):
            try:
                silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        for _ in range(5):
            assert infer_ok(server), server.log()[-2000:]
    finally:
        for sock in silent:
            sock.close()
        server.stop()
