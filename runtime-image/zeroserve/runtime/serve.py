"""The server's entry: REST under uvicorn (one process, or ``--workers N``), or gRPC alone; each through the one
lifecycle of lifecycle.py, with the ordered, bounded shutdown Knative expects on SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import pickle
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from zeroserve.runtime import memory, telemetry
from zeroserve.runtime.config import ConfigError, RuntimeConfig
from zeroserve.runtime.lifecycle import Stop, serving
from zeroserve.runtime.server_errors import ServerError

if TYPE_CHECKING:
    import socket

    import uvicorn

logger = logging.getLogger("zeroserve.runtime")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# Exit status uvicorn's supervisor reads as "this worker can never start": it stops instead of respawning.
_STARTUP_FAILURE = 3
_WORKER_CONFIG_ENV = "ZEROSERVE_WORKER_CONFIG"


def serve(config: RuntimeConfig) -> int:
    """Serve until stopped; returns the process exit code: 0 after SIGTERM, 130 after SIGINT (Ctrl-C), 1 when a
    model failed to load (or the server could not start), 2 when the configuration cannot run here."""
    try:
        config = config if config.loaded else config.load()
    except ConfigError as exc:
        print(f"zeroserve: {exc}", file=sys.stderr)
        return 2
    memory.tune_malloc()
    if not config.serves_rest:
        return _serve_grpc_only(config)
    if config.workers > 1:
        return _serve_workers(config)

    from zeroserve.runtime.app import create_app

    stop = Stop()
    app = create_app(config, stop=stop, telemetry=telemetry.from_environment(os.environ))
    server = _uvicorn_server(_uvicorn_config(app, config), stop)
    server.run()
    if stop.failure is not None:
        print(f"zeroserve: {stop.failure.message}", file=sys.stderr)
        return 1
    if not server.started:  # the lifespan could not start (the gRPC port is taken, ...); uvicorn logged why
        return 1
    return stop.exit_code


def _uvicorn_server(config: uvicorn.Config, stop: Stop) -> uvicorn.Server:
    """uvicorn's server with the signal handling of ``lifecycle.Stop``: a stop request sets uvicorn's exit flags,
    and the process exits with a code instead of re-raising the signal."""
    import uvicorn

    from zeroserve.runtime.http_server import take_in_arrived

    class Server(uvicorn.Server):
        def _exit(self, force: bool) -> None:
            self.should_exit = True
            self.force_exit = self.force_exit or force

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with stop.capture():
                yield

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if not self.force_exit:
                await take_in_arrived()
            await super().shutdown(sockets)

    server = Server(config)
    stop.on_stop(server._exit)
    return server


def _serve_grpc_only(config: RuntimeConfig) -> int:
    """Serve gRPC alone (``--protocol grpc``) until stopped; returns the process exit code."""
    if not config.uses_uvloop:
        return asyncio.run(_grpc_only(config))
    import uvloop

    code: int = uvloop.run(_grpc_only(config))
    return code


async def _grpc_only(config: RuntimeConfig) -> int:
    from zeroserve.runtime.dataplane import DataPlane
    from zeroserve.runtime.grpc import GrpcServer
    from zeroserve.runtime.repository import ModelRepository

    repository = ModelRepository(on_demand=config.loading.on_demand)
    tracing = telemetry.from_environment(os.environ)
    dataplane = DataPlane.from_config(repository, config, tracing)
    dataplane.running_on(asyncio.get_running_loop())
    grpc_server = GrpcServer(dataplane, config, tracing)
    metrics_server = None
    if config.metrics_port is not None:  # the gRPC-only server's one HTTP endpoint, only when asked for
        from zeroserve.runtime.metrics_server import MetricsServer

        metrics_server = MetricsServer(dataplane.metrics, config.host, config.metrics_port)
    stop = Stop()
    try:
        async with serving(config, repository, dataplane, tracing, stop, grpc_server=grpc_server):
            if metrics_server is not None:
                try:
                    await metrics_server.start()
                except OSError as exc:
                    raise ServerError(f"cannot serve metrics on port {config.metrics_port}: {exc}") from None
            await stop.wait()
            logger.info("stopping: draining gRPC calls for up to %g s", config.shutdown_timeout)
    except ServerError as exc:  # a listener could not start
        print(f"zeroserve: {exc.message}", file=sys.stderr)
        return 1
    finally:
        if metrics_server is not None:
            await metrics_server.stop()
    if stop.failure is not None:
        print(f"zeroserve: {stop.failure.message}", file=sys.stderr)
    return stop.exit_code


def _uvicorn_config(app: Any, config: RuntimeConfig, **extra: Any) -> uvicorn.Config:
    from zeroserve.runtime.http_server import ConnectionLimits, ServerConfig

    limits = ConnectionLimits(head_timeout=config.timeout_keep_alive, max_connections=config.max_connections)
    return ServerConfig(
        app,
        connection_limits=limits,
        host=config.host,
        port=config.http_port,
        loop="uvloop" if config.uses_uvloop else "asyncio",
        lifespan="on",
        ws="none",  # no WebSocket routes: nothing to import for them
        log_config=None,
        access_log=config.access_log,
        proxy_headers=False,  # nothing here reads client addresses; one middleware layer less per request
        server_header=False,
        timeout_keep_alive=config.timeout_keep_alive,
        timeout_graceful_shutdown=max(1, round(config.shutdown_timeout)),
        **extra,
    )


def _serve_workers(config: RuntimeConfig) -> int:
    """``--workers N``: N processes share one listening socket, each loading its own copy of the models.

    ONNX Runtime threads are split between them (unless set explicitly) so N workers do not
    oversubscribe the CPU quota."""
    from uvicorn.supervisors import Multiprocess

    # Workers are spawned processes: they rebuild the app from this config through the factory below.
    os.environ[_WORKER_CONFIG_ENV] = base64.b64encode(pickle.dumps(config)).decode()
    uvicorn_config = _uvicorn_config(f"{__name__}:worker_app", config, factory=True, workers=config.workers)
    supervisor = Multiprocess(uvicorn_config, sockets=[uvicorn_config.bind_socket()])
    memory.resume_gc()  # this process only supervises; each worker pauses and resumes its own
    supervisor.run()
    if any(process.exitcode == _STARTUP_FAILURE for process in supervisor.processes):
        print("zeroserve: a worker could not load its models (see its log above)", file=sys.stderr)
        return 1
    return 0


def worker_app() -> Any:
    """App factory run inside each worker process of ``--workers N``."""
    memory.pause_gc_for_startup()
    memory.tune_malloc()
    from zeroserve.runtime.app import create_app

    config: RuntimeConfig = pickle.loads(base64.b64decode(os.environ[_WORKER_CONFIG_ENV]))
    configure_logging(config.log_level)

    def on_load_failure(exc: ServerError) -> None:
        if config.exit_on_error:
            print(f"zeroserve: {exc.message}", file=sys.stderr, flush=True)
            os._exit(_STARTUP_FAILURE)  # nothing was ever ready in this worker; the supervisor stops all

    tracing = telemetry.from_environment(os.environ)
    # uvicorn's own server runs each worker: the app's stop hands signals on to it.
    return create_app(
        config, stop=Stop(chain=True), on_load_failure=on_load_failure, telemetry=tracing, load_before_serving=True
    )
