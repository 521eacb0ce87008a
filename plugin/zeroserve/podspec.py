"""The pieces of the server's container and pod that Knative Services and KServe runtimes share: flags, probes,
port, environment, resources, hardening, volumes and scheduling. Each returns fresh dicts, so a caller may
edit the manifest it gets.
"""

from __future__ import annotations

import copy

from zeroserve.render_options import (
    CACHE_DIR,
    GRPC_PORT,
    HTTP_PORT,
    S3_SECRET_KEYS,
    Manifest,
    RenderOptions,
)

SECURITY_CONTEXT: Manifest = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
# Knative accepts these pod fields only when its config-features ConfigMap turns the flag on.
FEATURE_FLAGS = {"nodeSelector": "kubernetes.podspec-nodeselector", "tolerations": "kubernetes.podspec-tolerations"}


def container_args(options: RenderOptions, model_dir: str | None, model_name: str | None) -> list[str]:
    """The server's flags; ``model_dir`` and ``model_name`` are left out when None, loading flags are not here."""
    args = [] if model_name is None else [f"--model_name={model_name}"]
    if model_dir is not None:
        args.append(f"--model_dir={model_dir}")
    if options.protocol == "grpc":
        # gRPC on the one port Knative exposes (h2c); REST stays on its own port inside the pod for the probes
        # (Knative sets PORT to the gRPC port, so REST's port is given explicitly).
        args += ["--protocol=both", f"--http_port={HTTP_PORT}", f"--grpc_port={GRPC_PORT}"]
    if options.accelerator == "gpu":
        # TensorRT engines and tactic timings survive container restarts in the cache volume.
        args += [f"--trt_engine_cache_path={CACHE_DIR}/trt", f"--trt_timing_cache_path={CACHE_DIR}/trt"]
    return args


def loading_args(options: RenderOptions) -> list[str]:
    """How the server loads models (``--model_loading`` and its bounds); none for eager, the server's default."""
    if not options.serves_repository:
        return []
    args = [f"--model_loading={options.model_loading}"]
    bounds = (("max_loaded_models", options.max_loaded_models), ("max_loaded_mib", options.max_loaded_mib),
              ("model_idle_timeout", options.model_idle_timeout))
    return args + [f"--{flag}={value}" for flag, value in bounds if value]


def probes(options: RenderOptions) -> Manifest:
    budget = options.budget
    # The probes ask the server, never one model: it is ready once its model is loaded or, serving a repository,
    # once the repository is indexed (a model's first request then loads it). Readiness runs in queue-proxy;
    # without periodSeconds it probes every 50 ms until ready, the fastest cold start. A number (not the port's
    # name) is used because Knative renames the pod's port.
    found: Manifest = {"readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT}}}
    if options.startup_probe:
        # Kubelet runs it; with one, the activator waits for kubelet's view of readiness (up to periodSeconds
        # more per cold start), hence 1 s.
        found["startupProbe"] = {
            "httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
            "periodSeconds": 1,
            "failureThreshold": budget.startup,
        }
    if options.protocol == "grpc":
        # Knative points liveness probes at the serving port, which speaks only HTTP/2 here.
        found["livenessProbe"] = {"tcpSocket": {"port": GRPC_PORT}, "periodSeconds": 10, "failureThreshold": 6}
    else:
        found["livenessProbe"] = {
            "httpGet": {"path": "/v2/health/live", "port": HTTP_PORT},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        }
    return found


def port(options: RenderOptions) -> Manifest:
    if options.protocol == "grpc":
        return {"name": "h2c", "containerPort": GRPC_PORT}
    return {"name": "http1", "containerPort": HTTP_PORT}


def env(options: RenderOptions, *, s3: bool = True) -> Manifest:
    """``env`` and ``envFrom`` of the server container (empty when no option sets any).

    With ``s3`` false the S3 settings are left out: under KServe the storage initializer fetches the model.
    """
    variables: list[Manifest] = []
    if s3 and options.s3_secret:
        variables += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": options.s3_secret, "key": key}}}
            for key in S3_SECRET_KEYS
        ]
    variables += [
        {"name": name, "value": value}
        for name, value in options.generated_env()
        if s3 or not name.startswith("AWS_")
    ]
    variables += [{"name": name, "value": value} for name, value in options.env]
    found: Manifest = {}
    if variables:
        found["env"] = variables
    if options.env_from_secrets:
        found["envFrom"] = [{"secretRef": {"name": name}} for name in options.env_from_secrets]
    return found


def resources(options: RenderOptions) -> Manifest:
    return {"resources": options.resources}


def hardening() -> Manifest:
    """The read-only root filesystem, writable only where the volumes are mounted; non-root, no capabilities."""
    return {
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": copy.deepcopy(SECURITY_CONTEXT),
    }


def volumes() -> list[Manifest]:
    # The root filesystem is read-only; downloads, TensorRT engines and temporary files go to these.
    return [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]


def pod_settings(options: RenderOptions) -> Manifest:
    """Pod-level fields: identity, registry credentials and where the pod may be scheduled."""
    found: Manifest = {}
    if options.service_account:
        found["serviceAccountName"] = options.service_account
    if options.image_pull_secrets:
        found["imagePullSecrets"] = [{"name": name} for name in options.image_pull_secrets]
    if options.node_selector:
        found["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        found["tolerations"] = [toleration.manifest() for toleration in options.tolerations]
    return found


def feature_flags(options: RenderOptions) -> list[str]:
    """The Knative config-features flags the pod settings need (off in a default installation)."""
    settings = pod_settings(options)
    return [flag for field, flag in FEATURE_FLAGS.items() if field in settings]


def metadata(name: str, namespace: str | None, annotations: dict[str, str] | None = None) -> Manifest:
    meta: Manifest = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta
