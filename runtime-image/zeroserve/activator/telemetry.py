"""The activator's traces and metrics, set up from the standard ``OTEL_*`` environment (``otel_sdk``): traces
and metrics each from their own ``OTEL_*_EXPORTER`` (``otlp``, ``console``, ``none``). Nothing set: nothing is
recorded, and the caller's trace context is still passed on (to the server process a request starts, and to
the process that answers it).

Spans, for every request (service ``zeroserve-activator`` unless ``OTEL_SERVICE_NAME`` says otherwise):

- ``{METHOD}``, kind SERVER, child of the caller's ``traceparent``: the request's whole stay in the activator
  (held, forwarded, answered). Attributes: ``http.request.method``, ``url.path``, ``http.response.status_code``,
  ``faas.trigger`` = ``http``, ``faas.coldstart`` (true when the request started a process or waited while one
  started), ``zeroserve.activator.wait_s`` (seconds it was held), ``zeroserve.activator.started_process``;
  for an answer about a start, ``zeroserve.start.state`` (``failed``/``loading``) and, failed,
  ``zeroserve.start.reason``. Status ERROR for 5xx answers, with ``error.type`` the status code.
- ``zeroserve.activator.wait``, kind INTERNAL, child of the above: the time held for capacity. The process a
  request starts gets this span's context in ``TRACEPARENT``, so the server's ``zeroserve.init`` span and
  its phases (``fetch``, ``session``, ``warmup``) sit inside it; a request that waited for a start another
  request caused links to that request's wait span.
- The forwarded request carries the SERVER span's ``traceparent``: the server's own SERVER span is its child.

Metrics: ``zeroserve.activator.starts`` (counter; ``zeroserve.start.outcome`` = ``ready`` | ``failed``),
``zeroserve.activator.wait.duration`` (histogram, s; ``faas.coldstart``), ``http.server.request.duration``
(histogram, s; ``http.request.method``, ``http.response.status_code``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from zeroserve.runtime.otel_sdk import SdkProviders, environment_carrier, providers_from_environment

if TYPE_CHECKING:
    from opentelemetry.context import Context

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = (b"traceparent", b"tracestate")
SCOPE = "zeroserve.activator"


class ActivatorTelemetry:
    def __init__(self, tracer_provider: trace.TracerProvider | None = None,
                 meter_provider: metrics.MeterProvider | None = None,
                 sdk: SdkProviders | None = None) -> None:
        self.tracer = (tracer_provider or trace.NoOpTracerProvider()).get_tracer(SCOPE)
        self.tracing = tracer_provider is not None
        meter = (meter_provider or metrics.NoOpMeterProvider()).get_meter(SCOPE)
        self.starts = meter.create_counter("zeroserve.activator.starts", unit="{process}",
                                           description="server processes started, by outcome")
        self.wait_duration = meter.create_histogram("zeroserve.activator.wait.duration", unit="s",
                                                    description="time a request was held for a server process")
        self.request_duration = meter.create_histogram("http.server.request.duration", unit="s",
                                                       description="time from a request's arrival to its answer")
        self._sdk = sdk

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> ActivatorTelemetry:
        resource = {} if "OTEL_SERVICE_NAME" in environ else {"service.name": "zeroserve-activator"}
        sdk = providers_from_environment(environ, resource, set_global=False)
        return cls(sdk.tracer_provider, sdk.meter_provider, sdk)

    def start_outcome(self, ready: bool) -> None:
        self.starts.add(1, {"zeroserve.start.outcome": "ready" if ready else "failed"})

    def request(self, method: str, path: str, headers: list[tuple[bytes, bytes]], arrived_ns: int) -> RequestTrace:
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers
                   if name in _TRACE_HEADERS}
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = self.tracer.start_span(method, context=parent, kind=SpanKind.SERVER, start_time=arrived_ns,
                                      attributes={"http.request.method": method, "url.path": path,
                                                  "url.scheme": "http", "faas.trigger": "http"})
        return RequestTrace(self, span, parent)

    def shutdown(self) -> None:
        if self._sdk is not None:
            self._sdk.shutdown()


class RequestTrace:
    """One request's spans; ``context`` is what goes on, to a process it starts and to the one that answers."""

    def __init__(self, telemetry: ActivatorTelemetry, span: trace.Span, parent: Context | None) -> None:
        self._telemetry = telemetry
        self.span = span
        # Not tracing: the caller's own context goes on unchanged.
        self.context = trace.set_span_in_context(span) if span.is_recording() else parent
        self.wait_context: Context | None = self.context
        self.wait_span: trace.Span | None = None
        self.attributes: dict[str, Any] = {}

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        span = self._telemetry.tracer.start_span("zeroserve.activator.wait", context=self.context)
        self.wait_span = span
        if span.is_recording():
            self.wait_context = trace.set_span_in_context(span)
        try:
            yield
        finally:
            span.end()

    def child_environment(self) -> dict[str, str]:
        """``TRACEPARENT``/``TRACESTATE`` for a process this request starts (parented on its wait span)."""
        if self.wait_context is None:
            return {}
        return environment_carrier(self.wait_context)

    @property
    def link(self) -> object | None:
        """What a request that waits for the start this one causes links to."""
        span = self.wait_span if self.wait_span is not None else self.span
        context = span.get_span_context()
        return context if context.is_valid else None

    def link_to(self, other: object | None) -> None:
        if other is not None and self.wait_span is not None and self.wait_span.is_recording():
            self.wait_span.add_link(other, {"zeroserve.activator.link": "waited for this start"})  # type: ignore[arg-type]

    def forward_headers(self) -> list[tuple[bytes, bytes]]:
        """The trace headers for the forwarded request (empty when the caller's go on as they are)."""
        carrier: dict[str, str] = {}
        if self.span.is_recording():
            _PROPAGATOR.inject(carrier, context=self.context)
        return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in carrier.items()]

    def finish(self, status: int, waited_s: float, cold: bool, started: bool, duration_s: float,
               method: str) -> None:
        """``status`` 0: the client left before it was answered."""
        span = self.span
        if span.is_recording():
            span.set_attributes({
                "faas.coldstart": cold, "zeroserve.activator.wait_s": round(waited_s, 6),
                "zeroserve.activator.started_process": started, **self.attributes,
            })
            if status:
                span.set_attribute("http.response.status_code", status)
            if status >= 500 or not status:
                span.set_attribute("error.type", str(status) if status else "client_disconnected")
                span.set_status(StatusCode.ERROR)
        span.end()
        telemetry = self._telemetry
        telemetry.wait_duration.record(waited_s, {"faas.coldstart": cold})
        attributes: dict[str, str | int] = {"http.request.method": method}
        if status:
            attributes["http.response.status_code"] = status
        telemetry.request_duration.record(duration_s, attributes)
