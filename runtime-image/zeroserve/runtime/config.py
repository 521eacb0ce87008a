"""Server configuration: one frozen value built from argv and the environment in the entrypoint.

Flag names are KServe's own (``--model_name``, ``--model_dir``, ``--http_port``, ...), so a KServe
ServingRuntime can start the image unchanged. Environment fallbacks cover plain Knative use:
``PORT`` (injected by Knative), ``STORAGE_URI`` and ``MODEL_NAME``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zeroserve.runtime import providers
from zeroserve.runtime.providers import ProviderSettings

logger = logging.getLogger("zeroserve.runtime")

DEFAULT_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the model
DEFAULT_HTTP_PORT = 8080
DEFAULT_GRPC_PORT = 8081
MiB = 2**20


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds checked before anything is allocated for a request."""

    max_body_bytes: int = 256 * MiB
    max_tensor_elements: int = 2**28
    max_dims: int = 16


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    model_name: str = "model"
    model_dir: str = DEFAULT_MODEL_DIR
    host: str = "0.0.0.0"
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    workers: int = 1
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "zeroserve")
    limits: Limits = field(default_factory=Limits)
    providers: ProviderSettings = field(default_factory=ProviderSettings)
    # One session.run at a time by default: ONNX Runtime already spreads one run over the CPU quota,
    # and two concurrent runs on 2 cores measured ~12% slower (bench/) than one.
    inference_threads: int = 1
    inline_run_ms: float = 0.3  # session.run shorter than this runs on the event loop (0: never)
    warmup: bool = True
    exit_on_error: bool = True
    shutdown_timeout: float = 30.0
    timeout_keep_alive: int = 65  # outlive the idle timeout of proxies in front (Envoy: 60 s)
    log_level: str = "info"
    access_log: bool = False

    @classmethod
    def from_args(cls, argv: Sequence[str], environ: Mapping[str, str]) -> RuntimeConfig:
        """Parse KServe-style flags, falling back to the environment; raises SystemExit on bad flags."""
        parser = build_parser()
        ns, unknown = parser.parse_known_args(list(argv))
        if unknown:
            # KServe passes flags meant for other servers through the same args; say so, don't die.
            logger.warning("ignoring unknown arguments: %s", " ".join(unknown))
        try:
            provider_settings = providers.settings_from_args(ns, environ)
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
        if ns.inference_threads < 1:
            parser.error("--inference_threads must be at least 1")
        return cls(
            model_name=ns.model_name or environ.get("MODEL_NAME") or "model",
            model_dir=ns.model_dir or environ.get("STORAGE_URI") or DEFAULT_MODEL_DIR,
            host=ns.host,
            http_port=http_port,
            grpc_port=ns.grpc_port,
            workers=ns.workers,
            cache_dir=Path(cache_dir),
            limits=limits,
            providers=provider_settings,
            inference_threads=ns.inference_threads,
            inline_run_ms=ns.inline_run_ms,
            warmup=ns.warmup,
            exit_on_error=ns.exit_on_error,
            shutdown_timeout=ns.shutdown_timeout,
            timeout_keep_alive=ns.timeout_keep_alive,
            log_level=ns.log_level,
            access_log=ns.access_log,
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
        "--cache_dir", help="where remote models are cached (env ZEROSERVE_CACHE_DIR; default ~/.cache/zeroserve)"
    )
    model.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=True,
        help="run one synthetic inference per model before reporting ready (default on)",
    )
    model.add_argument(
        "--exit_on_error", action=argparse.BooleanOptionalAction, default=True,
        help="exit when a model fails to load, so the platform shows the failure (default on)",
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0")
    server.add_argument("--http_port", type=int, help="REST port (env PORT, as Knative injects it; default 8080)")
    server.add_argument("--grpc_port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port (default 8081)")
    server.add_argument("--workers", type=int, default=1, help="server processes sharing the port (default 1)")
    server.add_argument(
        "--inference_threads", type=int, default=1,
        help="concurrent session.run calls (default 1; ONNX Runtime parallelises each run itself)",
    )
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
    providers.add_arguments(parser)
    return parser


def _port(text: str | None, parser: argparse.ArgumentParser) -> int:
    if not text:
        return DEFAULT_HTTP_PORT
    try:
        return int(text)
    except ValueError:
        parser.error(f"PORT must be a port number, got {text!r}")


def _default_cache_dir(environ: Mapping[str, str]) -> str:
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "zeroserve")
