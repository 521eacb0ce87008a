"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` and ``grpc.health.v1.Health``
on a ``grpc.aio`` server, thin over the same data plane as REST.

Needs the ``grpc`` extra; nothing imports this module unless gRPC is enabled (``--protocol grpc|both``,
``--enable_grpc`` or ``--grpc_port``). With REST it runs in the REST server's event loop, started and
stopped by the app's lifespan (``app.py``); alone (``--protocol grpc``) ``serve_grpc`` runs it.

Errors carry the status that ``STATUS_CODES`` gives the server error's HTTP status: the one mapping
from the error tree (``errors.py``) to gRPC codes. ``ModelInfer`` is observed as REST's infer endpoint is
(request metrics, a SERVER span, Server-Timing as trailing metadata); see docs/grpc.md.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

try:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
except ModuleNotFoundError as exc:  # only a missing package; an error inside one propagates as is
    if (exc.name or "").partition(".")[0] not in ("grpc", "grpc_health", "google"):
        raise
    raise ImportError(f"serving gRPC needs the '{exc.name}' package: pip install 'zeroserve[grpc]'") from exc

from zeroserve.protocol.start import START_HEADER, retry_after_value
from zeroserve.runtime import grpc_codec
from zeroserve.runtime._proto import open_inference_grpc_pb2 as pb
from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.dataplane import DataPlane, Holding
from zeroserve.runtime.invocation import Invocation
from zeroserve.runtime.repository import ModelRepository, State
from zeroserve.runtime.server_errors import InvalidInput, ModelLoadError, ModelNotReady, ServerError
from zeroserve.runtime.telemetry import Telemetry
from zeroserve.runtime.tensors import encode_is_heavy

logger = logging.getLogger("zeroserve.runtime")

SERVICE = "inference.GRPCInferenceService"
HEAVY_MESSAGE_BYTES = 1024 * 1024  # a ModelInfer message decoded in a thread rather than on the event loop
_SETTLED = 0.02  # seconds without a new call after which a stop finds no more waiting for a handler
_MAX_SETTLE = 0.5

STATUS_CODES: dict[HTTPStatus, grpc.StatusCode] = {
    HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    # Over a size bound: what gRPC itself answers for a message over the receive limit.
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    # Loading, or failed to load: the clients' retry policies (kserve's) retry UNAVAILABLE.
    HTTPStatus.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    HTTPStatus.INTERNAL_SERVER_ERROR: grpc.StatusCode.INTERNAL,
}

Request = TypeVar("Request")
Response = TypeVar("Response")
if TYPE_CHECKING:
    from typing import TypeAlias

    from opentelemetry.trace import Span

    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _rpc(
    method: Callable[[Any, Request, Context], Awaitable[Response]],
) -> Callable[[Any, Request, Context], Awaitable[Response]]:
    """Turn the server errors an RPC raises into its gRPC status, in one place."""

    @functools.wraps(method)
    async def call(self: Any, request: Request, context: Context) -> Response:
        self.calls_started += 1
        try:
            return await method(self, request, context)
        except ServerError as exc:
            error = exc
        except Exception:
            logger.exception("unexpected error in %s", method.__name__)
            error = ServerError("internal server error")
        await _abort(context, error)

    return call


async def _abort(context: Context, error: ServerError, extra: list[tuple[str, str]] | None = None) -> NoReturn:
    metadata = list(extra or ())
    if error.retry_after is not None:
        metadata.append(("retry-after", retry_after_value(error.retry_after)))
    if error.start is not None:
        metadata.append((START_HEADER, error.start.state))
    if metadata:
        context.set_trailing_metadata(tuple(metadata))
    await context.abort(_status_code(error), error.message)


def _status_code(error: ServerError) -> grpc.StatusCode:
    return STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)


class InferenceServicer:
    """``inference.GRPCInferenceService``: each RPC is one data-plane call and its message conversion."""

    def __init__(self, dataplane: DataPlane, config: RuntimeConfig, telemetry: Telemetry | None = None) -> None:
        self.dataplane = dataplane
        self.limits = config.limits
        self.telemetry = telemetry or Telemetry()
        self.calls_started = 0  # calls handed to a handler so far: a stop waits until they stop coming

    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            ready = self.dataplane.model_ready(request.name, request.version or None)
        except (ModelNotReady, ModelLoadError):
            ready = False  # REST answers these 503, its "not ready"; here that is ready=false
        return pb.ModelReadyResponse(ready=ready)

    @_rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return grpc_codec.server_metadata(self.dataplane.server_metadata())

    @_rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        return grpc_codec.model_metadata(await self.dataplane.model_metadata(request.name, request.version or None))

    @_rpc
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        rows = self.dataplane.models.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows])

    @_rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise InvalidInput("load parameters (a model config, override files) are not supported")
        await self.dataplane.models.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.dataplane.models.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, data: bytes, context: Context) -> bytes:
        """Takes and answers serialized messages: ``grpc_codec`` reads and writes their tensors in place."""
        self.calls_started += 1
        if not self.telemetry.enabled:
            return await self._infer(data, context, None)
        with self.telemetry.rpc_span(context.invocation_metadata(), SERVICE, "ModelInfer") as span:
            return await self._infer(data, context, span)

    async def _infer(self, data: bytes, context: Context, span: Span | None) -> bytes:
        """ModelInfer, observed as REST's infer endpoint is (invocation.py); the Server-Timing string goes out as
        trailing metadata ``server-timing`` on success."""
        invocation = Invocation(self.dataplane, self.telemetry, "grpc", span, self._span_outcome)
        request: pb.ModelInferRequest | None = None
        held: Holding | None = None  # the message counts against the budget until answered
        try:
            try:
                held = self.dataplane.admit(len(data))  # before decoding
                heavy = len(data) > HEAVY_MESSAGE_BYTES  # typed contents and BYTES cost Python work per value
                if heavy:
                    message, raw_contents = await invocation.off_loop(grpc_codec.parse_infer_request, data)
                    request = message
                    decoded, raw_outputs = await invocation.off_loop(
                        grpc_codec.decode_request, message, self.limits, raw_contents
                    )
                else:
                    message, raw_contents = invocation.here(grpc_codec.parse_infer_request, data)
                    request = message
                    decoded, raw_outputs = invocation.here(
                        grpc_codec.decode_request, message, self.limits, raw_contents
                    )
                result = await self.dataplane.infer(message.model_name, message.model_version or None, decoded)
                if encode_is_heavy(result):
                    response = await invocation.off_loop(grpc_codec.encode_result, result, raw_outputs)
                else:
                    response = invocation.here(grpc_codec.encode_result, result, raw_outputs)
            except ServerError as exc:
                error = exc
            except Exception:
                logger.exception("unexpected error in ModelInfer for model '%s'", request.model_name if request else "")
                error = ServerError("internal server error")
            else:
                context.set_trailing_metadata(tuple(invocation.answered(result)))
                return response
            # A parsed message names its request even when refused (REST's JSON may not parse).
            name, version = (request.model_name, request.model_version or None) if request else ("", None)
            billed = invocation.failed(error.status, name, version, (request.id or None) if request else None)
            await _abort(context, error, billed)
        finally:
            if held is not None:
                held.release()

    def _span_outcome(self, span: Span, status: int, coldstart: bool, request_id: str | None) -> None:
        code = STATUS_CODES.get(HTTPStatus(status), grpc.StatusCode.INTERNAL) if status != 200 else grpc.StatusCode.OK
        self.telemetry.set_rpc_result(span, code.name, code.value[0], coldstart, request_id)

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The service's handlers by method name: ModelInfer on bytes, the others on protobuf messages."""

        def messages(method: Callable[..., Any], request: Any, response: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                method, request_deserializer=request.FromString, response_serializer=response.SerializeToString
            )

        return {
            "ServerLive": messages(self.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": messages(self.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": messages(self.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": messages(self.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": messages(self.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self.ModelInfer),
            "RepositoryIndex": messages(self.RepositoryIndex, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
            "RepositoryModelLoad": messages(
                self.RepositoryModelLoad, pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse
            ),
            "RepositoryModelUnload": messages(
                self.RepositoryModelUnload, pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse
            ),
        }


class HealthServicer(health.aio.HealthServicer):
    """``grpc.health.v1.Health`` for "" (the server) and the inference service: SERVING exactly when
    the server is ready (``ServerReady``), NOT_SERVING while loading, after a failed load and once
    stopping. Kubernetes gRPC probes call Check; Watch streams see the change when loading ends."""

    def __init__(self, dataplane: DataPlane) -> None:
        super().__init__()
        self.dataplane = dataplane
        self._serving: bool | None = None

    async def refresh(self) -> None:
        serving = self.dataplane.ready()
        if serving != self._serving:
            self._serving = serving
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for service in ("", SERVICE):
                await self.set(service, status)

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> health_pb2.HealthCheckResponse:
        await self.refresh()
        return await super().Check(request, context)

    async def follow_loading(self, repository: ModelRepository, interval: float = 0.1) -> None:
        """Refresh until loading has ended one way or the other (bounded by the load itself)."""
        while repository.discovering or any(entry.state is State.LOADING for entry in repository.entries()):
            await asyncio.sleep(interval)
        await self.refresh()


class GrpcServer:
    """The gRPC listener over a data plane: ``start()`` binds and serves; ``stop()`` refuses new calls and
    lets running ones finish for up to ``config.shutdown_timeout`` seconds. Idempotent; ``begin_stop`` refuses new
    calls at once (the lifecycle calls it at the moment a stop is requested, as REST stops accepting)."""

    def __init__(self, dataplane: DataPlane, config: RuntimeConfig, telemetry: Telemetry | None = None) -> None:
        self.dataplane = dataplane
        self.config = config
        self.telemetry = telemetry or Telemetry()
        self.port = config.grpc_port
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer(dataplane)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Task[None] | None = None
        self._servicer: InferenceServicer | None = None

    async def start(self) -> None:
        config = self.config
        options = [
            ("grpc.max_receive_message_length", config.grpc_max_receive_message_length),
            ("grpc.max_send_message_length", config.grpc_max_send_message_length),
            # Several --workers share the port through SO_REUSEPORT; one process must fail on a busy port.
            ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
        ]
        server = grpc.aio.server(options=options)
        self._servicer = InferenceServicer(self.dataplane, config, self.telemetry)
        handlers = self._servicer.method_handlers()
        # Registered methods are grpc's fast path; the generic handler serves what does not match it (as the
        # generated add_..._to_server does).
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"[{config.host}]:{self.port}" if ":" in config.host else f"{config.host}:{self.port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio raises where older versions returned 0
            raise ServerError(f"cannot listen for gRPC on {address}: {exc}") from None
        if not bound:
            raise ServerError(f"cannot listen for gRPC on {address} (is the port in use?)")
        self.port = bound
        await self._health.refresh()
        await server.start()
        self._server = server
        self._tasks.append(asyncio.create_task(self._health.follow_loading(self.dataplane.repository)))
        logger.info("gRPC (inference.GRPCInferenceService, grpc.health.v1.Health) on %s", address)

    def begin_stop(self) -> None:
        """Refuse new calls from now on; ``stop`` waits for the running ones."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop())

    async def stop(self) -> None:
        self.begin_stop()
        assert self._stopping is not None
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self._health.enter_graceful_shutdown()
        if self._server is not None and self._servicer is not None:
            await self._take_in_arrived(self._servicer)
            # New calls are refused at once; running ones get the grace period, then are cancelled.
            await self._server.stop(self.config.shutdown_timeout)

    async def _take_in_arrived(self, servicer: InferenceServicer) -> None:
        """Let the calls that arrived before the stop reach their handlers, so that they are drained.

        grpc cancels, at ``stop``, the calls it has received but not yet handed to a handler, and a burst of calls
        waits there for the event loop. Handlers take them until none has started for ``_SETTLED`` seconds (the
        calls that arrive meanwhile are served too), for ``_MAX_SETTLE`` seconds at most under a steady stream."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(_MAX_SETTLE, self.config.shutdown_timeout)
        seen = -1
        while servicer.calls_started != seen and loop.time() < deadline:
            seen = servicer.calls_started
            await asyncio.sleep(_SETTLED)
