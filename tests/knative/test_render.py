"""``zeroserve.knative``: the repository's knative/ folder is the renderer's output, and the numbers in it
follow the cold-start rules for any options."""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from zeroserve import knative, kserve, render_options
from zeroserve import render as rendering
from zeroserve.render_options import RenderOptions

REPO = Path(__file__).resolve().parents[2]
BUILTIN_RUNTIMES = REPO.parent / "shared" / "schemas" / "kserve-v0.20.0-builtin-clusterservingruntimes.json"


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return int(match[1])


def _container(service: dict[str, Any]) -> dict[str, Any]:
    [container] = service["spec"]["template"]["spec"]["containers"]
    return container


def test_knative_folder_is_exactly_the_rendered_layout() -> None:
    on_disk = {
        str(path.relative_to(REPO / "knative")): path.read_text(encoding="utf-8")
        for path in sorted((REPO / "knative").rglob("*"))
        if path.is_file()
    }
    expected = rendering.layout()
    assert sorted(on_disk) == sorted(expected), "files added to or missing from knative/"
    for path, text in expected.items():
        assert on_disk[path] == text, f"knative/{path} differs: run `zeroserve render --out-dir knative`"


def test_layout_files_parse_back_to_the_rendered_manifests() -> None:
    files = rendering.layout()
    base = RenderOptions(model_name="mlp")
    pairs = [
        ("cpu/service.yaml", knative.knative_service(base)),
        ("gpu/service.yaml", knative.knative_service(replace(base, name="mlp-gpu", accelerator="gpu"))),
        ("grpc/service.yaml", knative.knative_service(replace(base, name="mlp-grpc", protocol="grpc"))),
        ("kserve/runtime.yaml", kserve.cluster_serving_runtime(base)),
        ("kserve/isvc.yaml", kserve.inference_service(replace(base, name="mlp-kserve"))),
    ]
    for path, manifest in pairs:
        assert yaml.safe_load(files[path]) == manifest, path
    assert yaml.safe_load(files["kustomization.yaml"])["resources"] == ["cpu"]
    assert yaml.safe_load(files["kserve/kustomization.yaml"])["resources"] == ["runtime.yaml", "isvc.yaml"]


def test_image_tag_is_the_package_version() -> None:
    assert render_options.VERSION == importlib.metadata.version("zeroserve")


@given(
    cold_start=st.integers(1, 3600),
    accelerator=st.sampled_from(["cpu", "gpu"]),
    protocol=st.sampled_from(["http", "grpc"]),
)
def test_cold_start_budgets_hold_for_any_cold_start(cold_start: int, accelerator: str, protocol: str) -> None:
    options = RenderOptions(cold_start=cold_start, accelerator=accelerator, protocol=protocol)  # type: ignore[arg-type]
    service = knative.knative_service(options)
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    spec = service["spec"]["template"]["spec"]
    startup = _container(service)["startupProbe"]
    startup_budget = startup["periodSeconds"] * startup["failureThreshold"]
    deadline = _seconds(annotations["serving.knative.dev/progress-deadline"])

    assert startup_budget >= cold_start, "the startup probe gives up before a normal cold start ends"
    assert deadline > startup_budget, "Knative gives up before the startup probe would"
    assert spec["responseStartTimeoutSeconds"] > cold_start, "a request that wakes the service would get a 504"
    assert spec["timeoutSeconds"] >= spec["responseStartTimeoutSeconds"]
    assert 0 <= _seconds(annotations["autoscaling.knative.dev/scale-down-delay"]) <= 3600
    assert annotations["autoscaling.knative.dev/min-scale"] == "0"
    assert annotations["autoscaling.knative.dev/class"] == "kpa.autoscaling.knative.dev"  # only the KPA reaches 0


def test_readiness_is_the_v2_ready_route_probed_by_queue_proxy_as_fast_as_it_can() -> None:
    container = _container(knative.knative_service(RenderOptions()))
    assert container["readinessProbe"] == {"httpGet": {"path": "/v2/health/ready", "port": render_options.HTTP_PORT}}
    assert "periodSeconds" not in container["readinessProbe"]  # unset: Knative probes every 50 ms until ready
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_no_startup_probe_option() -> None:
    assert "startupProbe" not in _container(knative.knative_service(RenderOptions(startup_probe=False)))


def test_rest_service_has_one_http1_port_and_lets_knative_inject_port() -> None:
    container = _container(knative.knative_service(RenderOptions()))
    assert container["ports"] == [{"name": "http1", "containerPort": 8080}]
    assert "env" not in container  # PORT is Knative's to set; the server reads it
    assert not any(arg.startswith("--http_port") for arg in container["args"])
    assert container["args"] == ["--model_name=mlp", "--model_dir=s3://my-bucket/models/mlp/"]


def test_grpc_service_exposes_only_the_h2c_port_and_probes_rest_inside_the_pod() -> None:
    service = knative.knative_service(RenderOptions(protocol="grpc"))
    container = _container(service)
    assert container["ports"] == [{"name": "h2c", "containerPort": render_options.GRPC_PORT}]
    assert container["args"][2:] == ["--protocol=both", "--http_port=8080", "--grpc_port=8081"]
    assert container["readinessProbe"]["httpGet"]["port"] == 8080
    assert container["startupProbe"]["httpGet"]["port"] == 8080
    assert container["livenessProbe"] == {"tcpSocket": {"port": 8081}, "periodSeconds": 10, "failureThreshold": 6}


def test_gpu_service_asks_for_a_gpu_and_keeps_engines_in_the_cache_volume() -> None:
    options = RenderOptions(accelerator="gpu")
    container = _container(knative.knative_service(options))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == render_options.IMAGES["gpu"]
    assert f"--trt_engine_cache_path={render_options.CACHE_DIR}/trt" in container["args"]
    assert {"name": "cache", "mountPath": render_options.CACHE_DIR} in container["volumeMounts"]
    assert options.budget.cold_start == 300 and options.budget.progress_deadline == 1200


def test_containers_run_hardened_with_writable_cache_and_tmp() -> None:
    service = knative.knative_service(RenderOptions())
    container = _container(service)
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {render_options.CACHE_DIR, "/tmp"}
    assert all("emptyDir" in v for v in service["spec"]["template"]["spec"]["volumes"])


def test_cluster_serving_runtime_does_not_clash_with_kserves_builtin_onnx_runtimes() -> None:
    runtime = kserve.cluster_serving_runtime(RenderOptions())
    spec = runtime["spec"]
    assert set(spec["protocolVersions"]) >= {"v2", "grpc-v2"}
    [fmt] = spec["supportedModelFormats"]
    assert fmt["name"] == "onnx"
    if fmt.get("autoSelect"):  # an auto-selected format needs a priority no built-in runtime holds
        import json

        builtin = json.loads(BUILTIN_RUNTIMES.read_text())["runtimes"]
        taken = {(f[0], f[1], f[2]) for r in builtin.values() for f in r["formats"]}
        assert ("onnx", fmt.get("version"), fmt.get("priority")) not in taken
    [container] = spec["containers"]
    assert container["name"] == "kserve-container"
    assert "--model_name={{.Name}}" in container["args"] and "--model_dir=/mnt/models" in container["args"]


def test_inference_service_names_the_runtime_and_scales_to_zero_in_knative_mode() -> None:
    isvc = kserve.inference_service(RenderOptions(name="bert", model_name="bert-base"))
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] == 0
    assert predictor["model"]["runtime"] == kserve.RUNTIME_NAME
    assert predictor["model"]["args"] == ["--model_name=bert-base"]  # after the runtime's {{.Name}}: last wins
    gpu = rendering.render(RenderOptions(accelerator="gpu"), "kserve")
    assert gpu[1]["spec"]["predictor"]["model"]["runtime"] == gpu[0]["metadata"]["name"] == "zeroserve-onnx-gpu"
    grpc = kserve.inference_service(RenderOptions(protocol="grpc"))["spec"]["predictor"]["model"]
    assert grpc["protocolVersion"] == "grpc-v2"
    assert grpc["ports"] == [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}]
    assert grpc["args"] == ["--protocol=both", "--grpc_port=8081"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "Model"}, "DNS-1035"),
        ({"name": "9lives"}, "DNS-1035"),
        ({"name": "a" * 64}, "DNS-1035"),
        ({"name": "abc\n"}, "DNS-1035"),
        ({"model_uri": " "}, "model_uri"),
        ({"min_scale": 3, "max_scale": 2}, "below min_scale"),
        ({"min_scale": -1}, "0 or more"),
        ({"target_concurrency": 9, "container_concurrency": 8}, "above container_concurrency"),
        ({"target_concurrency": 0}, "at least 1"),
        ({"cold_start": 0}, "between 1 and 3600"),
        ({"model_name": "a b"}, "model_name"),
        ({"namespace": "Bad_NS"}, "namespace"),
        ({"env": (("PORT", "9000"),)}, "PORT is Knative's to set"),
        ({"env": (("K_REVISION", "x"),)}, "reserved"),
        ({"env": (("1X", "x"),)}, "not a valid environment variable name"),
        ({"s3_secret": "creds", "env": (("AWS_ACCESS_KEY_ID", "x"),)}, "already set by the S3"),
        ({"otel_endpoint": "http://c:4318", "env": (("OTEL_TRACES_EXPORTER", "none"),)}, "already set"),
        ({"s3_secret": "Creds_1"}, "not a valid Secret or ServiceAccount name"),
        ({"image_pull_secrets": ("",)}, "not a valid Secret"),
        ({"s3_endpoint": "minio:9000"}, "s3_endpoint must be an http:// or https:// URL"),
        ({"otel_endpoint": "grpc://c:4317"}, "otel_endpoint must be an http"),
        ({"s3_region": "US East"}, "not a region name"),
        ({"requests": (("cpu", "lots"),)}, "not a resource quantity"),
        ({"requests": (("memory", "4Gi"),)}, "requests memory=4Gi is above limits memory=2Gi"),
        ({"limits": (("cpu", "500m"),)}, "requests cpu=1 is above limits cpu=500m"),
        ({"requests": (("bad key!", "1"),)}, "not a resource name"),
        ({"node_selector": (("-pool", "a"),)}, "not a valid label key"),
        ({"node_selector": (("pool", "a b"),)}, "not a valid label value"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RenderOptions(**options)


def test_notes_warn_about_what_default_knative_rejects() -> None:
    assert rendering.notes(RenderOptions()) == []
    [note] = rendering.notes(RenderOptions(cold_start=500))
    assert "max-revision-timeout-seconds" in note
    assert "never scales to zero" in rendering.notes(RenderOptions(min_scale=1))[0]


def test_layout_refuses_one_image_for_cpu_and_gpu() -> None:
    with pytest.raises(ValueError, match="kustomize edit set image"):
        rendering.layout(RenderOptions(image="registry/zeroserve:1"))


# -- YAML output ---------------------------------------------------------------------------------------------------

TRICKY = [
    "", " ", "yes", "No", "on", "OFF", "y", "n", "true", "False", "null", "~", "=", "-", "- a", "a: b", "a:", "#x",
    "a #b", "0", "-1", "+1", "0o17", "0x1F", "1e3", "1_000", "1:20", "2001-12-14", ".inf", "-.inf", ".nan",
    "{{.Name}}", "[a]", "*ref", "&a", "!tag", "%x", "@x", "`x", "|", ">", "'q'", '"q"', "back\\slash", "tab\there",
    "new\nline", "A\n", "\n", "é", "\x85", "\u2028", "\ufeff", "\x7f", "\x00", "😀", "60s", "1Gi", "--model_dir=s3://b/k/",
    "http://x:8080/p", "autoscaling.knative.dev/min-scale",
]


@pytest.mark.parametrize("text", TRICKY)
def test_yaml_keeps_every_string_a_string(text: str) -> None:
    doc = {"metadata": {"annotations": {text or "k": text}}, "args": [text], "nested": [[text], {text or "k": [text]}]}
    assert yaml.safe_load(rendering.to_yaml([doc])) == doc


json_values = st.recursive(
    st.none().map(lambda _: "") | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), json_values, max_size=5))
def test_yaml_round_trips_any_manifest_shaped_value(value: dict[str, Any]) -> None:
    assert yaml.safe_load(rendering.to_yaml([value])) == value


def test_yaml_documents_and_comments() -> None:
    text = rendering.to_yaml([{"a": 1}, {"b": [True, {}]}], comments=[["first"], ["second", ""]])
    assert text == "# first\na: 1\n---\n# second\n#\nb:\n  - true\n  - {}\n"
    assert list(yaml.safe_load_all(text)) == [{"a": 1}, {"b": [True, {}]}]


def test_yaml_refuses_values_manifests_cannot_hold() -> None:
    with pytest.raises(TypeError, match="float"):
        rendering.to_yaml([{"a": 0.5}])
