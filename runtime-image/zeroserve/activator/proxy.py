"""The ASGI app that holds the port: every request is held for capacity on a server process (``scaler``),
forwarded to it, and its answer relayed; when it cannot be, the activator answers itself (``answers``).

- Targets: only origin-form (``/path?query``); the upstream URL is built from the process's host and port
  and the target, so no target can name another host.
- Bodies: streamed to the process, never buffered whole; ``Content-Length`` over the server's
  ``--max_request_mib`` is answered 413 before any process is involved, and a body that grows past it while
  streaming is cut off and answered 413.
- Delivery: a request that never reached a process (the connection was refused: the process just died) is
  sent to the next one, up to ``_TRIES`` processes; a request that was sent and then lost its connection is
  answered 502, because it may have run.
- Hold time: readiness probes (GET/HEAD ``/v2/health/ready``, ``/v2/models/{m}[/versions/{v}]/ready``) are
  held at most ``--probe_hold`` seconds while a process starts, then answered 503 ``loading`` with the
  progress; any request may ask for its own bound with ``Prefer: wait=N`` (RFC 7240). This is a deliberate
  difference from Knative, which holds every request until ready or ``timeoutSeconds``: a caller can see a
  slow start's progress, and a long-polling probe still costs one round trip.
- Headers: hop-by-hop headers are dropped both ways; the process's ``date`` and ``server`` too (the
  activator's own HTTP server writes ``date``); ``Server-Timing: activator;dur=<ms>`` says how long the
  request waited for a process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import httpx

from zeroserve.activator import answers
from zeroserve.activator.answers import Headers
from zeroserve.activator.scaler import Backend, Hold, QueueFull, Scaler, ShuttingDown, StartFailed, StillLoading
from zeroserve.activator.settings import ScaleSettings
from zeroserve.activator.telemetry import ActivatorTelemetry, RequestTrace
from zeroserve.protocol.start import ACTIVATOR_START_TIMING

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger("zeroserve.activator")

_HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization proxy-connection te trailers "
    b"transfer-encoding upgrade".split()
)
_TO_SERVER_DROP = _HOP_BY_HOP | {b"host"}
_FROM_SERVER_DROP = _HOP_BY_HOP | {b"date", b"server"}
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
_READINESS = re.compile(r"^/v2/(health/ready|models/[^/]+(/versions/[^/]+)?/ready)/?$")
_PREFER_WAIT = re.compile(rb"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)
_TRIES = 3  # processes a request that was never delivered is offered to
_BUFFERED = 1 << 20  # answers up to this size are read whole before relaying: a lost connection is then a 502


class ClientGone(Exception):
    pass


class BodyTooLarge(Exception):
    pass


class RequestBody:
    """The request body, pulled from the client only while it is sent on; ``started`` once it was."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.started = False
        self.received = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk: bytes = message.get("body", b"")
            self.received += len(chunk)
            if self.received > self.limit:
                raise BodyTooLarge
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


@dataclass(slots=True)
class _Result:
    status: int = 0  # 0: the client left before an answer
    waited: float = 0.0
    cold: bool = False  # it waited while a process started (its own start, or another request's)
    responded: bool = False


class Activator:
    """The app: lifespan (the scaler's reaper, the shared HTTP client) and the proxy."""

    def __init__(self, scaler: Scaler, settings: ScaleSettings, telemetry: ActivatorTelemetry,
                 address: str = "") -> None:
        self.scaler = scaler
        self.settings = settings
        self.telemetry = telemetry
        self.address = address
        self._client: httpx.AsyncClient | None = None
        self._reaper: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    def drain(self) -> None:
        """Shutting down: held requests are answered now, the start in progress is stopped; requests already
        forwarded finish (the HTTP server waits for them, up to ``--drain_timeout``)."""
        self.scaler.drain()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            try:
                message = await receive()
            except asyncio.CancelledError:
                # A second signal: uvicorn skips the shutdown message and the loop cancels this task, while
                # serve() stops the processes. Nothing is left to do here, and nothing went wrong.
                return
            if message["type"] == "lifespan.startup":
                self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                                 limits=httpx.Limits(max_keepalive_connections=64))
                self._reaper = asyncio.get_running_loop().create_task(self.scaler.run())
                logger.info("holding http://%s; the model server starts on the first request", self.address)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._reaper is not None:
                    self._reaper.cancel()
                await self.scaler.close()
                if self._client is not None:
                    await self._client.aclose()
                await asyncio.to_thread(self.telemetry.shutdown)  # flushing exporters blocks
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.monotonic()
        method: str = scope["method"]
        trace = self.telemetry.request(method, scope["path"], scope["headers"], time.time_ns())
        hold = Hold()
        result = _Result()
        try:
            answer = _refusal(scope, self.settings.max_body_bytes)
            if answer is None:
                answer = await self._forward(scope, receive, send, trace, hold, result)
            if answer is not None:
                if answer.start_state is not None:
                    trace.attributes["zeroserve.start.state"] = answer.start_state
                    reason = answer.body["start"].get("reason")
                    if reason:
                        trace.attributes["zeroserve.start.reason"] = reason
                result.status = answer.status
                headers, body = answer.encode()
                await send({"type": "http.response.start", "status": answer.status,
                            "headers": [*headers, _server_timing(result)]})
                await send({"type": "http.response.body", "body": body})
        except asyncio.CancelledError:
            if not self.scaler.closing:
                raise
            # Stopped at once by a second signal: the loop cancels the requests still in flight and their
            # connections close. That is the stop asked for, not an error of this request.
        finally:
            trace.finish(result.status, result.waited, hold.cold, hold.started, time.monotonic() - arrived, method)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, trace: RequestTrace, hold: Hold,
                       result: _Result) -> answers.Answer | None:
        """Forward the request; None when the process's answer was relayed, else the activator's answer."""
        assert self._client is not None
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        forward_headers = _to_server(headers, trace.forward_headers())
        has_body = any(name in (b"content-length", b"transfer-encoding") for name, _ in headers) and (
            (b"content-length", b"0") not in headers)
        body = RequestBody(receive, self.settings.max_body_bytes)
        probe = scope["method"] in ("GET", "HEAD") and _READINESS.match(scope["path"]) is not None
        patience = _prefer_wait(headers)
        if patience is None and probe:
            patience = self.settings.probe_hold
        target = scope.get("raw_path") or scope["path"].encode("latin-1")
        query: bytes = scope.get("query_string", b"")
        timeout = self.settings.request_timeout
        delivered = False
        detail = ""
        try:
            async with asyncio.timeout(timeout):
                for _ in range(_TRIES):
                    backend = await self._acquire(trace, hold, patience, result)
                    try:
                        url = httpx.URL(scheme="http", host="127.0.0.1", port=backend.port,
                                        raw_path=target + (b"?" + query if query else b""))
                        request = self._client.build_request(scope["method"], url, headers=forward_headers,
                                                             content=body.chunks() if has_body else None)
                        try:
                            response = await self._client.send(request, stream=True)
                        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                            self.scaler.unreachable(backend)
                            detail = f"process {backend.pid} on port {backend.port}: {exc}"
                            if body.started:  # cannot happen before a connection, but never resend a body
                                return answers.not_delivered(detail)
                            continue
                        except httpx.TransportError as exc:
                            delivered = True
                            return answers.connection_lost(backend.pid, str(exc) or type(exc).__name__)
                        delivered = True
                        try:
                            return await self._relay(response, send, backend, result)
                        finally:
                            await response.aclose()
                    finally:
                        self.scaler.release(backend)
                return answers.not_delivered(detail)
        except TimeoutError:
            if result.responded:
                raise
            return answers.request_timeout(timeout, None if delivered else self.scaler.progress() or hold.progress)
        except QueueFull:
            return answers.queue_full()
        except StartFailed as exc:
            return answers.start_failed(exc.state)
        except StillLoading as exc:
            return answers.still_loading(exc.state, readiness=probe)
        except ShuttingDown:
            return answers.shutting_down()
        except BodyTooLarge:
            return answers.too_large(None, self.settings.max_body_bytes)
        except ClientGone:
            return None

    async def _acquire(self, trace: RequestTrace, hold: Hold, patience: float | None, result: _Result) -> Backend:
        began = time.monotonic()
        with trace.waiting():
            hold.trace_carrier = trace.child_environment()
            hold.link = trace.link
            try:
                backend = await self.scaler.acquire(hold, patience)
            finally:
                result.waited += time.monotonic() - began
                result.cold = result.cold or hold.cold
            if hold.cold and not hold.started:
                trace.link_to(backend.started_by)
        return backend

    async def _relay(self, response: httpx.Response, send: Send, backend: Backend,
                     result: _Result) -> answers.Answer | None:
        headers = [(name, value) for name, value in response.headers.raw if name.lower() not in _FROM_SERVER_DROP]
        headers.append(_server_timing(result))
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= _BUFFERED:
            try:
                content = b"".join([chunk async for chunk in response.aiter_raw()])
            except httpx.TransportError as exc:
                return answers.connection_lost(backend.pid, str(exc) or type(exc).__name__)
            result.status, result.responded = response.status_code, True
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": content})
            return None
        result.status, result.responded = response.status_code, True
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        async for chunk in response.aiter_raw():  # a connection lost here ends ours: the status is sent
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return None


def _refusal(scope: Scope, limit: int) -> answers.Answer | None:
    """Requests refused before anything is held or started: a target that is not origin-form, a declared
    body over the limit."""
    target: bytes = scope.get("raw_path") or scope["path"].encode("latin-1")
    if not target.startswith(b"/"):
        return answers.bad_target(target)
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                return answers.bad_length(value)
            if int(value) > limit:
                return answers.too_large(int(value), limit)
    return None


def _to_server(headers: list[tuple[bytes, bytes]], trace_headers: Headers) -> Headers:
    named = {token.strip().lower() for name, value in headers if name == b"connection" for token in value.split(b",")}
    drop = _TO_SERVER_DROP | named | (_TRACE_HEADERS if trace_headers else frozenset())
    return [(name, value) for name, value in headers if name not in drop] + trace_headers


def _prefer_wait(headers: list[tuple[bytes, bytes]]) -> float | None:
    for name, value in headers:
        if name == b"prefer":
            match = _PREFER_WAIT.search(value)
            if match:
                return float(match.group(1))
    return None


def _server_timing(result: _Result) -> tuple[bytes, bytes]:
    """``activator;dur=<ms>`` (the wait for a process), and ``activator.start;dur=<ms>`` too when that wait was for
    a process to start: a client whose probe an activator held through a start knows it met a cold start."""
    timing = f"activator;dur={result.waited * 1000:.1f}"
    if result.cold:
        timing += f", {ACTIVATOR_START_TIMING};dur={result.waited * 1000:.1f}"
    return b"server-timing", timing.encode()
