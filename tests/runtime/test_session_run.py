"""The run a request calls (model._session_run): ONNX Runtime's compiled session on the CPU provider, its Python
wrapper elsewhere. Real onnxruntime sessions; a GPU session's provider list is stood in for (no GPU here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from zeroserve.runtime.messages import InputTensor
from zeroserve.runtime.model import OnnxModel, _session_run
from zeroserve.runtime.server_errors import InvalidInput
from zeroserve.runtime.settings import ProviderSettings

import models as test_models


@pytest.fixture
def mlp(tmp_path: Path) -> OnnxModel:
    model = OnnxModel("mlp", "1", test_models.mlp_model(tmp_path / "mlp" / "model.onnx"), ProviderSettings())
    model.load()
    return model


def test_a_cpu_session_runs_through_the_compiled_session_and_answers_as_the_wrapper(mlp: OnnxModel) -> None:
    session = ort.InferenceSession(str(mlp.path), providers=["CPUExecutionProvider"])
    run = _session_run(session, ["CPUExecutionProvider"])
    assert getattr(run, "__self__", None) is session._sess
    feeds = {"input": np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32)}
    expected = session.run(["output"], feeds)[0]
    np.testing.assert_array_equal(run(["output"], feeds, None)[0], expected)
    np.testing.assert_array_equal(mlp.run(feeds, None)[0], expected)


def test_a_gpu_session_keeps_the_wrappers_run_and_its_fallback_mock_gpu(mlp: OnnxModel) -> None:
    session = ort.InferenceSession(str(mlp.path), providers=["CPUExecutionProvider"])
    run = _session_run(session, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert getattr(run, "__self__", None) is session


def test_what_the_wrapper_would_check_is_still_refused_with_the_reason(tmp_path: Path, mlp: OnnxModel) -> None:
    with pytest.raises(InvalidInput, match="needs input"):
        mlp.feeds([])
    gather = OnnxModel("gather", "1", test_models.gather_model(tmp_path / "gather" / "model.onnx"), ProviderSettings())
    gather.load()
    feeds = gather.feeds([InputTensor("index", "INT64", [1], np.array([10**6], dtype=np.int64))])
    with pytest.raises(InvalidInput, match="rejected the input"):
        gather.run(feeds, None)
