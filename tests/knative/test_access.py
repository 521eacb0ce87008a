"""What a real cluster needs besides the defaults: S3 credentials and endpoint, identity, registry credentials,
sizes, placement and the OpenTelemetry endpoint, each written the way its platform expects."""

from __future__ import annotations

from typing import Any

import pytest

from zeroserve import kserve, podspec
from zeroserve import render as rendering
from zeroserve.knative import knative_service
from zeroserve.render_options import RenderOptions, Toleration, quantity


def _container(service: dict[str, Any]) -> dict[str, Any]:
    [container] = service["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def test_defaults_set_no_environment_and_no_pod_fields() -> None:
    service = knative_service(RenderOptions())
    assert "env" not in _container(service) and "envFrom" not in _container(service)
    assert not {"serviceAccountName", "imagePullSecrets", "nodeSelector", "tolerations"} & set(
        service["spec"]["template"]["spec"]
    )


def test_s3_credentials_come_from_the_secrets_keys_and_the_endpoint_is_plain_env() -> None:
    options = RenderOptions(s3_secret="model-store", s3_endpoint="http://minio.minio:9000", s3_region="eu-west-1")
    env = _env(_container(knative_service(options)))
    assert env == {
        "AWS_ACCESS_KEY_ID": {"secretKeyRef": {"name": "model-store", "key": "AWS_ACCESS_KEY_ID"}},
        "AWS_SECRET_ACCESS_KEY": {"secretKeyRef": {"name": "model-store", "key": "AWS_SECRET_ACCESS_KEY"}},
        "AWS_ENDPOINT_URL": "http://minio.minio:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }


def test_otel_endpoint_sets_the_standard_variables_and_leaves_the_service_name_to_k_service() -> None:
    env = _env(_container(knative_service(RenderOptions(otel_endpoint="http://otel-collector.obs:4318"))))
    assert env == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.obs:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
    }


def test_user_env_and_env_from_secrets_follow_the_generated_ones() -> None:
    options = RenderOptions(env=(("A", "1"), ("B", "x=y,z")), env_from_secrets=("one", "two"), s3_region="us-east-1")
    container = _container(knative_service(options))
    assert [item["name"] for item in container["env"]] == ["AWS_DEFAULT_REGION", "A", "B"]
    assert container["env"][2] == {"name": "B", "value": "x=y,z"}
    assert container["envFrom"] == [{"secretRef": {"name": "one"}}, {"secretRef": {"name": "two"}}]


def test_identity_registry_credentials_and_placement_are_pod_fields() -> None:
    options = RenderOptions(
        service_account="mlp-irsa",
        image_pull_secrets=("regcred",),
        node_selector=(("cloud.google.com/gke-accelerator", "nvidia-l4"),),
        tolerations=(Toleration("nvidia.com/gpu", effect="NoSchedule"), Toleration("dedicated", "ml")),
    )
    spec = knative_service(options)["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "mlp-irsa"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml"},
    ]
    assert podspec.feature_flags(options) == ["kubernetes.podspec-nodeselector", "kubernetes.podspec-tolerations"]
    notes = rendering.notes(options)
    assert len(notes) == 2 and all("is off in a default Knative" in note for note in notes)
    assert "kubernetes.podspec-tolerations: enabled" in "\n".join(rendering.explain(options))
    assert podspec.feature_flags(RenderOptions(service_account="a", image_pull_secrets=("b",))) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nvidia.com/gpu:NoSchedule", Toleration("nvidia.com/gpu", "", "NoSchedule")),
        ("dedicated=ml:NoExecute", Toleration("dedicated", "ml", "NoExecute")),
        ("dedicated=ml", Toleration("dedicated", "ml", "")),
        ("spot", Toleration("spot", "", "")),
    ],
)
def test_tolerations_read_like_kubectl_taint(text: str, expected: Toleration) -> None:
    assert Toleration.parse(text) == expected


def test_a_toleration_with_an_unknown_effect_is_refused() -> None:
    with pytest.raises(ValueError, match="effect must be one of NoSchedule, PreferNoSchedule, NoExecute"):
        Toleration.parse("gpu:NoSchedul")


def test_requests_and_limits_replace_the_defaults_key_by_key() -> None:
    resources = _container(knative_service(RenderOptions(requests=(("cpu", "250m"),), limits=(("memory", "3Gi"),))))
    assert resources["resources"] == {
        "requests": {"cpu": "250m", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "3Gi"},
    }
    gpu = RenderOptions(accelerator="gpu", limits=(("nvidia.com/gpu", "2"),)).resources
    assert gpu["limits"]["nvidia.com/gpu"] == "2" and gpu["limits"]["memory"] == "8Gi"


@pytest.mark.parametrize(
    ("text", "value"),
    [("500m", "0.5"), ("2", "2"), ("1Gi", str(2**30)), ("1.5G", "1.5E+9"), ("1e3", "1E+3"), ("100Ki", "102400")],
)
def test_quantities_compare_as_kubernetes_does(text: str, value: str) -> None:
    assert quantity(text) == quantity(value)


def test_kserve_passes_s3_credentials_through_a_service_account_listing_the_secret() -> None:
    options = RenderOptions(s3_secret="model-store", s3_endpoint="https://s3.example.com", s3_region="us-east-2",
                            otel_endpoint="http://otel:4318", env=(("A", "1"),))
    runtime, account, isvc = rendering.render(options, "kserve")
    assert account == {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "mlp-storage"},
                       "secrets": [{"name": "model-store"}]}
    predictor = isvc["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "mlp-storage"
    # The storage initializer downloads; the server gets no S3 variables, only the per-model ones.
    assert [item["name"] for item in predictor["model"]["env"]] == [
        "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER",
        "A",
    ]
    assert "env" not in runtime["spec"]["containers"][0]  # the shared runtime carries nothing per model
    assert kserve.s3_annotations(options) == {
        "serving.kserve.io/s3-endpoint": "s3.example.com",
        "serving.kserve.io/s3-usehttps": "1",
        "serving.kserve.io/s3-region": "us-east-2",
    }
    [note] = rendering.notes(options, "kserve")
    assert note.endswith("kubectl annotate secret model-store serving.kserve.io/s3-endpoint=s3.example.com "
                         "serving.kserve.io/s3-usehttps=1 serving.kserve.io/s3-region=us-east-2")
    assert rendering.notes(options) == []  # on plain Knative the endpoint is already in the env


def test_kserve_with_an_irsa_service_account_renders_no_account_of_its_own() -> None:
    options = RenderOptions(service_account="models-irsa", s3_endpoint="http://minio:9000")
    runtime, isvc = rendering.render(options, "kserve")
    assert isvc["spec"]["predictor"]["serviceAccountName"] == "models-irsa"
    assert "kubectl annotate serviceaccount models-irsa serving.kserve.io/s3-endpoint=minio:9000 " \
        "serving.kserve.io/s3-usehttps=0" in rendering.notes(options, "kserve")[0]


def test_kserve_needs_a_secret_or_account_to_carry_the_endpoint() -> None:
    with pytest.raises(ValueError, match="give one of them"):
        rendering.render(RenderOptions(s3_endpoint="http://minio:9000"), "kserve")


def test_kserve_sizes_go_on_the_inference_service_not_the_shared_runtime() -> None:
    options = RenderOptions(requests=(("cpu", "2"),), limits=(("cpu", "4"),), image_pull_secrets=("regcred",))
    runtime, isvc = rendering.render(options, "kserve")
    assert runtime["spec"]["containers"][0]["resources"] == RenderOptions().resources
    assert isvc["spec"]["predictor"]["model"]["resources"]["requests"]["cpu"] == "2"
    assert isvc["spec"]["predictor"]["imagePullSecrets"] == [{"name": "regcred"}]
