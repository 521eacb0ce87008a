"""What ``zeroserve render`` prints and writes: the manifests of one variant with a header comment that explains
their numbers, warnings about options a default cluster rejects, and the whole Kustomize tree.

``render(options, target)`` builds the manifests for one variant; ``layout(options)`` gives the tree that
``zeroserve render --out-dir DIR`` writes (the repository's ``knative/`` folder is that tree with the default
options, and a test keeps the two equal); ``to_yaml`` prints manifests. Everything here is pure: no I/O and
nothing beyond the standard library, so ``zeroserve render`` starts at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal
from urllib.parse import urlsplit

from zeroserve import eventing, kserve, podspec
from zeroserve._yaml import to_yaml
from zeroserve.eventing import EventingOptions
from zeroserve.knative import knative_service
from zeroserve.model_memory import REQUEST_PEAK_FACTOR
from zeroserve.render_options import Manifest, RenderOptions, quantity

__all__ = ["Target", "explain", "layout", "notes", "render", "to_yaml"]

Target = Literal["knative", "kserve"]
GENERATED_BY = "zeroserve render"
MAX_REVISION_TIMEOUT = 600  # Knative's default max-revision-timeout-seconds


def render(options: RenderOptions, target: Target = "knative") -> list[Manifest]:
    """The manifests for one variant: a Knative Service, or KServe's runtime, storage account and service."""
    if target == "knative":
        return [knative_service(options)]
    if target == "kserve":
        if (
            kserve.storage_initializer(options)
            and (options.s3_endpoint or options.s3_region)
            and not (options.s3_secret or options.service_account)
        ):
            raise ValueError(
                "under KServe the storage initializer reads s3_endpoint and s3_region from the annotations of "
                "the s3_secret or of the service_account: give one of them"
            )
        return kserve.render(options)
    raise ValueError(f"target must be knative or kserve, got {target!r}")


def notes(options: RenderOptions, target: Target = "knative") -> list[str]:
    """Warnings about options a default installation rejects or handles badly, and steps left to the user."""
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
    for flag in podspec.feature_flags(options):
        found.append(
            f"{flag} is off in a default Knative: turn it on in the config-features ConfigMap "
            f"(kubectl patch configmap config-features -n knative-serving -p '{{\"data\":{{\"{flag}\":\"enabled\"}}}}')"
        )
    found += _loading_notes(options)
    annotations = kserve.s3_annotations(options)
    if target == "kserve" and annotations:
        what = f"secret {options.s3_secret}" if options.s3_secret else f"serviceaccount {options.service_account}"
        pairs = " ".join(f"{key}={value}" for key, value in annotations.items())
        found.append(f"KServe reads the S3 endpoint and region from annotations: kubectl annotate {what} {pairs}")
    return found


def _loading_notes(options: RenderOptions) -> list[str]:
    found = []
    if options.model_loading == "explicit" and not options.min_scale == options.max_scale == 1:
        found.append(
            "with --model-loading explicit a pod starts with no model loaded, and a load request through the "
            "service reaches one pod: after a scale from zero, or with more than one pod, models are missing until "
            "loaded again there; use on_demand, or --min-scale 1 --max-scale 1"
        )
    if options.serves_repository and not options.max_loaded_mib:
        limit = options.resources["limits"].get("memory", "none")
        found.append(
            f"no --max-loaded-mib: models load until the memory limit ({limit}) ends the pod; give a budget and "
            "the memory is sized from it"
        )
    memory, given = options.model_memory, dict(options.limits).get("memory")
    if memory is not None and given and quantity(given) < memory.limit_mib * 2**20:
        found.append(
            f"limits memory={given} is below the {memory.limit_mib}Mi that --max-loaded-mib {options.max_loaded_mib} "
            "sizes: with the model budget full, requests in flight may push the pod past its limit"
        )
    return found


def explain(options: RenderOptions, target: Target = "knative") -> list[str]:
    """Comment lines for the top of a rendered file: what it is and why its numbers are what they are."""
    b = options.budget
    platform = "KServe (Knative mode)" if target == "kserve" else "Knative Serving"
    wire = "gRPC on the h2c port" if options.protocol == "grpc" else "REST"
    startup = f"2*C = {b.startup} s on /v2/health/ready, then kubelet restarts the container"
    timeouts = f"C + 120 = {b.timeout} s"
    if target == "knative":
        timeouts += f"; responseStartTimeoutSeconds C + 60 = {b.response_start_timeout} s (the cold start counts)"
    what = f"repository {options.model_uri}" if options.serves_repository else f"model {options.served_name}"
    lines = [
        f"zeroserve on {platform}: {options.name} serves {what}, {options.accelerator.upper()}, "
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
    lines += _explain_loading(options, target)
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
    return lines + _explain_access(options, target)


def _explain_loading(options: RenderOptions, target: Target) -> list[str]:
    if not options.serves_repository:
        return []
    how = "loads on its first request" if options.model_loading == "on_demand" else "loads through the repository API"
    held = " and ".join(
        f"{value} {unit}"
        for value, unit in ((options.max_loaded_models, "models"), (options.max_loaded_mib, "MiB"))
        if value
    )
    idle = (
        f"a model idle for {options.model_idle_timeout} s is unloaded" if options.model_idle_timeout
        else "none is unloaded for idleness"
    )
    lines = [
        f"Models: each model in the repository is served under its folder's name and {how}",
        f"  (--model_loading {options.model_loading}); loaded at once: {held or 'no bound'}; {idle}.",
        "  /v2/health/ready is true once the repository is indexed; the first request for a model loads it, within C.",
    ]
    if target == "kserve":
        lines += [
            "  No storageUri: the server reads the repository itself, model by model (KServe's storage initializer",
            "  would download all of it before the server starts).",
        ]
    memory = options.model_memory
    if memory is not None:
        resources = options.resources
        request, limit = resources["requests"]["memory"], resources["limits"]["memory"]
        lines += [
            f"Memory for --max-loaded-mib M = {options.max_loaded_mib}: request {request}, limit {limit}. Derived: "
            f"R = {memory.baseline_mib} MiB (the server)",
            f"  + 5/4*M = {memory.request_mib} MiB; L = max(R + 1024, 2*R) = {memory.limit_mib} MiB, as the server "
            f"admits max(256, L/8) = {memory.inflight_mib} MiB",
            f"  of requests in flight, which peak at about {REQUEST_PEAK_FACTOR}x that.",
        ]
    return lines


def _explain_access(options: RenderOptions, target: Target) -> list[str]:
    lines = []
    if options.s3_secret and target == "kserve" and kserve.storage_initializer(options):
        lines.append(
            f"S3: KServe's storage initializer downloads the model with the keys AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY of Secret {options.s3_secret},"
        )
        lines.append(f"  listed by ServiceAccount {kserve.storage_account_name(options)}; the endpoint comes from "
                     "the Secret's serving.kserve.io/s3-* annotations.")
    elif options.s3_secret:
        lines.append(f"S3: the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY of Secret {options.s3_secret} become "
                     "the server's environment.")
    if options.otel_endpoint:
        lines.append(f"Traces and metrics go over OTLP/HTTP to {options.otel_endpoint}; service.name is Knative's "
                     "K_SERVICE.")
    flags = podspec.feature_flags(options)
    if flags:
        lines.append(f"Needs Knative config-features: {', '.join(f'{flag}: enabled' for flag in flags)} "
                     "(off by default).")
    return lines


def _kustomization(resources: Sequence[str], comment: Sequence[str]) -> str:
    doc = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(resources),
    }
    return to_yaml([doc], comments=[comment])


def layout(options: RenderOptions | None = None, events: EventingOptions | None = None) -> dict[str, str]:
    """The Kustomize tree ``zeroserve render --out-dir`` writes: relative path -> file text.

    ``cpu/``, ``gpu/`` and ``grpc/`` each hold a Knative Service (named NAME, NAME-gpu and NAME-grpc, so they
    can run side by side); ``kserve/`` the ClusterServingRuntime and an InferenceService (NAME-kserve);
    ``multi-model/`` a Knative Service (NAME-models) serving the repository that holds the model (the folder
    above ``model_uri``), loaded on demand (at most 8 models and 2048 MiB, unloaded after 300 s idle), and
    ``multi-model-kserve/`` its KServe variant (NAME-models-kserve); ``eventing/`` a Broker, Triggers and a
    PingSource for the ``cpu/`` service; the top-level kustomization deploys ``cpu/``. ``options.accelerator``
    and ``options.protocol`` are ignored; ``options.image`` must be unset (the CPU and GPU images differ:
    ``kustomize edit set image`` per folder), and so must ``options.model_loading`` (``model_uri`` is one model
    here).
    """
    if options is not None and options.image is not None:
        raise ValueError("the layout has a CPU and a GPU image: leave image unset and use kustomize edit set image")
    if options is not None and options.serves_repository:
        raise ValueError(
            "the layout serves one model, and the repository above it from multi-model/: leave model_loading unset"
        )
    base = replace(options or RenderOptions(), accelerator="cpu", protocol="http")
    # An example of bounds: eight models or 2 GiB of them at once, each unloaded after five idle minutes.
    repository = replace(
        base, name=_suffixed(base.name, "models"), model_name=None, model_uri=repository_uri(base.model_uri),
        model_loading="on_demand", max_loaded_models=8, max_loaded_mib=2048, model_idle_timeout=300,
    )
    base = replace(base, model_name=base.served_name)  # the suffixed services serve the same model name
    variants: list[tuple[str, RenderOptions, Target]] = [
        ("cpu", base, "knative"),
        ("gpu", replace(base, name=_suffixed(base.name, "gpu"), accelerator="gpu"), "knative"),
        ("grpc", replace(base, name=_suffixed(base.name, "grpc"), protocol="grpc"), "knative"),
        ("kserve", replace(base, name=_suffixed(base.name, "kserve")), "kserve"),
        ("multi-model", repository, "knative"),
        ("multi-model-kserve", replace(repository, name=_suffixed(base.name, "models-kserve")), "kserve"),
    ]
    how = "Point it at your image: kustomize edit set image {image}=REGISTRY/zeroserve:TAG"
    folders = ", ".join(f"{folder}/" for folder, _, _ in variants)
    files = {
        "kustomization.yaml": _kustomization(
            ["cpu"], [f"kubectl apply -k knative: the CPU variant ({base.name}); see {folders}."]
        )
    }
    for folder, opts, target in variants:
        names = []
        for manifest in render(opts, target):
            names.append(_FILE_NAMES.get(str(manifest["kind"]), "service.yaml"))
            files[f"{folder}/{names[-1]}"] = to_yaml([manifest], comments=[explain(opts, target)])
        files[f"{folder}/kustomization.yaml"] = _kustomization(
            names,
            [f"kubectl apply -k knative/{folder}", how.format(image=opts.resolved_image.rsplit(":", 1)[0])],
        )
    events = events or EventingOptions()
    grouped: dict[str, list[Manifest]] = {}
    for manifest in eventing.render(base, events):
        grouped.setdefault(f"{str(manifest['kind']).lower()}.yaml", []).append(manifest)
    for name, manifests in grouped.items():
        files[f"eventing/{name}"] = to_yaml(manifests, comments=[eventing.explain(base, events)])
    files["eventing/kustomization.yaml"] = _kustomization(
        list(grouped), [f"kubectl apply -k knative/eventing: events to the cpu/ service ({base.name})"]
    )
    return files


_FILE_NAMES = {"ClusterServingRuntime": "runtime.yaml", "InferenceService": "isvc.yaml",
               "ServiceAccount": "serviceaccount.yaml"}


def repository_uri(model_uri: str) -> str:
    """The repository a model lives in: the folder above its own (``s3://b/models/mlp/`` -> ``s3://b/models/``),
    skipping a ``model.onnx`` file and a version folder (``.../mlp/1/model.onnx`` -> ``.../``)."""
    head, _, last = model_uri.rstrip("/").rpartition("/")
    if last.endswith(".onnx"):
        head, _, last = head.rpartition("/")
    if last.isdigit():
        head, _, last = head.rpartition("/")
    parent = urlsplit(head)
    if not last or not (parent.netloc or parent.path.strip("/")):
        raise ValueError(f"model_uri {model_uri!r} is not in a folder that could be a repository")
    return head + "/"


def _suffixed(name: str, suffix: str) -> str:
    return f"{name[: 62 - len(suffix)]}-{suffix}"
