"""Models loaded on demand inside one server: real server processes, tritonclient's HTTP and gRPC clients for
the repository extension, a moto S3 repository, eviction under both bounds and never under requests in flight,
idle unloads, a failed load, an unknown model, and a herd of first requests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families
from triton_grpc_process import TritonProcess
from tritonclient.utils import InferenceServerException

import models as test_models
from conftest import ServerProcess, start_server, unused_port

MLP = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


def mlp_repository(root: Path, names: list[str]) -> Path:
    for index, name in enumerate(names):
        test_models.mlp_model(root / name / "1" / "model.onnx", seed=index)
    return root


def sample(server: ServerProcess, family_name: str, **labels: str) -> float:
    """One sample's value (0 when absent) from /metrics, parsed by prometheus_client."""
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for item in family.samples:
            if item.name == family_name and all(item.labels.get(k) == v for k, v in labels.items()):
                return float(item.value)
    return 0.0


def index(server: ServerProcess) -> dict[str, dict[str, str]]:
    rows = httpx.post(f"{server.url}/v2/repository/index").json()
    return {row["name"]: row for row in rows}


def infer(server: ServerProcess, name: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{name}/infer", json=MLP, timeout=timeout)


def wait_for(condition, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlp_repository(tmp_path_factory.mktemp("on-demand"), ["a", "b", "c", "d"])


@pytest.fixture
def on_demand(repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_server(["--model_dir", str(repository), "--model_loading", "on_demand"], tmp_path / "log")
    yield server
    server.stop()


def test_ready_once_indexed_and_the_first_request_loads_its_model(on_demand: ServerProcess) -> None:
    assert httpx.get(f"{on_demand.url}/v2/health/ready").status_code == 200  # indexed, nothing loaded
    assert sample(on_demand, "zeroserve_models_loaded") == 0
    assert index(on_demand)["a"] == {"name": "a", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    # Model ready keeps Triton's meaning (loaded), and says a request will load it.
    ready = httpx.get(f"{on_demand.url}/v2/models/a/ready")
    assert ready.status_code == 503 and ready.headers["zeroserve-start"] == "unloaded"
    assert "model_repository" in httpx.get(f"{on_demand.url}/v2").json()["extensions"]

    first = infer(on_demand, "a")
    assert first.status_code == 200, first.text
    timing = {part.split(";")[0].strip() for part in first.headers["server-timing"].split(",")}
    assert {"load", "load.session", "load.warmup"} <= timing  # the request that waited for the load says so
    second = infer(on_demand, "a")
    assert "load" not in second.headers["server-timing"]
    assert second.json()["outputs"] == first.json()["outputs"]
    assert index(on_demand)["a"]["state"] == "READY" and index(on_demand)["b"]["state"] == "UNAVAILABLE"
    assert httpx.get(f"{on_demand.url}/v2/models/a/ready").status_code == 200
    assert sample(on_demand, "zeroserve_model_loads_total", model="a", outcome="ready") == 1
    assert sample(on_demand, "zeroserve_models_loaded") == 1
    assert sample(on_demand, "zeroserve_models_loaded_bytes") > 0
    assert sample(on_demand, "zeroserve_model_load_duration_seconds_count", model="a") == 1
    # Metadata needs the session: asking for it loads the model too.
    assert httpx.get(f"{on_demand.url}/v2/models/b").json()["inputs"][0]["name"] == "input"


def test_a_herd_of_first_requests_causes_one_load(on_demand: ServerProcess) -> None:
    barrier = threading.Barrier(32)

    def call(_: int) -> int:
        barrier.wait(10)
        return infer(on_demand, "c").status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(call, range(32)))
    assert statuses == [200] * 32
    assert sample(on_demand, "zeroserve_model_loads_total", model="c", outcome="ready") == 1


def test_an_unknown_model_is_named_in_a_404(on_demand: ServerProcess) -> None:
    answer = infer(on_demand, "nope")
    assert answer.status_code == 404 and "model 'nope' not found" in answer.json()["error"]
    load = httpx.post(f"{on_demand.url}/v2/repository/models/nope/load")
    assert load.status_code == 404 and "'nope'" in load.json()["error"]


def test_the_least_recently_used_idle_model_makes_room(repository: Path, tmp_path: Path) -> None:
    server = start_server(["--model_dir", str(repository), "--model_loading", "on_demand", "--max_loaded_models", "2"],
                          tmp_path / "log")
    try:
        for name in ("a", "b", "a", "c"):  # a used after b: b is the least recently used when c needs room
            assert infer(server, name).status_code == 200
        states = {name: row["state"] for name, row in index(server).items()}
        assert states == {"a": "READY", "b": "UNAVAILABLE", "c": "READY", "d": "UNAVAILABLE"}
        assert sample(server, "zeroserve_model_unloads_total", model="b", reason="evicted_count") == 1
        assert infer(server, "b").status_code == 200  # loaded again, on demand
    finally:
        server.stop()


def test_the_memory_bound_is_the_models_measured_cost(repository: Path, tmp_path: Path) -> None:
    server = start_server(["--model_dir", str(repository), "--model_loading", "on_demand", "--max_loaded_mib", "1"],
                          tmp_path / "log")
    try:
        assert infer(server, "a").status_code == 200
        cost = sample(server, "zeroserve_models_loaded_bytes")
        assert cost > 0
        assert infer(server, "b").status_code == 200  # a alone costs about the whole budget: it makes room
        assert index(server)["a"]["state"] == "UNAVAILABLE"
        assert sample(server, "zeroserve_model_unloads_total", model="a", reason="evicted_memory") == 1
    finally:
        server.stop()


def test_a_model_in_use_is_never_unloaded_under_its_requests(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    test_models.conv_model(repo / "slow" / "1" / "model.onnx", size=96, channels=48, layers=6)
    test_models.mlp_model(repo / "quick" / "1" / "model.onnx")
    server = start_server(
        ["--model_dir", str(repo), "--model_loading", "on_demand", "--max_loaded_models", "1"], tmp_path / "log"
    )
    try:
        images = np.zeros((48, 3, 96, 96), np.float32)  # about 2 s of runs here
        body = {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                            "data": images.ravel().tolist()}]}
        assert httpx.post(f"{server.url}/v2/models/slow/infer", json={
            "inputs": [{"name": "input", "shape": [1, 3, 96, 96], "datatype": "FP32", "data": [0.0] * 3 * 96 * 96}]
        }, timeout=60).status_code == 200  # loaded
        slow: list[httpx.Response] = []
        thread = threading.Thread(
            target=lambda: slow.append(httpx.post(f"{server.url}/v2/models/slow/infer", json=body, timeout=120))
        )
        thread.start()
        wait_for(lambda: sample(server, "zeroserve_inference_in_flight") >= 1)
        refused = infer(server, "quick")
        assert thread.is_alive(), "the slow request ended before quick asked for room: make it slower"
        assert refused.status_code == 503 and "all have requests in flight" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        thread.join(120)
        assert slow[0].status_code == 200
        assert infer(server, "quick").status_code == 200  # now slow is idle, and makes room
        assert index(server)["slow"]["state"] == "UNAVAILABLE"
    finally:
        server.stop()


def test_an_idle_model_is_unloaded_after_the_idle_timeout(repository: Path, tmp_path: Path) -> None:
    server = start_server(
        ["--model_dir", str(repository), "--model_loading", "on_demand", "--model_idle_timeout", "1"], tmp_path / "log"
    )
    try:
        assert infer(server, "a").status_code == 200
        wait_for(lambda: index(server)["a"]["state"] == "UNAVAILABLE", timeout=10)
        assert sample(server, "zeroserve_model_unloads_total", model="a", reason="idle") == 1
        assert sample(server, "zeroserve_models_loaded") == 0
        assert infer(server, "a").status_code == 200  # scaled to zero, and back
    finally:
        server.stop()


def test_a_model_that_fails_to_load_says_why_and_is_tried_again_later(repository: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    test_models.mlp_model(repo / "good" / "1" / "model.onnx")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not a protobuf")
    server = start_server(["--model_dir", str(repo), "--model_loading", "on_demand"], tmp_path / "log")
    try:
        first = infer(server, "broken")
        assert first.status_code == 503 and first.headers["zeroserve-start"] == "failed"
        assert "Protobuf parsing failed" in first.json()["error"] and int(first.headers["retry-after"]) >= 1
        row = index(server)["broken"]
        assert row["state"] == "UNAVAILABLE" and "Protobuf parsing failed" in row["reason"]
        again = infer(server, "broken")  # within the backoff: answered at once, not loaded again
        assert again.status_code == 503 and "tried again in" in again.json()["error"]
        assert sample(server, "zeroserve_model_loads_total", model="broken", outcome="failed") == 1
        load = httpx.post(f"{server.url}/v2/repository/models/broken/load")  # the API tries at once
        assert load.status_code == 503 and "Protobuf parsing failed" in load.json()["error"]
        assert sample(server, "zeroserve_model_loads_total", model="broken", outcome="failed") == 2
        assert infer(server, "good").status_code == 200  # the others are served all along
    finally:
        server.stop()


def test_explicit_mode_loads_only_through_the_api_with_tritonclient_http(repository: Path, tmp_path: Path) -> None:
    server = start_server(["--model_dir", str(repository), "--model_loading", "explicit"], tmp_path / "log")
    try:
        client = triton_http.InferenceServerClient(server.address)
        names = {row["name"]: row["state"] for row in client.get_model_repository_index()}
        assert names == {"a": "UNAVAILABLE", "b": "UNAVAILABLE", "c": "UNAVAILABLE", "d": "UNAVAILABLE"}
        refused = infer(server, "a")
        assert refused.status_code == 503 and "--model_loading explicit" in refused.json()["error"]
        client.load_model("a")
        assert client.is_model_ready("a")
        assert infer(server, "a").status_code == 200
        assert [row["name"] for row in client.get_model_repository_index(query_params=None)
                if row["state"] == "READY"] == ["a"]
        ready_only = httpx.post(f"{server.url}/v2/repository/index", content=json.dumps({"ready": True})).json()
        assert [row["name"] for row in ready_only] == ["a"]
        client.unload_model("a")
        assert not client.is_model_ready("a")
        with pytest.raises(InferenceServerException, match="not found"):
            client.load_model("nope")
        with pytest.raises(InferenceServerException, match="not supported"):
            client.load_model("b", config="{}")
    finally:
        server.stop()


def test_the_repository_extension_over_grpc_with_tritonclient(repository: Path, tmp_path: Path) -> None:
    grpc_port = unused_port()
    server = start_server(
        ["--model_dir", str(repository), "--model_loading", "explicit", "--grpc_port", str(grpc_port)], tmp_path / "log"
    )
    client = TritonProcess(f"127.0.0.1:{grpc_port}")
    try:
        def states() -> dict[str, str]:
            answer = client.call("repository_index")
            assert answer["ok"], answer
            return {row["name"]: row.get("state", "") for row in answer["value"]}

        assert states() == {"a": "UNAVAILABLE", "b": "UNAVAILABLE", "c": "UNAVAILABLE", "d": "UNAVAILABLE"}
        assert client.call("load_model", model="b")["ok"]
        assert client.call("model_ready", model="b")["value"] is True
        assert states()["b"] == "READY"
        assert client.call("unload_model", model="b")["ok"]
        assert client.call("model_ready", model="b")["value"] is False
        missing = client.call("load_model", model="nope")
        assert not missing["ok"] and missing["code"] == "NOT_FOUND" and "nope" in missing["message"]
    finally:
        client.close()
        server.stop()


def test_a_repository_on_s3_is_indexed_without_reading_a_model(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bucket = s3_server.create_bucket()
    files = {}
    for index_, name in enumerate(["m0", "m1", "m2"]):
        path = test_models.mlp_model(tmp_path / "src" / name / "model.onnx", seed=index_)
        files[f"{name}/1/model.onnx"] = path.read_bytes()
    uri = s3_server.put_tree(bucket, "repo", files)
    server = start_server(["--model_dir", uri, "--model_loading", "on_demand", "--cache_dir", str(tmp_path / "c")],
                          tmp_path / "log", env=s3_server.aws_env())
    try:
        assert set(index(server)) == {"m0", "m1", "m2"}
        assert s3_server.object_reads(bucket) == []  # indexed from one listing, nothing fetched
        assert infer(server, "m1").status_code == 200
        assert s3_server.object_reads(bucket) == ["repo/m1/1/model.onnx"]  # only the model asked for
    finally:
        server.stop()


def test_the_plugin_wakes_an_unloaded_model_with_its_call_not_a_readiness_wait(on_demand: ServerProcess) -> None:
    """RemoteModel's wake-up probe learns that the model loads on request and sends the call at once; the call's
    span says a cold start (the model's load) was met."""
    import asyncio

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from zeroserve import AsyncRemoteModel, ColdStartPolicy, RemoteModel

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    policy = ColdStartPolicy(deadline=20)
    started = time.monotonic()
    with RemoteModel(on_demand.url, model="d", cold_start=policy, tracer_provider=provider) as model:
        assert not model.ready()  # Triton's meaning: not loaded
        outputs = model.infer({"input": np.full((1, 16), 0.5, np.float32)})
    assert outputs["output"].shape == (1, 4) and time.monotonic() - started < 10
    probes = [s for s in exporter.get_finished_spans() if s.name.startswith("GET") and s.name.endswith("/ready")]
    assert len(probes) <= 2  # ready() and at most one wake-up probe: no readiness wait
    call = next(s for s in exporter.get_finished_spans() if s.name == "zeroserve infer d")
    assert call.attributes["zeroserve.coldstart"] is True
    assert call.attributes["zeroserve.coldstart.model_load_duration"] > 0

    async def async_call() -> dict[str, np.ndarray]:
        async with AsyncRemoteModel(on_demand.url, model="b", cold_start=policy) as model:
            return await model.infer({"input": np.full((1, 16), 0.5, np.float32)})

    assert asyncio.run(async_call())["output"].shape == (1, 4)
