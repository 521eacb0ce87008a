"""Server configuration: one frozen value built from argv and the environment in the entrypoint.

Flag names are KServe's own (``--model_name``, ``--model_dir``, ``--http_port``, ...), so a KServe
ServingRuntime can start the image unchanged. Environment fallbacks cover plain Knative use:
``PORT`` (injected by Knative), ``STORAGE_URI`` and ``MODEL_NAME``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from zeroserve.runtime import flags
from zeroserve.runtime.settings import (
    BatchSettings,
    EventSettings,
    Limits,
    LoadingSettings,
    MiB,
    PerformanceHint,
    Protocol,
    ProviderSettings,
)

logger = logging.getLogger("zeroserve.runtime")

DEFAULT_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the model
DEFAULT_GRPC_PORT = 8081
DEFAULT_INFLIGHT_SHARE = 0.125
DEFAULT_HTTP_PORT = flags.DEFAULT_HTTP_PORT
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
    # quota, so more runs at once only compete for it. The throughput hint sets it from the CPU quota in ``load``.
    inference_threads: int = 1
    inline_run_ms: float = 0.3  # session.run shorter than this runs on the event loop (0: never)
    batching: BatchSettings = field(default_factory=BatchSettings)
    max_queue_size: int = 512  # inferences admitted at once; more get 503 + Retry-After (0: no bound)
    warmup: bool = True
    warmup_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # input name -> shape for the warmup run
    exit_on_error: bool = True
    progress_interval: float = 5.0  # seconds between "still starting" log lines while loading; 0: none
    # The share of the memory limit that request bytes in flight may take (limits.max_inflight_bytes), when
    # --max_inflight_mib does not say; 0: no budget. docs/hardening.md says what the budget costs in memory.
    inflight_share: float = DEFAULT_INFLIGHT_SHARE
    shutdown_timeout: float = 30.0
    timeout_keep_alive: int = 65  # outlive the idle timeout of proxies in front (Envoy: 60 s)
    events: EventSettings = field(default_factory=EventSettings)  # answers to CloudEvents (cloudevents.py)
    loading: LoadingSettings = field(default_factory=LoadingSettings)  # when models load and unload
    # The memory invocations are billed for (metering.py); 0 until ``load`` reads the container's memory limit.
    billing_memory_bytes: int = 0
    # Open connections at once (http_server.py); 0 until ``load`` derives it from the file descriptors allowed.
    max_connections: int = 0
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
        from zeroserve.runtime.cgroup import cpu_quota, memory_limit, physical_memory

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
        limits = self.limits
        if self.inflight_share and not limits.max_inflight_bytes:
            memory = memory_limit() or physical_memory()
            budget = max(limits.max_body_bytes, int(memory * self.inflight_share)) if memory else 0
            limits = replace(limits, max_inflight_bytes=budget)
        providers = self.providers
        inference_threads = self.inference_threads
        if self.performance_hint == "throughput":
            threads_per_run = providers.intra_op_threads or 1
            inference_threads = max(1, cpus // (threads_per_run * self.workers))
            providers = replace(providers, intra_op_threads=threads_per_run)
        elif self.workers > 1 and providers.intra_op_threads is None:
            # N worker processes split the quota, so they do not oversubscribe it.
            providers = replace(providers, intra_op_threads=max(1, cpus // self.workers))
        max_connections = self.max_connections or _connections_allowed()
        billing_memory = self.billing_memory_bytes or memory_limit() or physical_memory()
        return replace(
            self, event_loop=loop, cpus=cpus, providers=providers, inference_threads=inference_threads, limits=limits,
            max_connections=max_connections, billing_memory_bytes=billing_memory,
        )

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
        parser = flags.build_parser()
        ns, unknown = parser.parse_known_args(list(argv))
        if unknown:
            # KServe passes flags meant for other servers through the same args; say so, don't die.
            logger.warning("ignoring unknown arguments: %s", " ".join(unknown))
        try:
            provider_settings = flags.provider_settings_from(ns, environ)
        except ValueError as exc:
            parser.error(str(exc))
        http_port = ns.http_port if ns.http_port is not None else flags.port(environ.get("PORT"), parser)
        cache_dir = ns.cache_dir or environ.get("ZEROSERVE_CACHE_DIR") or _default_cache_dir(environ)
        for flag in ("max_request_mib", "max_tensor_elements", "max_bytes_elements"):
            if getattr(ns, flag) < 1:
                parser.error(f"--{flag} must be at least 1")
        if ns.billing_memory_mib is not None and ns.billing_memory_mib < 1:
            parser.error("--billing_memory_mib must be at least 1")
        if ns.max_connections < 0:
            parser.error("--max_connections must not be negative (0: from the open-file limit)")
        if ns.max_inflight_mib is not None and ns.max_inflight_mib < 0:
            parser.error("--max_inflight_mib must not be negative (0: no budget)")
        limits = Limits(
            max_body_bytes=ns.max_request_mib * MiB,
            max_tensor_elements=ns.max_tensor_elements,
            max_bytes_elements=ns.max_bytes_elements,
            max_inflight_bytes=(ns.max_inflight_mib or 0) * MiB,
        )
        if ns.workers < 1:
            parser.error("--workers must be at least 1")
        hint, inference_threads, provider_settings = flags.performance(ns, provider_settings, parser)
        protocol = flags.protocol(ns, parser)
        grpc_port = ns.grpc_port
        if grpc_port is None:
            # gRPC only on Knative: the single container port (named h2c) arrives as PORT.
            port_env = environ.get("PORT")
            grpc_port = flags.port(port_env, parser) if protocol == "grpc" and port_env else DEFAULT_GRPC_PORT
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
            grpc_max_receive_message_length=flags.message_length(ns.grpc_max_receive_message_length, limits, parser),
            grpc_max_send_message_length=flags.message_length(ns.grpc_max_send_message_length, limits, parser),
            metrics_port=metrics_port,
            workers=ns.workers,
            cache_dir=Path(cache_dir),
            cache_uri=ns.cache_uri or environ.get("ZEROSERVE_CACHE_URI") or None,
            limits=limits,
            providers=provider_settings,
            performance_hint=hint,
            inference_threads=inference_threads,
            inline_run_ms=ns.inline_run_ms,
            batching=flags.batching(ns, parser),
            max_queue_size=ns.max_queue_size,
            warmup=ns.warmup,
            warmup_shapes=flags.warmup_shapes(ns, provider_settings, parser),
            exit_on_error=ns.exit_on_error,
            progress_interval=ns.progress_interval,
            inflight_share=DEFAULT_INFLIGHT_SHARE if ns.max_inflight_mib is None else 0.0,
            shutdown_timeout=ns.shutdown_timeout,
            timeout_keep_alive=ns.timeout_keep_alive,
            max_connections=ns.max_connections,
            billing_memory_bytes=(ns.billing_memory_mib or 0) * MiB,
            events=EventSettings.from_env(environ),
            loading=flags.loading(ns, parser),
            log_level=ns.log_level,
            access_log=ns.access_log,
            event_loop=ns.event_loop,
        )


# File descriptors kept for what is not a client connection: model files, threads' pipes, gRPC, the cache.
_RESERVED_DESCRIPTORS = 128


def _connections_allowed() -> int:
    """Client connections this process can hold: its open-file limit less what the server itself needs."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65536
    return max(16, soft - _RESERVED_DESCRIPTORS)


def _default_cache_dir(environ: Mapping[str, str]) -> str:
    """``$XDG_CACHE_HOME/zeroserve``, else ``$HOME/.cache/zeroserve``, from the environment given."""
    home = environ.get("HOME") or os.path.expanduser("~")
    base = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return os.path.join(base, "zeroserve")
