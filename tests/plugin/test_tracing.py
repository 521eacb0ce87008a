"""Spans, checked with the real OpenTelemetry SDK and its in-memory exporter: one CLIENT span per attempt
under one span per logical call, cold-start attributes, and W3C trace context on the wire."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry.trace import SpanKind, StatusCode

from tests.plugin.conftest import Activator, FaultProxy, Forward, Respond, Seen, Spans
from zeroserve import ColdStartFailed, ColdStartPolicy, OutcomeUnknown, RemoteModel, RetryPolicy
from zeroserve.tracing import parse_server_timing, server_init_seconds

from conftest import ServerProcess

A = np.ones((1, 4), np.float32)
WARM = ColdStartPolicy(probe_after_idle=None)
FAST = RetryPolicy(deadline=10, backoff=0.01, backoff_max=0.05)
MakeProxy = Callable[..., FaultProxy]


def test_one_client_span_per_attempt_under_one_call_span(server: ServerProcess, fault_proxy: MakeProxy,
                                                         spans: Spans) -> None:
    def script(seen: Seen, index: int) -> Forward | Respond:
        return Respond(503, b"pending request queue full") if index < 2 else Forward()

    with RemoteModel(server.url, model="add") as untraced:
        untraced.infer({"a": A, "b": A})  # the server's first answer reports its own cold start; not this one
    proxy = fault_proxy(server.url, script)
    with RemoteModel(proxy.url, model="add", retry=FAST, cold_start=WARM, tracer_provider=spans.provider) as model:
        model.infer({"a": A, "b": A})

    (call,) = spans.named("zeroserve infer")
    attempts = spans.named("POST")
    assert call.name == "zeroserve infer add" and call.kind is SpanKind.INTERNAL
    assert call.attributes is not None
    assert call.attributes["zeroserve.attempts"] == 3 and call.attributes["zeroserve.coldstart"] is False
    assert call.attributes["faas.invoked_name"] == "add"
    assert len(attempts) == 3
    for number, span in enumerate(attempts):
        attributes = dict(span.attributes or {})
        assert span.kind is SpanKind.CLIENT and span.name == "POST /v2/models/{model}/infer"
        assert span.parent is not None and span.parent.span_id == call.context.span_id
        assert attributes.get("http.request.resend_count") == (number or None)  # set on resends only
        assert attributes["faas.invoked_name"] == "add" and attributes["faas.invoked_provider"] == "knative"
        assert attributes["server.address"] == "127.0.0.1" and attributes["server.port"] == proxy.port
        assert attributes["url.full"] == f"{proxy.url}/v2/models/add/infer"
        assert attributes["http.request.method"] == "POST"
    assert [dict(s.attributes or {})["http.response.status_code"] for s in attempts] == [503, 503, 200]
    assert [dict(s.attributes or {}).get("error.type") for s in attempts] == ["503", "503", None]
    assert attempts[0].status.status_code is StatusCode.ERROR


def test_a_cold_start_shows_on_the_call_span(activator: Callable[..., Activator], spans: Spans) -> None:
    timing = (("server-timing", "init;dur=1500.0, fetch;dur=2.0, session;dur=40.0"),)
    cold = activator(then=lambda seen: Forward(set_headers=timing if seen.method == "POST" else ()))
    with RemoteModel(cold.url, model="add", retry=FAST, cold_start=ColdStartPolicy(deadline=60, slow_probe=0.2),
                     tracer_provider=spans.provider) as model:
        model.infer({"a": A, "b": A})

    (call,) = spans.named("zeroserve infer")
    (wake,) = spans.named("zeroserve wake")
    (probe,) = spans.named("GET")
    (post,) = spans.named("POST")
    attributes = dict(call.attributes or {})
    assert attributes["zeroserve.coldstart"] is True
    assert attributes["zeroserve.coldstart.wait_duration"] > 0.2  # held while the server process started
    assert attributes["zeroserve.coldstart.server_init_duration"] == pytest.approx(1.5)
    assert dict(wake.attributes or {})["zeroserve.wake.probes"] == 1
    assert wake.parent is not None and wake.parent.span_id == call.context.span_id
    assert probe.parent is not None and probe.parent.span_id == wake.context.span_id
    assert probe.name == "GET /v2/models/{model}/ready" and probe.kind is SpanKind.CLIENT
    assert dict(post.attributes or {})["zeroserve.server_timing.session"] == pytest.approx(0.04)


def test_trace_context_and_baggage_go_out_on_every_attempt(server: ServerProcess, fault_proxy: MakeProxy,
                                                           spans: Spans) -> None:
    proxy = fault_proxy(server.url, lambda seen, index: Respond(429, b"", (("retry-after", "0"),)) if index == 0
                        else Forward())
    tracer = spans.provider.get_tracer("test")
    with RemoteModel(proxy.url, model="add", retry=FAST, cold_start=WARM, tracer_provider=spans.provider) as model:
        with tracer.start_as_current_span("handler") as handler:
            token = __import__("opentelemetry.context", fromlist=["attach"]).attach(
                baggage.set_baggage("tenant", "acme"))
            try:
                model.infer({"a": A, "b": A})
            finally:
                __import__("opentelemetry.context", fromlist=["detach"]).detach(token)

    attempts = spans.named("POST")
    assert len(attempts) == 2 == len(proxy.requests)
    for seen, span in zip(proxy.requests, attempts):
        version, trace_id, parent_id, flags = seen.headers["traceparent"].split("-")
        assert int(trace_id, 16) == handler.get_span_context().trace_id
        assert int(parent_id, 16) == span.context.span_id  # each attempt is the parent of its own hop
        assert seen.headers["baggage"] == "tenant=acme"


def test_without_an_sdk_an_incoming_trace_context_passes_through(server: ServerProcess,
                                                                 fault_proxy: MakeProxy) -> None:
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    proxy = fault_proxy(server.url)
    with RemoteModel(proxy.url, model="add", cold_start=WARM, tracer_provider=trace.NoOpTracerProvider()) as model:
        model.infer({"a": A, "b": A}, context=propagate.extract({"traceparent": incoming}))
    assert proxy.requests[0].headers["traceparent"] == incoming


def test_a_failed_call_marks_its_spans(server: ServerProcess, fault_proxy: MakeProxy, spans: Spans) -> None:
    proxy = fault_proxy(server.url, lambda seen, index: Respond(504, b"activator request timeout"))
    with RemoteModel(proxy.url, model="add", cold_start=WARM, tracer_provider=spans.provider) as model:
        with pytest.raises(OutcomeUnknown):
            model.infer({"a": A, "b": A})
    (call,) = spans.named("zeroserve infer")
    (attempt,) = spans.named("POST")
    assert call.status.status_code is StatusCode.ERROR
    assert dict(call.attributes or {})["error.type"] == "OutcomeUnknown"
    assert dict(attempt.attributes or {})["error.type"] == "504"


def test_server_timing_parsing() -> None:
    header = 'init;dur=1234.5;desc="cold, start", queue;dur=0.2, cache;desc=hit, infer;dur="3"'
    assert parse_server_timing(header) == pytest.approx(
        {"init": 1.2345, "queue": 0.0002, "cache": 0.0, "infer": 0.003})
    assert server_init_seconds(parse_server_timing("init.fetch;dur=100, init.session;dur=50")) == pytest.approx(0.15)
    assert server_init_seconds(parse_server_timing("queue;dur=1")) is None
    assert parse_server_timing("garbage;;, ,infer;dur=x") == {"garbage": 0.0, "infer": 0.0}


# --- the spans of a call that waited agree with each other ---

def test_the_wake_up_a_cold_sign_started_says_so_like_its_call(server: ServerProcess, fault_proxy: MakeProxy,
                                                               spans: Spans) -> None:
    loading = b'{"error":"model \'add\' is loading"}'
    proxy = fault_proxy(server.url, lambda seen, index: Respond(503, loading, (("retry-after", "0"),)) if index == 0
                        else Forward())
    with RemoteModel(proxy.url, model="add", cold_start=WARM, tracer_provider=spans.provider) as model:
        model.infer({"a": A, "b": A})
    (call,) = spans.named("zeroserve infer")
    (wake,) = spans.named("zeroserve wake")
    assert dict(call.attributes or {})["zeroserve.coldstart"] is True
    assert dict(wake.attributes or {})["zeroserve.coldstart"] is True  # one quick probe, but it met a cold start
    assert wake.parent is not None and wake.parent.span_id == call.context.span_id


def test_a_start_that_failed_is_a_cold_start_on_the_call_and_its_wake_up(
    server: ServerProcess, fault_proxy: MakeProxy, spans: Spans
) -> None:
    failed = b'{"error":"model failed to start","start":{"state":"failed","reason":"INVALID_PROTOBUF"}}'
    headers = (("retry-after", "5"), ("zeroserve-start", "failed"))
    proxy = fault_proxy(server.url, lambda seen, index: Respond(503, failed, headers))
    with RemoteModel(proxy.url, model="add", tracer_provider=spans.provider) as model, \
            pytest.raises(ColdStartFailed):
        model.infer({"a": A, "b": A})
    (call,) = spans.named("zeroserve infer")
    (wake,) = spans.named("zeroserve wake")
    assert dict(call.attributes or {})["zeroserve.coldstart"] is True
    assert dict(wake.attributes or {})["zeroserve.coldstart"] is True


@pytest.mark.parametrize("client", ["sync", "async"])
def test_with_plain_lists_the_wait_belongs_to_the_infer_call(activator: Callable[..., Activator], spans: Spans,
                                                             client: str) -> None:
    import asyncio

    from zeroserve import AsyncRemoteModel

    cold = activator()
    inputs = {"a": [[1.0, 2.0, 3.0, 4.0]], "b": [[1.0, 1.0, 1.0, 1.0]]}
    options = {"retry": FAST, "cold_start": ColdStartPolicy(deadline=60), "tracer_provider": spans.provider}
    if client == "sync":
        with RemoteModel(cold.url, model="add", **options) as model:  # type: ignore[arg-type]
            outputs = model.infer(inputs)
    else:
        async def run() -> dict[str, np.ndarray]:
            async with AsyncRemoteModel(cold.url, model="add", **options) as model:  # type: ignore[arg-type]
                return await model.infer(inputs)

        outputs = asyncio.run(run())
    assert outputs["sum"].shape == (1, 4)
    assert spans.named("zeroserve metadata") == []  # the metadata fetch is part of the call, not a call of its own
    (call,) = spans.named("zeroserve infer")
    (wake,) = spans.named("zeroserve wake")
    (metadata,) = [span for span in spans.named("GET") if span.name == "GET /v2/models/{model}"]
    assert wake.parent is not None and wake.parent.span_id == call.context.span_id
    assert metadata.parent is not None and metadata.parent.span_id == call.context.span_id
    attributes = dict(call.attributes or {})
    assert attributes["zeroserve.coldstart"] is True and attributes["zeroserve.coldstart.wait_duration"] > 0.2
    assert attributes["zeroserve.attempts"] == 2  # GET metadata, POST infer
    (post,) = spans.named("POST")
    assert "http.request.resend_count" not in dict(post.attributes or {})  # the POST's first send


@pytest.mark.parametrize("client", ["sync", "async"])
def test_an_answer_naming_the_servers_init_span_links_to_it(server: ServerProcess, fault_proxy: MakeProxy,
                                                           spans: Spans, client: str) -> None:
    import asyncio

    from zeroserve import AsyncRemoteModel

    init = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    proxy = fault_proxy(server.url, lambda seen, index: Forward(set_headers=(("zeroserve-init-traceparent", init),)))
    if client == "sync":
        with RemoteModel(proxy.url, model="add", tracer_provider=spans.provider) as model:
            model.infer({"a": A, "b": A})
    else:
        async def run() -> None:
            async with AsyncRemoteModel(proxy.url, model="add", tracer_provider=spans.provider) as model:
                await model.infer({"a": A, "b": A})

        asyncio.run(run())
    (call,) = spans.named("zeroserve infer")
    (wake,) = spans.named("zeroserve wake")  # the pre-flight probe of a service never heard from
    for span in (call, wake):
        (link,) = span.links
        assert link.context.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
        assert link.context.span_id == 0x00F067AA0BA902B7 and link.context.is_remote
        assert dict(link.attributes or {}) == {"zeroserve.link": "init"}
    assert call.context.trace_id != link.context.trace_id  # a link, not a parent: the server's start has its trace


def test_a_malformed_init_traceparent_adds_no_link(server: ServerProcess, fault_proxy: MakeProxy,
                                                   spans: Spans) -> None:
    proxy = fault_proxy(server.url, lambda seen, index: Forward(set_headers=(("zeroserve-init-traceparent",
                                                                             "00-nothex-00f067aa0ba902b7-01"),)))
    with RemoteModel(proxy.url, model="add", cold_start=WARM, tracer_provider=spans.provider) as model:
        model.infer({"a": A, "b": A})
    (call,) = spans.named("zeroserve infer")
    assert list(call.links) == []
