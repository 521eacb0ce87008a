"""Server configuration: one frozen value built from argv and the environment in the entrypoint.

Flag names are KServe's own (``--model_name``, ``--model_dir``, ``--http_port``, ...), so a KServe
ServingRuntime can start the image unchanged. Environment fallbacks cover plain Knative use:
``PORT`` (injected by Knative), ``STORAGE_URI`` and ``MODEL_NAME``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, cast

from zeroserve.runtime.settings import (
    CONV_ALGO_SEARCHES,
    PERFORMANCE_HINTS,
    PROTOCOLS,
    PROVIDER_CHOICES,
    TRT_BUILDS,
    BatchSettings,
    Limits,
    MiB,
    PerformanceHint,
    Protocol,
    ProviderChoice,
    ProviderSettings,
    parse_shapes,
)

logger = logging.getLogger("zeroserve.runtime")

DEFAULT_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the model
DEFAULT_HTTP_PORT = 8080
DEFAULT_GRPC_PORT = 8081
# KServe's own --protocol takes the predictor protocol of a transformer; a ServingRuntime may pass it.
_KSERVE_PROTOCOLS = ("v1", "v2", "grpc-v2")
_GRPC_MAX_MESSAGE = 2**31 - 1  # gRPC keeps message sizes in a signed 32-bit int
EventLoop = Literal["auto", "uvloop", "asyncio"]


class ConfigError(Exception):
    """The configuration cannot run on this machine (a package it needs is missing): said before serving."""


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    model_name: str = "model"
    model_dir: str = DEFAULT_MODEL_DIR
    host: str = "0.0.0.0"
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    # REST only unless asked: importing grpc costs start-up time (docs/grpc.md), which a scale-to-zero
    # server pays on every cold start.
    protocol: Protocol = "rest"
    # gRPC's own default receive limit is 4 MiB, which one 3x512x512 FP32 image exceeds; follow the REST body limit.
    grpc_max_receive_message_length: int = 256 * MiB
    grpc_max_send_message_length: int = 256 * MiB
    # gRPC only: serve GET /metrics on this port (REST serves it on http_port). None: off.
    metrics_port: int | None = None
    workers: int = 1
    cache_dir: Path = field(default_factory=lambda: Path(_default_cache_dir(os.environ)))
    # Built session artifacts (optimized graph, TensorRT engines) on any fsspec URI; None: off (docs/artifact-cache.md).
    cache_uri: str | None = None
    limits: Limits = field(default_factory=Limits)
    providers: ProviderSettings = field(default_factory=ProviderSettings)
    performance_hint: PerformanceHint = "adaptive"
    # With the latency hint, session.run calls at once: ONNX Runtime already spreads one run over the CPU
    # quota, and two concurrent runs on every thread measured ~12% slower (bench/) than one.
    # With the latency hint, session.run calls at once: ONNX Runtime already spreads one run over the CPU
    # quota. The throughput hint sets it from the CPU quota when the configuration is loaded.
    inference_threads: int = 1
    inline_run_ms: float = 0.3  # session.run shorter than this runs on the event loop (0: never)
    batching: BatchSettings = field(default_factory=BatchSettings)
    max_queue_size: int = 512  # inferences admitted at once; more get 503 + Retry-After (0: no bound)
    warmup: bool = True
    warmup_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # input name -> shape for the warmup run
    exit_on_error: bool = True
    shutdown_timeout: float = 30.0
    timeout_keep_alive: int = 65  # outlive the idle timeout of proxies in front (Envoy: 60 s)
    log_level: str = "info"
    access_log: bool = False
    # auto: uvloop when installed (faster); asyncio: the standard loop (fairer to connections when saturated).
    # ``load`` turns auto into the loop that will run.
    event_loop: EventLoop = "auto"
    # The CPUs this process may use (its cgroup quota); 0 until ``load`` has read it.
    cpus: int = 0

    def load(self) -> RuntimeConfig:
        """Resolve what depends on this machine, as uvicorn's ``Config.load`` does: the CPU quota and the
        thread counts that follow from it, the event loop, and whether the packages asked for are installed.
        Parsing (``from_args``) does no I/O; the entrypoint calls this once. Raises ConfigError."""
        from zeroserve.runtime.cgroup import cpu_quota

        missing = [name for name in ("onnxruntime",) if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(
                "ONNX Runtime is not installed: pip install 'zeroserve[cpu]' (or 'zeroserve[gpu]' with CUDA)"
            )
        if self.serves_grpc:
            absent = [name for name in ("grpc", "grpc_health") if importlib.util.find_spec(name) is None]
            if absent:
                raise ConfigError(f"gRPC needs the '{absent[0]}' package: pip install 'zeroserve[grpc]'")
        has_uvloop = importlib.util.find_spec("uvloop") is not None
        if self.event_loop == "uvloop" and not has_uvloop:
            raise ConfigError("--event_loop uvloop: uvloop is not installed (pip install uvloop, or --event_loop "
                              "asyncio)")
        loop: EventLoop = self.event_loop if self.event_loop != "auto" else ("uvloop" if has_uvloop else "asyncio")
        cpus = cpu_quota()
        providers = self.providers
        inference_threads = self.inference_threads
        if self.performance_hint == "throughput":
            threads_per_run = providers.intra_op_threads or 1
            inference_threads = max(1, cpus // (threads_per_run * self.workers))
            providers = replace(providers, intra_op_threads=threads_per_run)
        elif self.workers > 1 and providers.intra_op_threads is None:
            # N worker processes split the quota, so they do not oversubscribe it.
            providers = replace(providers, intra_op_threads=max(1, cpus // self.workers))
        return replace(self, event_loop=loop, cpus=cpus, providers=providers, inference_threads=inference_threads)

    @property
    def loaded(self) -> bool:
        return self.cpus > 0

    @property
    def uses_uvloop(self) -> bool:
        return self.event_loop == "uvloop"

    def adaptive_cores(self) -> int:
        """Cores the adaptive hint shares between runs (placement.py); 0 when it does not apply."""
        if self.performance_hint != "adaptive" or self.providers.choice in ("tensorrt", "cuda"):
            return 0
        cores = self.providers.intra_op_threads or self.cpus
        return cores if cores > 1 else 0

    @property
    def serves_rest(self) -> bool:
        return self.protocol != "grpc"

    @property
    def serves_grpc(self) -> bool:
        return self.protocol != "rest"

    @classmethod
    def from_args(cls, argv: Sequence[str], environ: Mapping[str, str]) -> RuntimeConfig:
        """Parse KServe-style flags, falling back to the environment; raises SystemExit on bad flags."""
        parser = build_parser()
        ns, unknown = parser.parse_known_args(list(argv))
        if unknown:
            # KServe passes flags meant for other servers through the same args; say so, don't die.
            logger.warning("ignoring unknown arguments: %s", " ".join(unknown))
        try:
            provider_settings = provider_settings_from(ns, environ)
        except ValueError as exc:
            parser.error(str(exc))
        http_port = ns.http_port if ns.http_port is not None else _port(environ.get("PORT"), parser)
        cache_dir = ns.cache_dir or environ.get("ZEROSERVE_CACHE_DIR") or _default_cache_dir(environ)
        limits = Limits(
            max_body_bytes=ns.max_request_mib * MiB,
            max_tensor_elements=ns.max_tensor_elements,
        )
        if ns.workers < 1:
            parser.error("--workers must be at least 1")
        hint, inference_threads, provider_settings = _performance(ns, provider_settings, parser)
        protocol = _protocol(ns, parser)
        grpc_port = ns.grpc_port
        if grpc_port is None:
            # gRPC only on Knative: the single container port (named h2c) arrives as PORT.
            port_env = environ.get("PORT")
            grpc_port = _port(port_env, parser) if protocol == "grpc" and port_env else DEFAULT_GRPC_PORT
        if protocol == "both" and grpc_port == http_port:
            parser.error(f"REST and gRPC cannot share port {grpc_port}; give --http_port and --grpc_port apart")
        if protocol == "grpc" and ns.workers > 1:
            parser.error("--workers applies to the REST server; with --protocol grpc run one process per pod")
        metrics_port = ns.metrics_port
        if metrics_port is not None:
            if not 0 < metrics_port < 65536:
                parser.error(f"--metrics_port must be a port number, got {metrics_port}")
            if protocol != "grpc":
                logger.warning("ignoring --metrics_port: /metrics is served on the REST port (--http_port)")
                metrics_port = None
            elif metrics_port == grpc_port:
                parser.error(f"gRPC and /metrics cannot share port {grpc_port}; give --metrics_port another")
        return cls(
            model_name=ns.model_name or environ.get("MODEL_NAME") or "model",
            model_dir=ns.model_dir or environ.get("STORAGE_URI") or DEFAULT_MODEL_DIR,
            host=ns.host,
            http_port=http_port,
            grpc_port=grpc_port,
            protocol=protocol,
            grpc_max_receive_message_length=_message_length(ns.grpc_max_receive_message_length, limits, parser),
            grpc_max_send_message_length=_message_length(ns.grpc_max_send_message_length, limits, parser),
            metrics_port=metrics_port,
            workers=ns.workers,
            cache_dir=Path(cache_dir),
            cache_uri=ns.cache_uri or environ.get("ZEROSERVE_CACHE_URI") or None,
            limits=limits,
            providers=provider_settings,
            performance_hint=hint,
            inference_threads=inference_threads,
            inline_run_ms=ns.inline_run_ms,
            batching=_batching(ns, parser),
            max_queue_size=ns.max_queue_size,
            warmup=ns.warmup,
            warmup_shapes=_warmup_shapes(ns, provider_settings, parser),
            exit_on_error=ns.exit_on_error,
            shutdown_timeout=ns.shutdown_timeout,
            timeout_keep_alive=ns.timeout_keep_alive,
            log_level=ns.log_level,
            access_log=ns.access_log,
            event_loop=ns.event_loop,
        )


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
    server.add_argument("--max_request_mib", type=int, default=256, help="largest request body accepted")
    server.add_argument("--max_tensor_elements", type=int, default=2**28, help="largest tensor accepted")
    server.add_argument("--shutdown_timeout", type=float, default=30.0, help="seconds to drain on SIGTERM")
    server.add_argument("--timeout_keep_alive", type=int, default=65)
    server.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    server.add_argument("--access_log", action=argparse.BooleanOptionalAction, default=False)
    server.add_argument(
        "--event_loop", default="auto", choices=["auto", "uvloop", "asyncio"],
        help="auto (default): uvloop when installed, which serves more requests/s; asyncio: the standard loop, "
        "fairer to connections when the server is saturated (a lower tail latency, fewer requests/s)",
    )
    add_provider_arguments(parser)
    return parser


def _performance(
    ns: argparse.Namespace, settings: ProviderSettings, parser: argparse.ArgumentParser
) -> tuple[PerformanceHint, int, ProviderSettings]:
    """The hint and the session.run calls at once it implies (the throughput hint's count waits for ``load``)."""
    if ns.inference_threads is not None and ns.inference_threads < 1:
        parser.error("--inference_threads must be at least 1")
    hint: PerformanceHint = ns.performance_hint or ("latency" if ns.inference_threads is not None else "adaptive")
    if ns.inference_threads is not None and hint != "latency":
        parser.error(f"--inference_threads goes with --performance_hint latency, not {hint}")
    return hint, ns.inference_threads or 1, settings


def _protocol(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> Protocol:
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


def _message_length(value: int | None, limits: Limits, parser: argparse.ArgumentParser) -> int:
    if value is None:
        return min(limits.max_body_bytes, _GRPC_MAX_MESSAGE)
    if not 0 < value <= _GRPC_MAX_MESSAGE:
        parser.error(f"gRPC message lengths must be between 1 and {_GRPC_MAX_MESSAGE} bytes, got {value}")
    return value


def _warmup_shapes(
    ns: argparse.Namespace, provider_settings: ProviderSettings, parser: argparse.ArgumentParser
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    text = ns.warmup_shapes or provider_settings.trt_profile_opt_shapes
    if not text:
        return ()
    try:
        return tuple(parse_shapes("--warmup_shapes", text))
    except ValueError as exc:
        parser.error(str(exc))


def _batching(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> BatchSettings:
    try:
        preferred = tuple(int(size) for size in ns.preferred_batch_sizes.split(",") if size.strip())
    except ValueError:
        parser.error(f"--preferred_batch_sizes must be integers separated by commas, got {ns.preferred_batch_sizes!r}")
    if ns.max_batch_size < 0 or ns.max_queue_delay_us < 0 or ns.max_queue_size < 0 or any(p < 1 for p in preferred):
        parser.error("batch sizes, delays and queue sizes must not be negative")
    return BatchSettings(ns.max_batch_size, ns.max_queue_delay_us / 1e6, preferred)


def _port(text: str | None, parser: argparse.ArgumentParser) -> int:
    if not text:
        return DEFAULT_HTTP_PORT
    try:
        return int(text)
    except ValueError:
        parser.error(f"PORT must be a port number, got {text!r}")


def _default_cache_dir(environ: Mapping[str, str]) -> str:
    """``$XDG_CACHE_HOME/zeroserve``, else ``$HOME/.cache/zeroserve``, from the environment given."""
    home = environ.get("HOME") or os.path.expanduser("~")
    base = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return os.path.join(base, "zeroserve")


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
