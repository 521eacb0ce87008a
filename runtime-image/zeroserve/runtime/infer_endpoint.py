"""POST /v2/models/{m}[/versions/{v}]/infer on raw ASGI.

Inference is the hot path, so it skips Starlette's request object, route table and middleware
layers: the server app recognises the two infer paths by hand (``infer_target``) and calls
``handle``; everything else (health, metadata, lifespan) goes through Starlette. The same handler
is the Starlette route's endpoint too, so there is one implementation of the endpoint.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import TYPE_CHECKING

from starlette.types import Message, Receive, Scope, Send

from zeroserve.protocol.binary import HEADER_LENGTH
from zeroserve.runtime import rest_codec
from zeroserve.runtime.dataplane import DataPlane
from zeroserve.runtime.messages import InferResult
from zeroserve.runtime.rest import error_body
from zeroserve.runtime.server_errors import InvalidInput, PayloadTooLarge, ServerError
from zeroserve.runtime.settings import Limits
from zeroserve.runtime.telemetry import Telemetry, set_result

if TYPE_CHECKING:
    from opentelemetry.trace import Span

logger = logging.getLogger("zeroserve.runtime")

_PREFIX = "/v2/models/"
_SUFFIX = "/infer"
_HEADER_LENGTH = HEADER_LENGTH.encode()


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class InferEndpoint:
    def __init__(self, dataplane: DataPlane, limits: Limits, telemetry: Telemetry | None = None) -> None:
        self.dataplane = dataplane
        self.limits = limits
        self.telemetry = telemetry or Telemetry()
        # A second turn of the loop before a short run while others are in flight (DataPlane.infer): on uvloop,
        # which the app's lifespan finds out.
        self.extra_turn = False

    async def route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The endpoint of the Starlette route (reached when the app runs without the front)."""
        params = scope["path_params"]
        await self.handle(scope, receive, send, params["model_name"], params.get("model_version"))

    async def handle(self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None) -> None:
        if not self.telemetry.enabled:
            await self._handle(scope, receive, send, name, version, None)
            return
        with self.telemetry.infer_span(scope["headers"], scope["path"], version is not None) as span:
            await self._handle(scope, receive, send, name, version, span)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None, span: Span | None
    ) -> None:
        received = time.perf_counter()
        headers = dict(scope["headers"])
        result: InferResult | None = None
        try:
            body = await self._read_counted(headers, receive)
            header_length = headers.get(_HEADER_LENGTH)
            request = rest_codec.decode_request(
                body, header_length.decode("latin-1") if header_length is not None else None, self.limits
            )
            result = await self.dataplane.infer(name, version, request, extra_turn=self.extra_turn)
            content, response_headers = rest_codec.encode_result(result, request)
            response_headers["server-timing"] = self.dataplane.server_timing(result)
            status = 200
        except ServerError as exc:
            status, response_headers, content = error_body(exc)
        except ClientGone:
            return  # nobody is listening
        except Exception:
            logger.exception("unexpected error in inference for model '%s'", name)
            status, response_headers, content = error_body(ServerError("internal server error"))
        if span is not None:
            set_result(span, status, result.coldstart if result else False, result.id if result else None)
        self.dataplane.observe(name, version, result, status, time.perf_counter() - received, "rest")
        raw_headers = [(key.encode(), value.encode()) for key, value in response_headers.items()]
        raw_headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": content})

    async def _read_counted(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        # Counted while the body arrives: the data plane must see this request as in flight already.
        self.dataplane.receiving += 1
        try:
            return await self._read_body(headers, receive)
        finally:
            self.dataplane.receiving -= 1

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidInput(f"Content-Length must be a number, got {declared.decode('latin-1')!r}")
            if int(declared) > limit:
                raise PayloadTooLarge(f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body: bytes = message.get("body", b"")
        if message.get("more_body", False):
            chunks = [body]
            received = len(body)
            while message.get("more_body", False):
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
                chunks.append(chunk)
            body = b"".join(chunks)
        elif len(body) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        encoding = headers.get(b"content-encoding")
        if encoding:
            body = _decompress(body, encoding.decode("latin-1").strip().lower(), limit)
        return body


def infer_target(path: str) -> tuple[str, str | None] | None:
    """(model, version) for ``/v2/models/{m}/infer`` and ``/v2/models/{m}/versions/{v}/infer``."""
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    parts = path[len(_PREFIX) : -len(_SUFFIX)].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """gzip/deflate request bodies (tritonclient can send them), bounded like plain bodies."""
    if encoding == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    decompressor = zlib.decompressobj(wbits)
    try:
        out = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding}: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"decompressed request body is over the limit of {limit} bytes")
    if not decompressor.eof:
        raise InvalidInput(f"request body is truncated {encoding} data")
    return out
