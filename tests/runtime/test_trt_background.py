"""``--trt_build background``: ready on CUDA at once, switched to TensorRT once its engines are built.

There is no GPU here, so these tests stand in for one (their names say so): ONNX Runtime's build is made to
list TensorRT and CUDA, and ``create_session`` is replaced by one that returns real CPU sessions of the model,
reports the providers a GPU build would, and holds the "TensorRT build" until the test lets it finish. What is
real: the loader, the model's readiness, its runs before, during and after the swap, and the logs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from zeroserve.runtime import model as model_module
from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.loader import load_models
from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.providers import CPU, CUDA, TRT
from zeroserve.runtime.repository import ModelRepository, State
from zeroserve.runtime.server_errors import ModelLoadError
from zeroserve.runtime.settings import ProviderSettings

from models import mlp_model

GPU_BUILD = [TRT, CUDA, CPU]


class FakeGpuSessions:
    """``create_session`` for a GPU build without a GPU: CUDA sessions at once, TensorRT when released."""

    def __init__(self, fail_tensorrt: bool = False) -> None:
        self.release_tensorrt = threading.Event()
        self.fail_tensorrt = fail_tensorrt
        self.calls: list[tuple[str, list[str] | None]] = []
        self.sessions: dict[str, ort.InferenceSession] = {}

    def __call__(
        self, path: Path, settings: ProviderSettings, *, available: list[str] | None = None, artifacts: Any = None
    ) -> tuple[ort.InferenceSession, list[str]]:
        self.calls.append((settings.choice, available))
        session = ort.InferenceSession(str(path), providers=[CPU])
        tensorrt_first = settings.choice == "tensorrt" or (settings.choice == "auto" and available is None)
        if tensorrt_first:
            assert self.release_tensorrt.wait(30), "the test never released the TensorRT build"
            if self.fail_tensorrt:
                raise ModelLoadError(f"cannot load {path} on {TRT}: out of GPU memory (simulated)")
            self.sessions[TRT] = session
            return session, [TRT, CUDA, CPU]
        assert available is not None and TRT not in available, "the interim session leaves TensorRT out"
        self.sessions[CUDA] = session
        return session, [CUDA, CPU]


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> FakeGpuSessions:
    fake = FakeGpuSessions()
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_BUILD))
    monkeypatch.setattr(model_module, "create_session", fake)
    return fake


def load(tmp_path: Path, *flags: str) -> tuple[ModelRepository, OnnxModel]:
    path = mlp_model(tmp_path / "mlp.onnx")
    config = RuntimeConfig.from_args(["--model_name", "mlp", "--model_dir", str(path), *flags], {})
    repository = ModelRepository()
    asyncio.run(load_models(config, repository))
    (entry,) = repository.entries()
    assert entry.state is State.READY
    return repository, entry.model


def wait_for(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def upgrade_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("zeroserve-tensorrt-")]


def run_once(model: OnnxModel) -> np.ndarray:
    x = np.arange(16, dtype=np.float32).reshape(1, 16) / 16
    return model.run({"input": x}, None)[0]


def test_ready_on_cuda_then_switched_to_tensorrt_mock_gpu(
    tmp_path: Path, fake_gpu: FakeGpuSessions, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "zeroserve")
    _, model = load(tmp_path, "--trt_build", "background")
    # Ready and answering before any TensorRT engine exists.
    assert model.execution_providers == [CUDA, CPU] and model.upgrade_pending
    expected = run_once(model)
    assert fake_gpu.calls[0] == ("auto", [CUDA, CPU])

    answers: list[np.ndarray] = []
    stop = threading.Event()

    def keep_running() -> None:  # traffic across the swap: every run must succeed
        while not stop.is_set():
            answers.append(run_once(model))

    traffic = threading.Thread(target=keep_running)
    traffic.start()
    try:
        time.sleep(0.05)
        fake_gpu.release_tensorrt.set()
        wait_for(lambda: model.execution_providers[:1] == [TRT])
        time.sleep(0.05)
    finally:
        stop.set()
        traffic.join(10)
    assert not model.upgrade_pending
    assert model._session is fake_gpu.sessions[TRT]
    assert model._run == fake_gpu.sessions[TRT].run  # a GPU session keeps the wrapper's run, with its fallback
    assert answers and all(np.array_equal(answer, expected) for answer in answers)
    np.testing.assert_array_equal(run_once(model), expected)
    wait_for(lambda: not upgrade_threads())
    assert "building TensorRT engines in the background" in caplog.text
    assert "switched to TensorrtExecutionProvider" in caplog.text


def test_failed_tensorrt_build_keeps_serving_on_cuda_mock_gpu(
    tmp_path: Path, fake_gpu: FakeGpuSessions, caplog: pytest.LogCaptureFixture
) -> None:
    fake_gpu.fail_tensorrt = True
    _, model = load(tmp_path, "--providers", "tensorrt", "--trt_build", "background")
    # An explicit --providers tensorrt serves on CUDA meanwhile, never on the CPU.
    assert fake_gpu.calls[0] == ("cuda", [CUDA, CPU])
    fake_gpu.release_tensorrt.set()
    wait_for(lambda: not upgrade_threads())
    assert model.execution_providers == [CUDA, CPU]
    assert model._session is fake_gpu.sessions[CUDA]
    assert run_once(model).shape == (1, 4)
    assert "TensorRT build failed, staying on CUDAExecutionProvider" in caplog.text
    assert "out of GPU memory (simulated)" in caplog.text


def test_blocking_build_waits_for_tensorrt_mock_gpu(tmp_path: Path, fake_gpu: FakeGpuSessions) -> None:
    fake_gpu.release_tensorrt.set()
    _, model = load(tmp_path)  # --trt_build blocking is the default: ready only once TensorRT is
    assert fake_gpu.calls == [("auto", None)]
    assert model.execution_providers == [TRT, CUDA, CPU] and not model.upgrade_pending
    assert not upgrade_threads()
