"""The execution-provider flags: parsed into ProviderSettings, the environment fallback, and their errors."""

from __future__ import annotations

import argparse

import pytest

from zeroserve.runtime.flags import add_provider_arguments, provider_settings_from
from zeroserve.runtime.settings import ProviderSettings


def parse(argv: list[str], environ: dict[str, str] | None = None) -> ProviderSettings:
    parser = argparse.ArgumentParser()
    add_provider_arguments(parser)
    return provider_settings_from(parser.parse_args(argv), environ or {})


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
    add_provider_arguments(parser)
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



def test_trt_build_and_ep_context_flags() -> None:
    parser = argparse.ArgumentParser()
    add_provider_arguments(parser)
    assert provider_settings_from(parser.parse_args(["--trt_build", "background"]), {}).trt_build == "background"
    assert provider_settings_from(parser.parse_args([]), {}).trt_build == "blocking"
    assert provider_settings_from(parser.parse_args(["--trt_ep_context"]), {}).trt_ep_context is True
    assert provider_settings_from(parser.parse_args([]), {}).trt_ep_context is False
    with pytest.raises(ValueError, match="--trt_build"):
        ProviderSettings(trt_build="later")  # type: ignore[arg-type]
