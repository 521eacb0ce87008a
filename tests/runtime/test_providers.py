"""Execution-provider choice, options and real CPU sessions.

GPU behaviour is covered through the provider lists an ONNX Runtime build reports: those are data, and the
tests that use them say in their names that they run without a GPU.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zeroserve.runtime.providers import (
    CPU,
    CUDA,
    TRT,
    create_session,
    interim_providers,
    select_providers,
)
from zeroserve.runtime.server_errors import ModelLoadError
from zeroserve.runtime.settings import ProviderSettings

CPU_BUILD = ["AzureExecutionProvider", CPU]  # what the CPU onnxruntime wheel lists
GPU_BUILD = [TRT, CUDA, CPU]  # onnxruntime-gpu lists these with or without a GPU
CUDA_BUILD = [CUDA, CPU]
CUDA_DEFAULTS = {
    "device_id": "0",
    "cudnn_conv_algo_search": "HEURISTIC",
    "arena_extend_strategy": "kSameAsRequested",
    "do_copy_in_default_stream": "True",
}


def names(chosen: list[tuple[str, dict[str, str]]]) -> list[str]:
    return [name for name, _ in chosen]


# -- select_providers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "available", "expected"),
    [
        ("auto", CPU_BUILD, [CPU]),
        ("auto", GPU_BUILD, [TRT, CUDA, CPU]),
        ("auto", CUDA_BUILD, [CUDA, CPU]),
        ("auto", [CPU, CUDA, TRT], [TRT, CUDA, CPU]),  # our order, not the list's
        ("tensorrt", GPU_BUILD, [TRT, CUDA, CPU]),
        ("cuda", GPU_BUILD, [CUDA, CPU]),
        ("cuda", CUDA_BUILD, [CUDA, CPU]),
        ("cpu", GPU_BUILD, [CPU]),
        ("cpu", CPU_BUILD, [CPU]),
    ],
)
def test_select_providers_order_without_gpu(choice: str, available: list[str], expected: list[str]) -> None:
    settings = ProviderSettings(choice=choice)  # type: ignore[arg-type]
    assert names(select_providers(settings, available)) == expected


def test_default_options_on_gpu_build_without_gpu() -> None:
    assert select_providers(ProviderSettings(), GPU_BUILD) == [
        (TRT, {"device_id": "0"}),
        (CUDA, CUDA_DEFAULTS),
        (CPU, {}),
    ]


def test_tensorrt_options_without_gpu() -> None:
    settings = ProviderSettings(
        choice="tensorrt",
        device_id=1,
        trt_fp16=True,
        trt_engine_cache_path="/cache/engines",
        trt_timing_cache_path="/cache/timing",
        trt_max_workspace_size=2**30,
        trt_builder_optimization_level=2,
        trt_profile_min_shapes="x:1x3",
        trt_profile_opt_shapes="x:8x3",
        trt_profile_max_shapes="x:32x3",
    )
    chosen = dict(select_providers(settings, GPU_BUILD))
    assert chosen[TRT] == {
        "device_id": "1",
        "trt_fp16_enable": "True",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": "/cache/engines",
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": "/cache/timing",
        "trt_max_workspace_size": str(2**30),
        "trt_builder_optimization_level": "2",
        "trt_profile_min_shapes": "x:1x3",
        "trt_profile_opt_shapes": "x:8x3",
        "trt_profile_max_shapes": "x:32x3",
    }
    assert chosen[CUDA]["device_id"] == "1"


def test_cuda_options_without_gpu() -> None:
    settings = ProviderSettings(
        choice="cuda", device_id=2, cuda_mem_limit=4 * 2**30, cudnn_conv_algo_search="EXHAUSTIVE"
    )
    assert select_providers(settings, GPU_BUILD) == [
        (
            CUDA,
            CUDA_DEFAULTS
            | {"device_id": "2", "cudnn_conv_algo_search": "EXHAUSTIVE", "gpu_mem_limit": str(4 * 2**30)},
        ),
        (CPU, {}),
    ]


@pytest.mark.parametrize(
    ("choice", "available", "missing"),
    [("cuda", CPU_BUILD, CUDA), ("tensorrt", CPU_BUILD, TRT), ("tensorrt", CUDA_BUILD, TRT)],
)
def test_explicit_gpu_provider_missing_from_build_without_gpu(
    choice: str, available: list[str], missing: str
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        select_providers(ProviderSettings(choice=choice), available)  # type: ignore[arg-type]
    message = str(caught.value)
    assert f"--providers {choice} needs {missing}" in message
    assert f"offers only {', '.join(available)}" in message
    assert "install 'zeroserve[gpu]'" in message


# -- real CPU sessions --------------------------------------------------------------------------------


@pytest.fixture
def add_model(tmp_path: Path) -> Path:
    from onnx import TensorProto, helper, save

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 3]) for n in ("a", "b")]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "add", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "model.onnx"
    save(model, str(path))
    return path


@pytest.mark.parametrize("choice", ["auto", "cpu"])
def test_cpu_session_runs(add_model: Path, choice: str) -> None:
    import numpy as np

    session, in_use = create_session(add_model, ProviderSettings(choice=choice))  # type: ignore[arg-type]
    assert in_use == [CPU] == session.get_providers()
    a = np.ones((2, 3), dtype=np.float32)
    (y,) = session.run(None, {"a": a, "b": a * 2})
    np.testing.assert_array_equal(y, np.full((2, 3), 3, dtype=np.float32))


def test_threads_honoured(add_model: Path) -> None:
    session, _ = create_session(add_model, ProviderSettings(intra_op_threads=3, inter_op_threads=2))
    options = session.get_session_options()
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 2



def test_intra_op_threads_stop_spinning_after_a_run(add_model: Path) -> None:
    session, _ = create_session(add_model, ProviderSettings(intra_op_threads=2))
    assert session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    alone, _ = create_session(add_model, ProviderSettings(intra_op_threads=1))  # no other thread to stop
    with pytest.raises(RuntimeError, match="does not have configuration"):
        alone.get_session_options().get_session_config_entry("session.force_spinning_stop")


def test_cuda_on_cpu_build_without_gpu(add_model: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"needs CUDAExecutionProvider.*install 'zeroserve\[gpu\]'"):
        create_session(add_model, ProviderSettings(choice="cuda"))


@pytest.mark.parametrize(("choice", "asked"), [("cuda", CUDA), ("tensorrt", TRT)])
def test_explicit_gpu_provider_silent_fallback_refused_without_gpu(
    add_model: Path, choice: str, asked: str
) -> None:
    # Told the build offers GPU providers, the real CPU build drops them and runs on the CPU, as
    # onnxruntime-gpu does when CUDA cannot load: only get_providers() shows it.
    settings = ProviderSettings(choice=choice)  # type: ignore[arg-type]
    refused = f"could not start {asked} and fell back to {CPU}"
    with pytest.warns(UserWarning, match="not in available"), pytest.raises(ModelLoadError, match=refused):
        create_session(add_model, settings, available=GPU_BUILD)


def test_auto_fallback_logged_without_gpu(add_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.warns(UserWarning, match="not in available provider names"):
        _, in_use = create_session(add_model, ProviderSettings(), available=GPU_BUILD)
    assert in_use == [CPU]
    assert f"asked for {TRT}, {CUDA}, {CPU}, running on {CPU}" in caplog.text
    assert [r.levelname for r in caplog.records if "asked for" in r.getMessage()] == ["WARNING"]


def test_corrupt_model(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07 this is not a protobuf \xff\xff")
    with pytest.raises(ModelLoadError) as caught:
        create_session(path, ProviderSettings())
    message = str(caught.value)
    assert message.startswith(f"cannot load model {path}: INVALID_PROTOBUF: ")
    assert "[ONNXRuntimeError]" not in message


def test_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot load model .*NO_SUCHFILE"):
        create_session(tmp_path / "absent.onnx", ProviderSettings())


def test_import_loads_no_onnxruntime_or_numpy() -> None:
    code = (
        "import sys, zeroserve.runtime.providers\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'numpy', 'onnx')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- --trt_build background ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "trt_build", "available", "expected"),
    [
        ("auto", "background", GPU_BUILD, ("auto", [CUDA, CPU])),
        ("tensorrt", "background", GPU_BUILD, ("cuda", [CUDA, CPU])),  # never the CPU for a named provider
        ("auto", "blocking", GPU_BUILD, None),
        ("cuda", "background", GPU_BUILD, None),  # TensorRT is not first: nothing to wait for
        ("cpu", "background", GPU_BUILD, None),
        ("auto", "background", CPU_BUILD, None),
        ("auto", "background", [TRT, CPU], None),  # no CUDA to serve on meanwhile
    ],
)
def test_interim_providers_without_gpu(
    choice: str, trt_build: str, available: list[str], expected: tuple[str, list[str]] | None
) -> None:
    settings = ProviderSettings(choice=choice, trt_build=trt_build)  # type: ignore[arg-type]
    interim = interim_providers(settings, available)
    if expected is None:
        assert interim is None
    else:
        assert interim is not None and (interim[0].choice, interim[1]) == expected
        assert interim[0].trt_build == "background" and interim[0].device_id == settings.device_id



def test_a_provider_library_missing_a_dependency_is_named(tmp_path: Path) -> None:
    # A stand-in for onnxruntime-gpu's folder: its TensorRT provider library links a library that is not
    # there (as libnvinfer.so.10 is not, where TensorRT was never installed); the real dynamic loader names it.
    from types import SimpleNamespace

    from zeroserve.runtime.providers import _missing_library

    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the shared libraries")
    capi = tmp_path / "onnxruntime" / "capi"
    capi.mkdir(parents=True)
    (tmp_path / "dep.c").write_text("int zeroserve_dep(void) { return 1; }\n")
    (tmp_path / "provider.c").write_text("int zeroserve_dep(void);\nint provider(void) { return zeroserve_dep(); }\n")
    dep = tmp_path / "libzeroserve_dep.so.10"
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libzeroserve_dep.so.10", "-o", str(dep),
                    str(tmp_path / "dep.c")], check=True)  # fmt: skip
    provider = capi / "libonnxruntime_providers_tensorrt.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(provider), str(tmp_path / "provider.c"), str(dep)], check=True)
    dep.unlink()
    ort = SimpleNamespace(__file__=str(tmp_path / "onnxruntime" / "__init__.py"))
    assert _missing_library(ort, TRT).startswith("libzeroserve_dep.so.10: cannot open shared object file")
    assert _missing_library(ort, CUDA) == ""  # no such library in this build: nothing to say
    assert _missing_library(ort, CPU) == ""
