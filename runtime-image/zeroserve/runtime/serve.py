"""Run the server under uvicorn, with the ordered, bounded shutdown Knative expects on SIGTERM.

On SIGTERM uvicorn stops accepting (the listening socket closes, new connections are refused),
lets in-flight requests finish for up to ``shutdown_timeout`` seconds, then the lifespan unloads.
"""

from __future__ import annotations

import base64
import importlib.util
import logging
import os
import pickle
import sys
from typing import TYPE_CHECKING, Any

from zeroserve.runtime import memory, telemetry
from zeroserve.runtime.config import ConfigError, RuntimeConfig
from zeroserve.runtime.server_errors import ServerError

if TYPE_CHECKING:
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
    """Serve until stopped; returns the process exit code (1 when a model failed to load, 2 when the
    configuration cannot run here)."""
    try:
        config = config if config.loaded else config.load()
    except ConfigError as exc:
        print(f"zeroserve: {exc}", file=sys.stderr)
        return 2
    memory.tune_malloc()
    if not config.serves_rest:
        from zeroserve.runtime.grpc import serve_grpc

        return serve_grpc(config)
    if config.workers > 1:
        return _serve_workers(config)
    import uvicorn

    from zeroserve.runtime.app import create_app

    failed: list[ServerError] = []

    def on_load_failure(exc: ServerError) -> None:
        if config.exit_on_error:
            failed.append(exc)
            server.should_exit = True

    app = create_app(config, on_load_failure=on_load_failure, telemetry=telemetry.from_environment(os.environ))
    server = uvicorn.Server(_uvicorn_config(app, config))
    server.run()
    if failed:
        print(f"zeroserve: {failed[0].message}", file=sys.stderr)
        return 1
    if not server.started:  # the lifespan could not start (the gRPC port is taken, ...); uvicorn logged why
        return 1
    return 0


def _uvicorn_config(app: Any, config: RuntimeConfig, **extra: Any) -> uvicorn.Config:
    import uvicorn

    return uvicorn.Config(
        app,
        host=config.host,
        port=config.http_port,
        loop="uvloop" if config.uses_uvloop else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
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
    return create_app(config, on_load_failure=on_load_failure, telemetry=tracing, load_before_serving=True)
