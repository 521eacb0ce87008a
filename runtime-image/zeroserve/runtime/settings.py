"""The server's settings values: small frozen dataclasses, validated on creation, with no I/O.

A leaf: it imports nothing else of ours, so the codecs, the model and the providers depend on it and not on
``config`` (which parses the command line) or on each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

MiB: Final = 2**20
DEFAULT_EVENT_TYPE: Final = "io.kserve.inference.response"  # KServe's

# rest: REST on --http_port; grpc: gRPC only, on --grpc_port or PORT (a Knative h2c port);
# both: REST on --http_port and gRPC on --grpc_port.
Protocol = Literal["rest", "grpc", "both"]
PROTOCOLS: tuple[Protocol, ...] = ("rest", "grpc", "both")
# How runs share the CPU (placement.py). latency: one run at a time on every intra-op thread (--inference_threads
# at once); throughput: one thread per run, as many runs as cores; adaptive: the first for a lone request, the
# second under contention.
PerformanceHint = Literal["adaptive", "latency", "throughput"]
# When models load (model_manager.py): all at start; on their first request; or only through the repository API.
ModelLoading = Literal["eager", "on_demand", "explicit"]
MODEL_LOADINGS: tuple[ModelLoading, ...] = ("eager", "on_demand", "explicit")
PERFORMANCE_HINTS: tuple[PerformanceHint, ...] = ("adaptive", "latency", "throughput")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds checked before anything is allocated for a request."""

    max_body_bytes: int = 256 * MiB
    max_tensor_elements: int = 2**28
    # A BYTES element costs a Python string and a std::string in ONNX Runtime (about 100 bytes with no text):
    # far more than the 4 bytes it may take in a request.
    max_bytes_elements: int = 2**20
    max_dims: int = 16
    # Request bytes in flight at once (bodies being read, decoded, run and answered); a request that would pass it
    # is answered 503 before its body is read. 0: no budget. ``RuntimeConfig.load`` derives it from the memory
    # limit unless --max_inflight_mib is given.
    max_inflight_bytes: int = 0


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """Adaptive batching (batching.py)."""

    max_batch_size: int = 0  # rows per merged run; 0 or 1: batching off
    max_queue_delay: float = 0.0005  # seconds the oldest request waits for company
    preferred_batch_sizes: tuple[int, ...] = ()  # row counts worth dispatching at once

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1


ProviderChoice = Literal["auto", "tensorrt", "cuda", "cpu"]
ConvAlgoSearch = Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]
TrtBuild = Literal["blocking", "background"]

PROVIDER_CHOICES: tuple[ProviderChoice, ...] = ("auto", "tensorrt", "cuda", "cpu")
CONV_ALGO_SEARCHES: tuple[ConvAlgoSearch, ...] = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
TRT_BUILDS: tuple[TrtBuild, ...] = ("blocking", "background")


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """How models run: which execution provider, its options, and CPU threads. Validated on creation."""

    choice: ProviderChoice = "auto"
    device_id: int = 0
    trt_fp16: bool = False
    trt_engine_cache_path: str | None = None  # enables the engine cache when set
    trt_timing_cache_path: str | None = None  # enables the timing cache when set
    trt_max_workspace_size: int | None = None  # bytes
    trt_builder_optimization_level: int | None = None  # 0..5, ORT's default 3
    trt_profile_min_shapes: str | None = None  # "in:1x3x224x224,in2:..."; all three or none
    trt_profile_opt_shapes: str | None = None
    trt_profile_max_shapes: str | None = None
    # background: serve on CUDA at once and switch to TensorRT once its engines are built (see interim_providers).
    trt_build: TrtBuild = "blocking"
    # With --cache_uri: cache TensorRT's EP-context model, which loads without TensorRT's parser and builder.
    trt_ep_context: bool = False
    cuda_mem_limit: int | None = None  # bytes, caps the CUDA arena only
    # ORT's default EXHAUSTIVE benchmarks every new input shape, which makes first requests slow.
    cudnn_conv_algo_search: ConvAlgoSearch = "HEURISTIC"
    intra_op_threads: int | None = None  # None: the container's CPU quota
    inter_op_threads: int | None = None

    def __post_init__(self) -> None:
        if self.choice not in PROVIDER_CHOICES:
            raise ValueError(f"--providers must be one of {', '.join(PROVIDER_CHOICES)}, got {self.choice!r}")
        if self.device_id < 0:
            raise ValueError(f"--device_id must be 0 or more, got {self.device_id}")
        level = self.trt_builder_optimization_level
        if level is not None and not 0 <= level <= 5:
            raise ValueError(f"--trt_builder_optimization_level must be 0..5, got {level}")
        for flag, value in (
            ("--trt_max_workspace_size", self.trt_max_workspace_size),
            ("--cuda_mem_limit", self.cuda_mem_limit),
            ("--intra_op_threads", self.intra_op_threads),
            ("--inter_op_threads", self.inter_op_threads),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if self.trt_build not in TRT_BUILDS:
            raise ValueError(f"--trt_build must be one of {', '.join(TRT_BUILDS)}, got {self.trt_build!r}")
        if self.cudnn_conv_algo_search not in CONV_ALGO_SEARCHES:
            raise ValueError(f"--cudnn_conv_algo_search must be one of {', '.join(CONV_ALGO_SEARCHES)}")
        _check_profiles(self.trt_profile_min_shapes, self.trt_profile_opt_shapes, self.trt_profile_max_shapes)


def parse_shapes(flag: str, text: str) -> list[tuple[str, tuple[int, ...]]]:
    # Parsed the way ORT's TensorRT EP does: split at ',', then at the *first* ':', then at 'x'.
    # A name may repeat: its second shape belongs to a second optimization profile.
    shapes = []
    for item in text.split(","):
        name, _, dims = item.partition(":")
        try:
            shape = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            shape = ()
        if not name or not shape or min(shape) < 0:
            hint = " (ORT cuts the input name at the first ':')" if dims.count(":") else ""
            raise ValueError(f"{flag}: {item!r} is not NAME:DIMxDIM..., e.g. 'input:1x3x224x224'{hint}")
        shapes.append((name, shape))
    return shapes


def _check_profiles(low: str | None, opt: str | None, high: str | None) -> None:
    given = [v is not None for v in (low, opt, high)]
    if not any(given):
        return
    if not all(given):
        raise ValueError(
            "--trt_profile_min_shapes, --trt_profile_opt_shapes and --trt_profile_max_shapes "
            "go together: give all three or none"
        )
    assert low is not None and opt is not None and high is not None
    mins, opts, maxs = (
        parse_shapes(f"--trt_profile_{k}_shapes", t) for k, t in (("min", low), ("opt", opt), ("max", high))
    )
    if not [n for n, _ in mins] == [n for n, _ in opts] == [n for n, _ in maxs]:
        raise ValueError("the TensorRT profile flags must list the same inputs in the same order")
    for (name, a), (_, b), (_, c) in zip(mins, opts, maxs):
        if not len(a) == len(b) == len(c) or not all(x <= y <= z for x, y, z in zip(a, b, c)):
            raise ValueError(
                f"TensorRT profile for {name!r}: need min <= opt <= max in every dimension "
                f"and the same rank, got {_dims(a)}, {_dims(b)}, {_dims(c)}"
            )


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@dataclass(frozen=True, slots=True)
class EventSettings:
    """How answers to CloudEvents are made (cloudevents.py), from KServe's environment variables CE_TYPE,
    CE_SOURCE and CE_MERGE."""

    type: str = DEFAULT_EVENT_TYPE
    source: str | None = None  # None: io.kserve.inference.<model>
    merge: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> EventSettings:
        return cls(
            type=environ.get("CE_TYPE") or DEFAULT_EVENT_TYPE,
            source=environ.get("CE_SOURCE") or None,
            merge=environ.get("CE_MERGE", "").strip().lower() == "true",
        )


@dataclass(frozen=True, slots=True)
class LoadingSettings:
    """When models load and unload (model_manager.py)."""

    mode: ModelLoading = "eager"
    max_loaded_models: int = 0  # 0: no bound
    max_loaded_bytes: int = 0  # the loaded models' memory, as measured at their first load; 0: no bound
    idle_timeout: float = 0.0  # unload a model after this long without requests; 0: never

    @property
    def on_demand(self) -> bool:
        """Models are indexed at start and loaded later (on a request, or through the repository API)."""
        return self.mode != "eager"
