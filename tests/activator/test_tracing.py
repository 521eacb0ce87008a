"""One trace explains a cold start: the caller's client span (the real OpenTelemetry SDK, in this process),
the activator's spans and the server process's, all exported over OTLP/HTTP to a receiver on 127.0.0.1.
And the activator's traces and metrics each follow their own ``OTEL_*_EXPORTER``, console included."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as OtlpStatus
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tests.activator.conftest import BODY, ActivatorProcess, Receiver, infer, wait_until

Start = Callable[..., ActivatorProcess]
SERVER_INFER = "POST /v2/models/{model_name}/infer"


def attributes(span: OtlpSpan) -> dict[str, Any]:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


def traced_call(dev: ActivatorProcess, client: httpx.Client) -> tuple[ReadableSpan, int]:
    """One inference inside a CLIENT span of the caller's own; the span and the answer's status."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("caller").start_as_current_span("infer mlp", kind=SpanKind.CLIENT):
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        status = client.post(f"{dev.url}/v2/models/mlp/infer", json=BODY, headers=carrier).status_code
    [span] = exporter.get_finished_spans()
    return span, status


def in_trace(receiver: Receiver, client: ReadableSpan) -> list[OtlpSpan]:
    trace_id = client.context.trace_id.to_bytes(16, "big")
    return [span for span in receiver.spans() if span.trace_id == trace_id]


def covered(client: ReadableSpan, spans: list[OtlpSpan]) -> float:
    """The share of the client span's time covered by the union of ``spans``."""
    assert client.start_time is not None and client.end_time is not None
    intervals = sorted((max(s.start_time_unix_nano, client.start_time), min(s.end_time_unix_nano, client.end_time))
                       for s in spans)
    total, reach = 0, client.start_time
    for start, end in intervals:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / (client.end_time - client.start_time)


def test_one_trace_explains_a_cold_start(activator: Start, model_dir: Path, receiver: Receiver) -> None:
    dev = activator("--model_name", "mlp", "--model_dir", str(model_dir), env=receiver.env)
    with httpx.Client(timeout=60) as client:
        cold, status = traced_call(dev, client)
        assert status == 200
        warm, status = traced_call(dev, client)
        assert status == 200
    dev.stop()  # the activator flushes; so does the server process it stops

    names = {"POST", "zeroserve.activator.wait", "zeroserve.init", "fetch", "session", "warmup", SERVER_INFER}
    wait_until(lambda: names <= {s.name for s in in_trace(receiver, cold)}, 15, "spans of the cold call")
    spans = in_trace(receiver, cold)
    by_name = {span.name: span for span in spans}
    client_id = cold.context.span_id.to_bytes(8, "big")

    held = by_name["POST"]  # the activator's SERVER span, in the caller's trace
    assert held.kind == OtlpSpan.SPAN_KIND_SERVER and held.parent_span_id == client_id
    held_attributes = attributes(held)
    assert held_attributes["faas.coldstart"] is True
    assert held_attributes["zeroserve.activator.started_process"] is True
    assert held_attributes["http.response.status_code"] == 200 and held_attributes["faas.trigger"] == "http"
    wait = by_name["zeroserve.activator.wait"]
    assert wait.parent_span_id == held.span_id
    assert held_attributes["zeroserve.activator.wait_s"] == pytest.approx(
        (wait.end_time_unix_nano - wait.start_time_unix_nano) / 1e9, abs=0.005)

    # The process the request started parents its start-up on the request's wait (TRACEPARENT).
    init = by_name["zeroserve.init"]
    assert init.parent_span_id == wait.span_id
    for phase in ("fetch", "session", "warmup"):
        assert by_name[phase].parent_span_id == init.span_id
    # (to 20 ms: the server dates its init span from its process's start time, known to 10 ms, and ends it
    # just after it starts answering ready)
    assert wait.start_time_unix_nano - 20_000_000 <= init.start_time_unix_nano
    assert init.end_time_unix_nano <= wait.end_time_unix_nano + 20_000_000

    # The forwarded request: the server's SERVER span is a child of the activator's.
    served = by_name[SERVER_INFER]
    assert served.parent_span_id == held.span_id and attributes(served)["faas.coldstart"] is True

    # Server-side spans cover the cold call's wall time: with the activator's span, and without it (its
    # wait, the process's start-up and the server's own span).
    assert covered(cold, spans) >= 0.9
    assert covered(cold, [span for span in spans if span is not held]) >= 0.9

    warm_spans = {span.name: span for span in in_trace(receiver, warm)}
    assert attributes(warm_spans["POST"])["faas.coldstart"] is False
    assert "zeroserve.init" not in warm_spans

    wait_until(lambda: {"zeroserve.activator.starts", "zeroserve.activator.wait.duration",
                        "http.server.request.duration"} <= receiver.metric_names("zeroserve-activator"), 10,
               "the activator's metrics")


def test_a_failed_start_is_in_the_callers_trace(activator: Start, corrupt_model_dir: Path,
                                                receiver: Receiver) -> None:
    dev = activator("--model_name", "mlp", "--model_dir", str(corrupt_model_dir), env=receiver.env)
    with httpx.Client(timeout=60) as client:
        call, status = traced_call(dev, client)
    assert status == 503
    dev.stop()
    wait_until(lambda: {"POST", "zeroserve.init"} <= {s.name for s in in_trace(receiver, call)}, 15, "spans")
    by_name = {span.name: span for span in in_trace(receiver, call)}
    held = attributes(by_name["POST"])
    assert held["zeroserve.start.state"] == "failed" and "INVALID_PROTOBUF" in held["zeroserve.start.reason"]
    assert held["http.response.status_code"] == 503 and held["error.type"] == "503"
    assert by_name["POST"].status.code == OtlpStatus.STATUS_CODE_ERROR
    assert by_name["zeroserve.init"].status.code == OtlpStatus.STATUS_CODE_ERROR  # the server's own account
    assert by_name["zeroserve.init"].parent_span_id == by_name["zeroserve.activator.wait"].span_id


@pytest.mark.parametrize(("traces", "metrics"), [("console", "otlp"), ("otlp", "console")])
def test_traces_and_metrics_follow_their_own_exporter(activator: Start, model_dir: Path, receiver: Receiver,
                                                      traces: str, metrics: str) -> None:
    env = {**receiver.env, "OTEL_TRACES_EXPORTER": traces, "OTEL_METRICS_EXPORTER": metrics}
    dev = activator("--model_name", "mlp", "--model_dir", str(model_dir), env=env)
    assert infer(dev.url).status_code == 200
    dev.stop()
    log = dev.log()
    if traces == "console":
        assert '"name": "zeroserve.activator.wait"' in log
        wait_until(lambda: "zeroserve.activator.starts" in receiver.metric_names("zeroserve-activator"), 10)
        assert not receiver.spans("zeroserve-activator")
    else:
        wait_until(lambda: receiver.spans("zeroserve-activator"), 10, "the activator's spans")
        assert '"name": "zeroserve.activator.starts"' in log
        time.sleep(0.3)
        assert not receiver.metric_names("zeroserve-activator")
