"""--performance_hint: a lone run gets every core, competing runs one core each on a single-thread session.

The scheduler is driven by real threads; the model's second session is real onnxruntime; the end-to-end test
is a real server answering concurrent clients, checked against onnxruntime run in this process."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from zeroserve.runtime import model as model_module
from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.cores import CoreScheduler
from zeroserve.runtime.dataplane import DataPlane
from zeroserve.runtime.loader import load_models
from zeroserve.runtime.messages import InferRequest, InputTensor
from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.repository import ModelRepository
from zeroserve.runtime.run_stats import RunResult
from zeroserve.runtime.settings import ProviderSettings

import models as test_models
from conftest import start_server

WAIT = 10.0  # bound on every wait below


def yes() -> bool:
    return True


def no() -> bool:
    return False


def test_a_lone_run_gets_every_core() -> None:
    scheduler = CoreScheduler(4)
    assert not scheduler.contended
    scheduler.submitted()
    assert scheduler.acquire(can_share=yes) == 4
    assert scheduler.contended
    scheduler.release(4)
    assert not scheduler.contended and scheduler.grants == {"all": 1, "one": 0}


def test_runs_waiting_behind_others_get_one_core_each() -> None:
    scheduler = CoreScheduler(2)
    for _ in range(3):
        scheduler.submitted()
    assert scheduler.acquire(can_share=yes) == 1  # two more are waiting: share
    assert scheduler.acquire(can_share=yes) == 1
    third, granted = acquire_in_thread(scheduler)
    time.sleep(0.05)
    assert granted == [], "no core is free: the third run must wait"
    scheduler.release(1)
    third.join(WAIT)
    assert granted == [1]  # a run still holds a core, so the third shares
    scheduler.release(1)
    scheduler.release(1)
    assert scheduler.grants == {"all": 0, "one": 3}


def acquire_in_thread(scheduler: CoreScheduler) -> tuple[threading.Thread, list[int]]:
    # For a run already counted by submitted(): only the acquire happens in the thread.
    granted: list[int] = []
    thread = threading.Thread(target=lambda: granted.append(scheduler.acquire(yes)), daemon=True)
    thread.start()
    return thread, granted


def test_a_run_that_cannot_share_waits_for_every_core() -> None:
    scheduler = CoreScheduler(2)
    scheduler.submitted()
    scheduler.submitted()
    assert scheduler.acquire(can_share=yes) == 1
    granted: list[int] = []
    thread = threading.Thread(target=lambda: granted.append(scheduler.acquire(no)), daemon=True)
    thread.start()
    time.sleep(0.05)
    assert granted == [], "one core is free, but a model without a single-thread session needs both"
    scheduler.release(1)
    thread.join(WAIT)
    assert granted == [2]


def test_a_run_that_cannot_share_is_not_starved_by_runs_that_can() -> None:
    # Four workers keep one-core runs going on 2 cores; a run that needs both must still get them.
    scheduler = CoreScheduler(2)
    stop, exclusive_done = threading.Event(), threading.Event()

    def sharer() -> None:
        while not stop.is_set():
            scheduler.submitted()
            granted = scheduler.acquire(yes)
            time.sleep(0.001)
            scheduler.release(granted)

    workers = [threading.Thread(target=sharer, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(0.05)
    scheduler.submitted()
    granted: list[int] = []

    def exclusive() -> None:
        granted.append(scheduler.acquire(no))
        scheduler.release(granted[0])
        exclusive_done.set()

    threading.Thread(target=exclusive, daemon=True).start()
    finished = exclusive_done.wait(WAIT)
    stop.set()
    for worker in workers:
        worker.join(WAIT)
    assert finished and granted == [2], "the run that needs every core waited forever"


def test_a_run_that_becomes_able_to_share_is_granted_one_core() -> None:
    # Its model's single-thread session became ready while it waited.
    scheduler = CoreScheduler(2)
    for _ in range(2):
        scheduler.submitted()
    assert scheduler.acquire(can_share=yes) == 1
    ready = threading.Event()
    granted: list[int] = []
    thread = threading.Thread(target=lambda: granted.append(scheduler.acquire(ready.is_set)), daemon=True)
    thread.start()
    time.sleep(0.05)
    assert granted == []
    ready.set()
    scheduler.release(0)  # any change wakes the waiters, which ask again
    thread.join(WAIT)
    assert granted == [1]


def test_runs_waiting_for_cores_share_them_when_they_free_up() -> None:
    # 4 cores: A holds them all; B and C wait inside acquire. When A ends, B must not take all four.
    scheduler = CoreScheduler(4)
    scheduler.submitted()
    assert scheduler.acquire(can_share=yes) == 4
    results: list[int] = []
    threads = []
    for _ in range(2):
        scheduler.submitted()
        threads.append(threading.Thread(target=lambda: results.append(scheduler.acquire(yes)), daemon=True))
        threads[-1].start()
    deadline = time.monotonic() + WAIT
    while scheduler._waiting < 2 and time.monotonic() < deadline:  # both blocked in acquire
        time.sleep(0.005)
    scheduler.release(4)
    for thread in threads:
        thread.join(WAIT)
    assert sorted(results) == [1, 1]


def test_a_withdrawn_run_no_longer_counts_as_waiting() -> None:
    scheduler = CoreScheduler(2)
    scheduler.submitted()
    scheduler.submitted()
    scheduler.withdrawn()  # cancelled while queued
    assert scheduler.acquire(can_share=yes) == 2


def test_the_pool_never_runs_more_than_the_cores_allow() -> None:
    scheduler = CoreScheduler(2)
    in_use, peak, lock = [0], [0], threading.Lock()

    def job(can_share: bool) -> int:
        granted = scheduler.acquire(lambda: can_share)
        with lock:
            in_use[0] += granted
            peak[0] = max(peak[0], in_use[0])
        time.sleep(0.002)
        with lock:
            in_use[0] -= granted
        scheduler.release(granted)
        return granted

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = []
        for index in range(60):
            scheduler.submitted()
            futures.append(pool.submit(job, index % 3 != 0))
        results = [future.result(WAIT) for future in futures]
    assert peak[0] <= 2
    assert set(results) <= {1, 2} and 1 in results
    assert not scheduler.contended


def test_a_cpu_model_builds_a_single_thread_session_that_answers_the_same(tmp_path: Path) -> None:
    path = test_models.mlp_model(tmp_path / "mlp" / "model.onnx")
    model = OnnxModel("mlp", "1", path, ProviderSettings(choice="cpu", intra_op_threads=2))
    model.load()
    assert not model.single_thread_ready
    model.prepare_single_thread_session()
    deadline = time.monotonic() + WAIT
    while not model.single_thread_ready and time.monotonic() < deadline:
        time.sleep(0.01)
    assert model.single_thread_ready
    feeds = {"input": np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)}
    single_thread_outputs = model.timed_run(feeds, None, single_thread=True)[0]
    np.testing.assert_allclose(single_thread_outputs[0], model.run(feeds, None)[0], rtol=1e-5)


def test_no_single_thread_session_off_the_cpu_mock_gpu(tmp_path: Path) -> None:
    # No GPU here: the provider list a CUDA session would report stands in for one.
    path = test_models.mlp_model(tmp_path / "mlp" / "model.onnx")
    model = OnnxModel("mlp", "1", path, ProviderSettings(choice="cpu", intra_op_threads=2))
    model.load()
    model.execution_providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    model.prepare_single_thread_session()
    time.sleep(0.2)
    assert not model.single_thread_ready


def test_no_single_thread_session_for_weights_too_large_to_hold_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = test_models.mlp_model(tmp_path / "mlp" / "model.onnx")
    monkeypatch.setattr(model_module, "SINGLE_THREAD_SESSION_MAX_BYTES", 100)
    model = OnnxModel("mlp", "1", path, ProviderSettings(choice="cpu", intra_op_threads=2))
    model.load()
    with caplog.at_level("INFO", logger="zeroserve.runtime"):
        model.prepare_single_thread_session()
        deadline = time.monotonic() + WAIT
        while "too large to hold twice" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "too large to hold twice" in caplog.text
    assert not model.single_thread_ready


@pytest.mark.parametrize(
    ("argv", "hint", "threads", "intra"),
    [
        ([], "adaptive", 1, None),
        (["--inference_threads", "3"], "latency", 3, None),
        (["--performance_hint", "latency"], "latency", 1, None),
        (["--performance_hint", "throughput", "--intra_op_threads", "1"], "throughput", None, 1),
    ],
)
def test_performance_hint_flags(argv: list[str], hint: str, threads: int | None, intra: int | None) -> None:
    config = RuntimeConfig.from_args(argv, {})
    assert config.performance_hint == hint
    assert config.providers.intra_op_threads == intra
    if threads is not None:
        assert config.inference_threads == threads
    else:
        assert config.inference_threads >= 1  # the CPU quota, one run per core


def test_inference_threads_belongs_to_the_latency_hint(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        RuntimeConfig.from_args(["--performance_hint", "adaptive", "--inference_threads", "2"], {})
    assert "--inference_threads goes with --performance_hint latency" in capsys.readouterr().err


def test_adaptive_cores_apply_to_cpu_sessions_with_threads_to_share() -> None:
    assert RuntimeConfig.from_args(["--intra_op_threads", "4"], {}).adaptive_cores() == 4
    assert RuntimeConfig.from_args(["--intra_op_threads", "1"], {}).adaptive_cores() == 0
    assert RuntimeConfig.from_args(["--intra_op_threads", "4", "--providers", "cuda"], {}).adaptive_cores() == 0
    latency = RuntimeConfig.from_args(["--intra_op_threads", "4", "--performance_hint", "latency"], {})
    assert latency.adaptive_cores() == 0


def session_runs(url: str) -> dict[str, float]:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name == "zeroserve_session_runs":
            return {sample.labels["cores"]: sample.value for sample in family.samples}
    return {}


def test_concurrent_requests_share_the_cores_and_get_the_same_answers(tmp_path: Path) -> None:
    # Convolutions: one image takes milliseconds (above SHARE_MIN_RUN_SECONDS), so concurrent requests overlap.
    path = test_models.conv_model(tmp_path / "repo" / "conv" / "1" / "model.onnx", size=96)
    # 2 threads per run whatever this machine has; runs always leave the event loop (no inline runs).
    server = start_server(
        ["--model_dir", str(tmp_path / "repo"), "--intra_op_threads", "2", "--inline_run_ms", "0"],
        tmp_path / "server.log",
    )
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal((1, 3, 96, 96)).astype(np.float32) for _ in range(6)]
    expected = [reference.run(None, {"input": batch})[0] for batch in batches]
    url = f"{server.url}/v2/models/conv/infer"

    def infer(index: int) -> np.ndarray:
        batch = batches[index]
        body = {"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                            "data": batch.ravel().tolist()}]}  # fmt: skip
        output = httpx.post(url, json=body, timeout=WAIT).json()["outputs"][0]
        return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])

    def infer_all(pool: ThreadPoolExecutor) -> None:
        for index, answer in enumerate(pool.map(infer, range(len(batches)))):
            np.testing.assert_allclose(answer, expected[index], rtol=1e-4, atol=1e-4)

    try:
        with ThreadPoolExecutor(max_workers=len(batches)) as pool:
            deadline = time.monotonic() + 30
            while "side by side" not in server.log() and time.monotonic() < deadline:
                infer_all(pool)  # contention builds the single-thread session
            assert "side by side on one thread each" in server.log()
            before = session_runs(server.url)
            for _ in range(20):  # bounded: overlap is likely on every round, not certain on a loaded machine
                infer_all(pool)
                runs = session_runs(server.url)
                if runs["one"] > before.get("one", 0.0):
                    break
        assert runs["one"] > before.get("one", 0.0), f"no run shared the cores: {runs}"
        # A lone request afterwards gets every core again.
        np.testing.assert_allclose(infer(0), expected[0], rtol=1e-4, atol=1e-4)
        assert session_runs(server.url)["all"] == runs["all"] + 1
    finally:
        server.stop()


class RecordedPlane:
    """A data plane over a real conv model (dynamic batch) in this process, noting the thread of every run."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = test_models.conv_model(tmp_path / "conv.onnx", size=96)
        argv = ["--model_name", "conv", "--model_dir", str(self.path), "--intra_op_threads", "2"]
        config = RuntimeConfig.from_args(argv, {})
        repository = ModelRepository()
        asyncio.run(load_models(config, repository))
        (entry,) = repository.entries()
        self.model = entry.model
        self.plane = DataPlane.from_config(repository, config)
        self.threads: list[str] = []
        timed_run = self.model.timed_run

        def recorded_run(feeds: dict[str, np.ndarray], output_names: list[str] | None, **how: bool) -> RunResult:
            self.threads.append(threading.current_thread().name)
            return timed_run(feeds, output_names, **how)

        monkeypatch.setattr(self.model, "timed_run", recorded_run)
        reference = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(3)
        self.images = [rng.standard_normal((1, 3, 96, 96)).astype(np.float32) for _ in range(4)]
        self.expected = [reference.run(None, {"input": image})[0] for image in self.images]

    def place(self, **changes: Any) -> None:
        """Change the placement policy's thresholds."""
        self.plane.placement = replace(self.plane.placement, **changes)

    async def infer(self, index: int, copies: int = 1, rest: bool = False) -> None:
        image = np.repeat(self.images[index], copies, axis=0)
        request = InferRequest([InputTensor("input", "FP32", list(image.shape), image)])
        result = await self.plane.infer("conv", None, request, rest=rest)
        want = np.repeat(self.expected[index], copies, axis=0)
        np.testing.assert_allclose(result.outputs[0].array, want, rtol=1e-4, atol=1e-4)


@pytest.fixture
def recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordedPlane]:
    plane = RecordedPlane(tmp_path, monkeypatch)
    # Whatever this machine's speed: every run of the conv model counts as short enough to share and for the loop.
    plane.place(share_min_run_seconds=0.0, loop_run_max_seconds=10.0, lone_quiet_seconds=60.0)
    yield plane
    plane.plane.close()


def test_a_lone_request_runs_on_the_event_loop_until_requests_overlap(
    recorded: RecordedPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop's own thread (this one) when a request is alone, the core-sharing workers once requests overlap,
    # and the loop again after a quiet spell.
    threads, cores = recorded.threads, recorded.plane.cores
    assert cores is not None

    async def scenario() -> None:
        here = threading.current_thread().name
        before = cores.grants["all"]
        await recorded.infer(0)
        assert threads == [here], "a lone request runs on the loop's thread"
        assert cores.grants["all"] == before + 1
        threads.clear()
        await asyncio.gather(*(recorded.infer(index) for index in range(4)))  # admitted together: none is alone
        assert threads and here not in threads, threads
        threads.clear()
        await recorded.infer(1)  # alone, but requests overlapped within LONE_QUIET_SECONDS
        assert threads and threads[0] != here, threads
        threads.clear()
        recorded.place(lone_quiet_seconds=0.0)  # the quiet spell has passed
        before = cores.grants["all"]
        await recorded.infer(2)
        assert threads == [here], "after a quiet spell a lone request is back on the loop"
        assert cores.grants["all"] == before + 1

    asyncio.run(scenario())


def test_a_request_much_larger_than_the_fastest_run_stays_off_the_loop(
    recorded: RecordedPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Warmup ran one image; 16 images may run 16 times as long, which must not hold the loop.
    stats = recorded.model.stats
    assert stats.fastest_input_bytes == recorded.images[0].nbytes
    recorded.place(loop_run_max_seconds=stats.fastest_seconds * 4)
    monkeypatch.setattr(stats, "average_seconds", stats.fastest_seconds)
    here = threading.current_thread().name
    asyncio.run(recorded.infer(0, copies=16))
    assert recorded.threads and recorded.threads[0] != here, recorded.threads


def test_a_gpu_session_runs_on_the_inference_workers_only_mock_gpu(
    recorded: RecordedPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No GPU here: the provider list a CUDA session reports stands in for one. Its first run at a new shape may
    # tune kernels or build an engine, which must not hold the loop, whatever its runs took so far (inline, or
    # alone); and it has no cores to share, while every thread that runs it gets a GPU workspace of its own
    # (seen on an H200: 16 core-sharing threads held 1.1 GiB more than one worker).
    monkeypatch.setattr(recorded.model, "execution_providers", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    recorded.place(inline_run_seconds=10.0)
    cores = recorded.plane.cores
    assert cores is not None
    before = dict(cores.grants)

    async def scenario() -> None:
        await recorded.infer(0)
        await asyncio.gather(*(recorded.infer(index) for index in range(4)))

    asyncio.run(scenario())
    assert len(recorded.threads) == 5 and all(name.startswith("zeroserve-infer") for name in recorded.threads)
    assert cores.grants == before


def test_a_request_whose_body_is_still_arriving_keeps_others_off_the_loop(recorded: RecordedPlane) -> None:
    # REST reads a large body over several turns of the loop; such a request is in flight before it is admitted.
    here = threading.current_thread().name
    recorded.plane.traffic.receiving = 1
    asyncio.run(recorded.infer(0))
    assert recorded.threads and recorded.threads[0] != here, recorded.threads


def test_a_short_rest_run_waits_one_more_turn_of_the_loop_only_when_others_are_in_flight(
    recorded: RecordedPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs short enough to stay on the event loop (the tiny-model path) let the loop turn once before running, and
    # for REST on uvloop (rest_extra_turn) once more when other requests are in flight: a saturated uvloop otherwise
    # leaves some connections waiting many rounds (bench/README.md has the numbers). A lone request must not pay.
    recorded.place(inline_run_seconds=10.0, inline_max_input_bytes=1 << 30, rest_extra_turn=True)
    turns_at_run: list[int] = []
    turns = 0
    timed_run = recorded.model.timed_run

    def counted_run(feeds: dict[str, np.ndarray], output_names: list[str] | None, **how: bool) -> RunResult:
        turns_at_run.append(turns)
        return timed_run(feeds, output_names, **how)

    monkeypatch.setattr(recorded.model, "timed_run", counted_run)

    async def scenario() -> tuple[list[int], list[int], list[int]]:
        loop = asyncio.get_running_loop()
        ticking = True

        def tick() -> None:  # one call per turn of the loop
            nonlocal turns
            turns += 1
            if ticking:
                loop.call_soon(tick)

        async def turns_before_runs(requests: int, rest: bool) -> list[int]:
            nonlocal turns
            turns_at_run.clear()
            turns = 0
            await asyncio.gather(*(recorded.infer(index, rest=rest) for index in range(requests)))
            return list(turns_at_run)

        loop.call_soon(tick)
        lone = await turns_before_runs(1, rest=True)
        together = await turns_before_runs(3, rest=True)
        together_grpc = await turns_before_runs(3, rest=False)
        ticking = False
        return lone, together, together_grpc

    lone, together, together_grpc = asyncio.run(scenario())
    assert recorded.threads == [threading.current_thread().name] * 7, "every run took the event loop's path"
    assert len(lone) == 1 and len(together) == 3
    assert together == [lone[0] + 1] * 3, (lone, together)
    assert together_grpc == lone * 3, (lone, together_grpc)
