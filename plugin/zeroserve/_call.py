"""One logical call, as the sync and async drivers share it: what is asked (``CallSpec``), the scope it runs in
(``CallScope``: its span, current while it runs, and the sans-I/O flows that decide each step), one physical
request (``Attempt``: its span, its headers, the classification of how it ended), and a wake-up's scope
(``WakeScope``). The drivers in ``zeroserve.client`` only do the I/O in between.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import httpx
from opentelemetry import context as otel_context

from zeroserve import _flow
from zeroserve._flow import CallReport, Kind, Outcome, Probe, Send, Sleep, Wake, WakeReport, WakeResult
from zeroserve.tracing import CallSpans

if TYPE_CHECKING:
    from types import TracebackType

    from opentelemetry.context import Context

    from zeroserve._types import Headers

CallStep = Send | Sleep | Wake
CallFlow = Generator[CallStep, Outcome | WakeResult | None, CallReport]
WakeFlow = Generator[Probe | Sleep, Outcome | None, WakeReport]
S = TypeVar("S")
R = TypeVar("R")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class CallSpec:
    """What one logical call sends and how it may be handled.

    Args:
        operation: the call's name on its span (``infer``, ``metadata``, ``request``, ``wake``).
        method, path, content, headers: the request (``path`` below the service URL, starting ``/v2/``).
        idempotent: may be resent after it may have run (None: GET and HEAD may, others per the policy).
        timeout: this call's deadline in seconds (None: the retry policy's).
        cold_wait: the longest this call waits for a cold start (None: up to the cold-start deadline).
        context: the OpenTelemetry context to parent the call's span (None: the current one).
    """

    operation: str
    method: str
    path: str
    content: bytes | None = None
    headers: Headers | None = None
    idempotent: bool | None = None
    timeout: float | None = None
    cold_wait: float | None = None
    context: Context | None = None


class _Steps(Generic[S, R, V]):
    """Steps a generator flow one reply at a time; ``next`` returns None once it has returned."""

    __slots__ = ("flow", "value")

    def __init__(self, flow: Generator[S, R, V]) -> None:
        self.flow = flow
        self.value: V | None = None

    def next(self, reply: R | None) -> S | None:
        try:
            return self.flow.send(reply)  # type: ignore[arg-type]  # None starts a fresh generator
        except StopIteration as done:
            self.value = done.value
            return None


class CallScope:
    """A logical call in progress: its span (attached as the current context while the call runs, so that a
    wake-up it starts is its child), the flow deciding its steps, its report, and the last answer.

    ``with`` ends the span however the call ends; ``begin(spec)`` starts a flow for one request, and
    ``next(reply)`` steps it (None when the flow has returned).
    """

    __slots__ = ("_make_flow", "_steps", "_token", "context", "report", "response", "span", "spans")

    def __init__(self, spans: CallSpans, spec: CallSpec,
                 make_flow: Callable[[CallSpec, CallReport], CallFlow]) -> None:
        self.spans = spans
        self.span, self.context = spans.start_call(spec.operation, spec.context)
        self.report = CallReport()
        self.response: httpx.Response | None = None
        self._make_flow = make_flow
        self._steps: _Steps[CallStep, Outcome | WakeResult, CallReport] | None = None
        self._token: object = None

    def __enter__(self) -> CallScope:
        self._token = otel_context.attach(self.context)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._steps is not None:
            self._steps.flow.close()
        otel_context.detach(self._token)  # type: ignore[arg-type]
        timing = self.response.headers.get("server-timing") if self.response is not None else None
        CallSpans.end_call(self.span, self.report, error, timing)

    def begin(self, spec: CallSpec) -> None:
        self._steps = _Steps(self._make_flow(spec, self.report))

    def next(self, reply: Outcome | WakeResult | None) -> CallStep | None:
        assert self._steps is not None
        return self._steps.next(reply)

    @property
    def answer(self) -> httpx.Response:
        """The final answer (the flow returns only after one)."""
        assert self.response is not None
        return self.response


class WakeScope:
    """A wake-up in progress: its span (a child of the call that started it) and its flow."""

    __slots__ = ("_steps", "context", "response", "span")

    def __init__(self, spans: CallSpans, flow: WakeFlow) -> None:
        self.span, self.context = spans.start_call("wake", None)
        self.response: httpx.Response | None = None
        self._steps: _Steps[Probe | Sleep, Outcome, WakeReport] = _Steps(flow)

    def __enter__(self) -> WakeScope:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._steps.flow.close()
        CallSpans.end_wake(self.span, self._steps.value, error)

    def next(self, reply: Outcome | None) -> Probe | Sleep | None:
        return self._steps.next(reply)

    @property
    def result(self) -> WakeReport:
        assert self._steps.value is not None
        return self._steps.value


class Attempt:
    """One physical request: its CLIENT span, the headers to send (trace context included), and how it ended."""

    __slots__ = ("headers", "httpx_timeout", "scope", "span", "timeout")

    def __init__(self, spans: CallSpans, spec: CallSpec, url: str, template: str, resend_count: int,
                 timeout: float, connect_timeout: float, scope: CallScope | WakeScope) -> None:
        self.scope = scope
        self.timeout = timeout
        self.span, carrier = spans.start_attempt(spec.method, url, template, resend_count, scope.context)
        self.headers = dict(spec.headers) if spec.headers else {}
        self.headers.update(carrier)
        self.httpx_timeout = httpx.Timeout(timeout, connect=min(connect_timeout, timeout))

    def answered(self, response: httpx.Response) -> Outcome:
        self.scope.response = response
        outcome = classify(response)
        CallSpans.end_attempt(self.span, outcome, None, response.headers.get("server-timing"))
        return outcome

    def failed(self, error: httpx.RequestError) -> Outcome:
        outcome = outcome_of_error(error, self.timeout)
        CallSpans.end_attempt(self.span, outcome, error, None)
        return outcome

    def abandoned(self) -> None:
        """Cancelled or failed outside the transport: the span ends, the error goes on up."""
        self.span.end()


def classify(response: httpx.Response) -> Outcome:
    return _flow.classify_response(response.status_code, response.headers.get("retry-after"), response.content)


def outcome_of_error(exc: Exception, timeout: float) -> Outcome:
    """Classify a transport error: was the request sent, and is it a sign of a cold start."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return Outcome(Kind.NOT_SENT, cold=True, reason=f"could not connect ({detail})")
    if isinstance(exc, httpx.PoolTimeout):
        return Outcome(Kind.NOT_SENT, reason="no free connection in the client's pool")
    if isinstance(exc, (httpx.WriteError, httpx.WriteTimeout)):
        # The body did not all leave, and a V2 server reads the whole body before it runs anything.
        return Outcome(Kind.NOT_SENT, reason=f"the request could not be written ({detail})")
    if isinstance(exc, httpx.ReadTimeout):
        return Outcome(Kind.MAYBE, reason=f"no answer within {timeout:.1f} s")
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return Outcome(Kind.MAYBE, reason=f"the connection broke before an answer ({detail})")
    return Outcome(Kind.MAYBE, reason=f"{type(exc).__name__}: {detail}")
