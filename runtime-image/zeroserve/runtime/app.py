"""The ASGI application: REST routes over a data plane, models loaded in the background by the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.dataplane import DataPlane
from zeroserve.runtime.infer_endpoint import InferEndpoint, infer_target
from zeroserve.runtime.loader import load_in_background
from zeroserve.runtime.repository import ModelRepository
from zeroserve.runtime.rest import RestApi, http_exception, server_error
from zeroserve.runtime.server_errors import ServerError
from zeroserve.runtime.telemetry import Telemetry

logger = logging.getLogger("zeroserve.runtime")


class ServerApp(Starlette):
    """Starlette, with inference POSTs dispatched straight to the raw-ASGI infer endpoint."""

    infer_endpoint: InferEndpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            target = infer_target(scope["path"])
            if target is not None:
                await self.infer_endpoint.handle(scope, receive, send, *target)
                return
        await super().__call__(scope, receive, send)


def create_app(
    config: RuntimeConfig,
    *,
    on_load_failure: Callable[[ServerError], None] | None = None,
    telemetry: Telemetry | None = None,
    load_before_serving: bool = False,
) -> ServerApp:
    """Build the server app. Models start loading when the lifespan starts, after the listener is up;
    ``on_load_failure`` is called if loading fails (the server uses it to exit). ``telemetry`` (off by
    default) receives the init spans once models are ready, and wraps each inference in a span.

    ``load_before_serving``: the lifespan returns (so the server accepts connections, REST and gRPC) only once
    the models are loaded. For the processes of ``--workers N``: they share one listening socket and the kernel
    hands each connection to whichever accepts it, so a worker still loading would answer requests, and
    readiness probes, with "not ready" while its siblings are ready. Connections wait in the listen backlog
    until the first worker is ready instead."""
    telemetry = telemetry or Telemetry()
    config = config if config.loaded else config.load()
    repository = ModelRepository()
    dataplane = DataPlane.from_config(repository, config)
    infer = InferEndpoint(dataplane, config.limits, telemetry)
    api = RestApi(dataplane, infer.route)
    grpc_server = None
    if config.serves_grpc:  # imported only when asked for: grpc adds to every cold start
        from zeroserve.runtime.grpc import GrpcServer

        grpc_server = GrpcServer(dataplane, config, telemetry)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        def load() -> asyncio.Task[None]:
            coroutine = load_in_background(config, repository, on_load_failure, telemetry)
            return asyncio.create_task(coroutine, name="zeroserve-load")

        # The loop the app really runs on (an embedding server may bring its own), not the one config asked for.
        infer.extra_turn = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        loading: asyncio.Task[None] | None = None
        try:
            if load_before_serving:
                loading = load()
                await _loaded_or_stopped(loading)
            if grpc_server is not None:
                await grpc_server.start()  # in this event loop, beside REST
                grpc_server.stop_on_signals()  # both stop accepting at once; one drain deadline
            if loading is None:
                loading = load()
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop()
            if loading is not None:
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            dataplane.close()
            await asyncio.to_thread(telemetry.shutdown)

    app = ServerApp(
        routes=api.routes(),
        lifespan=lifespan,
        exception_handlers={HTTPException: http_exception, Exception: server_error},
    )
    app.infer_endpoint = infer
    app.state.repository = repository
    app.state.dataplane = dataplane
    return app


async def _loaded_or_stopped(loading: asyncio.Task[None]) -> None:
    """Wait for the models, unless SIGTERM or SIGINT comes first: then hand the signal on to the server's own
    handler (uvicorn's, which starts its shutdown) and return at once, as nothing has been accepted yet.

    uvicorn does not look at its exit flag while the lifespan starts, so without this a worker told to stop while
    it loads would load every model first. Now its shutdown cancels the loading, which ends once the step in
    progress (a download or a session build, in a thread) returns."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        await asyncio.shield(loading)
        return
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        loop.call_soon_threadsafe(stopped.set)

    previous = {int(sig): signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    waiting = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait([loading, waiting], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received and not loading.done():
        handler = previous[received[0]]
        if callable(handler):
            handler(received[0], None)
        logger.info("stopping before the models finished loading")
