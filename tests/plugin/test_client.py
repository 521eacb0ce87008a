"""RemoteModel and AsyncRemoteModel against a real zeroserve process, and through faults that really happen:
connection refused until a server starts, a slow start, a server killed and restarted, 503 storms, 429,
504/502 and connections reset after the request was sent, and a cold start held by an activator."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.plugin.conftest import Activator, FaultProxy, Forward, Reset, Respond, Seen, start_server_on, wait_until
from zeroserve import (
    AsyncRemoteModel,
    CircuitOpen,
    CircuitPolicy,
    ColdStartPolicy,
    ColdStartTimeout,
    OutcomeUnknown,
    RemoteModel,
    RequestRejected,
    RetryPolicy,
    Unavailable,
)

from conftest import V2_DATATYPES, ServerProcess, unused_port

A = np.arange(8, dtype=np.float32).reshape(2, 4)
B = np.full((2, 4), 0.5, dtype=np.float32)
# The test repository's "add" has version 1 (a + b) and version 2 (a * b); calls without a version get 2.
FAST = RetryPolicy(deadline=10, backoff=0.01, backoff_max=0.05)
QUICK_COLD = ColdStartPolicy(deadline=30, probe_interval=0.1)
MakeProxy = Callable[..., FaultProxy]


def sample(datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([[b"zero", "sérve".encode()], [b"", b"\x00\x01"]], dtype=object)  # the server wants UTF-8
    if datatype == "BOOL":
        return np.array([[True, False], [False, True]])
    dtype = np.dtype({"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}.get(datatype, datatype.lower()))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max], [0, 1]], dtype=dtype)
    return np.array([[-2.5, 0.0], [1.25, 3.75]], dtype=dtype)


# --- the happy path, on the session's real server ---

def test_infer_sends_binary_tensors_and_returns_numpy_arrays(server: ServerProcess, fault_proxy: MakeProxy) -> None:
    proxy = fault_proxy(server.url)
    with RemoteModel(proxy.url, model="add") as model:
        outputs = model.infer({"a": A, "b": B})
    np.testing.assert_array_equal(outputs["sum"], A * B)
    assert outputs["sum"].dtype == np.float32
    (post,) = proxy.seen("POST")
    assert post.headers["content-type"] == "application/octet-stream"
    assert int(post.headers["inference-header-content-length"]) < len(post.body)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", V2_DATATYPES)
def test_every_datatype_round_trips(server: ServerProcess, datatype: str, binary: bool) -> None:
    if datatype == "BYTES" and not binary:
        value = np.array([[b"zero", "sérve".encode()]], dtype=object)  # JSON carries text, not raw bytes
    else:
        value = sample(datatype)
    with RemoteModel(server.url, model=f"identity_{datatype.lower()}", binary=binary) as model:
        outputs = model.infer({"input": value}, outputs=["copy"])
    assert list(outputs) == ["copy"]
    assert outputs["copy"].shape == value.shape
    if datatype == "BYTES":
        assert outputs["copy"].tolist() == value.tolist()
    else:
        assert outputs["copy"].dtype == value.dtype
        np.testing.assert_array_equal(outputs["copy"], value)


def test_plain_lists_take_their_datatype_from_metadata_fetched_once(server: ServerProcess,
                                                                    fault_proxy: MakeProxy) -> None:
    proxy = fault_proxy(server.url)
    with RemoteModel(proxy.url, model="add") as model:
        first = model.infer({"a": [[1, 2, 3, 4]], "b": [[0.5, 0.5, 0.5, 0.5]]})
        second = model.infer({"a": [[0, 0, 0, 0]], "b": [[1, 1, 1, 1]]})
    assert first["sum"].dtype == np.float32 and first["sum"].tolist() == [[0.5, 1, 1.5, 2]]
    assert second["sum"].tolist() == [[0, 0, 0, 0]]
    assert proxy.count("GET", "/v2/models/add") == 1


def test_ready_wake_metadata_and_versions(server: ServerProcess) -> None:
    with RemoteModel(server.url, model="add") as model:
        assert model.ready()
        model.wake()
        metadata = model.metadata()
    assert metadata["name"] == "add" and metadata["inputs"][0]["datatype"] == "FP32"
    with RemoteModel(server.url, model="add", version="1") as first:
        assert first.infer({"a": A, "b": B})["sum"].tolist() == (A + B).tolist()
    with RemoteModel(f"http://127.0.0.1:{unused_port()}", model="add") as nowhere:
        assert not nowhere.ready(timeout=1)


def test_a_rejected_request_says_why_where_and_how_often(server: ServerProcess) -> None:
    with RemoteModel(server.url, model="add") as model, pytest.raises(RequestRejected) as caught:
        model.infer({"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)})
    error = caught.value
    assert error.last_status == 400 and error.attempts == 1
    assert error.endpoint == f"{server.url}/v2/models/add/infer"
    assert "expects [-1, 4]" in error.message and "1 attempt, last status 400" in str(error)


def test_an_unknown_model_fails_on_its_readiness_probe(server: ServerProcess) -> None:
    with RemoteModel(server.url, model="nope") as model, pytest.raises(RequestRejected) as caught:
        model.infer({"a": A})
    assert caught.value.last_status == 404 and caught.value.attempts == 0


def test_async_model_gives_the_same_answers(server: ServerProcess) -> None:
    async def main() -> None:
        async with AsyncRemoteModel(server.url, model="add") as model:
            assert await model.ready()
            await model.wake()
            results = await asyncio.gather(*(model.infer({"a": A * i, "b": B}) for i in range(5)))
            listed = await model.infer({"a": [[1, 2, 3, 4]], "b": [[1, 1, 1, 1]]})
            assert (await model.metadata())["name"] == "add"
            with pytest.raises(RequestRejected):
                await model.infer({"a": np.ones((1, 3), np.float32), "b": np.ones((1, 3), np.float32)})
        for i, outputs in enumerate(results):
            np.testing.assert_array_equal(outputs["sum"], A * i * B)
        assert listed["sum"].tolist() == [[1, 2, 3, 4]]

    asyncio.run(main())


def test_credentials_go_to_the_model_service_and_its_cookies_never_come_back(server: ServerProcess,
                                                                           fault_proxy: MakeProxy) -> None:
    def script(seen: Seen, index: int) -> Forward | Respond:
        if index == 0:
            return Respond(200, b'{"ready":true}', (("set-cookie", "session=from-model; Path=/"),))
        return Forward()

    proxy = fault_proxy(server.url, script)
    with RemoteModel(proxy.url, model="add", headers={"Authorization": "Bearer model-token"}) as model:
        model.infer({"a": A, "b": B})
        model.infer({"a": A, "b": B})
    assert [seen.headers["authorization"] for seen in proxy.requests] == ["Bearer model-token"] * 3
    assert all("cookie" not in seen.headers for seen in proxy.requests)


# --- faults that really happen ---

def test_connection_refused_until_the_server_starts(add_repository: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    port = unused_port()
    started: list[ServerProcess] = []
    late = threading.Timer(0.5, lambda: started.append(
        start_server_on(port, ["--model_dir", str(add_repository)], tmp_path / "late.log", monkeypatch)))
    late.start()
    try:
        with RemoteModel(f"http://127.0.0.1:{port}", model="add", retry=FAST, cold_start=QUICK_COLD) as model:
            began = time.monotonic()
            outputs = model.infer({"a": A, "b": B})
            assert time.monotonic() - began > 0.4
        np.testing.assert_array_equal(outputs["sum"], A * B)
    finally:
        late.join(60)
        for server in started:
            server.stop()


def test_a_slow_start_answering_503_while_loading_is_waited_out(gated_model_server: tuple[str, threading.Event],
                                                                tmp_path: Path, fault_proxy: MakeProxy) -> None:
    from conftest import start_server

    uri, gate = gated_model_server
    server = start_server(["--model_name", "mlp", "--model_dir", uri, "--cache_dir", str(tmp_path / "cache")],
                          tmp_path / "slow.log", wait_ready=False)
    try:
        proxy = fault_proxy(server.url)
        threading.Timer(1.0, gate.set).start()
        with RemoteModel(proxy.url, model="mlp", retry=FAST, cold_start=QUICK_COLD) as model:
            outputs = model.infer({"input": np.full((1, 16), 0.5, np.float32)})
        assert outputs["output"].shape == (1, 4)
        assert proxy.count("POST") == 1  # the payload waited for readiness instead of bouncing off it
        assert proxy.count("GET", "/ready") >= 2
        statuses = [seen.path for seen in proxy.requests]
        assert statuses[-1].endswith("/infer")
    finally:
        gate.set()
        server.stop()


def test_a_server_killed_mid_run_and_restarted(add_repository: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    port = unused_port()
    args = ["--model_dir", str(add_repository)]
    first = start_server_on(port, args, tmp_path / "first.log", monkeypatch)
    restarted: list[ServerProcess] = []
    try:
        with RemoteModel(first.url, model="add", retry=FAST, cold_start=QUICK_COLD) as model:
            for _ in range(3):
                model.infer({"a": A, "b": B})
            os.kill(first.process.pid, signal.SIGKILL)
            first.process.wait(10)
            restart = threading.Timer(0.5, lambda: restarted.append(
                start_server_on(port, args, tmp_path / "second.log", monkeypatch)))
            restart.start()
            outputs = model.infer({"a": A, "b": B})  # refused, wakes, resent
            restart.join(60)
            assert model.state.last_answer is not None and not model.state.cold
        np.testing.assert_array_equal(outputs["sum"], A * B)
        assert restarted and restarted[0].process.pid != first.process.pid
    finally:
        first.stop()
        for server in restarted:
            server.stop()


def test_a_503_storm_is_resent_until_it_passes(server: ServerProcess, fault_proxy: MakeProxy) -> None:
    def script(seen: Seen, index: int) -> Forward | Respond:
        storm = seen.method == "POST" and len([r for r in proxy.requests if r.method == "POST"]) <= 5
        return Respond(503, b"pending request queue full") if storm else Forward()

    proxy = fault_proxy(server.url, script)
    with RemoteModel(proxy.url, model="add", retry=FAST) as model:
        outputs = model.infer({"a": A, "b": B})
    np.testing.assert_array_equal(outputs["sum"], A * B)
    assert proxy.count("POST") == 6


def test_a_503_storm_longer_than_the_deadline_ends_in_time(server: ServerProcess, fault_proxy: MakeProxy) -> None:
    proxy = fault_proxy(server.url, lambda seen, index: Respond(503, b"pending request queue full")
                        if seen.method == "POST" else Forward())
    with RemoteModel(proxy.url, model="add",
                     retry=RetryPolicy(deadline=1.0, backoff=0.05, backoff_max=0.2, max_attempts=100)) as model:
        began = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            model.infer({"a": A, "b": B})
        took = time.monotonic() - began
    assert took < 3.0  # the deadline (1 s) ended it: no sleeping past it, no attempts after it
    assert caught.value.last_status == 503 and caught.value.attempts == proxy.count("POST") > 2


def test_429_retry_after_is_honoured(server: ServerProcess, fault_proxy: MakeProxy) -> None:
    def script(seen: Seen, index: int) -> Forward | Respond:
        first_post = seen.method == "POST" and proxy.count("POST") == 1
        return Respond(429, b"slow down", (("retry-after", "1"),)) if first_post else Forward()

    proxy = fault_proxy(server.url, script)
    with RemoteModel(proxy.url, model="add", retry=FAST) as model:
        model.wake()
        began = time.monotonic()
        model.infer({"a": A, "b": B})
    assert time.monotonic() - began >= 1.0
    first, second = proxy.seen("POST")
    assert second.at - first.at >= 1.0


@pytest.mark.parametrize(
    "fault",
    [Respond(504, b"activator request timeout"), Respond(502, b"bad gateway"), Reset()],
    ids=["504", "502", "reset-after-send"],
)
def test_a_request_that_may_have_run_is_not_resent_unless_idempotent(
    server: ServerProcess, fault_proxy: MakeProxy, fault: Respond | Reset
) -> None:
    def script(seen: Seen, index: int) -> Forward | Respond | Reset:
        return fault if seen.method == "POST" and proxy.count("POST") == 1 else Forward()

    proxy = fault_proxy(server.url, script)
    with RemoteModel(proxy.url, model="add", retry=FAST, cold_start=QUICK_COLD) as model:
        with pytest.raises(OutcomeUnknown) as caught:
            model.infer({"a": A, "b": B})
        assert proxy.count("POST") == 1
        assert caught.value.attempts == 1
        assert caught.value.last_status == (fault.status if isinstance(fault, Respond) else None)

    proxy = fault_proxy(server.url, script)
    retry = RetryPolicy(deadline=10, backoff=0.01, idempotent=True)
    with RemoteModel(proxy.url, model="add", retry=retry, cold_start=QUICK_COLD) as model:
        np.testing.assert_array_equal(model.infer({"a": A, "b": B})["sum"], A * B)
    assert proxy.count("POST") == 2


def test_a_cold_start_held_by_an_activator_wakes_once_for_many_callers(activator: Callable[..., Activator]) -> None:
    cold = activator()
    results: list[np.ndarray] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    with RemoteModel(cold.url, model="add", retry=FAST, cold_start=QUICK_COLD) as model:
        def call(i: int) -> None:
            barrier.wait(10)
            try:
                results.append(model.infer({"a": A, "b": B * i})["sum"] - A * B * i)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors, errors
    assert len(results) == 8 and all((r == 0).all() for r in results)
    assert cold.proxy.count("GET", "/v2/models/add/ready") == 1  # one wake-up probe for eight callers
    assert cold.proxy.count("POST", "/v2/models/add/infer") == 8  # and every payload sent once


def test_async_callers_through_the_local_scale_to_zero_front_wake_it_once(
    dev_front: Callable[..., object], fault_proxy: MakeProxy, add_repository: Path
) -> None:
    front = dev_front("--model_dir", str(add_repository), "--idle_timeout", "60")
    proxy = fault_proxy(front.url)  # type: ignore[attr-defined]

    async def main() -> list[dict[str, np.ndarray]]:
        async with AsyncRemoteModel(proxy.url, model="add", retry=FAST, cold_start=QUICK_COLD) as model:
            return await asyncio.gather(*(model.infer({"a": A * i, "b": B}) for i in range(8)))

    results = asyncio.run(main())
    for i, outputs in enumerate(results):
        np.testing.assert_array_equal(outputs["sum"], A * i * B)
    assert proxy.count("GET", "/ready") == 1 and proxy.count("POST") == 8
    assert front.log().count("cold start: server process") == 1  # type: ignore[attr-defined]


def test_the_cold_start_deadline_ends_a_wait_that_never_ends(fault_proxy: MakeProxy) -> None:
    never = threading.Event()
    from tests.plugin.conftest import Hold

    proxy = fault_proxy(None, lambda seen, index: Hold(never))
    with RemoteModel(proxy.url, model="add", retry=FAST, cold_start=ColdStartPolicy(deadline=1.0)) as model:
        began = time.monotonic()
        with pytest.raises(ColdStartTimeout) as caught:
            model.infer({"a": A, "b": B})
    assert 0.9 < time.monotonic() - began < 3.0
    assert isinstance(caught.value, TimeoutError)
    assert proxy.count("POST") == 0 and proxy.count("GET") == 1


def test_the_circuit_breaker_fails_fast_then_probes_its_way_back(server: ServerProcess,
                                                                 fault_proxy: MakeProxy) -> None:
    broken = threading.Event()
    broken.set()

    def script(seen: Seen, index: int) -> Forward | Respond:
        return Respond(504, b"activator request timeout") if broken.is_set() and seen.method == "POST" else Forward()

    proxy = fault_proxy(server.url, script)
    circuit = CircuitPolicy(failures=2, reset_after=0.5)
    with RemoteModel(proxy.url, model="add", retry=FAST, cold_start=QUICK_COLD, circuit=circuit) as model:
        for _ in range(2):
            with pytest.raises(OutcomeUnknown):
                model.infer({"a": A, "b": B})
        sent = len(proxy.requests)
        with pytest.raises(CircuitOpen) as caught:
            model.infer({"a": A, "b": B})
        assert len(proxy.requests) == sent  # failed fast: nothing went out
        assert 0 < (caught.value.retry_after or 0) <= 0.5
        broken.clear()
        wait_until(lambda: model.state.circuit.state(time.monotonic()) == "half-open", 5)
        np.testing.assert_array_equal(model.infer({"a": A, "b": B})["sum"], A * B)
        assert model.state.circuit.state(time.monotonic()) == "closed"
    trial = [(seen.method, seen.path.rsplit("/", 1)[-1]) for seen in proxy.requests[sent:]]
    assert trial == [("GET", "ready"), ("POST", "infer")]  # the trial woke the service first
