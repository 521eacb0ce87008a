"""Adaptive batching with real clients on a real server: merged runs give the same answers as separate ones,
in order, errors stay with the request that caused them, and a full queue answers 503 with Retry-After."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess, start_server


@pytest.fixture(scope="module")
def batching_server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("batching") / "server.log"
    # A long delay makes merging certain under test load; production defaults are far shorter.
    server = start_server(
        ["--model_dir", str(model_repository), "--max_batch_size", "16", "--max_queue_delay_us", "50000"], log
    )
    yield server
    server.stop()


def batch_sizes(server: ServerProcess, model: str) -> dict[str, float]:
    """The batch-size histogram of ``model``, parsed by prometheus_client's own parser."""
    text = httpx.get(f"{server.url}/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "zeroserve_batch_size":
            return {
                sample.name.rsplit("_", 1)[1] + (sample.labels.get("le", "")): sample.value
                for sample in family.samples
                if sample.labels.get("model") == model
            }
    return {}


def add_inputs(seed: int, rows: int, binary: bool) -> tuple[list[triton.InferInput], np.ndarray]:
    a = np.full((rows, 4), seed, np.float32)
    b = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    inputs = [triton.InferInput("a", [rows, 4], "FP32"), triton.InferInput("b", [rows, 4], "FP32")]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    return inputs, a + b


def _wait_for_metric(server: ServerProcess, line: str) -> None:
    for _ in range(500):  # bounded: 5 s
        if line in httpx.get(f"{server.url}/metrics").text.splitlines():
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"{line!r} never appeared in /metrics")


def _start_request(server: ServerProcess, path: str) -> socket.socket:
    """A REST request whose headers and first body bytes are sent, and the rest is not (yet)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    sock.sendall(head.encode() + b'{"inputs": [')
    return sock


@contextlib.contextmanager
def arriving(server: ServerProcess, model: str = "lookup") -> Iterator[None]:
    """A request to ``model`` whose body is still arriving, for the duration: company a forming batch waits for
    (the delay applies), so that concurrent requests merge however the loop happens to see them."""
    sock = _start_request(server, f"/v2/models/{model}/infer")
    try:
        _wait_for_metric(server, "zeroserve_inference_receiving 1")
        yield
    finally:
        sock.close()
        _wait_for_metric(server, "zeroserve_inference_receiving 0")


def test_concurrent_requests_are_merged_and_answered_in_order(batching_server: ServerProcess) -> None:
    before = batch_sizes(batching_server, "add").get("count", 0.0)
    client = triton.InferenceServerClient(batching_server.address, concurrency=24)
    calls = []
    with arriving(batching_server):
        for seed in range(24):  # JSON and binary requests, 1 to 3 rows each, all in flight at once
            inputs, expected = add_inputs(seed, rows=1 + seed % 3, binary=seed % 2 == 0)
            outputs = [triton.InferRequestedOutput("sum", binary_data=seed % 4 == 0)]
            call = client.async_infer("add", inputs, outputs=outputs, model_version="1", request_id=str(seed))
            calls.append((call, expected, seed))
        for call, expected, seed in calls:
            result = call.get_result()
            assert result.get_response()["id"] == str(seed)
            np.testing.assert_array_equal(result.as_numpy("sum"), expected)
    sizes = batch_sizes(batching_server, "add")
    assert sizes["count"] - before == 24
    assert sizes["bucket1"] < sizes["count"], f"no request shared a run: {sizes}"


def test_an_invalid_request_fails_alone(batching_server: ServerProcess) -> None:
    url = f"{batching_server.url}/v2/models/add/versions/1/infer"
    good = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                       {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
    bad = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]},
                      {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
    results: dict[int, httpx.Response] = {}

    def post(index: int) -> None:
        results[index] = httpx.post(url, json=bad if index == 3 else good, timeout=30)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results[3].status_code == 400
    assert all(results[i].json()["outputs"][0]["data"] == [2, 3, 4, 5] for i in results if i != 3)


def test_a_failing_run_is_split_so_only_the_culprit_fails(batching_server: ServerProcess) -> None:
    url = f"{batching_server.url}/v2/models/lookup/infer"
    results: dict[int, httpx.Response] = {}

    def post(index: int) -> None:
        picks = [99] if index == 5 else [index % 8, (index + 1) % 8]  # 99 is out of the table's range
        body = {"inputs": [{"name": "index", "shape": [len(picks)], "datatype": "INT64", "data": picks}]}
        results[index] = httpx.post(url, json=body, timeout=30)

    before = batch_sizes(batching_server, "lookup").get("count", 0.0)
    with arriving(batching_server):
        threads = [threading.Thread(target=post, args=(i,)) for i in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    sizes = batch_sizes(batching_server, "lookup")
    assert sizes["count"] - before == 9 and sizes.get("bucket1", 0.0) < sizes["count"], sizes  # runs were merged
    assert results[5].status_code == 400
    assert "rejected the input" in results[5].json()["error"]
    for index, response in results.items():
        if index != 5:
            assert response.json()["outputs"][0]["data"] == [index % 8 * 10, (index + 1) % 8 * 10]


@pytest.mark.parametrize("company", [False, True], ids=["run-at-once", "batch-of-one"])
def test_a_failing_request_that_runs_alone_is_answered(batching_server: ServerProcess, company: bool) -> None:
    # Alone, a request runs at once; with a request still arriving it waits, then forms a batch of one. Either
    # way its failure must reach the caller, not leave it waiting.
    url = f"{batching_server.url}/v2/models/lookup/infer"
    body = {"inputs": [{"name": "index", "shape": [1], "datatype": "INT64", "data": [99]}]}
    with arriving(batching_server) if company else contextlib.nullcontext():
        response = httpx.post(url, json=body, timeout=10)
    assert response.status_code == 400
    assert "rejected the input" in response.json()["error"]
    good = {"inputs": [{"name": "index", "shape": [1], "datatype": "INT64", "data": [3]}]}
    assert httpx.post(url, json=good, timeout=10).json()["outputs"][0]["data"] == [30]


def test_a_model_without_a_batch_dimension_is_never_batched(batching_server: ServerProcess) -> None:
    url = f"{batching_server.url}/v2/models/gather/infer"

    def post(index: int) -> None:
        body = {"inputs": [{"name": "index", "shape": [1], "datatype": "INT64", "data": [index % 8]}]}
        assert httpx.post(url, json=body, timeout=30).status_code == 200

    before = batch_sizes(batching_server, "gather")
    threads = [threading.Thread(target=post, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    after = batch_sizes(batching_server, "gather")
    # Six runs, each of one row: every request ran alone.
    assert after["count"] - before.get("count", 0) == 6
    assert after["bucket1"] - before.get("bucket1", 0) == 6


def test_a_lone_request_does_not_wait_out_the_delay(model_repository: Path, tmp_path: Path) -> None:
    server = start_server(
        ["--model_dir", str(model_repository), "--max_batch_size", "64", "--max_queue_delay_us", "3000000"],
        tmp_path / "log",
    )
    try:
        url = f"{server.url}/v2/models/lookup/infer"
        body = {"inputs": [{"name": "index", "shape": [1], "datatype": "INT64", "data": [1]}]}
        with httpx.Client(timeout=30) as client:
            for _ in range(3):  # one client waiting for each answer: no company can come
                started = time.perf_counter()
                assert client.post(url, json=body).status_code == 200
                assert time.perf_counter() - started < 1.5, "a lone request waited for company that cannot come"
    finally:
        server.stop()


def test_a_full_queue_answers_503_with_retry_after(model_repository: Path, tmp_path: Path) -> None:
    server = start_server(
        ["--model_dir", str(model_repository), "--max_batch_size", "64", "--max_queue_delay_us", "1500000",
         "--max_queue_size", "1"],
        tmp_path / "log",
    )
    arriving = None
    try:
        url = f"{server.url}/v2/models/lookup/infer"
        body = {"inputs": [{"name": "index", "shape": [1], "datatype": "INT64", "data": [1]}]}
        # A request still arriving may join a batch: with it on the way, the next request waits for company.
        arriving = _start_request(server, "/v2/models/lookup/infer")
        _wait_for_metric(server, "zeroserve_inference_receiving 1")
        first: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: first.append(httpx.post(url, json=body, timeout=30)))
        waiting.start()  # waits up to 1.5 s in the batch queue
        _wait_for_metric(server, "zeroserve_inference_in_flight 1")
        refused = httpx.post(url, json=body, timeout=30)
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert "limit of 1 queued" in refused.json()["error"]
        waiting.join(30)
        assert first[0].status_code == 200
    finally:
        if arriving is not None:
            arriving.close()
        server.stop()


def test_metrics_exposition_is_valid(batching_server: ServerProcess) -> None:
    text = httpx.get(f"{batching_server.url}/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {"zeroserve_inference_requests", "zeroserve_inference_request_duration_seconds",
            "zeroserve_inference_queue_duration_seconds", "zeroserve_inference_compute_duration_seconds",
            "zeroserve_batch_size", "zeroserve_queue_depth", "zeroserve_inference_in_flight"} <= set(families)
    outcomes = {(s.labels["model"], s.labels["outcome"]) for s in families["zeroserve_inference_requests"].samples}
    assert ("add", "success") in outcomes


def test_grpc_raw_requests_are_batched_like_rest(model_repository: Path, tmp_path: Path) -> None:
    import asyncio

    from kserve import InferenceGRPCClient, InferInput, InferRequest

    from conftest import unused_port

    grpc_port = unused_port()
    server = start_server(
        ["--model_dir", str(model_repository), "--max_batch_size", "16", "--max_queue_delay_us", "50000",
         "--enable_grpc", "--grpc_port", str(grpc_port)],
        tmp_path / "log",
    )

    async def burst() -> list[tuple[np.ndarray, np.ndarray]]:
        client = InferenceGRPCClient(f"127.0.0.1:{grpc_port}", timeout=30)
        try:
            requests = []
            for seed in range(12):
                a = np.full((1 + seed % 2, 4), seed, np.float32)
                b = np.ones_like(a)
                tensors = [InferInput("a", list(a.shape), "FP32"), InferInput("b", list(b.shape), "FP32")]
                tensors[0].set_data_from_numpy(a, binary_data=True)  # raw_input_contents
                tensors[1].set_data_from_numpy(b, binary_data=True)
                requests.append((InferRequest("add", tensors, model_version="1", request_id=str(seed)), a + b))
            responses = await asyncio.gather(*(client.infer(request) for request, _ in requests))
            return [(response.outputs[0].as_numpy(), expected) for response, (_, expected) in zip(responses, requests)]
        finally:
            await client.close()

    try:
        with arriving(server):  # a REST request on the way: batches wait for company
            answers = asyncio.run(burst())
        for actual, expected in answers:
            np.testing.assert_array_equal(actual, expected)
        sizes = batch_sizes(server, "add")
        assert sizes["count"] == 12 and sizes["bucket1"] < 12, sizes
    finally:
        server.stop()
