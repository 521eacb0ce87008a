"""KServe manifests for the zeroserve image, as plain dicts: a ClusterServingRuntime, an InferenceService in
Knative mode that names it, and the ServiceAccount through which KServe's storage initializer gets S3
credentials.

KServe's credential convention: the storage initializer (the init container that downloads ``storageUri`` to
``/mnt/models``) takes ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` from the Secrets listed by the
InferenceService's ServiceAccount, and the endpoint, region and https switch from that Secret's
``serving.kserve.io/s3-*`` annotations (from the ServiceAccount's own annotations when it carries an IRSA role).
The server itself never sees the credentials: it reads the downloaded files.

A repository whose models load on demand (``model_loading`` on_demand or explicit) is the exception: the storage
initializer would download every model before the server starts, which is what loading on demand avoids. There the
InferenceService has no ``storageUri``, the server reads the repository itself (``--model_dir``) with the S3
settings in its environment, as on plain Knative, and the runtime is ``zeroserve-onnx-repository``, which names
no model (``--model_name={{.Name}}`` would name one).
"""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlsplit

from zeroserve import podspec
from zeroserve.render_options import GRPC_PORT, HTTP_PORT, Manifest, RenderOptions

__all__ = [
    "cluster_serving_runtime", "inference_service", "runtime_name", "s3_annotations", "storage_account",
    "storage_initializer",
]

RUNTIME_NAME = "zeroserve-onnx"  # the ClusterServingRuntime
REPOSITORY_RUNTIME_NAME = "zeroserve-onnx-repository"  # the one for repositories loaded on demand
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"


def runtime_name(options: RenderOptions) -> str:
    name = REPOSITORY_RUNTIME_NAME if options.serves_repository else RUNTIME_NAME
    return name if options.accelerator == "cpu" else f"{name}-gpu"


def storage_initializer(options: RenderOptions) -> bool:
    """Whether KServe's storage initializer downloads the model (not for a repository loaded on demand)."""
    return not options.serves_repository


def storage_account_name(options: RenderOptions) -> str | None:
    """The ServiceAccount the InferenceService runs as: the given one, else one rendered for ``s3_secret``."""
    if options.service_account:
        return options.service_account
    return f"{options.name}-storage" if options.s3_secret and storage_initializer(options) else None


def cluster_serving_runtime(options: RenderOptions) -> Manifest:
    """A KServe ClusterServingRuntime for ONNX over the Open Inference Protocol (REST and gRPC).

    ``autoSelect`` is off, so it never competes with KServe's built-in Triton (onnx priority 1) and OpenVINO
    (onnx priority 2) runtimes: an InferenceService uses it only by naming it. It is shared by every
    InferenceService that names it, so per-model settings (resources, environment) go on those instead.
    """
    # Per-service settings (model loading, resources) stay on the InferenceService.
    shared = replace(options, protocol="http", requests=(), limits=(), model_loading="eager", max_loaded_models=0,
                     max_loaded_mib=0, model_idle_timeout=0)
    # KServe's storage initializer puts the model in /mnt/models; {{.Name}} is the InferenceService's name. A
    # repository's InferenceService gives --model_dir itself and its models keep their own names.
    model = (None, None) if options.serves_repository else ("/mnt/models", "{{.Name}}")
    container: Manifest = {
        "name": "kserve-container",
        "image": options.resolved_image,
        # REST is pinned to 8080 so an InferenceService that declares the h2c gRPC port keeps its probes.
        "args": [*podspec.container_args(shared, *model), f"--http_port={HTTP_PORT}"],
        "ports": [{"containerPort": HTTP_PORT, "protocol": "TCP"}],
        **podspec.probes(shared),
        **podspec.resources(shared),
        **podspec.hardening(),
    }
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ClusterServingRuntime",
        "metadata": podspec.metadata(runtime_name(options), None),
        "spec": {
            "supportedModelFormats": [{"name": "onnx", "version": "1", "autoSelect": False}],
            "protocolVersions": ["v2", "grpc-v2"],
            "multiModel": False,
            "containers": [container],
            "volumes": podspec.volumes(),
        },
    }


def inference_service(options: RenderOptions) -> Manifest:
    """A KServe InferenceService in Knative mode that names the zeroserve runtime and scales to zero."""
    budget = options.budget
    annotations = {
        "serving.kserve.io/deploymentMode": "Knative",
        # KServe copies these onto the Knative revision.
        "autoscaling.knative.dev/scale-down-delay": f"{budget.scale_down_delay}s",
        "serving.knative.dev/progress-deadline": f"{budget.progress_deadline}s",
    }
    model: Manifest = {
        "modelFormat": {"name": "onnx"},
        "runtime": runtime_name(options),
        "protocolVersion": "grpc-v2" if options.protocol == "grpc" else "v2",
    }
    # KServe appends these to the runtime's args (--model_name={{.Name}}, REST on 8080); the last flag wins.
    if storage_initializer(options):
        model["storageUri"] = options.model_uri
        args = [f"--model_name={options.served_name}"] if options.served_name != options.name else []
    else:
        args = [f"--model_dir={options.model_uri}", *podspec.loading_args(options)]
    if options.protocol == "grpc":
        args += ["--protocol=both", f"--grpc_port={GRPC_PORT}"]
        model["ports"] = [{"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"}]
    if args:
        model["args"] = args
    model.update(podspec.env(options, s3=not storage_initializer(options)))
    if options.requests or options.limits or options.max_loaded_mib:
        model.update(podspec.resources(options))
    pod = podspec.pod_settings(options)
    account = storage_account_name(options)
    if account:
        pod["serviceAccountName"] = account
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": podspec.metadata(options.name, options.namespace, annotations),
        "spec": {
            "predictor": {
                **pod,
                "minReplicas": options.min_scale,
                "maxReplicas": options.max_scale,
                "scaleMetric": "concurrency",
                "scaleTarget": options.target_concurrency,
                "containerConcurrency": options.container_concurrency,
                "timeout": budget.timeout,
                "model": model,
            }
        },
    }


def storage_account(options: RenderOptions) -> Manifest | None:
    """The ServiceAccount listing ``s3_secret``, so that KServe hands its keys to the storage initializer."""
    name = storage_account_name(options)
    if not options.s3_secret or name is None or not storage_initializer(options):
        return None
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": podspec.metadata(name, options.namespace),
        "secrets": [{"name": options.s3_secret}],
    }


def s3_annotations(options: RenderOptions) -> dict[str, str]:
    """KServe's ``serving.kserve.io/s3-*`` annotations for ``s3_endpoint`` and ``s3_region`` (none when the server
    reads a repository itself: it takes them from its environment)."""
    found: dict[str, str] = {}
    if not storage_initializer(options):
        return found
    if options.s3_endpoint:
        url = urlsplit(options.s3_endpoint)
        found["serving.kserve.io/s3-endpoint"] = url.netloc + url.path.rstrip("/")
        found["serving.kserve.io/s3-usehttps"] = "1" if url.scheme == "https" else "0"
    if options.s3_region:
        found["serving.kserve.io/s3-region"] = options.s3_region
    return found


def render(options: RenderOptions) -> list[Manifest]:
    """The runtime, the storage ServiceAccount when S3 credentials are given, then the InferenceService."""
    account = storage_account(options)
    return [cluster_serving_runtime(options), *([account] if account else []), inference_service(options)]
