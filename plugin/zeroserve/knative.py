"""Knative Serving and KServe manifests for the zeroserve image, rendered as plain dicts.

``render(options, target)`` builds the manifests for one variant; ``layout(options)`` gives the whole
Kustomize tree that ``zeroserve render --out-dir DIR`` writes (the repository's ``knative/`` folder is that
tree with the default options, and a test keeps the two equal); ``to_yaml`` prints manifests. Everything
here is pure: no I/O and nothing beyond the standard library, so ``zeroserve render`` starts at once.

The cold-start settings follow from one number, the expected cold start C (seconds from a request reaching a
service at zero until a pod answers it: image start, model download, session build, TensorRT engine build,
warm-up). See ``Budget`` for the rules.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from zeroserve._yaml import to_yaml

__all__ = ["Budget", "RenderOptions", "Target", "layout", "notes", "render", "to_yaml"]

Manifest = dict[str, Any]
Accelerator = Literal["cpu", "gpu"]
Protocol = Literal["http", "grpc"]
Target = Literal["knative", "kserve"]

VERSION = "0.1.0"  # the image tag; a test keeps it equal to the package version
# dev.local images skip Knative's tag-to-digest resolution (config-deployment registries-skipping-tag-resolving),
# so an image loaded straight into the nodes (`kind load docker-image`) runs without a registry.
IMAGES: Mapping[Accelerator, str] = {
    "cpu": f"dev.local/zeroserve:{VERSION}",
    "gpu": f"dev.local/zeroserve:{VERSION}-gpu",
}
HTTP_PORT = 8080  # Knative's default PORT and KServe's REST port
GRPC_PORT = 8081  # KServe's gRPC port; the server's --grpc_port default
CACHE_DIR = "/var/cache/zeroserve"  # the images' ZEROSERVE_CACHE_DIR, writable by their user
RUNTIME_NAME = "zeroserve-onnx"  # the ClusterServingRuntime
DEFAULT_COLD_START: Mapping[Accelerator, int] = {"cpu": 60, "gpu": 300}
NODE_BUDGET: Mapping[Accelerator, int] = {"cpu": 120, "gpu": 600}  # scheduling (GPU node scale-up) + image pull
MAX_REVISION_TIMEOUT = 600  # Knative's default max-revision-timeout-seconds
RESOURCES: Mapping[Accelerator, Manifest] = {
    # The server sizes ONNX Runtime's threads from the CPU limit (the cgroup quota), so set one.
    "cpu": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
    "gpu": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}},
}
SECURITY_CONTEXT: Manifest = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
GENERATED_BY = "zeroserve render"
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """What a deployment varies by. ``image`` and ``cold_start`` default by ``accelerator``.

    Args:
        name: the Knative Service or InferenceService name (a DNS-1035 label).
        model_name: the name the model is served under (``/v2/models/NAME``); default ``name``.
        model_uri: where the server fetches the model (``--model_dir``): s3://, gs://, https://, ...
        image: the runtime image; default ``IMAGES[accelerator]``.
        accelerator: ``gpu`` adds an ``nvidia.com/gpu`` limit and keeps TensorRT engines in the cache volume.
        protocol: ``grpc`` exposes the gRPC port, named ``h2c``; REST stays inside the pod for the probes.
        namespace: written into the manifests when given; otherwise the deploying context's namespace.
        min_scale: 0 lets the service scale to zero.
        max_scale: 0 means unbounded.
        target_concurrency: in-flight requests per pod the autoscaler aims at.
        container_concurrency: hard cap of in-flight requests per pod (queue-proxy queues the rest).
        cold_start: expected cold start in seconds; the probe, deadline and timeout budgets derive from it.
        startup_probe: a kubelet startup probe that restarts a container whose model never loads.
    """

    name: str = "mlp"
    model_name: str | None = None
    model_uri: str = "s3://my-bucket/models/mlp/"
    image: str | None = None
    accelerator: Accelerator = "cpu"
    protocol: Protocol = "http"
    namespace: str | None = None
    min_scale: int = 0
    max_scale: int = 4
    target_concurrency: int = 4
    container_concurrency: int = 8
    cold_start: int | None = None
    startup_probe: bool = True

    def __post_init__(self) -> None:
        if len(self.name) > 63 or not _DNS1035.fullmatch(self.name):
            raise ValueError(
                f"name {self.name!r} must be a DNS-1035 label: lowercase letters, digits and '-', "
                "starting with a letter, at most 63 characters"
            )
        if self.namespace is not None and (len(self.namespace) > 63 or not _DNS1123.fullmatch(self.namespace)):
            raise ValueError(f"namespace {self.namespace!r} is not a valid namespace name")
        if self.model_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.model_name):
            raise ValueError(f"model_name {self.model_name!r} must be letters, digits, '_', '.' or '-'")
        if not self.model_uri.strip():
            raise ValueError("model_uri must not be empty")
        if self.accelerator not in ("cpu", "gpu"):
            raise ValueError(f"accelerator must be cpu or gpu, got {self.accelerator!r}")
        if self.protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be http or grpc, got {self.protocol!r}")
        if self.min_scale < 0 or self.max_scale < 0:
            raise ValueError("min_scale and max_scale must be 0 or more")
        if self.max_scale and self.max_scale < self.min_scale:
            raise ValueError(f"max_scale ({self.max_scale}) is below min_scale ({self.min_scale})")
        if self.target_concurrency < 1:
            raise ValueError("target_concurrency must be at least 1")
        if self.container_concurrency < 0:
            raise ValueError("container_concurrency must be 0 (unlimited) or more")
        if self.container_concurrency and self.target_concurrency > self.container_concurrency:
            raise ValueError(
                f"target_concurrency ({self.target_concurrency}) is above container_concurrency "
                f"({self.container_concurrency}): the autoscaler would aim at a load no pod may take"
            )
        if self.cold_start is not None and not 1 <= self.cold_start <= 3600:
            raise ValueError("cold_start must be between 1 and 3600 seconds")

    @property
    def served_name(self) -> str:
        return self.model_name or self.name

    @property
    def resolved_image(self) -> str:
        return self.image or IMAGES[self.accelerator]

    @property
    def budget(self) -> Budget:
        cold_start = DEFAULT_COLD_START[self.accelerator] if self.cold_start is None else self.cold_start
        return Budget(cold_start, NODE_BUDGET[self.accelerator])


@dataclass(frozen=True, slots=True)
class Budget:
    """Cold-start budgets, in seconds, all derived from the expected cold start ``cold_start`` (C).

    - startup probe: 2·C on ``/v2/health/ready`` before kubelet restarts the container (slow downloads get
      twice the expected time);
    - ``serving.knative.dev/progress-deadline``: the startup budget plus ``node`` (scheduling, a GPU node
      scaling up, the image pull); past it Knative fails the revision or gives up a scale-from-zero;
    - ``responseStartTimeoutSeconds``: C + 60, because a cold start counts against it (knative/serving#15352);
    - ``timeoutSeconds``: C + 120, which is also the pod's termination grace period;
    - ``scale-down-delay``: C. Keep an idle pod as long as a cold start costs before dropping it (the
      ski-rental rule: never pay more than twice the best possible choice).
    """

    cold_start: int
    node: int

    @property
    def startup(self) -> int:
        return 2 * self.cold_start

    @property
    def progress_deadline(self) -> int:
        return self.startup + self.node

    @property
    def response_start_timeout(self) -> int:
        return self.cold_start + 60

    @property
    def timeout(self) -> int:
        return self.cold_start + 120

    @property
    def scale_down_delay(self) -> int:
        return min(self.cold_start, 3600)


def notes(options: RenderOptions) -> list[str]:
    """Warnings about options a default Knative installation rejects or handles badly."""
    found = []
    budget = options.budget
    if budget.timeout > MAX_REVISION_TIMEOUT:
        found.append(
            f"timeoutSeconds {budget.timeout} (cold start {budget.cold_start} s + 120) is above Knative's default "
            f"max-revision-timeout-seconds ({MAX_REVISION_TIMEOUT}); raise it in config-defaults (and the "
            "activator's terminationGracePeriodSeconds) or expect the revision to be rejected"
        )
    if options.min_scale > 0:
        found.append(f"min-scale {options.min_scale} keeps that many pods running: the service never scales to zero")
    return found


# ---------------------------------------------------------------------------------------------------------
# Manifests


def _container_args(options: RenderOptions, model_dir: str, model_name: str) -> list[str]:
    args = [f"--model_name={model_name}", f"--model_dir={model_dir}"]
    if options.protocol == "grpc":
        # gRPC on the one port Knative exposes (h2c); REST stays on its own port inside the pod for the probes
        # (Knative sets PORT to the gRPC port, so REST's port is given explicitly).
        args += ["--protocol=both", f"--http_port={HTTP_PORT}", f"--grpc_port={GRPC_PORT}"]
    if options.accelerator == "gpu":
        # TensorRT engines and tactic timings survive container restarts in the cache volume.
        args += [f"--trt_engine_cache_path={CACHE_DIR}/trt", f"--trt_timing_cache_path={CACHE_DIR}/trt"]
    return args


def _probes(options: RenderOptions) -> Manifest:
    budget = options.budget
    # Readiness runs in queue-proxy; without periodSeconds it probes every 50 ms until ready, the fastest
    # cold start. A number (not the port's name) is used because Knative renames the pod's port.
    probes: Manifest = {"readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT}}}
    if options.startup_probe:
        # Kubelet runs it; with one, the activator waits for kubelet's view of readiness (up to periodSeconds
        # more per cold start), hence 1 s.
        probes["startupProbe"] = {
            "httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
            "periodSeconds": 1,
            "failureThreshold": budget.startup,
        }
    if options.protocol == "grpc":
        # Knative points liveness probes at the serving port, which speaks only HTTP/2 here.
        probes["livenessProbe"] = {"tcpSocket": {"port": GRPC_PORT}, "periodSeconds": 10, "failureThreshold": 6}
    else:
        probes["livenessProbe"] = {
            "httpGet": {"path": "/v2/health/live", "port": HTTP_PORT},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        }
    return probes


def _port(options: RenderOptions) -> Manifest:
    if options.protocol == "grpc":
        return {"name": "h2c", "containerPort": GRPC_PORT}
    return {"name": "http1", "containerPort": HTTP_PORT}


def _pod_settings(options: RenderOptions) -> Manifest:
    # Copies: a caller may edit the manifests it gets.
    return {
        "resources": copy.deepcopy(RESOURCES[options.accelerator]),
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": copy.deepcopy(SECURITY_CONTEXT),
    }


def _volumes() -> list[Manifest]:
    # The root filesystem is read-only; downloads, TensorRT engines and temporary files go to these.
    return [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]


def _metadata(name: str, namespace: str | None, annotations: Mapping[str, str] | None = None) -> Manifest:
    meta: Manifest = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def knative_service(options: RenderOptions) -> Manifest:
    """A Knative Service running the image, scaling to zero with the KPA."""
    budget = options.budget
    annotations = {
        "autoscaling.knative.dev/class": "kpa.autoscaling.knative.dev",
        "autoscaling.knative.dev/metric": "concurrency",
        "autoscaling.knative.dev/target": str(options.target_concurrency),
        "autoscaling.knative.dev/min-scale": str(options.min_scale),
        "autoscaling.knative.dev/max-scale": str(options.max_scale),
        "autoscaling.knative.dev/scale-down-delay": f"{budget.scale_down_delay}s",
        "serving.knative.dev/progress-deadline": f"{budget.progress_deadline}s",
    }
    container: Manifest = {
        "name": "zeroserve",
        "image": options.resolved_image,
        "args": _container_args(options, options.model_uri, options.served_name),
        "ports": [_port(options)],
        **_probes(options),
        **_pod_settings(options),
    }
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": _metadata(options.name, options.namespace),
        "spec": {
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {
                    "containerConcurrency": options.container_concurrency,
                    "timeoutSeconds": budget.timeout,
                    "responseStartTimeoutSeconds": budget.response_start_timeout,
                    "containers": [container],
                    "volumes": _volumes(),
                },
            }
        },
    }


def runtime_name(options: RenderOptions) -> str:
    return RUNTIME_NAME if options.accelerator == "cpu" else f"{RUNTIME_NAME}-gpu"


def cluster_serving_runtime(options: RenderOptions) -> Manifest:
    """A KServe ClusterServingRuntime for ONNX over the Open Inference Protocol (REST and gRPC).

    ``autoSelect`` is off, so it never competes with KServe's built-in Triton (onnx priority 1) and OpenVINO
    (onnx priority 2) runtimes: an InferenceService uses it only by naming it.
    """
    container: Manifest = {
        "name": "kserve-container",
        "image": options.resolved_image,
        # KServe's storage initializer puts the model in /mnt/models; {{.Name}} is the InferenceService's name.
        # REST is pinned to 8080 so an InferenceService that declares the h2c gRPC port keeps its probes.
        "args": [
            *_container_args(replace(options, protocol="http"), "/mnt/models", "{{.Name}}"),
            f"--http_port={HTTP_PORT}",
        ],
        "ports": [{"containerPort": HTTP_PORT, "protocol": "TCP"}],
        **_probes(replace(options, protocol="http")),
        **_pod_settings(options),
    }
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ClusterServingRuntime",
        "metadata": _metadata(runtime_name(options), None),
        "spec": {
            "supportedModelFormats": [{"name": "onnx", "version": "1", "autoSelect": False}],
            "protocolVersions": ["v2", "grpc-v2"],
            "multiModel": False,
            "containers": [container],
            "volumes": _volumes(),
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
        "storageUri": options.model_uri,
    }
    # KServe appends these to the runtime's args (--model_name={{.Name}}, REST on 8080); the last flag wins.
    args = [f"--model_name={options.served_name}"] if options.served_name != options.name else []
    if options.protocol == "grpc":
        args += ["--protocol=both", f"--grpc_port={GRPC_PORT}"]
        model["ports"] = [{"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"}]
    if args:
        model["args"] = args
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": _metadata(options.name, options.namespace, annotations),
        "spec": {
            "predictor": {
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


def render(options: RenderOptions, target: Target = "knative") -> list[Manifest]:
    """The manifests for one variant: a Knative Service, or a ClusterServingRuntime and an InferenceService."""
    if target == "knative":
        return [knative_service(options)]
    if target == "kserve":
        return [cluster_serving_runtime(options), inference_service(options)]
    raise ValueError(f"target must be knative or kserve, got {target!r}")


def explain(options: RenderOptions, target: Target = "knative") -> list[str]:
    """Comment lines for the top of a rendered file: what it is and why its numbers are what they are."""
    b = options.budget
    platform = "KServe (Knative mode)" if target == "kserve" else "Knative Serving"
    wire = "gRPC on the h2c port" if options.protocol == "grpc" else "REST"
    startup = f"2*C = {b.startup} s on /v2/health/ready, then kubelet restarts the container"
    timeouts = f"C + 120 = {b.timeout} s"
    if target == "knative":
        timeouts += f"; responseStartTimeoutSeconds C + 60 = {b.response_start_timeout} s (the cold start counts)"
    lines = [
        f"zeroserve on {platform}: {options.name} serves model {options.served_name}, {options.accelerator.upper()}, "
        f"{wire} (Open Inference Protocol v2).",
        f"Generated by `{GENERATED_BY}`: change its options and render again rather than edit this file.",
        f"Cold-start budget from the expected cold start C = {b.cold_start} s (download, session, engine, warm-up):",
        f"  startup probe      {startup if options.startup_probe else 'none (--no-startup-probe)'}",
        f"  progress-deadline  2*C + {b.node} s for scheduling and the image pull = {b.progress_deadline} s",
        f"  timeoutSeconds     {timeouts}",
        f"Scale to zero (KPA): min {options.min_scale}, max {options.max_scale or 'unbounded'}. An idle pod stays for "
        f"scale-down-delay = C = {b.scale_down_delay} s",
        "  (as long as a cold start costs), then about one 60 s stable window plus the 30 s grace period;",
        "  autoscaling.knative.dev/scale-to-zero-pod-retention-period would instead keep the last pod a fixed time.",
        "Concurrency: the server runs one inference at a time per model and decodes the next request meanwhile;",
        f"  containerConcurrency {options.container_concurrency} caps each pod (queue-proxy queues the rest), "
        f"the autoscaler aims at {options.target_concurrency} per pod.",
    ]
    if target == "kserve":
        lines += [
            "The runtime's autoSelect is off, so it never competes with KServe's Triton and OpenVINO runtimes for",
            "  onnx: the InferenceService names it. For gRPC, the InferenceService declares the h2c port 8081.",
        ]
    if options.accelerator == "gpu":
        lines += [
            "GPU: TensorRT engines and timings are kept in the cache volume (see --cache_uri to share them);",
            "  nodes need the NVIDIA device plugin and a driver >= 580 (CUDA 13).",
        ]
    return lines


def _kustomization(resources: Sequence[str], comment: Sequence[str]) -> str:
    doc = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(resources),
    }
    return to_yaml([doc], comments=[comment])


def layout(options: RenderOptions | None = None) -> dict[str, str]:
    """The Kustomize tree ``zeroserve render --out-dir`` writes: relative path -> file text.

    ``cpu/``, ``gpu/`` and ``grpc/`` each hold a Knative Service (named NAME, NAME-gpu and NAME-grpc, so they
    can run side by side); ``kserve/`` the ClusterServingRuntime and an InferenceService (NAME-kserve); the
    top-level kustomization deploys ``cpu/``. ``options.accelerator`` and ``options.protocol`` are ignored;
    ``options.image`` must be unset (the CPU and GPU images differ: ``kustomize edit set image`` per folder).
    """
    if options is not None and options.image is not None:
        raise ValueError("the layout has a CPU and a GPU image: leave image unset and use kustomize edit set image")
    base = replace(options or RenderOptions(), accelerator="cpu", protocol="http")
    base = replace(base, model_name=base.served_name)  # the suffixed services serve the same model name
    variants: list[tuple[str, RenderOptions, Target, list[str]]] = [
        ("cpu", base, "knative", ["service.yaml"]),
        ("gpu", replace(base, name=_suffixed(base.name, "gpu"), accelerator="gpu"), "knative", ["service.yaml"]),
        ("grpc", replace(base, name=_suffixed(base.name, "grpc"), protocol="grpc"), "knative", ["service.yaml"]),
        ("kserve", replace(base, name=_suffixed(base.name, "kserve")), "kserve", ["runtime.yaml", "isvc.yaml"]),
    ]
    how = "Point it at your image: kustomize edit set image {image}=REGISTRY/zeroserve:TAG"
    files = {
        "kustomization.yaml": _kustomization(
            ["cpu"], [f"kubectl apply -k knative: the CPU variant ({base.name}); see cpu/, gpu/, grpc/ and kserve/."]
        )
    }
    for folder, opts, target, names in variants:
        manifests = render(opts, target)
        for file_name, manifest in zip(names, manifests):
            files[f"{folder}/{file_name}"] = to_yaml([manifest], comments=[explain(opts, target)])
        files[f"{folder}/kustomization.yaml"] = _kustomization(
            names,
            [f"kubectl apply -k knative/{folder}", how.format(image=opts.resolved_image.rsplit(":", 1)[0])],
        )
    return files


def _suffixed(name: str, suffix: str) -> str:
    return f"{name[: 62 - len(suffix)]}-{suffix}"
