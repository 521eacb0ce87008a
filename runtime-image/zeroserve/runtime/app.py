"""The ASGI application: REST routes over a data plane, gRPC beside it when asked, models loaded by the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException

from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.dataplane import DataPlane
from zeroserve.runtime.infer_endpoint import InferEndpoint, InferFastPath
from zeroserve.runtime.lifecycle import Stop, serving
from zeroserve.runtime.repository import ModelRepository
from zeroserve.runtime.rest import RestApi, http_exception, server_error
from zeroserve.runtime.server_errors import ServerError
from zeroserve.runtime.telemetry import Telemetry


def create_app(
    config: RuntimeConfig,
    *,
    stop: Stop | None = None,
    on_load_failure: Callable[[ServerError], None] | None = None,
    telemetry: Telemetry | None = None,
    load_before_serving: bool = False,
) -> InferFastPath:
    """Build the server app. Models start loading when the lifespan starts, after the listener is up
    (lifecycle.py). ``stop`` is the server's stop request (``serve`` passes the one its signal handlers set; by
    default the app handles SIGTERM/SIGINT itself while it runs, then hands them on to the server running it).
    ``telemetry`` (off by default) receives the init spans and wraps each inference in a span.

    ``load_before_serving``: the lifespan returns (so the server accepts connections, REST and gRPC) only once
    the models are loaded. For the processes of ``--workers N``: they share one listening socket and the kernel
    hands each connection to whichever accepts it, so a worker still loading would answer requests, and
    readiness probes, with "not ready" while its siblings are ready. Connections wait in the listen backlog
    until the first worker is ready instead."""
    telemetry = telemetry or Telemetry()
    stop = stop or Stop(chain=True)
    config = config if config.loaded else config.load()
    repository = ModelRepository(on_demand=config.loading.on_demand)
    dataplane = DataPlane.from_config(repository, config, telemetry)
    endpoint = InferEndpoint(dataplane, config.limits, telemetry, config.events)
    grpc_server = None
    if config.serves_grpc:  # imported only when asked for: grpc adds to every cold start
        from zeroserve.runtime.grpc import GrpcServer

        grpc_server = GrpcServer(dataplane, config, telemetry)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        dataplane.running_on(asyncio.get_running_loop())
        async with serving(
            config, repository, dataplane, telemetry, stop, grpc_server=grpc_server,
            load_first=load_before_serving, on_load_failure=on_load_failure,
        ):
            yield

    app = Starlette(
        routes=RestApi(dataplane, endpoint.route).routes(),
        lifespan=lifespan,
        exception_handlers={HTTPException: http_exception, Exception: server_error},
    )
    app.state.repository = repository
    app.state.dataplane = dataplane
    app.state.stop = stop
    return InferFastPath(endpoint, app)
