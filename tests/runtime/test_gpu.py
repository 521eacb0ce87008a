"""The GPU path on a real NVIDIA GPU: the CUDA execution provider, the provider fallbacks, and a server on it.

Skipped wherever ONNX Runtime offers no CUDA provider or no GPU answers (CI has neither). On a GPU machine,
with ``onnxruntime-gpu`` installed and the CUDA libraries on the loader's path:

    python -m pytest tests/runtime/test_gpu.py -v

Nothing here stands in for the GPU: sessions, kernels and the server process are real. Where TensorRT's
libraries (``libnvinfer.so.10``) are not installed, the tests for that case run instead of the TensorRT ones.
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from zeroserve.runtime.artifact_keys import cuda_device
from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.providers import CPU, CUDA, TRT
from zeroserve.runtime.server_errors import ModelLoadError
from zeroserve.runtime.settings import ProviderSettings

from conftest import start_server
from models import conv_model


def _cuda_offered() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return CUDA in ort.get_available_providers()


pytestmark = pytest.mark.skipif(
    not _cuda_offered() or cuda_device(0) is None,
    reason="needs onnxruntime-gpu and an NVIDIA GPU (none here)",
)

# TF32 (ONNX Runtime's CUDA default on Ampere and later) keeps 10 mantissa bits in convolutions.
GPU_RTOL, GPU_ATOL = 5e-3, 5e-3


def _tensorrt_installed() -> bool:
    try:
        ctypes.CDLL("libnvinfer.so.10")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conv_model(tmp_path_factory.mktemp("cnn") / "cnn" / "1" / "model.onnx", size=64, channels=32, layers=4)


def _cpu_reference(path: Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=[CPU])
    return np.asarray(session.run(None, {"input": batch})[0])


def _images(count: int, seed: int = 0, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, size, size)).astype(np.float32)


def test_cuda_device_facts_match_nvidia_smi() -> None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("nvidia-smi is not installed")
    line = subprocess.run(
        [smi, "--id=0", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    name, capability = (part.strip() for part in line.rsplit(",", 1))
    device = cuda_device(0)
    assert device is not None
    assert (device.name, device.compute_capability) == (name, capability)
    assert re.fullmatch(r"(driver )?\d+\.\d+", device.cuda_runtime), device.cuda_runtime


def test_a_cuda_session_runs_on_the_gpu_and_agrees_with_the_cpu(cnn: Path) -> None:
    model = OnnxModel("cnn", "1", cnn, ProviderSettings(choice="cuda"))
    model.load()
    model.warmup()
    assert model.execution_providers[0] == CUDA
    # Neither the event-loop path nor a second, single-thread session (dataplane.py, cores.py) is for a GPU one.
    assert not model.cpu_only
    for rows in (1, 5, 16):  # shapes warmup did not see
        batch = _images(rows, seed=rows)
        got = model.run({"input": batch}, None)[0]
        np.testing.assert_allclose(got, _cpu_reference(cnn, batch), rtol=GPU_RTOL, atol=GPU_ATOL)


def test_auto_serves_on_the_best_gpu_provider_that_starts(cnn: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = OnnxModel("cnn", "1", cnn, ProviderSettings(choice="auto"))
    with caplog.at_level(logging.WARNING, logger="zeroserve.runtime.providers"):
        model.load()
    if _tensorrt_installed():
        assert model.execution_providers[0] == TRT
    else:
        # onnxruntime-gpu offers TensorRT, but its libraries are missing: CUDA serves, and the log says why.
        assert model.execution_providers[0] == CUDA
        assert f"{TRT} failed" in caplog.text and "libnvinfer" in caplog.text, caplog.text
    batch = _images(2)
    np.testing.assert_allclose(
        model.run({"input": batch}, None)[0], _cpu_reference(cnn, batch), rtol=GPU_RTOL, atol=GPU_ATOL
    )


@pytest.mark.skipif(_tensorrt_installed(), reason="TensorRT's libraries are installed here")
def test_tensorrt_named_without_its_libraries_fails_and_names_them(cnn: Path) -> None:
    model = OnnxModel("cnn", "1", cnn, ProviderSettings(choice="tensorrt"))
    with pytest.raises(ModelLoadError, match="libnvinfer") as caught:
        model.load()
    assert "LD_LIBRARY_PATH" in str(caught.value)


def test_a_device_id_past_the_last_gpu_fails_clearly(cnn: Path) -> None:
    count = ctypes.c_int()
    cuda = ctypes.CDLL("libcuda.so.1")
    assert cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0
    model = OnnxModel("cnn", "1", cnn, ProviderSettings(choice="cuda", device_id=count.value))
    # ORT 1.31 on an H200: "... Invalid device ID: 1, must be between 0 (inclusive) and 1 (exclusive)"
    with pytest.raises(ModelLoadError, match=rf"(?s)on {CUDA}: .*device") as caught:
        model.load()
    print("device_id past the last GPU:", caught.value)


def _binary_request(batch: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({
        "inputs": [{
            "name": "input", "shape": list(batch.shape), "datatype": "FP32",
            "parameters": {"binary_data_size": batch.nbytes},
        }],
        "outputs": [{"name": "output", "parameters": {"binary_data": False}}],
    }).encode()  # fmt: skip
    return header + batch.tobytes(), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def _output(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _rows_per_run_sum(metrics: str) -> float:
    found = re.search(r'^zeroserve_batch_size_sum\{model="cnn",version="1"\} (\S+)$', metrics, re.MULTILINE)
    assert found is not None, metrics
    return float(found.group(1))


def test_a_server_on_cuda_batches_concurrent_requests_and_survives_running_out_of_memory(
    cnn: Path, tmp_path: Path
) -> None:
    # 256 MiB of arena: a 512-image request needs more (its first activation alone is 512 x 32 x 64 x 64 x 4 bytes).
    args = [
        "--model_name", "cnn", "--model_dir", str(cnn.parent.parent), "--providers", "cuda",
        "--max_batch_size", "8", "--max_queue_delay_us", "5000", "--cuda_mem_limit", str(256 * 2**20),
    ]  # fmt: skip
    server = start_server(args, tmp_path / "server.log", timeout=120)
    try:
        assert f"runs on {CUDA}" in server.log()
        url = f"{server.url}/v2/models/cnn/infer"
        with httpx.Client(timeout=60) as client:
            # JSON
            one = _images(1, seed=7)
            body = {"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32",
                                "data": one.ravel().tolist()}]}  # fmt: skip
            got = _output(client.post(url, json=body))
            np.testing.assert_allclose(got, _cpu_reference(cnn, one), rtol=GPU_RTOL, atol=GPU_ATOL)

            # 48 concurrent binary requests of 1 to 3 images: merged into batches, each answer its own.
            batches = [_images(1 + i % 3, seed=100 + i) for i in range(48)]

            def send(batch: np.ndarray) -> np.ndarray:
                data, headers = _binary_request(batch)
                return _output(client.post(url, content=data, headers=headers))

            before = _rows_per_run_sum(client.get(f"{server.url}/metrics").text)
            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(send, batches))
            for batch, answer in zip(batches, answers):
                np.testing.assert_allclose(answer, _cpu_reference(cnn, batch), rtol=GPU_RTOL, atol=GPU_ATOL)
            # Each request observes the rows of the run that served it: more than its own once runs were merged.
            observed = _rows_per_run_sum(client.get(f"{server.url}/metrics").text) - before
            assert observed > sum(len(batch) for batch in batches), "no two requests were run as one batch"

            # Too much for the capped arena: an error for this request alone, with the reason.
            data, headers = _binary_request(_images(512, seed=3))
            failed = client.post(url, content=data, headers=headers)
            print("out of GPU memory:", failed.status_code, failed.text[:600])
            assert failed.status_code == 500
            assert "memory" in failed.json()["error"].lower()
            # ...and the next request is served.
            again = _images(2, seed=9)
            np.testing.assert_allclose(send(again), _cpu_reference(cnn, again), rtol=GPU_RTOL, atol=GPU_ATOL)
        assert server.process.poll() is None
    finally:
        server.stop()
