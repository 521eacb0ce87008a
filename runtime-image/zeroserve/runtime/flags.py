"""The server's command line: KServe's flag names and ours, and the checks that turn a flag into a settings value.

Errors go through ``parser.error`` (usage, then exit 2). ``config.RuntimeConfig.from_args`` assembles the result.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import fields
from typing import cast

from zeroserve.runtime.settings import (
    CONV_ALGO_SEARCHES,
    MODEL_LOADINGS,
    PERFORMANCE_HINTS,
    PROTOCOLS,
    PROVIDER_CHOICES,
    TRT_BUILDS,
    BatchSettings,
    Limits,
    LoadingSettings,
    PerformanceHint,
    Protocol,
    ProviderChoice,
    ProviderSettings,
    parse_shapes,
)

logger = logging.getLogger("zeroserve.runtime")

DEFAULT_HTTP_PORT = 8080
# KServe's own --protocol takes the predictor protocol of a transformer; a ServingRuntime may pass it.
_KSERVE_PROTOCOLS = ("v1", "v2", "grpc-v2")
GRPC_MAX_MESSAGE = 2**31 - 1  # gRPC keeps message sizes in a signed 32-bit int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zeroserve serve",
        description="Serve ONNX models over the Open Inference Protocol (KServe V2).",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model_name", help="name the model is served under (env MODEL_NAME; default 'model')")
    model.add_argument(
        "--model_dir",
        help="model URI: a .onnx file, a folder holding one, or a NAME/VERSION/model.onnx repository; "
        "local path, file://, s3://, gs://, az://, https:// (env STORAGE_URI; default /mnt/models)",
    )
    model.add_argument(
        "--cache_uri",
        help="keep built session artifacts (CPU: the optimized graph; GPU: TensorRT engines) at this fsspec URI, "
        "local folder or s3://bucket/prefix, shared by every start (env ZEROSERVE_CACHE_URI; default off)",
    )
    model.add_argument(
        "--cache_dir", help="where remote models are cached (env ZEROSERVE_CACHE_DIR; default ~/.cache/zeroserve)"
    )
    model.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=True,
        help="run one synthetic inference per model before reporting ready (default on)",
    )
    model.add_argument(
        "--warmup_shapes",
        help="shapes for the warmup run, e.g. 'input:8x3x224x224' (dynamic dimensions otherwise run as 1; "
        "default: --trt_profile_opt_shapes when given, so TensorRT builds its engine before readiness)",
    )
    model.add_argument(
        "--model_loading", choices=MODEL_LOADINGS, default="eager",
        help="eager (default): load every model at start; on_demand: index the repository at start and load a model "
        "on its first request; explicit: load only through POST /v2/repository/models/NAME/load",
    )
    model.add_argument("--max_loaded_models", type=int, default=0,
                       help="with on_demand/explicit: most models loaded at once (default 0: no bound)")
    model.add_argument(
        "--max_loaded_mib", type=int, default=0,
        help="with on_demand/explicit: most memory the loaded models take, each as measured at its first load; "
        "the least recently used idle model is unloaded to make room (default 0: no bound)",
    )
    model.add_argument(
        "--model_idle_timeout", type=float, default=0.0, metavar="SECONDS",
        help="with on_demand/explicit: unload a model after this long without requests (default 0: never)",
    )
    model.add_argument(
        "--progress_interval", type=float, default=5.0, metavar="SECONDS",
        help="while models load, log the phase and its progress (bytes fetched of the total, throughput, time "
        "left) this often (default 5; 0: never)",
    )
    model.add_argument(
        "--exit_on_error", action=argparse.BooleanOptionalAction, default=True,
        help="exit when a model fails to load, so the platform shows the failure (default on)",
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0")
    server.add_argument("--http_port", type=int, help="REST port (env PORT, as Knative injects it; default 8080)")
    server.add_argument(
        "--protocol",
        help="rest (default): REST on --http_port; grpc: gRPC only, on --grpc_port, else PORT (Knative's h2c "
        "port), else 8081; both: REST on --http_port and gRPC on --grpc_port",
    )
    server.add_argument(
        "--enable_grpc", nargs="?", const=True, type=_boolean, metavar="BOOL",
        help="also serve gRPC on --grpc_port (KServe's flag: '--enable_grpc', '--enable_grpc=false'); "
        "same as --protocol both. Default off, or on when --grpc_port is given",
    )
    server.add_argument("--no-enable_grpc", dest="enable_grpc", action="store_false", help=argparse.SUPPRESS)
    server.add_argument("--grpc_port", type=int, help="gRPC port (default 8081); giving it turns gRPC on")
    server.add_argument(
        "--grpc_max_receive_message_length", type=int, metavar="BYTES",
        help="largest gRPC request accepted (default: --max_request_mib)",
    )
    server.add_argument(
        "--grpc_max_send_message_length", type=int, metavar="BYTES",
        help="largest gRPC response sent (default: --max_request_mib)",
    )
    server.add_argument(
        "--metrics_port", type=int,
        help="with --protocol grpc: serve Prometheus GET /metrics on this port (default: off; "
        "REST serves /metrics on --http_port)",
    )
    server.add_argument("--workers", type=int, default=1, help="server processes sharing the port (default 1)")
    server.add_argument(
        "--performance_hint", choices=PERFORMANCE_HINTS,
        help="how runs share the CPU: latency (one run at a time on every intra-op thread), throughput "
        "(--intra_op_threads per run, default 1, as many runs as the CPU quota allows), adaptive (default: a run "
        "gets every core when nothing else runs or waits, on the event loop's thread if it is expected under 50 ms "
        "and no requests overlapped in the last second; when others run or wait, one core each, on a second "
        "single-thread session built on first contention; CPU provider, models up to 256 MiB whose fastest run "
        "takes 1 ms or more; batched models and the rest run one at a time on every core)",
    )
    server.add_argument(
        "--inference_threads", type=int,
        help="with --performance_hint latency (implied), concurrent session.run calls (default 1)",
    )
    batching = parser.add_argument_group("adaptive batching (off unless --max_batch_size > 1)")
    batching.add_argument("--max_batch_size", type=int, default=0,
                          help="merge concurrent requests into runs of up to this many rows (default 0: off)")
    batching.add_argument("--max_queue_delay_us", type=int, default=500,
                          help="how long the oldest request waits for others to join its batch, while requests "
                          "it could wait for are in flight (default 500)")
    batching.add_argument("--preferred_batch_sizes", default="",
                          help="comma-separated row counts dispatched without waiting out the delay, e.g. 4,8")
    server.add_argument("--max_queue_size", type=int, default=512,
                        help="inferences admitted at once; more are answered 503 with Retry-After (0: no bound)")
    server.add_argument(
        "--inline_run_ms", type=float, default=0.3,
        help="models whose runs take less than this (moving average) run on the event loop, skipping the "
        "thread hop; inputs over 64 KiB always go to a worker thread (default 0.3; 0 disables)",
    )
    server.add_argument("--max_request_mib", type=int, default=256,
                        help="largest request body accepted, compressed or inflated (default %(default)d)")
    server.add_argument("--max_tensor_elements", type=int, default=2**28,
                        help="most elements in one tensor (default 2^28)")
    server.add_argument(
        "--max_inflight_mib", type=int, metavar="MIB",
        help="request bytes in flight at once; a request past it is answered 503 with Retry-After before its body "
        "is read (default: an eighth of the container's memory limit, at least --max_request_mib; 0: no budget)",
    )
    server.add_argument(
        "--max_bytes_elements", type=int, default=2**20,
        help="most elements in one BYTES (string) tensor: each costs far more memory than its bytes (default 2^20)",
    )
    server.add_argument("--shutdown_timeout", type=float, default=30.0,
                        help="seconds the requests in flight get to finish on SIGTERM (default %(default)g)")
    server.add_argument(
        "--timeout_keep_alive", type=int, default=65,
        help="seconds a connection may stay idle between requests, or take to send a request's headers (default 65)",
    )
    server.add_argument(
        "--billing_memory_mib", type=int, metavar="MIB",
        help="the memory each invocation is billed for, in GB-seconds (default: the container's memory limit)",
    )
    server.add_argument(
        "--max_connections", type=int, default=0,
        help="open connections at once; past it the one idle longest is closed, or the new one is answered 503 "
        "(default 0: the open-file limit less 128)",
    )
    server.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    server.add_argument("--access_log", action=argparse.BooleanOptionalAction, default=False)
    server.add_argument(
        "--event_loop", default="auto", choices=["auto", "uvloop", "asyncio"],
        help="auto (default): uvloop when installed, which serves more requests/s; asyncio: the standard loop, "
        "fairer to connections when the server is saturated (a lower tail latency, fewer requests/s)",
    )
    add_provider_arguments(parser)
    return parser


def performance(
    ns: argparse.Namespace, settings: ProviderSettings, parser: argparse.ArgumentParser
) -> tuple[PerformanceHint, int, ProviderSettings]:
    """The hint and the session.run calls at once it implies (the throughput hint's count waits for ``load``)."""
    if ns.inference_threads is not None and ns.inference_threads < 1:
        parser.error("--inference_threads must be at least 1")
    hint: PerformanceHint = ns.performance_hint or ("latency" if ns.inference_threads is not None else "adaptive")
    if ns.inference_threads is not None and hint != "latency":
        parser.error(f"--inference_threads goes with --performance_hint latency, not {hint}")
    return hint, ns.inference_threads or 1, settings


def protocol(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> Protocol:
    """REST, gRPC or both, from --protocol, --enable_grpc and whether --grpc_port was given."""
    chosen: Protocol | None = None
    if ns.protocol in _KSERVE_PROTOCOLS:
        logger.warning("ignoring --protocol %s: KServe's predictor protocol (ours: rest|grpc|both)", ns.protocol)
    elif ns.protocol is not None:
        if ns.protocol not in PROTOCOLS:
            parser.error(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {ns.protocol!r}")
        chosen = ns.protocol
    if ns.enable_grpc is not None:
        if chosen is not None and ns.enable_grpc != (chosen != "rest"):
            parser.error(f"--enable_grpc={str(ns.enable_grpc).lower()} contradicts --protocol {chosen}")
        return chosen or ("both" if ns.enable_grpc else "rest")
    if chosen is not None:
        return chosen
    return "both" if ns.grpc_port is not None else "rest"


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def message_length(value: int | None, limits: Limits, parser: argparse.ArgumentParser) -> int:
    if value is None:
        return min(limits.max_body_bytes, GRPC_MAX_MESSAGE)
    if not 0 < value <= GRPC_MAX_MESSAGE:
        parser.error(f"gRPC message lengths must be between 1 and {GRPC_MAX_MESSAGE} bytes, got {value}")
    return value


def warmup_shapes(
    ns: argparse.Namespace, provider_settings: ProviderSettings, parser: argparse.ArgumentParser
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    text = ns.warmup_shapes or provider_settings.trt_profile_opt_shapes
    if not text:
        return ()
    try:
        return tuple(parse_shapes("--warmup_shapes", text))
    except ValueError as exc:
        parser.error(str(exc))


def batching(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> BatchSettings:
    try:
        preferred = tuple(int(size) for size in ns.preferred_batch_sizes.split(",") if size.strip())
    except ValueError:
        parser.error(f"--preferred_batch_sizes must be integers separated by commas, got {ns.preferred_batch_sizes!r}")
    if ns.max_batch_size < 0 or ns.max_queue_delay_us < 0 or ns.max_queue_size < 0 or any(p < 1 for p in preferred):
        parser.error("batch sizes, delays and queue sizes must not be negative")
    return BatchSettings(ns.max_batch_size, ns.max_queue_delay_us / 1e6, preferred)


def port(text: str | None, parser: argparse.ArgumentParser) -> int:
    if not text:
        return DEFAULT_HTTP_PORT
    try:
        return int(text)
    except ValueError:
        parser.error(f"PORT must be a port number, got {text!r}")


def add_provider_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the execution-provider flags, in a group of their own."""
    group = parser.add_argument_group("execution providers")
    add = group.add_argument
    auto = "auto: TensorRT, CUDA, CPU as installed; a named GPU provider fails rather than fall back"
    add("--providers", choices=PROVIDER_CHOICES, help=f"{auto} (env ZEROSERVE_PROVIDERS; default auto)")
    add("--device_id", type=int, default=0, help="GPU ordinal (default 0)")
    add("--trt_fp16", action="store_true", help="let TensorRT build FP16 kernels")
    add("--trt_engine_cache_path", help="folder keeping TensorRT engines across starts")
    add("--trt_timing_cache_path", help="folder keeping TensorRT tactic timings across starts")
    add("--trt_max_workspace_size", type=int, help="TensorRT builder workspace, bytes")
    add("--trt_builder_optimization_level", type=int, help="0..5: lower builds faster (ORT default 3)")
    for kind in ("min", "opt", "max"):
        add(f"--trt_profile_{kind}_shapes", help=f"{kind} input shapes, 'in:1x3x224x224,in2:...' (all three)")
    add(
        "--trt_ep_context", action="store_true",
        help="with --cache_uri, cache TensorRT's EP-context model (the engine in a one-node ONNX graph): "
        "a hit loads it without TensorRT's parser and builder",
    )  # fmt: skip
    add(
        "--trt_build", choices=TRT_BUILDS, default="blocking",
        help="background: become ready on CUDA at once and switch to TensorRT when its engines are built "
        "(both sessions hold GPU memory until then); blocking (default): ready once TensorRT is",
    )  # fmt: skip
    add("--cuda_mem_limit", type=int, help="cap on the CUDA memory arena, bytes")
    add("--cudnn_conv_algo_search", choices=CONV_ALGO_SEARCHES, default="HEURISTIC", help="(default HEURISTIC)")
    add("--intra_op_threads", type=int, help="threads inside one operator (default: the CPU quota)")
    add("--inter_op_threads", type=int, help="threads across operators; above 1 runs the graph in parallel")


def provider_settings_from(ns: argparse.Namespace, environ: Mapping[str, str]) -> ProviderSettings:
    """Build settings from parsed flags, with ``ZEROSERVE_PROVIDERS`` when ``--providers`` is absent.

    Raises ValueError with the offending flag named.
    """
    choice = ns.providers
    if choice is None:
        raw = environ.get("ZEROSERVE_PROVIDERS", "")
        choice = raw.strip().lower() or "auto"
        if choice not in PROVIDER_CHOICES:
            raise ValueError(f"ZEROSERVE_PROVIDERS={raw!r} is not one of {', '.join(PROVIDER_CHOICES)}")
    # Every other flag's dest is the field's own name.
    given = {f.name: getattr(ns, f.name) for f in fields(ProviderSettings) if f.name != "choice"}
    return ProviderSettings(choice=cast(ProviderChoice, choice), **given)


def loading(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> LoadingSettings:
    for flag in ("max_loaded_models", "max_loaded_mib", "model_idle_timeout"):
        if getattr(ns, flag) < 0:
            parser.error(f"--{flag} must not be negative (0: no bound)")
    bounds = ns.max_loaded_models or ns.max_loaded_mib or ns.model_idle_timeout
    if ns.model_loading == "eager" and bounds:
        parser.error("--max_loaded_models, --max_loaded_mib and --model_idle_timeout need --model_loading on_demand "
                     "or explicit (eager loading keeps every model)")
    return LoadingSettings(
        mode=ns.model_loading, max_loaded_models=ns.max_loaded_models, max_loaded_bytes=ns.max_loaded_mib * 2**20,
        idle_timeout=ns.model_idle_timeout,
    )
