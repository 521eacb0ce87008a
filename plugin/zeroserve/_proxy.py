"""What a mounted model route does, whatever the web framework: the paths it serves, the headers that
may cross it in each direction, and how a failed call becomes an HTTP answer.

Under its prefix a mounted route serves:

- ``GET  {prefix}``                 the route's view of the model service (state, breaker)
- ``POST {prefix}``                 convenience JSON: ``{"input": [[...]]}`` -> ``{"output": [[...]]}``
- ``GET  {prefix}/v2/models/{m}[/versions/{v}]``         proxied V2 metadata
- ``GET  {prefix}/v2/models/{m}[/versions/{v}]/ready``   proxied V2 readiness
- ``POST {prefix}/v2/models/{m}[/versions/{v}]/infer``   proxied V2 inference, binary bodies untouched

so that any V2 client pointed at ``http(s)://host{prefix}`` works against the remote model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote

from zeroserve.errors import (
    DeadlineExceeded,
    OutcomeUnknown,
    RemoteModelError,
    RequestRejected,
    Unavailable,
    Unreachable,
)
from zeroserve.protocol.start import START_HEADER, retry_after_value
from zeroserve.tracing import incoming_context

if TYPE_CHECKING:
    import httpx
    from opentelemetry.context import Context

    from zeroserve._model import _BaseRemoteModel
    from zeroserve._types import WhenCold

MAX_BODY_BYTES = 64 * 2**20

# Sent on to the model service. Everything else stays in the host app: above all its cookies and
# Authorization, which belong to the app's users, not to the model service.
FORWARDED_REQUEST_HEADERS = frozenset({"content-type", "content-encoding", "inference-header-content-length", "accept"})
# Never forwarded, even when allow-listed: hop-by-hop headers, and the trace context, which goes out
# through OpenTelemetry propagation (continued from the incoming request, with this hop's span).
_NEVER_FORWARDED = frozenset({
    "host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-authorization", "proxy-connection", "expect", "traceparent", "tracestate", "baggage",
})
# Sent back to the caller. The body is already decoded by the client, so no Content-Encoding, and a
# model service has no business setting cookies on the host app's domain.
RETURNED_HEADERS = frozenset({"content-type", "inference-header-content-length", "retry-after", "server-timing",
                              START_HEADER})


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer for the framework adapter to send."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Target:
    """What a request under the prefix asks for: ``status``, ``predict``, or a proxied ``v2`` path."""

    kind: Literal["status", "predict", "v2"]
    path: str = ""


@dataclass(frozen=True, slots=True)
class ModelCall:
    """What one proxied request asks of the model client, and how the result becomes the answer.

    ``inputs`` set: ``model.infer(inputs, cold_wait=, context=)`` (the convenience JSON route); else
    ``model.request(method, path, content=, headers=, cold_wait=, context=)``.
    """

    method: str
    path: str
    content: bytes | None
    headers: dict[str, str]
    cold_wait: float | None
    context: Context | None
    inputs: dict[str, Any] | None = None

    def answer(self, result: Mapping[str, Any] | httpx.Response) -> Answer:
        if isinstance(result, Mapping):
            return predict_answer(result)
        return upstream_answer(result)

    def failed(self, error: Exception) -> Answer:
        """The answer for a failed call; errors that are no failure of the call itself go on up."""
        if isinstance(error, RemoteModelError):
            return error_answer(error)
        if isinstance(error, ValueError) and self.inputs is not None:  # inputs the codec cannot encode
            return json_answer(400, {"error": str(error)})
        raise error


class Forwarding:
    """What a mounted route does with a request under its prefix, whatever the framework: the Starlette route
    and the Flask extension differ only in how they read the request and await the model.

    Args:
        when_cold: ``"hold"`` or ``"reject"`` (see ``zeroserve._types.WhenCold``).
        cold_grace: seconds a request may wait for a wake-up in ``"reject"`` mode.
        forward_headers: request headers to forward besides the protocol's own.
        max_body_bytes: larger request bodies are answered 413.
    """

    def __init__(self, *, when_cold: WhenCold = "hold", cold_grace: float = 0.5, forward_headers: Iterable[str] = (),
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        if when_cold not in ("hold", "reject"):
            raise ValueError(f"when_cold must be 'hold' or 'reject', got {when_cold!r}")
        if not cold_grace >= 0:
            raise ValueError(f"cold_grace must not be negative, got {cold_grace}")
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.when_cold: WhenCold = when_cold
        self.cold_grace = cold_grace
        self.headers = HeaderPolicy(forward_headers)
        self.max_body_bytes = max_body_bytes

    def too_large(self, length: int | None) -> Answer | None:
        """The 413 answer when a body of ``length`` bytes is over the limit."""
        return too_large(self.max_body_bytes) if length is not None and length > self.max_body_bytes else None

    def call(self, target: Target, method: str, query: str, headers: Iterable[tuple[str, str]],
             body: bytes) -> ModelCall | Answer:
        """What to ask of the model for a ``predict`` or ``v2`` target (or the answer when the body is wrong)."""
        headers = list(headers)
        cold_wait = self.cold_grace if self.when_cold == "reject" else None
        context = incoming_context({name.lower(): value for name, value in headers})
        if target.kind == "predict":
            inputs = predict_inputs(body)
            if isinstance(inputs, Answer):
                return inputs
            return ModelCall("POST", "", None, {}, cold_wait, context, inputs)
        path = target.path + (f"?{query}" if query else "")
        return ModelCall(method, path, body or None, self.headers.outgoing(headers), cold_wait, context)


def check_prefix(prefix: str) -> None:
    """A mount prefix looks like ``/predict``: a leading slash, none at the end."""
    if not prefix.startswith("/") or prefix == "/" or prefix.endswith("/"):
        raise ValueError(f"prefix must look like '/predict' (a leading slash, none at the end), got {prefix!r}")


class HeaderPolicy:
    """Which incoming request headers go on to the model service.

    Args:
        forward_headers: header names to forward on top of the protocol's own (e.g. ``"x-request-id"``,
            or ``"authorization"`` when the model service shares the app's users).
    """

    def __init__(self, forward_headers: Iterable[str] = ()) -> None:
        extra = {name.lower() for name in forward_headers}
        self.allowed = (FORWARDED_REQUEST_HEADERS | extra) - _NEVER_FORWARDED

    def outgoing(self, headers: Iterable[tuple[str, str]]) -> dict[str, str]:
        return {name: value for name, value in headers if name.lower() in self.allowed}


def resolve(method: str, path: str, model: str) -> Target | Answer:
    """The target of ``method path`` (path relative to the prefix), or the error answer for it."""
    if path in ("", "/"):
        if method == "GET":
            return Target("status")
        if method == "POST":
            return Target("predict")
        return _not_allowed(method, "GET, POST")
    parts = path.split("/")
    # "", "v2", "models", name, [ "versions", v ], [ "ready" | "infer" ]
    if len(parts) < 4 or parts[0] or parts[1] != "v2" or parts[2] != "models" or not parts[3]:
        return json_answer(404, {"error": f"no such endpoint: {method} {path}"})
    name = unquote(parts[3])
    rest = parts[4:]
    if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
        rest = rest[2:]
    if len(rest) > 1 or (rest and rest[0] not in ("ready", "infer")):
        return json_answer(404, {"error": f"no such endpoint: {method} {path}"})
    if name != model:
        return json_answer(404, {"error": f"model '{name}' is not served here; this route serves '{model}'"})
    allowed = "POST" if rest == ["infer"] else "GET"
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        return _not_allowed(method, allowed)
    return Target("v2", path)


def json_answer(status: int, content: Any, headers: Mapping[str, str] | None = None) -> Answer:
    body = json.dumps(content, separators=(",", ":")).encode()
    return Answer(status, body, {"content-type": "application/json", **(headers or {})})


def upstream_answer(response: httpx.Response) -> Answer:
    """The model service's answer, passed through: status, body bytes as they came, the headers that matter."""
    headers = {name: value for name, value in response.headers.items() if name in RETURNED_HEADERS}
    return Answer(response.status_code, response.content, headers)


def error_answer(error: RemoteModelError) -> Answer:
    """The answer for a failed call, in the V2 error shape (the message only: no internal URLs).

    A 503 about the service's start (it failed, or it is still starting and the route would not wait) passes
    the marker on: ``Zeroserve-Start`` and the body's ``start`` object, so the host app's caller sees the cause.
    """
    headers: dict[str, str] = {}
    content: dict[str, Any] = {"error": error.message}
    if isinstance(error, Unreachable):
        status = 502  # the route could not reach the model service at all
    elif isinstance(error, Unavailable):
        status = 503
        if error.retry_after is not None:
            headers["retry-after"] = retry_after_value(error.retry_after)
        if error.start is not None:
            headers[START_HEADER] = error.start.state
            content["start"] = error.start.to_json()
    elif isinstance(error, DeadlineExceeded):
        status = 504
    elif isinstance(error, OutcomeUnknown):
        status = 504 if error.last_status == 504 else 502
    elif isinstance(error, RequestRejected) and error.last_status is not None:
        status = error.last_status
    else:
        status = 502
    return json_answer(status, content, headers)


def status_answer(model: _BaseRemoteModel, waking: bool) -> Answer:
    now = time.monotonic()
    return json_answer(200, {
        "model": model.model,
        "state": "waking" if waking else model.state.describe(now, model.cold_start.probe_after_idle),
        "circuit": model.state.circuit.state(now),
    })


def predict_inputs(body: bytes) -> dict[str, Any] | Answer:
    """The inputs of a convenience JSON request (``{"name": nested list, ...}``), or the 400 answer."""
    try:
        inputs = json.loads(body)
    except ValueError as exc:
        return json_answer(400, {"error": f"request body is not valid JSON: {exc}"})
    if not isinstance(inputs, dict) or not inputs:
        return json_answer(400, {"error": 'send a JSON object of input name -> nested list, e.g. {"input": [[1, 2]]}'})
    return inputs


def predict_answer(outputs: Mapping[str, Any]) -> Answer:
    from zeroserve.protocol.client_codec import to_json_outputs

    return json_answer(200, to_json_outputs(outputs))


def too_large(limit: int) -> Answer:
    return json_answer(413, {"error": f"request body is over the limit of {limit} bytes"})


def _not_allowed(method: str, allowed: str) -> Answer:
    return json_answer(405, {"error": f"method {method} is not allowed here"}, {"allow": allowed})
