"""What ``zeroserve render`` varies by: one frozen ``RenderOptions`` value, checked when it is made, and the
cold-start ``Budget`` derived from it. Pure and standard-library only, so ``zeroserve render`` starts at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import urlsplit

from zeroserve.model_memory import ModelMemory

__all__ = ["Budget", "RenderOptions", "Toleration", "parse_pairs"]

Manifest = dict[str, Any]
Accelerator = Literal["cpu", "gpu"]
Protocol = Literal["http", "grpc"]
ModelLoading = Literal["eager", "on_demand", "explicit"]
Pairs = tuple[tuple[str, str], ...]

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
MODEL_LOADINGS: tuple[ModelLoading, ...] = ("eager", "on_demand", "explicit")  # the server's --model_loading
# The server always sizes ONNX Runtime's threads from the CPU limit (the cgroup quota), so there is always one.
DEFAULT_RESOURCES: Mapping[Accelerator, tuple[Mapping[str, str], Mapping[str, str]]] = {
    "cpu": ({"cpu": "1", "memory": "1Gi"}, {"cpu": "2", "memory": "2Gi"}),
    "gpu": ({"cpu": "2", "memory": "4Gi"}, {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}),
}
DEFAULT_COLD_START: Mapping[Accelerator, int] = {"cpu": 60, "gpu": 300}
NODE_BUDGET: Mapping[Accelerator, int] = {"cpu": 120, "gpu": 600}  # scheduling (GPU node scale-up) + image pull
# Knative sets these itself; a container that sets them is rejected.
RESERVED_ENV = frozenset({"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"})
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# The keys of an S3 credentials Secret: the variables boto reads, and the names KServe's storage initializer expects.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_QUANTITY = re.compile(r"\+?(?P<number>\d+(\.\d*)?|\.\d+)(?P<suffix>[eE][-+]?\d+|[KMGTPE]i|[numkMGTPE])?")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal(10**3),
            "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12), "P": Decimal(10**15),
            "E": Decimal(10**18)}
_REGION = re.compile(r"[a-z0-9][-a-z0-9]*")


def parse_pairs(text: str, what: str) -> Pairs:
    """``"k=v,k2=v2"`` as pairs; raises ValueError naming ``what`` when an item has no ``=``."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} takes NAME=VALUE items, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


@dataclass(frozen=True, slots=True)
class Toleration:
    """A pod toleration, written the way ``kubectl taint`` writes a taint: ``KEY[=VALUE][:EFFECT]``.

    Without a value the operator is ``Exists``; without an effect it tolerates every effect of that key.
    """

    key: str
    value: str = ""
    effect: str = ""

    @classmethod
    def parse(cls, text: str) -> Toleration:
        rest, _, effect = text.rpartition(":") if ":" in text else (text, "", "")
        key, _, value = rest.partition("=")
        return cls(key.strip(), value.strip(), effect.strip())

    def __post_init__(self) -> None:
        _check_label_key(self.key, "toleration key")
        if self.value:
            _check_label_value(self.value, "toleration value")
        if self.effect and self.effect not in EFFECTS:
            raise ValueError(f"toleration effect must be one of {', '.join(EFFECTS)}, got {self.effect!r}")

    def manifest(self) -> Manifest:
        found: Manifest = {"key": self.key, "operator": "Equal" if self.value else "Exists"}
        if self.value:
            found["value"] = self.value
        if self.effect:
            found["effect"] = self.effect
        return found


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """What a deployment varies by. ``image`` and ``cold_start`` default by ``accelerator``.

    Args:
        name: the Knative Service or InferenceService name (a DNS-1035 label).
        model_name: the name the model is served under (``/v2/models/NAME``); default ``name``. Not with
            ``model_loading`` on_demand or explicit, where each model of the repository is served under its
            folder's name.
        model_uri: where the server fetches the model (``--model_dir``): s3://, gs://, https://, ...; with
            ``model_loading`` on_demand or explicit, the repository (``NAME/VERSION/model.onnx`` or
            ``NAME/model.onnx`` under it).
        model_loading: the server's ``--model_loading``: ``eager`` loads the model before the pod is ready;
            ``on_demand`` indexes the repository and loads a model on its first request; ``explicit`` loads
            only through the repository API.
        max_loaded_models: models loaded at once (on_demand, explicit); 0 is unbounded.
        max_loaded_mib: the loaded models' estimated memory (on_demand, explicit); 0 is unbounded. When set,
            the memory request and limit derive from it (``zeroserve.model_memory.ModelMemory``) unless
            ``requests`` or ``limits`` give ``memory``.
        model_idle_timeout: seconds after which an idle model is unloaded (on_demand, explicit); 0 is never.
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
        service_account: the pod's ServiceAccount (cloud identity: IRSA, Workload Identity).
        image_pull_secrets: Secrets holding the registry credentials the nodes pull the image with.
        s3_secret: a Secret with the keys ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (the names
            KServe's storage initializer reads too).
        s3_endpoint: an S3-compatible endpoint URL (MinIO, Ceph, ...); AWS's own when unset.
        s3_region: the bucket's region.
        env: literal environment variables.
        env_from_secrets: Secrets whose every key becomes an environment variable.
        requests: resource requests replacing the accelerator's defaults, key by key.
        limits: resource limits replacing the accelerator's defaults, key by key.
        node_selector: node labels the pod must run on.
        tolerations: node taints the pod tolerates.
        otel_endpoint: an OTLP/HTTP collector that receives the server's traces and metrics.
    """

    name: str = "mlp"
    model_name: str | None = None
    model_uri: str = "s3://my-bucket/models/mlp/"
    model_loading: ModelLoading = "eager"
    max_loaded_models: int = 0
    max_loaded_mib: int = 0
    model_idle_timeout: int = 0
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
    service_account: str | None = None
    image_pull_secrets: tuple[str, ...] = ()
    s3_secret: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None
    env: Pairs = ()
    env_from_secrets: tuple[str, ...] = ()
    requests: Pairs = ()
    limits: Pairs = ()
    node_selector: Pairs = ()
    tolerations: tuple[Toleration, ...] = ()
    otel_endpoint: str | None = None

    def __post_init__(self) -> None:
        self._check_identity()
        self._check_loading()
        self._check_scaling()
        self._check_pod()

    def _check_identity(self) -> None:
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

    def _check_loading(self) -> None:
        if self.model_loading not in MODEL_LOADINGS:
            raise ValueError(f"model_loading must be one of {', '.join(MODEL_LOADINGS)}, got {self.model_loading!r}")
        bounds = {"max_loaded_models": self.max_loaded_models, "max_loaded_mib": self.max_loaded_mib,
                  "model_idle_timeout": self.model_idle_timeout}
        for field, value in bounds.items():
            if value < 0:
                raise ValueError(f"{field} must be 0 (no bound) or more, got {value}")
        given = [field for field, value in bounds.items() if value]
        if given and not self.serves_repository:
            raise ValueError(
                f"{' and '.join(given)} bound models loaded one by one: give model_loading on_demand or explicit "
                "(eager loads the model at start and keeps it)"
            )
        if self.serves_repository and self.model_name is not None:
            raise ValueError(
                f"model_name does not apply with model_loading {self.model_loading}: the server serves every model "
                "of the repository under its folder's name"
            )

    def _check_scaling(self) -> None:
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

    def _check_pod(self) -> None:
        for secret in (self.service_account, self.s3_secret, *self.image_pull_secrets, *self.env_from_secrets):
            if secret is not None and (len(secret) > 253 or not _SUBDOMAIN.fullmatch(secret)):
                raise ValueError(f"{secret!r} is not a valid Secret or ServiceAccount name")
        for url, what in ((self.s3_endpoint, "s3_endpoint"), (self.otel_endpoint, "otel_endpoint")):
            if url is not None and not (urlsplit(url).scheme in ("http", "https") and urlsplit(url).hostname):
                raise ValueError(f"{what} must be an http:// or https:// URL, got {url!r}")
        if self.s3_region is not None and not _REGION.fullmatch(self.s3_region):
            raise ValueError(f"s3_region {self.s3_region!r} is not a region name")
        generated = {name for name, _ in self.generated_env()} | (set(S3_SECRET_KEYS) if self.s3_secret else set())
        for name, _ in self.env:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"env {name!r} is not a valid environment variable name")
            if name in RESERVED_ENV:
                raise ValueError(f"env {name} is Knative's to set (reserved: {', '.join(sorted(RESERVED_ENV))})")
            if name in generated:
                raise ValueError(f"env {name} is already set by the S3 or OpenTelemetry options")
        for key, value in self.node_selector:
            _check_label_key(key, "node_selector key")
            _check_label_value(value, "node_selector value")
        for key, value in (*self.requests, *self.limits):
            if not re.fullmatch(r"([a-z0-9.-]+/)?[A-Za-z0-9][-A-Za-z0-9_.]*", key):
                raise ValueError(f"{key!r} is not a resource name")
            quantity(value)
        requests, limits = self.resources["requests"], self.resources["limits"]
        given_limit = dict(self.limits).get("memory")
        if self.max_loaded_mib and given_limit and "memory" not in dict(self.requests):
            if quantity(given_limit) < quantity(requests["memory"]):
                raise ValueError(
                    f"limits memory={given_limit} is below the {requests['memory']} that max_loaded_mib "
                    f"{self.max_loaded_mib} needs at rest (the server plus the models): raise it, lower "
                    "max_loaded_mib, or give requests memory too"
                )
        for key in requests.keys() & limits.keys():
            if quantity(requests[key]) > quantity(limits[key]):
                raise ValueError(f"requests {key}={requests[key]} is above limits {key}={limits[key]}")

    @property
    def served_name(self) -> str:
        return self.model_name or self.name

    @property
    def serves_repository(self) -> bool:
        """Whether the server indexes a repository and loads its models one by one (on_demand, explicit)."""
        return self.model_loading != "eager"

    @property
    def model_memory(self) -> ModelMemory | None:
        """The memory the model budget needs (``max_loaded_mib``); None without one."""
        return ModelMemory(self.max_loaded_mib) if self.max_loaded_mib else None

    @property
    def resolved_image(self) -> str:
        return self.image or IMAGES[self.accelerator]

    @property
    def budget(self) -> Budget:
        cold_start = DEFAULT_COLD_START[self.accelerator] if self.cold_start is None else self.cold_start
        return Budget(cold_start, NODE_BUDGET[self.accelerator])

    @property
    def resources(self) -> dict[str, dict[str, str]]:
        """The accelerator's default requests and limits, with the given ones replacing them key by key.

        With ``max_loaded_mib`` the memory comes from ``model_memory`` instead of the defaults. On GPU it never
        goes below them: they cover the CUDA, cuDNN and TensorRT libraries' host memory, which the baseline
        (measured on CPU) leaves out.
        """
        defaults = DEFAULT_RESOURCES[self.accelerator]
        requests, limits = dict(defaults[0]), dict(defaults[1])
        memory = self.model_memory
        if memory is not None:
            floor = self.accelerator == "gpu"
            for found, mib in ((requests, memory.request_mib), (limits, memory.limit_mib)):
                if floor:
                    mib = max(mib, int(quantity(found["memory"])) >> 20)
                found["memory"] = f"{mib}Mi"
        return {"requests": requests | dict(self.requests), "limits": limits | dict(self.limits)}

    def generated_env(self) -> list[tuple[str, str]]:
        """The literal variables the S3 and OpenTelemetry options set (the S3 Secret's keys come on top)."""
        found = []
        if self.s3_endpoint:
            found.append(("AWS_ENDPOINT_URL", self.s3_endpoint))
        if self.s3_region:
            found.append(("AWS_DEFAULT_REGION", self.s3_region))
        if self.otel_endpoint:
            # The server's exporter speaks OTLP over HTTP; its service.name comes from Knative's K_SERVICE.
            found += [
                ("OTEL_EXPORTER_OTLP_ENDPOINT", self.otel_endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_TRACES_EXPORTER", "otlp"),
                ("OTEL_METRICS_EXPORTER", "otlp"),
            ]
        return found


def quantity(text: str) -> Decimal:
    """A Kubernetes resource quantity (``500m``, ``2``, ``1.5Gi``, ``1e3``) as a number."""
    match = _QUANTITY.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a resource quantity (like 500m, 2, 1Gi)")
    number, suffix = Decimal(match["number"]), match["suffix"] or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    return number * Decimal(10) ** int(suffix[1:]) if suffix else number


def _check_label_key(key: str, what: str) -> None:
    prefix, _, name = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not _SUBDOMAIN.fullmatch(prefix))) or len(name) > 63 or not (
        _LABEL_NAME.fullmatch(name)
    ):
        raise ValueError(f"{what} {key!r} is not a valid label key")


def _check_label_value(value: str, what: str) -> None:
    if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
        raise ValueError(f"{what} {value!r} is not a valid label value")


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
