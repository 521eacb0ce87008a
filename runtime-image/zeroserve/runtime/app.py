"""The ASGI application: REST routes over a data plane, models loaded in the background by the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.dataplane import DataPlane
from zeroserve.runtime.errors import ServerError
from zeroserve.runtime.infer_endpoint import InferEndpoint, infer_target
from zeroserve.runtime.loader import load_models
from zeroserve.runtime.repository import ModelRepository
from zeroserve.runtime.rest import RestApi, http_exception, server_error

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
) -> ServerApp:
    """Build the server app. Models start loading when the lifespan starts, after the listener is up;
    ``on_load_failure`` is called if loading fails (the server uses it to exit)."""
    repository = ModelRepository()
    dataplane = DataPlane(repository, config.inference_threads, config.inline_run_ms / 1000)
    infer = InferEndpoint(dataplane, config.limits)
    api = RestApi(dataplane, infer.route)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loading = asyncio.create_task(_load(config, repository, on_load_failure), name="zeroserve-load")
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            dataplane.close()

    app = ServerApp(
        routes=api.routes(),
        lifespan=lifespan,
        exception_handlers={HTTPException: http_exception, Exception: server_error},
    )
    app.infer_endpoint = infer
    app.state.repository = repository
    app.state.dataplane = dataplane
    return app


async def _load(
    config: RuntimeConfig, repository: ModelRepository, on_failure: Callable[[ServerError], None] | None
) -> None:
    try:
        await load_models(config, repository)
    except ServerError as exc:
        logger.error("model loading failed: %s", exc.message)
        if on_failure is not None:
            on_failure(exc)
    except Exception as exc:
        logger.exception("model loading crashed")
        repository.discovering = False
        if on_failure is not None:
            on_failure(ServerError(f"model loading crashed: {exc}"))
