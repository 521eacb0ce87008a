"""Every example runs as documented."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from zeroserve import RemoteModel

from conftest import ServerProcess, start_server, unused_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_serves_and_answers() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--once", "--port", str(unused_port())],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "cold: POST /v2/models/mlp/infer -> 200" in result.stdout
    assert "warm: POST /v2/models/mlp/infer -> 200" in result.stdout
    assert '"model_name": "mlp"' in result.stdout and '"shape": [1, 4]' in result.stdout
    assert "scaled to zero" in result.stdout


@pytest.fixture(scope="module")
def mlp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The example model served by a real zeroserve process (the remote model the app examples mount)."""
    log = tmp_path_factory.mktemp("examples") / "mlp.log"
    server = start_server(["--model_name", "mlp", "--model_dir", str(EXAMPLES / "models" / "mlp")], log)
    yield server
    server.stop()


@contextlib.contextmanager
def running(example: str, model_url: str) -> Iterator[str]:
    """Run a web app example as its docstring says; yield its URL; stop it with SIGTERM."""
    port = unused_port()
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / example), "--model-url", model_url, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy(),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[0].decode(errors="replace")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{example} is not listening after 60 s"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output = process.communicate(timeout=30)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0].decode(errors="replace")
    assert "Traceback" not in output, output


@pytest.mark.parametrize("example", ["starlette_app.py", "fastapi_app.py", "flask_app.py"])
def test_web_app_examples_mount_the_model(example: str, mlp_server: ServerProcess) -> None:
    features = [0.5] * 16
    expected = httpx.post(f"{mlp_server.url}/v2/models/mlp/infer", json={
        "inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": features}]}).json()
    with running(example, mlp_server.url) as url, httpx.Client(base_url=url, timeout=60) as client:
        labelled = client.post("/label", json={"features": features})
        assert labelled.status_code == 200, labelled.text
        assert labelled.json()["label"] in {"cat", "dog", "bird", "fish"}
        assert labelled.json()["scores"] == pytest.approx(expected["outputs"][0]["data"], rel=1e-6)
        assert client.post("/predict", json={"input": [features]}).json()["output"][0] == pytest.approx(
            expected["outputs"][0]["data"], rel=1e-6)
        with RemoteModel(f"{url}/predict", model="mlp") as through:  # V2 binary through the mounted route
            outputs = through.infer({"input": np.array([features], dtype=np.float32)})
        assert outputs["output"].tolist()[0] == pytest.approx(expected["outputs"][0]["data"], rel=1e-6)


def test_call_from_python_meets_a_cold_start() -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / "call_from_python.py")],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tight deadline: ColdStartTimeout")
    assert lines[1].startswith("cold: output (1, 4) float32") and lines[2].startswith("warm: output (1, 4)")
    assert lines[3].startswith("ready: True")
    assert lines[4].startswith("unreachable: Unreachable in ") and "no-such-host.invalid does not resolve" in lines[4]


@pytest.mark.parametrize("example", ["starlette_app.py", "flask_app.py"])
def test_web_app_examples_answer_bad_input_with_json(example: str, mlp_server: ServerProcess) -> None:
    with running(example, mlp_server.url) as url, httpx.Client(base_url=url, timeout=60) as client:
        wrong_shape = client.post("/label", json={"features": [0.5] * 3})
        assert wrong_shape.status_code == 400, wrong_shape.text
        assert "shape" in wrong_shape.json()["error"]  # the model server's own words
        not_numbers = client.post("/label", json={"features": ["a", "b"]})
        assert not_numbers.status_code == 400 and "FP32" in not_numbers.json()["error"]
        missing = client.post("/label", content=b"not json")
        assert missing.status_code == 400 and "features" in missing.json()["error"]
