"""Many models in one service: ``--model-loading`` and its bounds reach the server's args on Knative and KServe,
the memory request and limit follow ``--max-loaded-mib`` by the formula of ``zeroserve.model_memory``, and
nonsense is refused with the flag's name."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.knative.conftest import run
from zeroserve import eventing, knative, kserve
from zeroserve import render as rendering
from zeroserve.eventing import EventingOptions
from zeroserve.model_memory import BASELINE_MIB, ModelMemory
from zeroserve.render_options import RenderOptions, quantity

REPO = Path(__file__).resolve().parents[2]
REPOSITORY = RenderOptions(
    name="models", model_uri="s3://my-bucket/models/", model_loading="on_demand", max_loaded_mib=2048,
    max_loaded_models=8, model_idle_timeout=300,
)
LOADING_ARGS = ["--model_loading=on_demand", "--max_loaded_models=8", "--max_loaded_mib=2048",
                "--model_idle_timeout=300"]
MiB = 2**20


def _container(service: dict[str, Any]) -> dict[str, Any]:
    [container] = service["spec"]["template"]["spec"]["containers"]
    return container


# --- the Knative Service ------------------------------------------------------------------------------------------


def test_knative_service_passes_the_loading_flags_and_names_no_model() -> None:
    container = _container(knative.knative_service(REPOSITORY))
    assert container["args"] == ["--model_dir=s3://my-bucket/models/", *LOADING_ARGS]
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "2720Mi"},
        "limits": {"cpu": "2", "memory": "5440Mi"},
    }


def test_unset_bounds_are_left_to_the_server_and_eager_adds_no_flag() -> None:
    bare = replace(REPOSITORY, max_loaded_mib=0, max_loaded_models=0, model_idle_timeout=0, model_loading="explicit")
    container = _container(knative.knative_service(bare))
    assert container["args"] == ["--model_dir=s3://my-bucket/models/", "--model_loading=explicit"]
    assert container["resources"] == RenderOptions().resources  # no budget: the defaults
    assert not any("model_loading" in arg for arg in _container(knative.knative_service(RenderOptions()))["args"])


def test_probes_ask_the_server_not_a_model() -> None:
    # Readiness of a repository means "indexed": the same server-wide probes, naming no model.
    single, many = (_container(knative.knative_service(o)) for o in (RenderOptions(), REPOSITORY))
    for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
        assert many[probe] == single[probe]
    assert many["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_grpc_and_gpu_flags_follow_the_loading_flags() -> None:
    options = replace(REPOSITORY, accelerator="gpu", protocol="grpc")
    args = _container(knative.knative_service(options))["args"]
    assert args[0] == "--model_dir=s3://my-bucket/models/" and args[-4:] == LOADING_ARGS
    assert "--protocol=both" in args and any(a.startswith("--trt_engine_cache_path=") for a in args)


# --- KServe -------------------------------------------------------------------------------------------------------


def test_kserve_repository_runtime_names_no_model_and_keeps_the_shared_defaults() -> None:
    runtime = kserve.cluster_serving_runtime(REPOSITORY)
    assert runtime["metadata"]["name"] == "zeroserve-onnx-repository"
    [container] = runtime["spec"]["containers"]
    assert container["args"] == ["--http_port=8080"]
    assert container["resources"] == RenderOptions().resources  # shared: per-service memory is on the service
    gpu = kserve.cluster_serving_runtime(replace(REPOSITORY, accelerator="gpu"))
    assert gpu["metadata"]["name"] == "zeroserve-onnx-repository-gpu"
    # The single-model runtime is unchanged.
    assert kserve.cluster_serving_runtime(RenderOptions())["spec"]["containers"][0]["args"] == [
        "--model_name={{.Name}}", "--model_dir=/mnt/models", "--http_port=8080"
    ]


def test_kserve_service_reads_the_repository_itself_with_the_credentials_in_its_env() -> None:
    options = replace(REPOSITORY, s3_secret="model-store", s3_endpoint="http://minio:9000", s3_region="eu-west-1")
    manifests = rendering.render(options, "kserve")
    assert [m["kind"] for m in manifests] == ["ClusterServingRuntime", "InferenceService"]  # no storage account
    model = manifests[1]["spec"]["predictor"]["model"]
    assert "storageUri" not in model  # the storage initializer would download every model first
    assert model["runtime"] == "zeroserve-onnx-repository"
    assert model["args"] == ["--model_dir=s3://my-bucket/models/", *LOADING_ARGS]
    env = {e["name"]: e.get("value") or e["valueFrom"]["secretKeyRef"]["key"] for e in model["env"]}
    assert env == {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
                   "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
    assert model["resources"]["limits"]["memory"] == "5440Mi"
    assert "serviceAccountName" not in manifests[1]["spec"]["predictor"]
    assert not any("kubectl annotate" in note for note in rendering.notes(options, "kserve"))


def test_kserve_repository_keeps_a_given_service_account_for_cloud_identity() -> None:
    options = replace(REPOSITORY, service_account="models-irsa", s3_secret="model-store")
    manifests = rendering.render(options, "kserve")
    assert [m["kind"] for m in manifests] == ["ClusterServingRuntime", "InferenceService"]
    assert manifests[1]["spec"]["predictor"]["serviceAccountName"] == "models-irsa"


# --- the memory formula -------------------------------------------------------------------------------------------


def test_memory_for_the_example_budget() -> None:
    memory = ModelMemory(2048)
    assert (memory.models_mib, memory.request_mib, memory.limit_mib, memory.inflight_mib) == (2560, 2720, 5440, 680)


def test_a_small_budget_leaves_room_for_one_largest_request() -> None:
    # Under 2 GiB of limit the server's in-flight budget is its floor, one 256 MiB request: 4 x 256 on top.
    memory = ModelMemory(100)
    assert (memory.request_mib, memory.limit_mib, memory.inflight_mib) == (BASELINE_MIB + 125, BASELINE_MIB + 1149, 256)


@given(st.integers(1, 2**20))
def test_the_limit_holds_the_models_and_the_requests_in_flight_at_their_peak(budget: int) -> None:
    memory = ModelMemory(budget)
    assert memory.models_mib >= budget * 5 / 4
    assert memory.request_mib == BASELINE_MIB + memory.models_mib
    # What the server will admit under this very limit, at its peak, fits beside the models.
    assert memory.limit_mib >= memory.request_mib + 4 * max(256, memory.limit_mib / 8)
    # And no more than a MiB of rounding beyond that.
    assert memory.limit_mib <= memory.request_mib + 4 * max(256, memory.limit_mib / 8) + 1
    resources = replace(REPOSITORY, max_loaded_mib=budget).resources
    for kind in ("requests", "limits"):
        assert re.fullmatch(r"[1-9]\d*Mi", resources[kind]["memory"])  # whole MiB
    assert quantity(resources["requests"]["memory"]) == memory.request_mib * MiB
    assert quantity(resources["limits"]["memory"]) == memory.limit_mib * MiB


def test_gpu_memory_never_goes_below_the_gpu_defaults() -> None:
    small = replace(REPOSITORY, accelerator="gpu", max_loaded_mib=256).resources
    assert (small["requests"]["memory"], small["limits"]["memory"]) == ("4096Mi", "8192Mi")
    large = replace(REPOSITORY, accelerator="gpu", max_loaded_mib=8192).resources
    assert (large["requests"]["memory"], large["limits"]["memory"]) == ("10400Mi", "20800Mi")
    assert large["limits"]["nvidia.com/gpu"] == "1"


def test_given_requests_and_limits_win_key_by_key() -> None:
    options = replace(REPOSITORY, limits=(("memory", "6Gi"),))
    assert options.resources["limits"]["memory"] == "6Gi"
    assert options.resources["requests"]["memory"] == "2720Mi"  # still derived
    both = replace(REPOSITORY, requests=(("memory", "1Gi"),), limits=(("memory", "2Gi"),))
    assert both.resources["requests"]["memory"] == "1Gi" and both.resources["limits"]["memory"] == "2Gi"


def test_a_given_limit_below_the_derived_one_is_a_warning() -> None:
    options = replace(REPOSITORY, limits=(("memory", "4Gi"),))
    [note] = [n for n in rendering.notes(options) if "limits memory" in n]
    assert "below the 5440Mi that --max-loaded-mib 2048 sizes" in note


# --- errors and warnings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_loaded_mib": -1}, "max_loaded_mib must be 0 (no bound) or more, got -1"),
        ({"max_loaded_models": -8}, "max_loaded_models must be 0 (no bound) or more"),
        ({"model_idle_timeout": -300}, "model_idle_timeout must be 0 (no bound) or more"),
        ({"model_loading": "lazy"}, "model_loading must be one of eager, on_demand, explicit, got 'lazy'"),
        ({"model_loading": "eager"}, "max_loaded_models and max_loaded_mib and model_idle_timeout bound models"),
        ({"model_name": "resnet"}, "model_name does not apply with model_loading on_demand"),
        ({"limits": (("memory", "2Gi"),)}, "limits memory=2Gi is below the 2720Mi that max_loaded_mib 2048 needs"),
        ({"requests": (("memory", "8Gi"),)}, "requests memory=8Gi is above limits memory=5440Mi"),
    ],
)
def test_nonsense_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        replace(REPOSITORY, **changes)


def test_a_repository_without_a_budget_or_with_explicit_loading_is_warned_about() -> None:
    unbounded = replace(REPOSITORY, max_loaded_mib=0)
    assert any("no --max-loaded-mib: models load until the memory limit (2Gi)" in n for n in rendering.notes(unbounded))
    explicit = replace(REPOSITORY, model_loading="explicit")
    assert any("a load request through the service reaches one pod" in n for n in rendering.notes(explicit))
    pinned = replace(explicit, min_scale=1, max_scale=1)
    assert not any("reaches one pod" in n for n in rendering.notes(pinned))
    assert rendering.notes(REPOSITORY) == []


def test_eventing_needs_one_model() -> None:
    with pytest.raises(ValueError, match="eventing delivers to one model's infer route"):
        eventing.render(REPOSITORY, EventingOptions())


# --- the layout ---------------------------------------------------------------------------------------------------


def test_layout_multi_model_folders_are_the_repository_above_the_model() -> None:
    files = rendering.layout()
    service = yaml.safe_load(files["multi-model/service.yaml"])
    expected = replace(REPOSITORY, name="mlp-models")
    assert service == knative.knative_service(expected)
    assert [yaml.safe_load(text) for text in files["multi-model-kserve/runtime.yaml"].split("---\n")] == [
        kserve.cluster_serving_runtime(expected)
    ]
    assert yaml.safe_load(files["multi-model-kserve/isvc.yaml"]) == kserve.inference_service(
        replace(expected, name="mlp-models-kserve")
    )
    assert yaml.safe_load(files["multi-model-kserve/kustomization.yaml"])["resources"] == ["runtime.yaml", "isvc.yaml"]
    assert "Memory for --max-loaded-mib M = 2048: request 2720Mi, limit 5440Mi" in files["multi-model/service.yaml"]


@pytest.mark.parametrize(
    ("model_uri", "repository"),
    [
        ("s3://my-bucket/models/mlp/", "s3://my-bucket/models/"),
        ("s3://bucket/mlp", "s3://bucket/"),
        ("gs://b/models/mlp/3/model.onnx", "gs://b/models/"),
        ("https://example.com/models/mlp/model.onnx", "https://example.com/models/"),
        ("/mnt/models/mlp", "/mnt/models/"),
    ],
)
def test_repository_uri(model_uri: str, repository: str) -> None:
    assert rendering.repository_uri(model_uri) == repository


@pytest.mark.parametrize("model_uri", ["s3://bucket/", "s3://bucket", "mlp"])
def test_a_model_in_no_folder_has_no_repository(model_uri: str) -> None:
    with pytest.raises(ValueError, match="is not in a folder that could be a repository"):
        rendering.repository_uri(model_uri)


def test_layout_refuses_a_repository_as_its_one_model() -> None:
    with pytest.raises(ValueError, match="leave model_loading unset"):
        rendering.layout(REPOSITORY)


# --- the command line ---------------------------------------------------------------------------------------------


def test_render_command_prints_the_repository_service(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["render", "--name", "models", "--model-uri", "s3://my-bucket/models/", "--model-loading", "on_demand",
            "--max-loaded-mib", "2048", "--max-loaded-models", "8", "--model-idle-timeout", "300"]
    code, out, err = run(args, capsys)
    assert (code, err) == (0, "")
    assert out == rendering.to_yaml(rendering.render(REPOSITORY), comments=[rendering.explain(REPOSITORY)])
    code, out, _ = run([*args, "--kserve"], capsys)
    manifests = rendering.render(REPOSITORY, "kserve")
    comment = rendering.explain(REPOSITORY, "kserve")
    assert code == 0 and out == rendering.to_yaml(manifests, comments=[comment] * 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-loading", "on_demand", "--max-loaded-mib", "-1"], "error: --max-loaded-mib must be 0 (no bound)"),
        (["--max-loaded-models", "4"], "error: --max-loaded-models bound models loaded one by one: give "
                                       "--model-loading on_demand or explicit"),
        (["--model-loading", "lazy"], "argument --model-loading: invalid choice: 'lazy'"),
        (["--model-loading", "on_demand", "--model-name", "x"], "error: --model-name does not apply with "
                                                                "--model-loading on_demand"),
        (["--model-loading", "on_demand", "--max-loaded-mib", "2048", "--limits", "memory=1Gi"],
         "error: --limits memory=1Gi is below the 2720Mi that --max-loaded-mib 2048 needs at rest"),
        (["--model-loading", "on_demand", "--eventing"], "error: eventing delivers to one model's infer route"),
        (["--out-dir", "somewhere", "--model-loading", "on_demand", "--max-loaded-mib", "64"],
         "drop --model-loading, --max-loaded-mib"),
        (["--model-idle-timeout", "soon"], "argument --model-idle-timeout: invalid int value: 'soon'"),
    ],
)
def test_render_errors_name_the_flag(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["render", *args], capsys)
    assert code == 2 and out == ""
    assert message in err


@pytest.mark.parametrize("variant", ["knative", "kserve"])
def test_the_server_reads_the_rendered_args_as_meant(variant: str) -> None:
    """The args a manifest passes are the server's own flags: its parser takes them and ends with the bounds that
    were rendered."""
    from zeroserve.runtime.config import RuntimeConfig

    if variant == "knative":
        args = _container(knative.knative_service(REPOSITORY))["args"]
    else:
        args = [*kserve.inference_service(REPOSITORY)["spec"]["predictor"]["model"]["args"],
                "--model_dir=s3://my-bucket/models/"]
    config = RuntimeConfig.from_args(args, {})
    assert config.loading.mode == "on_demand"
    assert (config.loading.max_loaded_models, config.loading.max_loaded_bytes) == (8, 2048 * MiB)
    assert config.loading.idle_timeout == 300
