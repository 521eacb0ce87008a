"""Cold-start telemetry with the real OpenTelemetry SDK: an in-memory exporter in-process, and OTLP over
HTTP from a real server process to a receiver on 127.0.0.1. Plus the Server-Timing header."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from zeroserve.runtime.app import create_app
from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.telemetry import Telemetry, from_environment

import models as test_models
from conftest import start_server

BODY = {"id": "req-7", "inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def timings(header: str) -> dict[str, float]:
    return {part.split(";dur=")[0].strip(): float(part.split(";dur=")[1]) for part in header.split(",")}


def test_init_spans_server_spans_and_metrics_in_process(tmp_path: Path) -> None:
    test_models.mlp_model(tmp_path / "model.onnx")
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(tracer_provider, MeterProvider(metric_readers=[reader]))
    app = create_app(RuntimeConfig(model_dir=str(tmp_path), model_name="mlp"), telemetry=telemetry)

    async def scenario() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            for _ in range(400):
                if app.state.repository.all_ready() and app.state.repository.coldstart.ready_ns:
                    break
                await asyncio.sleep(0.01)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
                first = await client.post("/v2/models/mlp/infer", json=BODY, headers=headers)
                second = await client.post("/v2/models/mlp/versions/1/infer", json=BODY)
                return [first, second]

    first, second = asyncio.run(scenario())
    assert first.status_code == second.status_code == 200

    # Server-Timing: init phases on the first answer only; queue and compute on every answer.
    first_timing, second_timing = timings(first.headers["server-timing"]), timings(second.headers["server-timing"])
    assert {"init", "fetch", "session", "warmup", "queue", "infer"} <= set(first_timing)
    assert set(second_timing) == {"queue", "infer"}
    assert first_timing["init"] >= first_timing["session"] + first_timing["warmup"]

    spans = {span.name: span for span in exporter.get_finished_spans()}
    init = spans["zeroserve.init"]
    for phase in ("fetch", "session", "warmup"):
        assert spans[phase].parent.span_id == init.context.span_id
        assert init.start_time <= spans[phase].start_time <= spans[phase].end_time <= init.end_time
    assert spans["session"].attributes["zeroserve.execution_providers"] == ("CPUExecutionProvider",)
    assert spans["fetch"].attributes["zeroserve.fetch.cache_hit"] is True
    assert init.end_time - init.start_time == pytest.approx(first_timing["init"] * 1e6, rel=0.01)

    server_spans = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert [s.name for s in server_spans] == [
        "POST /v2/models/{model_name}/infer", "POST /v2/models/{model_name}/versions/{model_version}/infer",
    ]
    cold, warm = server_spans
    assert format(cold.context.trace_id, "032x") == TRACE_ID  # the caller's trace continues
    assert format(cold.parent.span_id, "016x") == PARENT_ID
    assert cold.attributes["faas.coldstart"] is True and warm.attributes["faas.coldstart"] is False
    assert cold.attributes["faas.trigger"] == "http"
    assert cold.attributes["faas.invocation_id"] == "req-7"
    assert cold.attributes["http.response.status_code"] == 200

    points = {
        metric.name: metric.data.data_points[0]
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    assert points["faas.coldstarts"].value == 1
    assert points["faas.init_duration"].count == 1
    assert points["faas.init_duration"].sum == pytest.approx(first_timing["init"] / 1000, rel=0.01)


def test_tracing_is_off_without_otel_environment() -> None:
    assert not from_environment({}).enabled
    assert not from_environment({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}).enabled
    assert not from_environment({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}).enabled


class Receiver:
    """An OTLP/HTTP receiver on 127.0.0.1 that keeps every export request it gets."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    receiver.traces.append(ExportTraceServiceRequest.FromString(body))
                elif self.path == "/v1/metrics":
                    receiver.metrics.append(ExportMetricsServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def spans(self) -> list[object]:
        return [
            span
            for request in self.traces
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    collector = Receiver()
    yield collector
    collector.close()


def test_otlp_over_http_from_a_server_process(receiver: Receiver, tmp_path: Path) -> None:
    test_models.mlp_model(tmp_path / "model.onnx")
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
        "K_SERVICE": "mlp-knative",
        "K_REVISION": "mlp-knative-00001",
    }
    server = start_server(["--model_name", "mlp", "--model_dir", str(tmp_path)], tmp_path / "log", env=env)
    try:
        response = httpx.post(f"{server.url}/v2/models/mlp/infer", json=BODY)
        assert response.status_code == 200
    finally:
        server.stop()  # SIGTERM: the lifespan flushes the exporters

    deadline = time.monotonic() + 10
    while not ({"zeroserve.init", "POST /v2/models/{model_name}/infer"} <= {s.name for s in receiver.spans()}):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    spans = {span.name: span for span in receiver.spans()}
    attributes = {a.key: a.value for a in spans["POST /v2/models/{model_name}/infer"].attributes}
    assert attributes["faas.coldstart"].bool_value is True
    resource = {a.key: a.value.string_value for a in receiver.traces[0].resource_spans[0].resource.attributes}
    assert resource["faas.name"] == "mlp-knative" and resource["faas.version"] == "mlp-knative-00001"
    assert resource["service.name"] == "mlp-knative"
    metric_names = {
        metric.name
        for request in receiver.metrics
        for resource_metrics in request.resource_metrics
        for scope in resource_metrics.scope_metrics
        for metric in scope.metrics
    }
    assert {"faas.init_duration", "faas.coldstarts"} <= metric_names
