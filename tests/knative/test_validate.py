"""Every manifest in knative/ and every ``zeroserve render`` output passes ../shared/tools/validate-manifests
(upstream Knative 1.23 and KServe 0.20 CRD schemas plus their admission rules), warnings included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from zeroserve import knative
from zeroserve import render as rendering
from zeroserve.render_options import RenderOptions, Toleration

REPO = Path(__file__).resolve().parents[2]
VALIDATOR = REPO.parent / "shared" / "tools" / "validate-manifests"

pytestmark = pytest.mark.skipif(not VALIDATOR.exists(), reason=f"{VALIDATOR} not found (shared/ not beside the repo)")


def validate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(VALIDATOR), "-W", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_knative_folder_validates_with_no_warnings() -> None:
    result = validate(str(REPO / "knative"))
    assert result.returncode == 0, result.stdout + result.stderr
    # Subfolders are walked (kustomization.yaml files are skipped as kustomize input): 11 manifest files.
    assert "11 file(s), 12 document(s): 0 error(s), 0 warning(s), 0 skipped" in result.stdout


ACCESS = {
    "s3_secret": "model-store", "s3_endpoint": "http://minio.minio:9000", "s3_region": "us-east-1",
    "service_account": "models", "image_pull_secrets": ("regcred", "mirror"), "env": (("LOG_FORMAT", "json"),),
    "env_from_secrets": ("extra",), "requests": (("cpu", "500m"), ("ephemeral-storage", "1Gi")),
    "limits": (("memory", "12Gi"),), "otel_endpoint": "http://otel-collector.observability:4318",
}
PLACEMENT = {
    "node_selector": (("cloud.google.com/gke-accelerator", "nvidia-l4"),),
    "tolerations": (Toleration("nvidia.com/gpu", effect="NoSchedule"), Toleration("dedicated", "ml", "NoExecute")),
}
# A repository loaded on demand (docs/deploy.md, "Many models in one service").
REPOSITORY = {
    "model_uri": "s3://my-bucket/models/", "model_loading": "on_demand", "max_loaded_mib": 2048,
    "max_loaded_models": 8, "model_idle_timeout": 300,
}
FLAGS = ("--feature", "kubernetes.podspec-nodeselector", "--feature", "kubernetes.podspec-tolerations")

VARIANTS = [
    ("knative", RenderOptions()),
    ("knative", RenderOptions(accelerator="gpu")),
    ("knative", RenderOptions(protocol="grpc")),
    ("knative", RenderOptions(accelerator="gpu", protocol="grpc", namespace="ml", image=f"r.io/z@sha256:{'a' * 64}")),
    ("knative", RenderOptions(name="x" * 63, min_scale=1, max_scale=0, container_concurrency=0, startup_probe=False)),
    ("knative", RenderOptions(cold_start=1, target_concurrency=1, container_concurrency=1)),
    ("knative", RenderOptions(cold_start=480)),  # the longest cold start inside Knative's default 600 s timeout
    ("knative", RenderOptions(**ACCESS)),  # type: ignore[arg-type]
    ("knative", RenderOptions(accelerator="gpu", **ACCESS, **PLACEMENT)),  # type: ignore[arg-type]
    ("kserve", RenderOptions()),
    ("kserve", RenderOptions(accelerator="gpu", model_name="resnet.v2")),
    ("kserve", RenderOptions(protocol="grpc", namespace="ml", name="b" * 53)),
    ("kserve", RenderOptions(namespace="ml", **ACCESS, **PLACEMENT)),  # type: ignore[arg-type]
    ("kserve", RenderOptions(s3_secret="model-store")),
    ("knative", RenderOptions(**REPOSITORY)),  # type: ignore[arg-type]
    ("knative", RenderOptions(accelerator="gpu", protocol="grpc", namespace="ml", **REPOSITORY)),  # type: ignore[arg-type]
    ("knative", RenderOptions(**REPOSITORY | ACCESS)),  # type: ignore[arg-type]
    ("knative", RenderOptions(model_uri="gs://b/models/", model_loading="explicit", min_scale=1, max_scale=1)),
    ("knative", RenderOptions(model_uri="/mnt/models", model_loading="on_demand", max_loaded_mib=100_000)),
    ("kserve", RenderOptions(**REPOSITORY)),  # type: ignore[arg-type]
    ("kserve", RenderOptions(accelerator="gpu", protocol="grpc", **REPOSITORY)),  # type: ignore[arg-type]
    ("kserve", RenderOptions(namespace="ml", **REPOSITORY | ACCESS, **PLACEMENT)),  # type: ignore[arg-type]
    ("kserve", RenderOptions(s3_secret="model-store", **REPOSITORY)),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("target", "options"), VARIANTS)
def test_render_output_validates_with_no_warnings(target: rendering.Target, options: RenderOptions) -> None:
    manifests = rendering.render(options, target)
    text = rendering.to_yaml(manifests, comments=[rendering.explain(options, target)] * len(manifests))
    # Flags the output itself says it needs; the cluster must enable them.
    flags = FLAGS if options.node_selector else ()
    result = validate(*flags, "-", stdin=text)
    assert result.returncode == 0, result.stdout
    assert f"{len(manifests)} document(s): 0 error(s), 0 warning(s), 0 skipped" in result.stdout


def test_node_selectors_and_tolerations_are_flagged_unless_the_cluster_enables_them() -> None:
    options = RenderOptions(**PLACEMENT)  # type: ignore[arg-type]
    result = validate("-", stdin=rendering.to_yaml(rendering.render(options)))
    assert result.returncode == 1
    flagged = sorted(line.split("flag ")[1].split(" ")[0] for line in result.stdout.splitlines() if "warning:" in line)
    assert flagged == ["kubernetes.podspec-nodeselector", "kubernetes.podspec-tolerations"]
    assert [note.split(" ")[0] for note in rendering.notes(options)] == flagged  # render says the same


def test_validator_is_not_vacuous() -> None:
    # The same pipeline flags what Knative would reject: a second port and a reserved env var.
    service = knative.knative_service(RenderOptions())
    container = service["spec"]["template"]["spec"]["containers"][0]
    container["ports"].append({"containerPort": 9000})
    container["env"] = [{"name": "PORT", "value": "9000"}]
    result = validate("-", stdin=rendering.to_yaml([service]))
    assert result.returncode == 1
    assert "only a single port is allowed" in result.stdout
    assert '"PORT" is a reserved environment variable' in result.stdout


def test_a_long_cold_start_is_flagged_as_the_render_note_says() -> None:
    options = RenderOptions(cold_start=900)
    result = validate("-", stdin=rendering.to_yaml(rendering.render(options)))
    assert result.returncode == 1 and "max-revision-timeout-seconds (600)" in result.stdout
    assert "max-revision-timeout-seconds" in rendering.notes(options)[0]
