"""The OpenTelemetry SDK, set up from the standard ``OTEL_*`` environment: for the model server and for
``zeroserve dev``'s activator alike. A leaf: it imports nothing else of ours, and the SDK only when asked for.

Traces and metrics are set up each from its own variables, so either may go to the console, to OTLP, or
nowhere, whatever the other does:

- traces: ``OTEL_TRACES_EXPORTER`` ``otlp`` | ``console`` | ``none``; unset, traces go to OTLP when an OTLP
  endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), else nowhere;
- metrics: ``OTEL_METRICS_EXPORTER`` the same, with ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``;
- ``OTEL_SDK_DISABLED=true`` turns both off; ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` name
  the resource; the OTLP exporters read their own ``OTEL_EXPORTER_OTLP_*`` settings (endpoint, headers,
  timeout). The OTLP exporters speak HTTP/protobuf (``/v1/traces``, ``/v1/metrics``).

Unset, nothing is exported and the SDK is never imported: an untraced cold start pays nothing.

A process started on behalf of a request reads that request's trace context from its environment
(``TRACEPARENT``, ``TRACESTATE``: OpenTelemetry's environment-variable carrier), see ``parent_from_environment``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

logger = logging.getLogger("zeroserve.otel")

_EXPORTERS = ("otlp", "console", "none")


@dataclass(frozen=True, slots=True)
class SdkProviders:
    """The providers set up from the environment; None where that signal goes nowhere."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    def shutdown(self) -> None:
        """Flush and stop both (an unreachable collector must not turn a clean exit into a crash)."""
        for provider in (self.tracer_provider, self.meter_provider):
            shutdown = getattr(provider, "shutdown", None)
            if shutdown is not None:
                try:
                    shutdown()
                except Exception:
                    logger.warning("OpenTelemetry shutdown failed", exc_info=True)


def exporter_choice(environ: Mapping[str, str], signal: str) -> str:
    """``otlp``, ``console`` or ``none`` for ``signal`` (``traces`` or ``metrics``), as described above."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "none"
    chosen = environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if chosen:
        # A list names several exporters; the first one we know is used.
        for name in (part.strip() for part in chosen.split(",")):
            if name in _EXPORTERS:
                return name
        logger.warning("OTEL_%s_EXPORTER=%s: none of these is supported here (otlp, console, none)",
                       signal.upper(), chosen)
        return "none"
    endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
        f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"
    )
    return "otlp" if endpoint else "none"


def providers_from_environment(
    environ: Mapping[str, str], resource_attributes: Mapping[str, str] | None = None, *, set_global: bool = True
) -> SdkProviders:
    """Tracer and meter providers as the environment asks. ``resource_attributes`` are merged over what
    ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME`` give (leave ``service.name`` out when the latter is
    set). ``set_global`` also makes them the process's global providers."""
    traces = exporter_choice(environ, "traces")
    metrics = exporter_choice(environ, "metrics")
    if traces == "none" and metrics == "none":
        return SdkProviders()
    try:
        from opentelemetry.sdk.resources import Resource
    except ImportError as exc:
        logger.warning("OTEL_* is set but the OpenTelemetry SDK is missing (%s): pip install 'zeroserve[runtime]'",
                       exc)
        return SdkProviders()
    resource = Resource.create(dict(resource_attributes or {}))
    tracer_provider = _tracer_provider(traces, resource) if traces != "none" else None
    meter_provider = _meter_provider(metrics, resource) if metrics != "none" else None
    if set_global:
        from opentelemetry import metrics as metrics_api
        from opentelemetry import trace

        if tracer_provider is not None:
            trace.set_tracer_provider(tracer_provider)
        if meter_provider is not None:
            metrics_api.set_meter_provider(meter_provider)
    logger.info("OpenTelemetry: traces to %s, metrics to %s", _where(traces, environ, "traces"),
                _where(metrics, environ, "metrics"))
    return SdkProviders(tracer_provider, meter_provider)


def _tracer_provider(exporter_name: str, resource: Any) -> TracerProvider:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    exporter: Any
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider = SdkTracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _meter_provider(exporter_name: str, resource: Any) -> MeterProvider:
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    exporter: Any
    if exporter_name == "console":
        exporter = ConsoleMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter()
    # The reader exports every OTEL_METRIC_EXPORT_INTERVAL (60 s by default) and once more at shutdown, so a
    # process scaled to zero before a minute has passed still exports its cold start.
    return SdkMeterProvider(resource=resource, metric_readers=[PeriodicExportingMetricReader(exporter)])


def _where(choice: str, environ: Mapping[str, str], signal: str) -> str:
    if choice != "otlp":
        return "the console" if choice == "console" else "nowhere"
    endpoint = environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return endpoint or "the OTLP default (http://localhost:4318)"


def parent_from_environment(environ: Mapping[str, str]) -> Context | None:
    """The trace context a parent process passed in ``TRACEPARENT``/``TRACESTATE``; None when there is none.

    Only these two are read (not ``BAGGAGE``): start-up spans need a parent, not the caller's baggage."""
    traceparent = environ.get("TRACEPARENT")
    if not traceparent:
        return None
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": traceparent}
    if environ.get("TRACESTATE"):
        carrier["tracestate"] = environ["TRACESTATE"]
    context = TraceContextTextMapPropagator().extract(carrier)
    return context if get_current_span(context).get_span_context().is_valid else None


def environment_carrier(context: Context | None = None) -> dict[str, str]:
    """``TRACEPARENT`` (and ``TRACESTATE``) for a child process started on behalf of ``context``'s span
    (the current one when None); empty when there is no valid span."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=context)
    return {key.upper(): value for key, value in carrier.items()}
