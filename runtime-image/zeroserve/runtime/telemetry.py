"""OpenTelemetry for the server: cold-start spans and metrics, and a SERVER span per inference.

The SDK is set up only from the standard ``OTEL_*`` environment, in the entrypoint (``from_environment``);
without it every hook here is a no-op that costs one attribute check, and the SDK is never imported.

What is emitted (semantic conventions for FaaS, HTTP and RPC; FaaS and RPC are not stable yet):

- ``zeroserve.init``: a span from process start to "every model ready", with one child per phase
  (``fetch`` with bytes and cache hit, ``session`` with the execution providers, ``warmup``);
- a SERVER span per inference, REST (``POST {route}``) or gRPC (``inference.GRPCInferenceService/ModelInfer``),
  continuing the caller's W3C trace context, with ``faas.trigger=http``, ``faas.invocation_id`` (the
  request's id) and ``faas.coldstart=true`` on the first inference this process answers, by either protocol;
- metrics ``faas.init_duration`` (histogram, s) and ``faas.coldstarts`` (counter).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Literal

from zeroserve.runtime.coldstart import ColdStart

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, SpanContext, TracerProvider
    from opentelemetry.util.types import Attributes

    from zeroserve.runtime.coldstart import PhaseLog
    from zeroserve.runtime.metering import Bill
    from zeroserve.runtime.server_errors import ServerError

logger = logging.getLogger("zeroserve.runtime")

INFER_ROUTE = "/v2/models/{model_name}/infer"
VERSIONED_INFER_ROUTE = "/v2/models/{model_name}/versions/{model_version}/infer"
# The RPC attribute names to emit: "old" is the v1.37 set (rpc.system, rpc.service, rpc.method = the method
# alone, rpc.grpc.status_code as a number) that most instrumentations and backends still use; "stable" the
# renamed set (rpc.system.name, rpc.method = service/method, rpc.response.status_code as a name); "dup" both,
# where rpc.method, in both sets, takes the new value. See ``rpc_conventions``.
RpcConventions = Literal["old", "stable", "dup"]
# gRPC codes that mark a SERVER span as failed (the RPC conventions' list); the rest are the caller's doing.
RPC_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


class Telemetry:
    """Hooks the server calls; inert unless built with providers."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        *,
        rpc_conventions: RpcConventions = "old",
        start_parent: Context | None = None,
    ) -> None:
        self.enabled = tracer_provider is not None
        # The trace of the request this process was started for (TRACEPARENT), which its init span joins.
        self.start_parent = start_parent
        self.init_span: SpanContext | None = None
        self.rpc_conventions = rpc_conventions
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        if tracer_provider is not None:
            from zeroserve._version import version

            self._tracer = tracer_provider.get_tracer("zeroserve.runtime", version())
        if meter_provider is not None:
            meter = meter_provider.get_meter("zeroserve.runtime")
            self._init_duration = meter.create_histogram(
                "faas.init_duration", unit="s", description="Time from process start until every model was ready"
            )
            self._coldstarts = meter.create_counter("faas.coldstarts", description="Cold starts of this server")

    def record_init(self, coldstart: ColdStart, failure: str | None = None) -> None:
        """Emit the init span tree and metrics once loading ended: every model ready, or ``failure``.

        The init span is a child of the trace context this process was started with (``start_parent``),
        so a start made for a request sits in that request's trace; a failed start ends it with an error."""
        if coldstart.ready_ns is None and failure is None:
            return
        if self._meter_provider is not None and coldstart.init_seconds is not None:
            self._init_duration.record(coldstart.init_seconds)
            self._coldstarts.add(1)
        if not self.enabled:
            return
        import time

        from opentelemetry import trace

        root = self._tracer.start_span(
            "zeroserve.init", context=self.start_parent, start_time=coldstart.process_start_ns,
            attributes={"faas.coldstart": True},
        )
        parent = trace.set_span_in_context(root)
        end_ns = coldstart.ready_ns or time.time_ns()
        for phase in coldstart.phases:
            child = self._tracer.start_span(
                phase.name, context=parent, start_time=phase.start_ns, attributes=phase.attributes
            )
            if not phase.end_ns:  # the phase that failed
                child.set_status(trace.Status(trace.StatusCode.ERROR, failure))
            child.end(end_time=phase.end_ns or end_ns)
        if failure is not None:
            root.set_attribute("error.type", "ModelLoadError")
            root.set_status(trace.Status(trace.StatusCode.ERROR, failure))
        root.end(end_time=end_ns)
        self.init_span = root.get_span_context()

    def init_traceparent(self) -> str | None:
        """The W3C traceparent of this process's ``zeroserve.init`` span, once recorded (tracing on)."""
        context = self.init_span
        if context is None or not context.is_valid:
            return None
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"

    def mark_cold_answer(self, span: Span, coldstart: ColdStart) -> None:
        """The first answer's SERVER span tells where the cold start went, wherever the init span is: a link to
        it (in another trace when no request started this process, as in a Knative pod) and one event per
        phase, with its duration."""
        if self.init_span is not None and self.init_span.trace_id != span.get_span_context().trace_id:
            span.add_link(self.init_span, {"zeroserve.link": "init"})
        for phase in coldstart.phases:
            if phase.end_ns:
                span.add_event(
                    f"zeroserve.init.{phase.name}", {"zeroserve.duration": phase.seconds}, timestamp=phase.start_ns
                )
        if coldstart.init_seconds is not None:
            span.set_attribute("zeroserve.init.duration", coldstart.init_seconds)

    def record_model_load(
        self, name: str, version: str, start_ns: int, log: PhaseLog, failure: ServerError | None
    ) -> SpanContext | None:
        """A ``zeroserve.model.load`` span, with one child per phase, in the trace of the request that caused the
        load (the current context); the requests that waited for it link to it (``mark_model_load``)."""
        if not self.enabled:
            return None
        import time

        from opentelemetry import trace

        end_ns = time.time_ns()
        span = self._tracer.start_span(
            "zeroserve.model.load", start_time=start_ns,
            attributes={"zeroserve.model.name": name, "zeroserve.model.version": version},
        )
        parent = trace.set_span_in_context(span)
        for phase in log.phases:
            child = self._tracer.start_span(phase.name, context=parent, start_time=phase.start_ns,
                                            attributes=phase.attributes)
            child.end(end_time=phase.end_ns or end_ns)
        if failure is not None:
            span.set_attribute("error.type", type(failure).__name__)
            span.set_status(trace.Status(trace.StatusCode.ERROR, failure.message))
        span.end(end_time=end_ns)
        return span.get_span_context()

    @staticmethod
    def mark_model_load(span: Span, load: SpanContext | None) -> None:
        """A request that waited for its model to load: a link to the load's span when it is in another trace."""
        if load is not None and load.trace_id != span.get_span_context().trace_id:
            span.add_link(load, {"zeroserve.link": "model.load"})
        span.set_attribute("zeroserve.model.loaded_on_demand", True)

    @staticmethod
    def set_bill(span: Span, bill: Bill) -> None:
        """What the invocation is billed (metering.py): milliseconds, GB-seconds and CPU seconds."""
        span.set_attribute("zeroserve.billed_duration_ms", bill.billed_ms)
        span.set_attribute("zeroserve.billed_gb_seconds", bill.gb_seconds)
        span.set_attribute("zeroserve.cpu_seconds", bill.cpu_seconds)

    @contextmanager
    def server_span(self, name: str, carrier: Mapping[str, str], attributes: Attributes) -> Iterator[Span]:
        """The one way a SERVER span starts, whatever the protocol: a child of the caller's W3C context
        (``traceparent``/``tracestate`` in ``carrier``) if any. Exceptions are not recorded: the handler
        reports the outcome it answered with (``set_result``, ``set_rpc_result``). Only when enabled."""
        from opentelemetry import propagate, trace

        with self._tracer.start_as_current_span(
            name,
            context=propagate.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span

    def infer_span(
        self, headers: Sequence[tuple[bytes, bytes]], path: str, versioned: bool
    ) -> AbstractContextManager[Span | None]:
        """A SERVER span around one REST inference (ASGI ``headers``), child of the caller's ``traceparent``."""
        if not self.enabled:
            return nullcontext()
        carrier = {key.decode("latin-1"): value.decode("latin-1") for key, value in headers}
        route = VERSIONED_INFER_ROUTE if versioned else INFER_ROUTE
        attributes = {"http.request.method": "POST", "http.route": route, "url.path": path, "faas.trigger": "http"}
        return self.server_span(f"POST {route}", carrier, attributes)

    def rpc_span(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, service: str, method: str
    ) -> AbstractContextManager[Span | None]:
        """A SERVER span around one gRPC call (its invocation ``metadata``), named ``service/method``."""
        if not self.enabled:
            return nullcontext()
        carrier = {key: value for key, value in metadata or () if isinstance(value, str)}  # "-bin" keys are bytes
        # gRPC rides on an inbound HTTP/2 request (through Knative's queue-proxy too), hence faas.trigger=http.
        attributes: dict[str, str] = {"faas.trigger": "http"}
        if self.rpc_conventions != "stable":
            attributes.update({"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
        if self.rpc_conventions != "old":
            attributes.update({"rpc.system.name": "grpc", "rpc.method": f"{service}/{method}"})
        return self.server_span(f"{service}/{method}", carrier, attributes)

    def set_rpc_result(
        self, span: Span | None, code: str, number: int, coldstart: bool, request_id: str | None
    ) -> None:
        """The outcome of a gRPC call: its status ``code`` name (``OK``, ``NOT_FOUND``) and ``number``."""
        if span is None:
            return
        if self.rpc_conventions != "stable":
            span.set_attribute("rpc.grpc.status_code", number)
        if self.rpc_conventions != "old":
            span.set_attribute("rpc.response.status_code", code)
        _set_invocation(span, coldstart, request_id, code if code in RPC_SERVER_ERRORS else None)

    def shutdown(self) -> None:
        """Flush and stop the exporters (called once, at the end of the lifespan)."""
        for provider in (self._tracer_provider, self._meter_provider):
            shutdown = getattr(provider, "shutdown", None)
            if shutdown is not None:
                try:
                    shutdown()
                except Exception:  # an unreachable collector must not turn a clean exit into a crash
                    logger.warning("telemetry shutdown failed", exc_info=True)


def set_result(span: Span | None, status: int, coldstart: bool, request_id: str | None) -> None:
    """The outcome of a REST inference: the HTTP status it was answered with."""
    if span is None:
        return
    span.set_attribute("http.response.status_code", status)
    _set_invocation(span, coldstart, request_id, str(status) if status >= 500 else None)


def _set_invocation(span: Span, coldstart: bool, request_id: str | None, error: str | None) -> None:
    """What REST and gRPC spans record alike: cold start, the request's id, and a server-side failure."""
    span.set_attribute("faas.coldstart", coldstart)
    if request_id is not None:
        span.set_attribute("faas.invocation_id", request_id)
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("error.type", error)
        span.set_status(Status(StatusCode.ERROR))


def rpc_conventions(environ: Mapping[str, str]) -> RpcConventions:
    """Which RPC attribute names to emit, chosen the way the semantic conventions ask for a migration:
    ``OTEL_SEMCONV_STABILITY_OPT_IN`` holding ``rpc`` (the new names only) or ``rpc/dup`` (both)."""
    values = {value.strip().lower() for value in environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "").split(",")}
    if "rpc/dup" in values:
        return "dup"
    return "stable" if "rpc" in values else "old"


def from_environment(environ: Mapping[str, str]) -> Telemetry:
    """Telemetry configured the standard way (``otel_sdk``): traces and metrics each from their own
    ``OTEL_*_EXPORTER``, console included. Nothing set: off, and the SDK is never imported."""
    if not any(name.startswith("OTEL_") for name in environ):  # the common case, decided without the module
        return Telemetry(rpc_conventions=rpc_conventions(environ))
    from zeroserve.runtime import otel_sdk

    sdk = otel_sdk.providers_from_environment(environ, _faas_resource(environ))
    parent = otel_sdk.parent_from_environment(environ) if sdk.tracer_provider is not None else None
    return Telemetry(
        sdk.tracer_provider, sdk.meter_provider, rpc_conventions=rpc_conventions(environ), start_parent=parent
    )


def _faas_resource(environ: Mapping[str, str]) -> dict[str, str]:
    """Knative's K_SERVICE / K_REVISION and the pod name as FaaS resource attributes."""
    attributes = {}
    if "OTEL_SERVICE_NAME" not in environ:
        attributes["service.name"] = environ.get("K_SERVICE", "zeroserve")
    for key, env in (("faas.name", "K_SERVICE"), ("faas.version", "K_REVISION"), ("faas.instance", "HOSTNAME")):
        if environ.get(env):
            attributes[key] = environ[env]
    return attributes
