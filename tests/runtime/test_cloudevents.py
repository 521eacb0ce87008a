"""CloudEvents on the V2 infer routes, with the real ``cloudevents`` SDK as the client: binary and structured mode
both ways, the binary tensor extension inside a binary-mode event, malformed events, KServe's environment names,
and the event on the SERVER span."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent, from_http
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from zeroserve.runtime.app import create_app
from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.telemetry import Telemetry

import models as test_models
from conftest import ServerProcess, start_server

REQUEST = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
ATTRIBUTES = {"type": "io.kserve.inference.request", "source": "tests/cloudevents", "subject": "one"}


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("events") / "model.onnx"
    test_models.mlp_model(path)
    return path


@pytest.fixture(scope="module")
def server(mlp_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(["--model_name", "mlp", "--model_dir", str(mlp_dir)],
                           tmp_path_factory.mktemp("events-log") / "log")
    yield process
    process.stop()


def expected(server: ServerProcess) -> list[float]:
    return list(httpx.post(f"{server.url}/v2/models/mlp/infer", json=REQUEST).json()["outputs"][0]["data"])


def test_a_binary_mode_event_is_answered_with_a_binary_mode_event(server: ServerProcess) -> None:
    event = CloudEvent(ATTRIBUTES, REQUEST)
    headers, body = to_binary(event)
    answer = httpx.post(f"{server.url}/v2/models/mlp/infer", headers=headers, content=body)
    assert answer.status_code == 200, answer.text
    reply = from_http(dict(answer.headers), answer.content)
    assert reply["type"] == "io.kserve.inference.response" and reply["source"] == "io.kserve.inference.mlp"
    assert reply["id"] != event["id"] and reply["specversion"] == "1.0" and reply["time"]
    assert reply.data["outputs"][0]["data"] == pytest.approx(expected(server))
    assert "subject" not in reply.get_attributes()  # not merged unless CE_MERGE=true


def test_the_binary_tensor_extension_inside_a_binary_mode_event(server: ServerProcess) -> None:
    tensor = np.full((1, 16), 0.5, np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": tensor.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    event = CloudEvent({**ATTRIBUTES, "datacontenttype": "application/octet-stream"}, header + tensor.tobytes())
    headers, body = to_binary(event)
    headers["inference-header-content-length"] = str(len(header))
    answer = httpx.post(f"{server.url}/v2/models/mlp/infer", headers=headers, content=body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["ce-type"] == "io.kserve.inference.response" and answer.headers["ce-id"]
    length = int(answer.headers["inference-header-content-length"])
    outputs = np.frombuffer(answer.content[length:], np.float32)
    assert outputs.tolist() == pytest.approx(expected(server))


def test_a_structured_event_is_answered_with_a_structured_event(server: ServerProcess) -> None:
    headers, body = to_structured(CloudEvent(ATTRIBUTES, REQUEST))
    answer = httpx.post(f"{server.url}/v2/models/mlp/infer", headers=headers, content=body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/cloudevents+json"
    reply = from_http(dict(answer.headers), answer.content)
    assert reply["type"] == "io.kserve.inference.response"
    assert reply.data["outputs"][0]["data"] == pytest.approx(expected(server))


def test_a_ping_source_event_of_any_type_is_served(server: ServerProcess) -> None:
    """Knative's PingSource cannot choose its type: a Trigger chose what reaches the model, so any type is served."""
    event = CloudEvent({"type": "dev.knative.sources.ping", "source": "/apis/v1/namespaces/default/pingsources/p",
                        "targetmodel": "mlp"}, REQUEST)
    headers, body = to_binary(event)
    assert httpx.post(f"{server.url}/v2/models/mlp/infer", headers=headers, content=body).status_code == 200


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        ({"ce-specversion": "1.0", "ce-source": "s", "ce-type": "t"}, json.dumps(REQUEST),
         "lacks the required attribute(s) id"),
        ({"ce-id": "1", "ce-source": "s", "ce-type": "t"}, json.dumps(REQUEST), "specversion"),
        ({"ce-specversion": "0.3", "ce-id": "1", "ce-source": "s", "ce-type": "t"}, json.dumps(REQUEST),
         "specversion '0.3'"),
        ({"content-type": "application/cloudevents+json"},
         json.dumps({"specversion": "1.0", "id": "1", "source": "s", "type": "t"}), "has no data"),
        ({"content-type": "application/cloudevents+json"}, '{"specversion": "1.0", "id": ', "not valid JSON"),
        ({"content-type": "application/cloudevents+json"},
         json.dumps({"specversion": "1.0", "id": "1", "source": "s", "type": "t",
                     "data": {**REQUEST, "parameters": {"binary_data_output": True}}}), "carries JSON only"),
    ],
)
def test_a_malformed_event_is_a_400_a_dead_letter_sink_can_catch(
    server: ServerProcess, headers: dict[str, str], body: str, message: str
) -> None:
    answer = httpx.post(f"{server.url}/v2/models/mlp/infer", headers=headers, content=body)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]


def test_kserves_environment_names_choose_the_answers_type_source_and_merge(mlp_dir: Path, tmp_path: Path) -> None:
    env = {"CE_TYPE": "org.example.scored", "CE_SOURCE": "urn:scorer", "CE_MERGE": "true"}
    merging = start_server(["--model_name", "mlp", "--model_dir", str(mlp_dir)], tmp_path / "log", env=env)
    try:
        headers, body = to_binary(CloudEvent(ATTRIBUTES, REQUEST))
        answer = httpx.post(f"{merging.url}/v2/models/mlp/infer", headers=headers, content=body)
        reply = from_http(dict(answer.headers), answer.content)
        assert (reply["type"], reply["source"], reply["subject"]) == ("org.example.scored", "urn:scorer", "one")
        assert reply["id"] != headers["ce-id"]
    finally:
        merging.stop()


def test_the_event_is_on_the_server_span(mlp_dir: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(RuntimeConfig(model_dir=str(mlp_dir), model_name="mlp"), telemetry=Telemetry(provider))
    event = CloudEvent(ATTRIBUTES, REQUEST)
    headers, body = to_binary(event)

    async def scenario() -> httpx.Response:
        async with app.fallback.router.lifespan_context(app.fallback):
            for _ in range(400):
                if app.fallback.state.repository.all_ready():
                    break
                await asyncio.sleep(0.01)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.post("/v2/models/mlp/infer", headers=headers, content=body)

    assert asyncio.run(scenario()).status_code == 200
    (span,) = [span for span in exporter.get_finished_spans() if span.name.startswith("POST")]
    assert span.attributes["cloudevents.event_id"] == event["id"]
    assert span.attributes["cloudevents.event_type"] == "io.kserve.inference.request"
    assert span.attributes["cloudevents.event_source"] == "tests/cloudevents"
    assert span.attributes["cloudevents.event_spec_version"] == "1.0"
    assert span.attributes["cloudevents.event_subject"] == "one"
