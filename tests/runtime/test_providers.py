"""Execution-provider choice, options, CPU quota and real CPU sessions.

GPU behaviour is covered through the provider lists an ONNX Runtime build reports: those are data, and the
tests that use them say in their names that they run without a GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zeroserve.runtime.errors import ModelLoadError
from zeroserve.runtime.providers import (
    CPU,
    CUDA,
    TRT,
    ProviderSettings,
    add_arguments,
    cpu_quota,
    create_session,
    interim_providers,
    select_providers,
    session_options,
    settings_from_args,
)

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


# -- cpu_quota ----------------------------------------------------------------------------------------


def v2_root(tmp_path: Path, cpu_max: str | None) -> Path:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    return tmp_path


def v1_root(tmp_path: Path, quota: int, period: int = 100_000, folder: str = "cpu") -> Path:
    cpu = tmp_path / folder
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (cpu / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("150000 100000", 2),
        ("max 100000", 8),
        ("1000 100000", 1),
        ("400000 100000", 4),
        ("garbage", 8),
        (None, 8),
    ],
)
def test_cgroup_v2_quota(tmp_path: Path, cpu_max: str | None, expected: int) -> None:
    root = v2_root(tmp_path, cpu_max)
    assert cpu_quota(root, host_cpus=8, proc_cgroup=tmp_path / "absent") == expected


def test_cgroup_v2_follows_own_cgroup_and_its_parents(tmp_path: Path) -> None:
    root = v2_root(tmp_path, None)  # the host's root cgroup has no cpu.max
    pod = root / "kubepods" / "pod1"
    (pod / "ctr").mkdir(parents=True)
    (pod / "cpu.max").write_text("250000 100000\n")  # the pod's limit binds the container
    (pod / "ctr" / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    assert cpu_quota(root, host_cpus=16, proc_cgroup=proc) == 3


def test_cgroup_v2_path_outside_namespace_uses_mount_root(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "200000 100000")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/../../elsewhere\n")
    assert cpu_quota(root, host_cpus=16, proc_cgroup=proc) == 2


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [(-1, 100_000, 8), (150_000, 100_000, 2), (50_000, 100_000, 1), (300_000, 100_000, 3)],
)
def test_cgroup_v1_quota(tmp_path: Path, quota: int, period: int, expected: int) -> None:
    root = v1_root(tmp_path, quota, period)
    assert cpu_quota(root, host_cpus=8, proc_cgroup=tmp_path / "absent") == expected


def test_cgroup_v1_combined_mount_and_host_path_absent_in_container(tmp_path: Path) -> None:
    root = v1_root(tmp_path, 200_000, folder="cpu,cpuacct")
    proc = tmp_path / "proc-cgroup"
    # Docker on v1 shows the host's path; the container's mount root is that cgroup already.
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cpu_quota(root, host_cpus=8, proc_cgroup=proc) == 2


def test_no_cgroup_gives_host_cpus(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path, host_cpus=5, proc_cgroup=tmp_path / "absent") == 5


def test_quota_capped_by_affinity(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "100000000 100000")  # 1000 CPUs
    assert cpu_quota(root, proc_cgroup=tmp_path / "absent") == len(os.sched_getaffinity(0))
    assert cpu_quota(root, host_cpus=3, proc_cgroup=tmp_path / "absent") == 3


def test_never_below_one(tmp_path: Path) -> None:
    assert cpu_quota(v2_root(tmp_path, "1 100000"), host_cpus=0, proc_cgroup=tmp_path / "absent") == 1


def test_cpu_quota_on_this_machine() -> None:
    assert 1 <= cpu_quota() <= len(os.sched_getaffinity(0))


# -- flags --------------------------------------------------------------------------------------------


def parse(argv: list[str], environ: dict[str, str] | None = None) -> ProviderSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(argv), environ or {})


def test_flags_round_trip() -> None:
    argv = [
        "--providers",
        "tensorrt",
        "--device_id",
        "1",
        "--trt_fp16",
        "--trt_engine_cache_path",
        "/c/e",
        "--trt_timing_cache_path",
        "/c/t",
        "--trt_max_workspace_size",
        "1073741824",
        "--trt_builder_optimization_level",
        "0",
        "--trt_profile_min_shapes",
        "a:1x3,b:1",
        "--trt_profile_opt_shapes",
        "a:4x3,b:4",
        "--trt_profile_max_shapes",
        "a:8x3,b:8",
        "--cuda_mem_limit",
        "2000000000",
        "--cudnn_conv_algo_search",
        "DEFAULT",
        "--intra_op_threads",
        "3",
        "--inter_op_threads",
        "2",
    ]
    assert parse(argv) == ProviderSettings(
        choice="tensorrt",
        device_id=1,
        trt_fp16=True,
        trt_engine_cache_path="/c/e",
        trt_timing_cache_path="/c/t",
        trt_max_workspace_size=2**30,
        trt_builder_optimization_level=0,
        trt_profile_min_shapes="a:1x3,b:1",
        trt_profile_opt_shapes="a:4x3,b:4",
        trt_profile_max_shapes="a:8x3,b:8",
        cuda_mem_limit=2_000_000_000,
        cudnn_conv_algo_search="DEFAULT",
        intra_op_threads=3,
        inter_op_threads=2,
    )


def test_no_flags_give_defaults() -> None:
    assert parse([]) == ProviderSettings()


def test_flags_in_their_own_group() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "execution providers:" in parser.format_help()


def test_env_fallback_for_providers() -> None:
    assert parse([], {"ZEROSERVE_PROVIDERS": " CUDA "}).choice == "cuda"
    assert parse([], {"ZEROSERVE_PROVIDERS": ""}).choice == "auto"
    assert parse(["--providers", "cpu"], {"ZEROSERVE_PROVIDERS": "cuda"}).choice == "cpu"
    with pytest.raises(
        ValueError, match=r"ZEROSERVE_PROVIDERS='gpu' is not one of auto, tensorrt, cuda, cpu"
    ):
        parse([], {"ZEROSERVE_PROVIDERS": "gpu"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trt_profile_min_shapes", "x:1"], "give all three or none"),
        (["--trt_profile_min_shapes", "x:1", "--trt_profile_max_shapes", "x:2"], "give all three or none"),
        (
            ["--trt_builder_optimization_level", "6"],
            r"--trt_builder_optimization_level must be 0\.\.5, got 6",
        ),
        (["--device_id", "-1"], "--device_id must be 0 or more"),
        (["--intra_op_threads", "0"], "--intra_op_threads must be at least 1"),
        (["--cuda_mem_limit", "0"], "--cuda_mem_limit must be at least 1"),
        (
            [
                "--trt_profile_min_shapes",
                "x:1x3",
                "--trt_profile_opt_shapes",
                "x:4x3",
                "--trt_profile_max_shapes",
                "x:2x3",
            ],
            r"min <= opt <= max .* got 1x3, 4x3, 2x3",
        ),
        (
            [
                "--trt_profile_min_shapes",
                "x:1",
                "--trt_profile_opt_shapes",
                "y:1",
                "--trt_profile_max_shapes",
                "x:1",
            ],
            "same inputs in the same order",
        ),
        (
            [
                "--trt_profile_min_shapes",
                "x:1x3",
                "--trt_profile_opt_shapes",
                "x:1",
                "--trt_profile_max_shapes",
                "x:1x3",
            ],
            "same rank",
        ),
        (
            [
                "--trt_profile_min_shapes",
                "x:1by3",
                "--trt_profile_opt_shapes",
                "x:1",
                "--trt_profile_max_shapes",
                "x:1",
            ],
            r"--trt_profile_min_shapes: 'x:1by3' is not NAME:DIMxDIM",
        ),
        (
            [
                "--trt_profile_min_shapes",
                "in:0:1",
                "--trt_profile_opt_shapes",
                "in:0:1",
                "--trt_profile_max_shapes",
                "in:0:1",
            ],
            "first ':'",
        ),
    ],
)
def test_invalid_flags(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(argv)


def test_several_trt_profiles_per_input() -> None:
    # ORT reads a repeated input name as a second optimization profile.
    settings = parse(
        [
            "--trt_profile_min_shapes",
            "x:1x3,x:9x3",
            "--trt_profile_opt_shapes",
            "x:4x3,x:16x3",
            "--trt_profile_max_shapes",
            "x:8x3,x:32x3",
        ]
    )
    assert settings.trt_profile_max_shapes == "x:8x3,x:32x3"


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


def test_session_options_use_cpu_quota(tmp_path: Path) -> None:
    import onnxruntime as ort

    options = session_options(ProviderSettings(), cgroup_root=v2_root(tmp_path, "150000 100000"))
    assert options.intra_op_num_threads == min(2, len(os.sched_getaffinity(0)))
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


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


def test_trt_build_and_ep_context_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from_args(parser.parse_args(["--trt_build", "background"]), {}).trt_build == "background"
    assert settings_from_args(parser.parse_args([]), {}).trt_build == "blocking"
    assert settings_from_args(parser.parse_args(["--trt_ep_context"]), {}).trt_ep_context is True
    assert settings_from_args(parser.parse_args([]), {}).trt_ep_context is False
    with pytest.raises(ValueError, match="--trt_build"):
        ProviderSettings(trt_build="later")  # type: ignore[arg-type]


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
