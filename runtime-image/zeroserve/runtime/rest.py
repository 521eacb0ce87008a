"""V2 REST endpoints: thin handlers over the data plane, one renderer for every error."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from zeroserve.protocol.start import START_HEADER, StartState
from zeroserve.runtime.dataplane import DataPlane
from zeroserve.runtime.rest_codec import encode_error
from zeroserve.runtime.server_errors import InvalidInput, ServerError

logger = logging.getLogger("zeroserve.runtime")

_JSON = {"content-type": "application/json"}
_READY = orjson.dumps({"ready": True})
_NOT_READY = orjson.dumps({"ready": False})


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status, headers={**_JSON, **(headers or {})})


def error_response(exc: ServerError) -> Response:
    status, headers, body = encode_error(exc)
    return Response(body, status, headers=headers)


def not_ready(start: StartState | None) -> Response:
    """503 ``{"ready": false}``, with the start-state marker that says whether waiting will help."""
    if start is None:
        return Response(_NOT_READY, 503, headers=_JSON)
    return json_response({"ready": False, "start": start.to_json()}, 503, {START_HEADER: start.state})


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in the protocol's error shape."""
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    return json_response({"error": detail}, exc.status_code, dict(exc.headers or {}))


async def server_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ServerError):
        return error_response(exc)
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return json_response({"error": f"internal server error: {type(exc).__name__}"}, 500)


class RestApi:
    def __init__(self, dataplane: DataPlane, infer: ASGIApp) -> None:
        self.dataplane = dataplane
        self.infer = infer  # the raw-ASGI infer endpoint (infer_endpoint.py)

    def routes(self) -> list[BaseRoute]:
        model = "/v2/models/{model_name}"
        versioned = "/v2/models/{model_name}/versions/{model_version}"
        return [
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/", self.server_metadata, methods=["GET"]),
            *(
                route
                for prefix in (model, versioned)
                for route in (
                    Route(prefix, self.model_metadata, methods=["GET"]),
                    Route(prefix + "/ready", self.model_ready, methods=["GET"]),
                    Route(prefix + "/infer", self.infer, methods=["POST"]),
                )
            ),
            Route("/v2/repository/index", self.repository_index, methods=["POST"]),
            Route("/v2/repository/models/{model_name}/load", self.repository_load, methods=["POST"]),
            Route("/v2/repository/models/{model_name}/unload", self.repository_unload, methods=["POST"]),
        ]

    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        # Kubernetes and Knative read the status code: not ready must not be 2xx.
        if self.dataplane.ready():
            return Response(_READY, 200, headers=_JSON)
        return not_ready(self.dataplane.repository.start_state())

    async def metrics(self, request: Request) -> Response:
        return Response(
            self.dataplane.metrics.render(), headers={"content-type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    async def server_metadata(self, request: Request) -> Response:
        return json_response(self.dataplane.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        params = request.path_params
        try:
            metadata = await self.dataplane.model_metadata(params["model_name"], params.get("model_version"))
        except ServerError as exc:
            return error_response(exc)
        return json_response(metadata)

    async def model_ready(self, request: Request) -> Response:
        params = request.path_params
        try:
            start = self.dataplane.repository.model_start_state(params["model_name"], params.get("model_version"))
        except ServerError as exc:
            return error_response(exc)
        return Response(_READY, 200, headers=_JSON) if start is None else not_ready(start)

    # The model repository extension (Triton's; tritonclient's get_model_repository_index, load_model,
    # unload_model): the models, and loading and unloading them (model_manager.py).

    async def repository_index(self, request: Request) -> Response:
        try:
            ready = _repository_body(await request.body(), "ready")
        except ServerError as exc:
            return error_response(exc)
        return json_response(self.dataplane.models.index(ready_only=ready is True))

    async def repository_load(self, request: Request) -> Response:
        name = request.path_params["model_name"]
        try:
            _repository_body(await request.body(), "parameters", refuse_parameters=True)
            await self.dataplane.models.load(name)
        except ServerError as exc:
            return error_response(exc)
        return json_response({"name": name, "load": True})

    async def repository_unload(self, request: Request) -> Response:
        name = request.path_params["model_name"]
        try:
            _repository_body(await request.body(), "parameters")
            await self.dataplane.models.unload(name)
        except ServerError as exc:
            return error_response(exc)
        return json_response({"name": name, "unload": True})


def _repository_body(body: bytes, key: str, *, refuse_parameters: bool = False) -> Any:
    """The one field of a repository request's JSON body that is read (an empty body is an empty request, as
    tritonclient sends the index request)."""
    if not body.strip():
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidInput("request body must be a JSON object")
    value = parsed.get(key)
    if refuse_parameters and value:
        raise InvalidInput(
            "load parameters (a model config, override files) are not supported: models load from the repository "
            "as they are"
        )
    return value
