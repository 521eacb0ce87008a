"""Process lifecycle of the real server: honest readiness while loading, load failures, SIGTERM drain."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

import models as test_models
from conftest import start_server, unused_port

MLP_BODY = b'{"inputs":[{"name":"input","shape":[1,16],"datatype":"FP32","data":[' + b",".join(
    [b"0.5"] * 16
) + b"]}]}"


def wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.TransportError:
        return False


def read_answer(sock: socket.socket) -> bytes:
    """One JSON answer read off ``sock``, which is then closed."""
    response = b""
    while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        response += chunk
    sock.close()
    return response


def test_not_ready_while_loading_then_ready(gated_model_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    uri, gate = gated_model_server
    server = start_server(
        ["--model_name", "mlp", "--model_dir", uri, "--cache_dir", str(tmp_path / "cache")],
        tmp_path / "log",
        wait_ready=False,
    )
    try:
        wait_for(lambda: answers(f"{server.url}/v2/health/live"))
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert ready.headers["zeroserve-start"] == "loading"
        infer = httpx.post(f"{server.url}/v2/models/mlp/infer", content=MLP_BODY)
        assert infer.status_code == 503
        assert int(infer.headers["retry-after"]) >= 1
        assert "still loading" in infer.json()["error"]
        # The marker says "still loading", not "failed", with the phase the start is in.
        assert infer.headers["zeroserve-start"] == "loading"
        start = infer.json()["start"]
        assert start["state"] == "loading" and start["phase"] == "fetch" and start["elapsed_s"] > 0
        assert httpx.get(f"{server.url}/v2/models/mlp").status_code == 503

        gate.set()
        wait_for(lambda: httpx.get(f"{server.url}/v2/health/ready").status_code == 200)
        assert httpx.get(f"{server.url}/v2/models/mlp/ready").json() == {"ready": True}
        assert httpx.post(f"{server.url}/v2/models/mlp/infer", content=MLP_BODY).status_code == 200
    finally:
        server.stop()


def test_missing_model_exits_with_a_clear_message(tmp_path: Path) -> None:
    server = start_server(["--model_dir", str(tmp_path / "nowhere")], tmp_path / "log", wait_ready=False)
    try:
        server.process.wait(30)
    finally:
        server.stop()
    assert server.process.returncode == 1
    assert "does not exist" in server.log()


def test_missing_model_without_exit_keeps_serving_errors(tmp_path: Path) -> None:
    server = start_server(
        ["--model_name", "m", "--model_dir", str(tmp_path / "nowhere"), "--no-exit_on_error"],
        tmp_path / "log",
        wait_ready=False,
    )
    try:
        wait_for(lambda: answers(f"{server.url}/v2/health/live"))
        wait_for(lambda: "model loading failed" in server.log())
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 503
        response = httpx.post(f"{server.url}/v2/models/m/infer", content=MLP_BODY)
        assert response.status_code == 503
        assert "does not exist" in response.json()["error"]
        assert response.headers["zeroserve-start"] == "failed"
        assert "does not exist" in response.json()["start"]["reason"]
    finally:
        server.stop()


def test_corrupt_model_without_exit_answers_failed_with_onnx_runtimes_reason(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"this is not a protobuf")
    server = start_server(
        ["--model_name", "m", "--model_dir", str(tmp_path / "model.onnx"), "--no-exit_on_error"],
        tmp_path / "log",
        wait_ready=False,
    )
    try:
        wait_for(lambda: "model loading failed" in server.log())
        for path in ("/v2/models/m/infer", "/v2/models/m/ready"):
            response = httpx.request("POST" if path.endswith("infer") else "GET", server.url + path, content=MLP_BODY)
            assert response.status_code == 503
            assert response.headers["zeroserve-start"] == "failed"
            assert "Protobuf parsing failed" in response.json()["start"]["reason"]
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503 and ready.headers["zeroserve-start"] == "failed"
        assert ready.json()["ready"] is False and "Protobuf parsing failed" in ready.json()["start"]["reason"]
    finally:
        server.stop()


def test_broken_onnx_file_fails_to_load(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"this is not a protobuf")
    server = start_server(["--model_dir", str(tmp_path / "model.onnx")], tmp_path / "log", wait_ready=False)
    try:
        server.process.wait(30)
    finally:
        server.stop()
    assert server.process.returncode == 1
    assert "zeroserve:" in server.log()


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(tmp_path: Path) -> None:
    test_models.mlp_model(tmp_path / "model.onnx")
    server = start_server(["--model_dir", str(tmp_path), "--shutdown_timeout", "20"], tmp_path / "log")
    head, tail = MLP_BODY[:40], MLP_BODY[40:]
    in_flight = []
    for _ in range(3):  # three requests whose bodies are still arriving when SIGTERM lands
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(
            b"POST /v2/models/model/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(MLP_BODY)}\r\n\r\n".encode()
            + head
        )
        in_flight.append(sock)
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)

    def refuses_new_connections() -> bool:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return False
        except ConnectionRefusedError:
            return True

    wait_for(refuses_new_connections, timeout=10)
    assert server.process.poll() is None  # still draining
    for sock in in_flight:
        sock.sendall(tail)
        response = read_answer(sock)
        assert response.startswith(b"HTTP/1.1 200"), response
        assert b'"outputs"' in response
    # A stop asked for by the platform is a clean exit (Kubernetes reads 143 as "killed").
    assert server.process.wait(15) == 0


def test_sigterm_drain_is_bounded_by_its_deadline(tmp_path: Path) -> None:
    test_models.mlp_model(tmp_path / "model.onnx")
    server = start_server(["--model_dir", str(tmp_path), "--shutdown_timeout", "1"], tmp_path / "log")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as stuck:
        stuck.sendall(b"POST /v2/models/model/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{")
        time.sleep(0.2)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0
        assert time.monotonic() - started < 8


@pytest.mark.parametrize("loaded", [True, False])
def test_ctrl_c_stops_cleanly_without_a_traceback(gated_model_server, tmp_path: Path, loaded: bool) -> None:  # type: ignore[no-untyped-def]
    """SIGINT (Ctrl-C) once serving, or while the model still loads: exit 130, the shell's "interrupted", and
    no KeyboardInterrupt traceback."""
    uri, gate = gated_model_server
    if loaded:
        gate.set()
    server = start_server(["--model_dir", uri, "--cache_dir", str(tmp_path / "cache")], tmp_path / "log",
                          wait_ready=loaded)
    try:
        wait_for(lambda: answers(f"{server.url}/v2/health/live"))
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(15) == 130
    finally:
        server.stop()
    assert "Traceback" not in server.log() and "KeyboardInterrupt" not in server.log()


def test_port_from_environment_and_model_name_fallback(tmp_path: Path) -> None:
    test_models.mlp_model(tmp_path / "model.onnx")
    port = unused_port()
    import os
    import subprocess
    import sys

    env = {**os.environ, "PORT": str(port), "STORAGE_URI": str(tmp_path), "MODEL_NAME": "from-env"}
    process = subprocess.Popen(
        [sys.executable, "-m", "zeroserve.runtime", "--host", "127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(f"{url}/v2/health/ready") and httpx.get(f"{url}/v2/health/ready").status_code == 200)
        assert httpx.post(f"{url}/v2/models/from-env/infer", content=MLP_BODY).status_code == 200
    finally:
        process.terminate()
        process.wait(15)


def test_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    # A warmup of some length, so that the two workers become ready at visibly different times.
    test_models.conv_model(tmp_path / "model.onnx", size=64, channels=32, layers=4)
    args = ["--model_dir", str(tmp_path), "--workers", "2", "--warmup_shapes", "input:16x3x64x64"]
    server = start_server(args, tmp_path / "log", wait_ready=False)
    body = {"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.5] * 3 * 64 * 64}]}
    try:
        # A worker accepts connections only once its models are loaded, so no request meets one still loading
        # (which would answer 503): requests sent from the start wait, then are served, on a new connection
        # each time, spread over the workers.
        statuses: list[int] = []
        deadline = time.monotonic() + 60
        while len(statuses) < 60 and time.monotonic() < deadline:
            try:
                with httpx.Client(timeout=30) as client:
                    statuses.append(client.post(f"{server.url}/v2/models/model/infer", json=body).status_code)
            except httpx.ConnectError:  # the supervisor has not bound the port yet
                time.sleep(0.01)
        assert statuses and set(statuses) == {200}, statuses
        wait_for(lambda: server.log().count("all models ready") == 2)
    finally:
        assert server.stop() in (0, -signal.SIGTERM)
    assert "Stopping parent process" in server.log()


def test_workers_told_to_stop_while_loading_stop_at_once(gated_model_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The download never finishes (the gate stays shut): the workers must not wait for their models before
    # shutting down, as they would if their lifespan only waited for loading.
    uri, _ = gated_model_server
    server = start_server(
        ["--model_dir", uri, "--cache_dir", str(tmp_path / "cache"), "--workers", "2"], tmp_path / "log",
        wait_ready=False,
    )  # fmt: skip
    try:
        wait_for(lambda: server.log().count("Waiting for application startup") == 2)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0
        assert time.monotonic() - started < 10
    finally:
        server.stop()
    assert server.log().count("stopping before the models finished loading") == 2


def test_workers_stop_when_a_model_cannot_load(tmp_path: Path) -> None:
    server = start_server(["--model_dir", str(tmp_path / "nowhere"), "--workers", "2"], tmp_path / "log",
                          wait_ready=False)
    try:
        assert server.process.wait(60) == 1
    finally:
        server.stop()
    assert "does not exist" in server.log()


def test_warmup_profile_shapes_the_warmup_run(tmp_path: Path) -> None:
    test_models.mlp_model(tmp_path / "model.onnx")
    good = start_server(["--model_dir", str(tmp_path), "--warmup_shapes", "input:32x16"], tmp_path / "good.log")
    good.stop()
    bad = start_server(["--model_dir", str(tmp_path), "--warmup_shapes", "input:32x15"], tmp_path / "bad.log",
                       wait_ready=False)
    try:
        assert bad.process.wait(60) == 1
    finally:
        bad.stop()
    assert "warmup shape [32, 15] for input 'input' does not fit the model's [-1, 16]" in bad.log()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_requests_sent_in_full_before_sigterm_are_answered_though_the_server_had_not_read_them(
    tmp_path: Path, event_loop: str
) -> None:
    """A server too busy to read its sockets when SIGTERM lands (here: stopped with SIGSTOP, so the requests wait
    in the kernel's listen backlog and socket buffers) still answers every request that had arrived in full."""
    test_models.mlp_model(tmp_path / "model.onnx")
    server = start_server(["--model_dir", str(tmp_path), "--shutdown_timeout", "10", "--event_loop", event_loop],
                          tmp_path / "log")
    request = (
        b"POST /v2/models/model/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(MLP_BODY)}\r\n\r\n".encode() + MLP_BODY
    )
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # accepted now, its request sent later
    time.sleep(0.2)
    server.process.send_signal(signal.SIGSTOP)
    try:
        arrived = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(8)]
        for sock in [idle, *arrived]:
            sock.sendall(request)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # longer than uvicorn's tick: it finds the stop in the loop's first turn after SIGCONT
    finally:
        server.process.send_signal(signal.SIGCONT)
    for sock in [idle, *arrived]:
        response = read_answer(sock)
        assert response.startswith(b"HTTP/1.1 200"), response
    assert server.process.wait(15) == 0
