"""Cold-start telemetry with the real OpenTelemetry SDK: an in-memory exporter in-process, and OTLP over
HTTP from a real server process to a receiver on 127.0.0.1. Plus the Server-Timing header, and the same
for gRPC: SERVER spans per ModelInfer, ``server-timing`` trailing metadata, the gRPC-only server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as OtlpStatus
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from otlp_receiver import Receiver
from prometheus_client.parser import text_string_to_metric_families

from zeroserve.runtime._proto import open_inference_grpc_pb2 as pb
from zeroserve.runtime.app import create_app
from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.telemetry import Telemetry, from_environment, rpc_conventions

import models as test_models
import open_inference_grpc_pb2_grpc as pb_grpc
from conftest import start_server, unused_port

BODY = {"id": "req-7", "inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


GRPC_SPAN = "inference.GRPCInferenceService/ModelInfer"
BILL_ATTRIBUTES = ("zeroserve.billed_duration_ms", "zeroserve.billed_gb_seconds", "zeroserve.cpu_seconds")


def mlp_request(request_id: str = "", model: str = "mlp", shape: tuple[int, ...] = (1, 16)) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        id=request_id,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(shape))],
        raw_input_contents=[np.full(shape, 0.5, np.float32).tobytes()],
    )


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
        async with app.fallback.router.lifespan_context(app.fallback):
            for _ in range(400):
                if app.fallback.state.repository.all_ready() and app.fallback.state.repository.coldstart.ready_ns:
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
    assert set(second_timing) == {"billed", "queue", "infer"}
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
        warm = httpx.post(f"{server.url}/v2/models/mlp/infer", json=BODY)
    finally:
        server.stop()  # SIGTERM: the lifespan flushes the exporters
    # The first answer names the init span, so a caller in another trace can link to it; later ones do not.
    init_traceparent = response.headers["zeroserve-init-traceparent"]
    assert "zeroserve-init-traceparent" not in warm.headers

    deadline = time.monotonic() + 10
    while not ({"zeroserve.init", "POST /v2/models/{model_name}/infer"} <= {s.name for s in receiver.spans()}):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    spans = {span.name: span for span in receiver.spans()}
    init = spans["zeroserve.init"]
    assert init_traceparent.startswith(f"00-{init.trace_id.hex()}-{init.span_id.hex()}-")
    posts = [span for span in receiver.spans() if span.name == "POST /v2/models/{model_name}/infer"]
    first = min(posts, key=lambda span: span.start_time_unix_nano)
    attributes = {a.key: a.value for a in first.attributes}
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


def otlp_attributes(span: OtlpSpan) -> dict[str, object]:
    values: dict[str, object] = {}
    for attribute in span.attributes:
        kind = attribute.value.WhichOneof("value")
        values[attribute.key] = getattr(attribute.value, kind)
    return values


def test_grpc_only_server_traces_times_and_counts_calls(receiver: Receiver, tmp_path: Path) -> None:
    """``--protocol grpc``: OTel from the environment, the init span tree, a SERVER span per ModelInfer
    continuing the caller's trace, ``server-timing`` trailing metadata, and /metrics on --metrics_port."""
    test_models.mlp_model(tmp_path / "model.onnx")
    port, metrics_port = unused_port(), unused_port()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    server = start_server(
        ["--model_name", "mlp", "--model_dir", str(tmp_path), "--protocol", "grpc", "--grpc_port", str(port),
         "--metrics_port", str(metrics_port)],
        tmp_path / "log", env=env, wait_ready=False,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline and server.process.poll() is None, server.log()
                time.sleep(0.05)
            caller = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"), ("tracestate", "vendor=7"))
            _, first = stub.ModelInfer.with_call(mlp_request("grpc-1"), metadata=caller, timeout=10)
            _, second = stub.ModelInfer.with_call(mlp_request("grpc-2"), timeout=10)
            failures = {}
            for request in (mlp_request("grpc-3", model="nope"), mlp_request("grpc-4", shape=(1, 15))):
                with pytest.raises(grpc.RpcError) as info:
                    stub.ModelInfer(request, timeout=10)
                failures[request.id] = info.value.code()
                # An error is billed too; it carries no run's timings.
                assert dict(info.value.trailing_metadata() or ())["server-timing"].startswith("billed;dur=")
        assert failures == {"grpc-3": grpc.StatusCode.NOT_FOUND, "grpc-4": grpc.StatusCode.INVALID_ARGUMENT}

        # The first answer tells where the cold start went; every answer its queue and compute time.
        first_timing = timings(dict(first.trailing_metadata())["server-timing"])
        assert {"init", "fetch", "session", "warmup", "queue", "infer"} <= set(first_timing)
        assert set(timings(dict(second.trailing_metadata())["server-timing"])) == {"billed", "queue", "infer"}

        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        families = {family.name: family for family in text_string_to_metric_families(metrics.text)}
        counts = {
            (sample.labels["model"], sample.labels["protocol"], sample.labels["outcome"]): sample.value
            for sample in families["zeroserve_inference_requests"].samples
        }
        assert counts == {("mlp", "grpc", "success"): 2, ("mlp", "grpc", "failure"): 1, ("", "grpc", "failure"): 1}
        head = httpx.head(f"http://127.0.0.1:{metrics_port}/metrics")
        assert head.status_code == 200 and int(head.headers["content-length"]) > 0 and not head.content
        assert httpx.post(f"http://127.0.0.1:{metrics_port}/metrics").status_code == 405
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/v2/health/ready").status_code == 404
    finally:
        assert server.stop() == 0  # SIGTERM: the exporters are flushed on the way out

    deadline = time.monotonic() + 10
    while not ({"zeroserve.init", "fetch", "session", "warmup"} <= {s.name for s in receiver.spans()}
               and sum(s.name == GRPC_SPAN for s in receiver.spans()) == 4):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    spans = receiver.spans()
    init = next(span for span in spans if span.name == "zeroserve.init")
    for phase in ("fetch", "session", "warmup"):
        assert next(span for span in spans if span.name == phase).parent_span_id == init.span_id
    calls = {otlp_attributes(span)["faas.invocation_id"]: span for span in spans if span.name == GRPC_SPAN}
    assert set(calls) == {"grpc-1", "grpc-2", "grpc-3", "grpc-4"}
    cold = calls["grpc-1"]
    assert cold.kind == OtlpSpan.SPAN_KIND_SERVER
    assert cold.trace_id.hex() == TRACE_ID and cold.parent_span_id.hex() == PARENT_ID  # the caller's trace
    assert cold.trace_state == "vendor=7"
    attributes = otlp_attributes(cold)
    assert 0 < float(attributes.pop("zeroserve.init.duration")) < 60  # type: ignore[arg-type]
    bill = {key: attributes.pop(key) for key in BILL_ATTRIBUTES}
    assert bill["zeroserve.billed_duration_ms"] >= 1 and bill["zeroserve.cpu_seconds"] > 0  # type: ignore[operator]
    assert attributes == {
        "rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer",
        "rpc.grpc.status_code": 0, "faas.trigger": "http", "faas.coldstart": True, "faas.invocation_id": "grpc-1",
    }
    # No request started this process: the first answer links to its init span, in a trace of its own, and
    # carries the init phases as events.
    assert [(link.trace_id, link.span_id) for link in cold.links] == [(init.trace_id, init.span_id)]
    assert init.trace_id != cold.trace_id
    assert [event.name for event in cold.events] == ["zeroserve.init.fetch", "zeroserve.init.session",
                                                     "zeroserve.init.warmup"]
    assert calls["grpc-2"].trace_id.hex() != TRACE_ID and not calls["grpc-2"].parent_span_id
    assert [otlp_attributes(calls[i])["faas.coldstart"] for i in ("grpc-2", "grpc-3", "grpc-4")] == [False] * 3
    assert otlp_attributes(calls["grpc-3"])["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert otlp_attributes(calls["grpc-4"])["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # A caller's mistake is not the server's failure (the RPC conventions' server-side error list).
    assert {calls[i].status.code for i in calls} == {OtlpStatus.STATUS_CODE_UNSET}


def test_rpc_attribute_names_follow_the_stability_opt_in() -> None:
    assert rpc_conventions({}) == "old"
    assert rpc_conventions({"OTEL_SEMCONV_STABILITY_OPT_IN": "http, rpc"}) == "stable"
    assert rpc_conventions({"OTEL_SEMCONV_STABILITY_OPT_IN": "rpc,rpc/dup"}) == "dup"


@pytest.mark.parametrize(
    ("conventions", "expected"),
    [
        ("stable", {"rpc.system.name": "grpc", "rpc.method": GRPC_SPAN, "rpc.response.status_code": "UNAVAILABLE"}),
        ("dup", {
            "rpc.system.name": "grpc", "rpc.method": GRPC_SPAN, "rpc.response.status_code": "UNAVAILABLE",
            "rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.grpc.status_code": 14,
        }),
    ],
)
def test_grpc_span_in_process_with_new_rpc_names(
    conventions: str, expected: dict[str, object], gated_model_server: tuple[str, threading.Event], tmp_path: Path
) -> None:
    """REST and gRPC in one process (the app's lifespan starts gRPC); a call while the model is still
    downloading is UNAVAILABLE, which the RPC conventions count as a server-side failure."""
    uri, gate = gated_model_server
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(tracer_provider, rpc_conventions=conventions)  # type: ignore[arg-type]
    port = unused_port()
    config = RuntimeConfig(model_dir=uri, model_name="mlp", cache_dir=tmp_path / "cache", host="127.0.0.1",
                           grpc_port=port, protocol="both")
    app = create_app(config, telemetry=telemetry)

    async def scenario() -> None:
        lifespan = app.fallback.router.lifespan_context(app.fallback)
        async with lifespan, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(mlp_request("early"), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            gate.set()
            for _ in range(1000):
                if app.fallback.state.repository.all_ready():
                    break
                await asyncio.sleep(0.01)
            await stub.ModelInfer(mlp_request("ready"), timeout=10)

    asyncio.run(scenario())
    spans = {span.attributes["faas.invocation_id"]: span for span in exporter.get_finished_spans()
             if span.name == GRPC_SPAN}
    early, ready = spans["early"], spans["ready"]
    assert early.kind is SpanKind.SERVER
    assert {key: early.attributes[key] for key in expected} == expected
    assert set(early.attributes) - set(expected) == {"faas.trigger", "faas.coldstart", "faas.invocation_id",
                                                     "error.type", *BILL_ATTRIBUTES}
    assert early.status.status_code is StatusCode.ERROR and early.attributes["error.type"] == "UNAVAILABLE"
    assert ready.status.status_code is StatusCode.UNSET and "error.type" not in ready.attributes
    assert ready.attributes["rpc.response.status_code"] == "OK" and ready.attributes["faas.coldstart"] is True


def test_a_process_started_for_a_request_puts_its_init_span_in_that_requests_trace(
    receiver: Receiver, tmp_path: Path
) -> None:
    """OpenTelemetry's environment carrier: TRACEPARENT given to the process parents ``zeroserve.init``."""
    test_models.mlp_model(tmp_path / "model.onnx")
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "TRACEPARENT": f"00-{TRACE_ID}-{PARENT_ID}-01",
    }
    server = start_server(["--model_name", "mlp", "--model_dir", str(tmp_path)], tmp_path / "log", env=env)
    server.stop()
    init = wait_for_span(receiver, "zeroserve.init", server.log)
    assert init.trace_id.hex() == TRACE_ID and init.parent_span_id.hex() == PARENT_ID
    phases = [span for span in receiver.spans() if span.parent_span_id == init.span_id]
    assert {span.name for span in phases} == {"fetch", "session", "warmup"}


def test_a_failed_start_is_in_the_trace_with_its_reason(receiver: Receiver, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"this is not a protobuf")
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "TRACEPARENT": f"00-{TRACE_ID}-{PARENT_ID}-01",
    }
    server = start_server(["--model_dir", str(tmp_path / "model.onnx")], tmp_path / "log", env=env, wait_ready=False)
    try:
        assert server.process.wait(30) == 1
    finally:
        server.stop()
    init = wait_for_span(receiver, "zeroserve.init", server.log)
    assert init.trace_id.hex() == TRACE_ID
    assert init.status.code == OtlpStatus.STATUS_CODE_ERROR and "Protobuf parsing failed" in init.status.message
    session = next(span for span in receiver.spans() if span.name == "session")
    assert session.status.code == OtlpStatus.STATUS_CODE_ERROR


def test_console_exporters_each_follow_their_own_variable(tmp_path: Path) -> None:
    """Traces and metrics to the console: the init span and faas.init_duration / faas.coldstarts both printed."""
    test_models.mlp_model(tmp_path / "model.onnx")
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    server = start_server(["--model_name", "mlp", "--model_dir", str(tmp_path)], tmp_path / "log", env=env)
    assert httpx.post(f"{server.url}/v2/models/mlp/infer", json=BODY).status_code == 200
    assert server.stop() == 0  # SIGTERM: the lifespan flushes both exporters
    log = server.log()
    assert '"name": "zeroserve.init"' in log
    assert '"name": "faas.init_duration"' in log and '"name": "faas.coldstarts"' in log


@pytest.mark.parametrize(
    ("environ", "traces", "metrics"),
    [
        ({}, "none", "none"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, "otlp", "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x"}, "otlp", "none"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console", "none"),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "console"}, "console", "console"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, "none", "otlp"),
        ({"OTEL_METRICS_EXPORTER": "prometheus,console"}, "none", "console"),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, "none", "none"),
    ],
)
def test_exporter_choice_per_signal(environ: dict[str, str], traces: str, metrics: str) -> None:
    from zeroserve.runtime.otel_sdk import exporter_choice

    assert (exporter_choice(environ, "traces"), exporter_choice(environ, "metrics")) == (traces, metrics)


def wait_for_span(receiver: Receiver, name: str, log: Callable[[], str]) -> OtlpSpan:
    deadline = time.monotonic() + 10
    while True:
        for span in receiver.spans():
            if span.name == name:
                return span
        assert time.monotonic() < deadline, log()
        time.sleep(0.05)
