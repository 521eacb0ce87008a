"""OpenTelemetry for remote model calls, on the API only: the application chooses and configures the SDK.

Each logical call (``infer``, ``metadata``, a proxied request) is one INTERNAL span; each physical
request under it, every resend and every wake-up probe, is its own CLIENT span, as the HTTP client
conventions ask ("every physical attempt is its own span"). Spans carry:

- CLIENT (per attempt): ``http.request.method``, ``url.full``, ``server.address``, ``server.port``,
  ``http.response.status_code``, ``error.type``, ``http.request.resend_count`` (on resends: 1, 2, ...),
  and the FaaS client attributes ``faas.invoked_name`` and ``faas.invoked_provider``.
- INTERNAL (per call): the FaaS client attributes, ``zeroserve.model``, ``zeroserve.attempts``,
  ``zeroserve.coldstart`` (a cold start was met), ``zeroserve.coldstart.wait_duration`` (seconds spent
  waiting for the wake-up) and, when the server sent a ``Server-Timing`` header with an ``init`` metric,
  ``zeroserve.coldstart.server_init_duration`` (seconds).
- INTERNAL (per wake-up, a child of the call that started it): ``zeroserve.wake.probes``,
  ``zeroserve.coldstart``, ``zeroserve.coldstart.wait_duration``.

When an answer names the server's ``zeroserve.init`` span (header ``zeroserve-init-traceparent``: the server
started in another trace, e.g. a Knative pod no request started), the call's span (or the wake-up's) gets a
span link to it, with ``zeroserve.link=init``.

W3C ``traceparent``/``tracestate``/``baggage`` go out on every attempt through the global propagator.
With no SDK installed the spans are no-ops and an incoming trace context still passes through.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from zeroserve._version import version
from zeroserve.errors import RemoteModelError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, TracerProvider

    from zeroserve._flow import CallReport, WakeReport
    from zeroserve._outcome import Outcome

HTTP_REQUEST_METHOD = "http.request.method"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
HTTP_REQUEST_RESEND_COUNT = "http.request.resend_count"
URL_FULL = "url.full"
URL_TEMPLATE = "url.template"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
FAAS_INVOKED_NAME = "faas.invoked_name"
FAAS_INVOKED_PROVIDER = "faas.invoked_provider"
MODEL = "zeroserve.model"
ATTEMPTS = "zeroserve.attempts"
COLDSTART = "zeroserve.coldstart"
COLDSTART_WAIT = "zeroserve.coldstart.wait_duration"
COLDSTART_SERVER_INIT = "zeroserve.coldstart.server_init_duration"
COLDSTART_MODEL_LOAD = "zeroserve.coldstart.model_load_duration"
WAKE_PROBES = "zeroserve.wake.probes"
LINK = "zeroserve.link"
SERVER_TIMING_PREFIX = "zeroserve.server_timing."


class CallSpans:
    """The spans of one remote model's calls (its name, provider and address are on every span). Not the
    server's ``zeroserve.runtime.telemetry.Telemetry``, which records the server's own spans and metrics."""

    def __init__(
        self,
        *,
        model: str,
        invoked_name: str,
        provider: str,
        address: str,
        port: int,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.model = model
        self.address = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"  # for messages
        self.tracer = trace.get_tracer("zeroserve", version(), tracer_provider=tracer_provider)
        self.common: dict[str, str | int] = {
            FAAS_INVOKED_NAME: invoked_name,
            FAAS_INVOKED_PROVIDER: provider,
            SERVER_ADDRESS: address,
            SERVER_PORT: port,
        }

    def start_call(self, operation: str, parent: Context | None) -> tuple[Span, Context]:
        """The INTERNAL span of one logical call and the context its attempts hang under."""
        span = self.tracer.start_span(
            f"zeroserve {operation} {self.model}",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes={MODEL: self.model, **self.common},
        )
        if not span.get_span_context().is_valid:  # older APIs (1.25) answer no-op spans so: keep the parent
            return span, parent if parent is not None else otel_context.get_current()
        return span, trace.set_span_in_context(span, parent)

    def start_attempt(
        self, method: str, url: str, template: str, resend_count: int, context: Context
    ) -> tuple[Span, dict[str, str]]:
        """A CLIENT span for one physical request, and the trace headers to send with it."""
        attributes: dict[str, str | int] = {HTTP_REQUEST_METHOD: method, URL_FULL: url, URL_TEMPLATE: template,
                                            **self.common}
        if resend_count:
            attributes[HTTP_REQUEST_RESEND_COUNT] = resend_count
        span = self.tracer.start_span(f"{method} {template}", context=context, kind=SpanKind.CLIENT,
                                      attributes=attributes)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span, context)
                         if span.get_span_context().is_valid else context)
        return span, carrier

    @staticmethod
    def end_attempt(span: Span, outcome: Outcome, error: BaseException | None, server_timing: str | None) -> None:
        if span.is_recording():
            if outcome.status is not None:
                span.set_attribute(HTTP_RESPONSE_STATUS_CODE, outcome.status)
            failed = outcome.status is None or outcome.status >= 400
            if failed:
                error_type = type(error).__name__ if error is not None else str(outcome.status)
                span.set_attribute(ERROR_TYPE, error_type)
                span.set_status(Status(StatusCode.ERROR, outcome.reason or None))
            if server_timing:
                for name, seconds in parse_server_timing(server_timing).items():
                    span.set_attribute(SERVER_TIMING_PREFIX + name, seconds)
        span.end()

    @staticmethod
    def end_call(span: Span, report: CallReport, error: BaseException | None, server_timing: str | None) -> None:
        if span.is_recording():
            timings = parse_server_timing(server_timing) if server_timing else {}
            init = server_init_seconds(timings)
            load = timings.get("load")  # a server loading models on demand loaded this one for the call
            span.set_attribute(ATTEMPTS, report.attempts)
            span.set_attribute(COLDSTART, report.cold_start or init is not None or load is not None)
            if load is not None:
                span.set_attribute(COLDSTART_MODEL_LOAD, load)
            if report.woke:
                span.set_attribute(COLDSTART_WAIT, report.cold_wait)
            if init is not None:
                span.set_attribute(COLDSTART_SERVER_INIT, init)
            if error is not None:
                span.set_attribute(ERROR_TYPE, type(error).__name__)
                span.set_status(Status(StatusCode.ERROR, str(error)))
            if report.init_traceparent is not None:
                link_init(span, report.init_traceparent)
        span.end()

    @staticmethod
    def end_wake(span: Span, report: WakeReport | None, error: BaseException | None,
                 init_traceparent: str | None = None) -> None:
        if span.is_recording():
            if report is not None:
                span.set_attribute(WAKE_PROBES, report.probes)
                span.set_attribute(COLDSTART, report.cold)
                span.set_attribute(COLDSTART_WAIT, report.seconds)
            elif isinstance(error, RemoteModelError):
                span.set_attribute(WAKE_PROBES, error.probes)
                span.set_attribute(COLDSTART, True)  # it waited for a start that did not come
            if error is not None:
                span.set_attribute(ERROR_TYPE, type(error).__name__)
                span.set_status(Status(StatusCode.ERROR, str(error)))
            if init_traceparent is not None:
                link_init(span, init_traceparent)
        span.end()


def link_init(span: Span, traceparent: str) -> None:
    """Link ``span`` to the server's ``zeroserve.init`` span named by a W3C ``traceparent`` (ignored if malformed)."""
    context = span_context_of(traceparent)
    if context is not None:
        span.add_link(context, {LINK: "init"})


def span_context_of(traceparent: str) -> SpanContext | None:
    """The remote span context of a W3C ``traceparent`` value (version 00), or None when it is not one."""
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & TraceFlags.SAMPLED))


# Server-Timing: metric *( ";" param ), comma-separated; params are token=value or token="quoted".
_METRIC = re.compile(r'\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)((?:\s*;\s*[^;,="]+(?:=(?:"(?:[^"\\]|\\.)*"|[^;,]*))?)*)')
_PARAM = re.compile(r'\s*;\s*([^;,="\s]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^;,]*))?')


def parse_server_timing(value: str) -> dict[str, float]:
    """Metric name -> duration in seconds from a ``Server-Timing`` header (metrics without ``dur`` are 0)."""
    timings: dict[str, float] = {}
    position = 0
    while position < len(value):
        match = _METRIC.match(value, position)
        if match is None:
            comma = value.find(",", position)
            if comma < 0:
                break
            position = comma + 1
            continue
        seconds = 0.0
        for param in _PARAM.finditer(match.group(2)):
            if param.group(1).lower() == "dur" and param.group(2):
                try:
                    seconds = float(param.group(2).strip('" ')) / 1000.0
                except ValueError:
                    pass
        timings.setdefault(match.group(1), seconds)
        position = match.end()
        comma = value.find(",", position)
        if comma < 0:
            break
        position = comma + 1
    return timings


def server_init_seconds(timings: Mapping[str, float]) -> float | None:
    """The server's cold-start init time: its ``init`` metric, else the sum of ``init.*``/``init-*``/``init_*``."""
    if "init" in timings:
        return timings["init"]
    phases = [seconds for name, seconds in timings.items() if name[:5] in ("init.", "init-", "init_")]
    return sum(phases) if phases else None


def incoming_context(headers: Mapping[str, str]) -> Context | None:
    """The trace context of an incoming request, for a mounted route whose host app traces nothing.

    None when a span is already active (the host's instrumentation continued the trace itself).
    """
    if trace.get_current_span().get_span_context().is_valid:
        return None
    return propagate.extract(headers)
