"""POST /v2/models/{m}[/versions/{v}]/infer on raw ASGI.

Inference is the hot path, so it skips Starlette's request object, route table and middleware layers:
``InferFastPath`` recognises the two infer paths by hand (``infer_target``) and calls ``InferEndpoint.handle``;
everything else (health, metadata, lifespan) goes to the Starlette app behind it. The same handler is the
Starlette route's endpoint too, so there is one implementation of the endpoint.
"""

from __future__ import annotations

import logging
import zlib
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.types import Message, Receive, Scope, Send

from zeroserve.protocol.binary import HEADER_LENGTH
from zeroserve.runtime import cloudevents, rest_codec
from zeroserve.runtime.dataplane import DataPlane, Holding
from zeroserve.runtime.invocation import Invocation
from zeroserve.runtime.messages import InferRequest
from zeroserve.runtime.server_errors import InvalidInput, PayloadTooLarge, ServerError
from zeroserve.runtime.settings import EventSettings, Limits
from zeroserve.runtime.telemetry import Telemetry, set_result
from zeroserve.runtime.tensors import encode_is_heavy

if TYPE_CHECKING:
    from opentelemetry.trace import Span

logger = logging.getLogger("zeroserve.runtime")

_PREFIX = "/v2/models/"
_SUFFIX = "/infer"
_HEADER_LENGTH = HEADER_LENGTH.encode()
# Deflate inflates at most about 1000:1, so a compressed body this small inflates in a few ms on the event loop.
_INFLATE_ON_LOOP_BYTES = 16 * 1024
_INFLATE_PIECE_BYTES = 16 * 1024 * 1024
# Infer paths remembered parsed: a server's clients use a few; clients that invent paths cannot grow it past this.
_KNOWN_TARGETS = 256


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class InferFastPath:
    """The server's ASGI app: inference POSTs straight to the endpoint, everything else to ``fallback``."""

    def __init__(self, endpoint: InferEndpoint, fallback: Starlette) -> None:
        self.endpoint = endpoint
        self.fallback = fallback
        self._targets: dict[str, tuple[str, str | None]] = {}  # infer paths seen, parsed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            target = self._targets.get(path)
            if target is None:
                target = infer_target(path)
                if target is not None and len(self._targets) < _KNOWN_TARGETS:
                    self._targets[path] = target
            if target is not None:
                await self.endpoint.handle(scope, receive, send, *target)
                return
        await self.fallback(scope, receive, send)


class InferEndpoint:
    def __init__(
        self,
        dataplane: DataPlane,
        limits: Limits,
        telemetry: Telemetry | None = None,
        events: EventSettings | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.limits = limits
        self.telemetry = telemetry or Telemetry()
        self.events = events or EventSettings()

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
        invocation = Invocation(self.dataplane, self.telemetry, "rest", span, set_result)
        headers = dict(scope["headers"])
        request: InferRequest | None = None
        held: Holding | None = None  # the request's bytes count against the budget until answered
        try:
            try:
                declared = _declared_length(headers, self.limits.max_body_bytes)
                held = self.dataplane.admit(declared or 0, arriving=True)  # before the body is read
                message: Message = await receive()
                if declared is not None and not message.get("more_body", False) and message["type"] == "http.request":
                    body: bytes = message.get("body", b"")  # all of it, its declared length checked against the limit
                else:
                    body = await self._read_body(message, receive, held if declared is None else None)
                held.arrived()
                encoding = headers.get(b"content-encoding")
                if encoding:
                    body = await _inflate(body, encoding.decode("latin-1").strip().lower(), self.limits.max_body_bytes,
                                          held, invocation)
                raw_length = headers.get(_HEADER_LENGTH)
                header_length = raw_length.decode("latin-1") if raw_length is not None else None
                event = cloudevents.read_event(headers, body)
                if event is not None:
                    body, header_length = event.data, event.header_length
                    if span is not None:
                        span.set_attributes(cloudevents.span_attributes(event))
                if rest_codec.decode_is_heavy(body, header_length):
                    request = await invocation.off_loop(rest_codec.decode_request, body, header_length, self.limits)
                else:
                    request = invocation.here(rest_codec.decode_request, body, header_length, self.limits)
                if event is not None and event.mode == "structured" and rest_codec.asks_binary_outputs(request):
                    raise InvalidInput(
                        "a structured CloudEvent carries JSON only: ask for JSON outputs, or send a binary-mode event"
                    )
                result = await self.dataplane.infer(name, version, request, rest=True)
                if encode_is_heavy(result):
                    content, response_headers = await invocation.off_loop(rest_codec.encode_result, result, request)
                else:
                    content, response_headers = invocation.here(rest_codec.encode_result, result, request)
                if event is not None:
                    content, response_headers = cloudevents.answer(
                        event, self.events, result.model_name, content, response_headers
                    )
                response_headers.update(invocation.answered(result))
                status = 200
            except ServerError as exc:
                status, response_headers, content = rest_codec.encode_error(exc)
                response_headers.update(
                    invocation.failed(status, name, version, request.id if request is not None else None)
                )
            except ClientGone:
                return  # nobody is listening
            except Exception:
                logger.exception("unexpected error in inference for model '%s'", name)
                status, response_headers, content = rest_codec.encode_error(ServerError("internal server error"))
                response_headers.update(invocation.failed(status, name, version, None))
            raw_headers = [(key.encode(), value.encode()) for key, value in response_headers.items()]
            raw_headers.append((b"content-length", str(len(content)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": raw_headers})
            await send({"type": "http.response.body", "body": content})
        finally:
            if held is not None:
                held.release()

    async def _read_body(self, message: Message, receive: Receive, growing: Holding | None) -> bytes:
        """The whole body from its first message on, within ``--max_request_mib``; ``growing`` holds the bytes of a
        body of unknown length as they arrive (refused with 503 once the budget is passed)."""
        limit = self.limits.max_body_bytes
        if message["type"] == "http.disconnect":
            raise ClientGone
        body: bytes = message.get("body", b"")
        if growing is not None:
            growing.grow(len(body))
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
                if growing is not None:
                    growing.grow(len(chunk))
                chunks.append(chunk)
            body = b"".join(chunks)
        elif len(body) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        return body


def _declared_length(headers: dict[bytes, bytes], limit: int) -> int | None:
    """The body's Content-Length, checked against ``--max_request_mib``; None when the body is chunked."""
    declared = headers.get(b"content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise InvalidInput(f"Content-Length must be a number, got {declared.decode('latin-1')!r}")
    length = int(declared)
    if length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit} bytes")
    return length


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


async def _inflate(body: bytes, encoding: str, limit: int, held: Holding, invocation: Invocation) -> bytes:
    """A gzip/deflate request body (tritonclient can send them), bounded like plain bodies.

    A small body can inflate a thousandfold, so it is inflated a piece at a time: each piece counts against the
    in-flight budget as it comes (a bomb is refused 413 or 503 once past the limit, not after), and the pieces of a
    body that can inflate for long are inflated off the event loop (zlib lets go of the GIL)."""
    if encoding == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    decompressor = zlib.decompressobj(wbits)
    off_loop = len(body) > _INFLATE_ON_LOOP_BYTES
    pieces: list[bytes] = []
    total = 0
    data = body
    while True:
        asked = min(_INFLATE_PIECE_BYTES, limit + 1 - total)
        try:
            if off_loop:
                piece: bytes = await invocation.off_loop(decompressor.decompress, data, asked)
            else:
                piece = invocation.here(decompressor.decompress, data, asked)
        except zlib.error as exc:
            raise InvalidInput(f"request body is not valid {encoding}: {exc}") from None
        total += len(piece)
        if total > limit:
            raise PayloadTooLarge(f"decompressed request body is over the limit of {limit} bytes")
        held.grow(len(piece))
        pieces.append(piece)
        data = decompressor.unconsumed_tail
        # Done at the stream's end; out of input with less than asked means nothing more will come.
        if decompressor.eof or (not data and len(piece) < asked):
            break
    if not decompressor.eof:
        raise InvalidInput(f"request body is truncated {encoding} data")
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)
