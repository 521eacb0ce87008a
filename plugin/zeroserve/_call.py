"""One logical call, as the sync and async drivers share it: what is asked (``CallSpec``), the scope it runs in
(``CallScope``: its span, current while it runs, and the sans-I/O flows that decide each step), one physical
request (``Attempt``: its span, its headers, the classification of how it ended), and a wake-up's scope
(``WakeScope``). The drivers in ``zeroserve.client`` only do the I/O in between.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from opentelemetry import context as otel_context

from zeroserve._flow import CallReport, Probe, Send, Sleep, Wake, WakeReport, WakeResult
from zeroserve._outcome import Outcome, classify_error, classify_response
from zeroserve.protocol.start import ACTIVATOR_START_TIMING, INIT_SPAN_HEADER, START_HEADER
from zeroserve.tracing import CallSpans, parse_server_timing

if TYPE_CHECKING:
    from types import TracebackType

    from opentelemetry.context import Context

    from zeroserve._types import Headers

CallStep = Send | Sleep | Wake
CallFlow = Generator[CallStep, Outcome | WakeResult | None, CallReport]
WakeFlow = Generator[Probe | Sleep, Outcome | None, WakeReport]


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

    def with_content(self, content: bytes, headers: Headers) -> CallSpec:
        """The same call with this body (``dataclasses.replace``, without its cost on every inference)."""
        return CallSpec(self.operation, self.method, self.path, content, headers, self.idempotent, self.timeout,
                        self.cold_wait, self.context)


class CallScope:
    """A logical call in progress: its span (attached as the current context while the call runs, so that a
    wake-up it starts is its child), the flows deciding its steps, its report, and the last answer.

    ``with`` ends the span however the call ends; ``begin(spec)`` starts a flow for one request (a call may
    send two: an infer with plain lists first fetches the model's metadata), ``next(reply)`` steps it (None
    when the flow has returned). ``report`` adds up the call's requests; ``part`` is the current request's.
    """

    __slots__ = ("_flow", "_make_flow", "_token", "context", "init_traceparent", "part", "report", "response",
                 "server_timing", "span", "started")

    def __init__(self, spans: CallSpans, spec: CallSpec, started: float,
                 make_flow: Callable[[CallSpec, CallReport, float], CallFlow]) -> None:
        self.span, self.context = spans.start_call(spec.operation, spec.context)
        self.started = started
        self.report = CallReport()
        self.part = self.report
        self.response: httpx.Response | None = None
        self.server_timing: str | None = None
        self.init_traceparent: str | None = None
        self._make_flow = make_flow
        self._flow: CallFlow | None = None
        self._token: object = None

    def __enter__(self) -> CallScope:
        self._token = otel_context.attach(self.context)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._flow is not None:
            self._flow.close()
        if self.part is not self.report:
            self.report.absorb(self.part)
        otel_context.detach(self._token)  # type: ignore[arg-type]
        if self.init_traceparent is not None:
            self.report.init_traceparent = self.init_traceparent
        CallSpans.end_call(self.span, self.report, error, self.server_timing)

    def begin(self, spec: CallSpec) -> None:
        """Start the flow of one request of this call (the first reports straight into ``report``)."""
        if self._flow is not None:
            self._flow.close()
            if self.part is not self.report:
                self.report.absorb(self.part)
            self.part = CallReport()
        self._flow = self._make_flow(spec, self.part, self.started)

    def next(self, reply: Outcome | WakeResult | None) -> CallStep | None:
        """The flow's next step after ``reply`` (None to start it); None once it has returned."""
        assert self._flow is not None
        try:
            return self._flow.send(reply)
        except StopIteration:
            return None

    @property
    def answer(self) -> httpx.Response:
        """The final answer (the flow returns only after one)."""
        assert self.response is not None
        return self.response


class WakeScope:
    """A wake-up in progress: its span (a child of the call that started it) and its flow."""

    __slots__ = ("_flow", "_report", "context", "init_traceparent", "response", "server_timing", "span")

    def __init__(self, spans: CallSpans, flow: WakeFlow) -> None:
        self.span, self.context = spans.start_call("wake", None)
        self.response: httpx.Response | None = None
        self.server_timing: str | None = None
        self.init_traceparent: str | None = None
        self._flow = flow
        self._report: WakeReport | None = None

    def __enter__(self) -> WakeScope:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._flow.close()
        CallSpans.end_wake(self.span, self._report, error, self.init_traceparent)

    def next(self, reply: Outcome | None) -> Probe | Sleep | None:
        """The flow's next step after ``reply`` (None to start it); None once it has returned."""
        try:
            return self._flow.send(reply)
        except StopIteration as done:
            report: WakeReport = done.value
            if not report.cold and self.server_timing is not None and (
                ACTIVATOR_START_TIMING in parse_server_timing(self.server_timing)
            ):  # a quick probe, but an activator held it through a start
                report = dataclasses.replace(report, cold=True)
            self._report = report
            return None

    @property
    def result(self) -> WakeReport:
        """The finished wake-up's report, with the server's init span when an answer named it."""
        report = self._report
        assert report is not None
        if self.init_traceparent is not None:
            report = dataclasses.replace(report, init_traceparent=self.init_traceparent)
        return report


class Attempt:
    """One physical request: its CLIENT span, the headers to send (trace context included), and how it ended."""

    __slots__ = ("address", "headers", "httpx_timeout", "scope", "span", "timeout")

    def __init__(self, spans: CallSpans, spec: CallSpec, url: str, template: str, resend_count: int,
                 timeout: float, connect_timeout: float, scope: CallScope | WakeScope) -> None:
        self.scope = scope
        self.timeout = timeout
        self.address = spans.address
        self.span, carrier = spans.start_attempt(spec.method, url, template, resend_count, scope.context)
        self.headers = dict(spec.headers) if spec.headers else {}
        self.headers.update(carrier)
        self.httpx_timeout = httpx.Timeout(timeout, connect=min(connect_timeout, timeout))

    def answered(self, response: httpx.Response) -> Outcome:
        scope = self.scope
        scope.response = response
        headers = response.headers
        init = headers.get(INIT_SPAN_HEADER)
        if init is not None:
            scope.init_traceparent = init
        outcome = classify_response(response.status_code, headers.get("retry-after"), response.content,
                                    headers.get(START_HEADER) if response.status_code == 503 else None)
        scope.server_timing = timing = headers.get("server-timing")
        CallSpans.end_attempt(self.span, outcome, None, timing)
        return outcome

    def failed(self, error: httpx.RequestError) -> Outcome:
        self.scope.server_timing = None
        outcome = classify_error(error, self.timeout, self.address)
        CallSpans.end_attempt(self.span, outcome, error, None)
        return outcome

    def abandoned(self) -> None:
        """Cancelled or failed outside the transport: the span ends, the error goes on up."""
        self.span.end()
