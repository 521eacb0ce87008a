"""KServe-compatible flags and the environment fallbacks Knative and KServe rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

from zeroserve.runtime.config import DEFAULT_MODEL_DIR, RuntimeConfig


def test_defaults_follow_kserve() -> None:
    config = RuntimeConfig.from_args([], {"HOME": "/home/u"})
    assert config.model_name == "model"
    assert config.model_dir == DEFAULT_MODEL_DIR == "/mnt/models"
    assert (config.http_port, config.grpc_port) == (8080, 8081)
    assert config.cache_dir == Path("/home/u/.cache/zeroserve")


def test_cache_dir_follows_the_environment_given() -> None:
    assert RuntimeConfig.from_args([], {"HOME": "/h", "XDG_CACHE_HOME": "/xdg"}).cache_dir == Path("/xdg/zeroserve")
    assert RuntimeConfig.from_args([], {"HOME": "/h", "ZEROSERVE_CACHE_DIR": "/c"}).cache_dir == Path("/c")
    assert RuntimeConfig.from_args(["--cache_dir", "/f"], {"ZEROSERVE_CACHE_DIR": "/c"}).cache_dir == Path("/f")


def test_kserve_flags() -> None:
    config = RuntimeConfig.from_args(
        ["--model_name=resnet", "--model_dir=s3://bucket/resnet", "--http_port=9000", "--grpc_port=9001"], {}
    )
    assert (config.model_name, config.model_dir, config.http_port, config.grpc_port) == (
        "resnet", "s3://bucket/resnet", 9000, 9001,
    )


def test_environment_fallbacks() -> None:
    env = {"PORT": "8012", "STORAGE_URI": "gs://b/m.onnx", "MODEL_NAME": "m", "ZEROSERVE_CACHE_DIR": "/cache"}
    config = RuntimeConfig.from_args([], env)
    assert (config.http_port, config.model_dir, config.model_name, config.cache_dir) == (
        8012, "gs://b/m.onnx", "m", Path("/cache"),
    )


def test_flags_win_over_environment() -> None:
    env = {"PORT": "8012", "STORAGE_URI": "gs://b/m.onnx", "MODEL_NAME": "m"}
    config = RuntimeConfig.from_args(["--http_port", "1234", "--model_dir", "/x", "--model_name", "n"], env)
    assert (config.http_port, config.model_dir, config.model_name) == (1234, "/x", "n")


def test_unknown_flags_are_tolerated_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    config = RuntimeConfig.from_args(["--model_name", "m", "--enable_docs_url", "true"], {})
    assert config.model_name == "m"
    assert "--enable_docs_url" in caplog.text


def test_limits_and_providers_flags() -> None:
    config = RuntimeConfig.from_args(
        ["--max_request_mib", "8", "--max_tensor_elements", "1000", "--providers", "cpu", "--intra_op_threads", "1"],
        {},
    )
    assert config.limits.max_body_bytes == 8 * 2**20
    assert config.limits.max_tensor_elements == 1000
    assert config.providers.choice == "cpu" and config.providers.intra_op_threads == 1


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"PORT": "eighty"}, "PORT must be a port number"),
        (["--workers", "0"], {}, "--workers must be at least 1"),
        (["--http_port", "x"], {}, "invalid int value"),
        (["--providers", "gpu"], {}, "invalid choice"),
    ],
)
def test_bad_configuration_is_explained(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        RuntimeConfig.from_args(argv, env)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_warmup_shapes_flag_and_tensorrt_default() -> None:
    assert RuntimeConfig.from_args([], {}).warmup_shapes == ()
    assert RuntimeConfig.from_args(["--warmup_shapes", "input:8x16,mask:8"], {}).warmup_shapes == (
        ("input", (8, 16)), ("mask", (8,)),
    )
    trt = ["--trt_profile_min_shapes", "x:1x3", "--trt_profile_opt_shapes", "x:4x3",
           "--trt_profile_max_shapes", "x:8x3"]
    assert RuntimeConfig.from_args(trt, {}).warmup_shapes == (("x", (4, 3)),)  # the engine TensorRT will use


def test_bad_warmup_shapes_are_explained(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        RuntimeConfig.from_args(["--warmup_shapes", "input=8x16"], {})
    assert "--warmup_shapes" in capsys.readouterr().err


def test_event_loop_choice_is_resolved_by_load() -> None:
    parsed = RuntimeConfig.from_args([], {})
    assert parsed.event_loop == "auto" and not parsed.loaded  # parsing looks at nothing on the machine
    loaded = parsed.load()
    assert loaded.event_loop == "uvloop" and loaded.uses_uvloop  # installed with the runtime extra here
    assert not RuntimeConfig.from_args(["--event_loop", "asyncio"], {}).load().uses_uvloop
    with pytest.raises(SystemExit):
        RuntimeConfig.from_args(["--event_loop", "trio"], {})


def test_load_reads_the_cpu_quota_and_sizes_threads_from_it() -> None:
    from zeroserve.runtime.cgroup import cpu_quota

    loaded = RuntimeConfig.from_args([], {}).load()
    assert loaded.loaded and loaded.cpus == cpu_quota()
    throughput = RuntimeConfig.from_args(["--performance_hint", "throughput"], {}).load()
    assert throughput.providers.intra_op_threads == 1 and throughput.inference_threads == cpu_quota()
    workers = RuntimeConfig.from_args(["--workers", "2"], {}).load()
    assert workers.providers.intra_op_threads == max(1, cpu_quota() // 2)
