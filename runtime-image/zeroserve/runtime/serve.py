"""Run the server under uvicorn, with the ordered, bounded shutdown Knative expects on SIGTERM.

On SIGTERM uvicorn stops accepting (the listening socket closes, new connections are refused),
lets in-flight requests finish for up to ``shutdown_timeout`` seconds, then the lifespan unloads.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.errors import ServerError

logger = logging.getLogger("zeroserve.runtime")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve(config: RuntimeConfig) -> int:
    """Serve until stopped; returns the process exit code (1 when a model failed to load)."""
    import uvicorn

    from zeroserve.runtime.app import create_app

    failed: list[ServerError] = []

    def on_load_failure(exc: ServerError) -> None:
        if config.exit_on_error:
            failed.append(exc)
            server.should_exit = True

    app = create_app(config, on_load_failure=on_load_failure)
    uvicorn_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.http_port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        log_config=None,
        access_log=config.access_log,
        proxy_headers=False,  # nothing here reads client addresses; one middleware layer less per request
        server_header=False,
        timeout_keep_alive=config.timeout_keep_alive,
        timeout_graceful_shutdown=max(1, round(config.shutdown_timeout)),
    )
    server = uvicorn.Server(uvicorn_config)
    server.run()
    if failed:
        print(f"zeroserve: {failed[0].message}", file=sys.stderr)
        return 1
    return 0
