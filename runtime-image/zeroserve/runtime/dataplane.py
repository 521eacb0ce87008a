"""The transport-neutral V2 operations: health, metadata and inference. REST (and gRPC) are thin over it."""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

from zeroserve.runtime.batching import Batcher, RunResult, batchable, timed_run
from zeroserve.runtime.cores import CoreScheduler
from zeroserve.runtime.messages import InferRequest, InferResult, OutputTensor
from zeroserve.runtime.metrics import Gauge, Labels, Protocol, ServerMetrics
from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.repository import ModelRepository, State
from zeroserve.runtime.runpool import RunPool
from zeroserve.runtime.server_errors import InvalidInput, ServerBusy
from zeroserve.runtime.settings import BatchSettings

if TYPE_CHECKING:
    from zeroserve.runtime.config import RuntimeConfig

SERVER_NAME = "zeroserve"
EXTENSIONS = ["binary_tensor_data"]


INLINE_MAX_INPUT_BYTES = 64 * 1024
# Under the adaptive hint, runs share the cores only when the model's fastest run took at least this long.
# Shorter runs do not gain (the work around them dominates) and lose to the hand-offs between threads and their
# contention for the GIL: 256 KiB tensors, 0.12 ms runs, 4 connections: 780-830 req/s sharing vs 1,040-1,350
# one at a time. The fastest run, not the average: under load the average overstates a short run (it passed
# 1 ms for that model). A model with a dynamic batch is judged by its smallest batch (warmup runs one row).
SHARE_MIN_RUN_SECONDS = 0.001
# Under the adaptive hint a request that is alone runs on the event loop's thread, as KServe runs every request:
# no hand-off to a worker and back, one thread fewer to wake. Image CNN, one call in flight, alternating rounds:
# gRPC p99 17.3 -> 12.3-15.9 ms over four sets (KServe 13.9-15.0 in the same sets), REST binary p99 14.9 -> 11.7 ms
# and +5% req/s. Only for runs expected to be this short (the fastest run, scaled by the request's input bytes,
# and the average): meanwhile the loop answers nothing else, health probes included.
LOOP_RUN_MAX_SECONDS = 0.05
# While a run holds the loop it reads no request, so requests sent meanwhile look as if they came after it and
# would run one by one on the loop too (4 calls in flight: 104 instead of 114 req/s). Once requests (to any model)
# have been seen overlapping, lone ones go to the workers until none has overlapped for this long.
LONE_QUIET_SECONDS = 1.0


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        inference_threads: int,
        inline_seconds: float = 0.0,
        *,
        batching: BatchSettings | None = None,
        max_queue: int = 0,
        metrics: ServerMetrics | None = None,
        cores: int = 0,
    ) -> None:
        self.repository = repository
        # Runs shorter than this stay on the event loop: for a tiny model the hop to a worker thread
        # costs more than the run itself (measured ~130 us per request on 2 cores, bench/).
        self.inline_seconds = inline_seconds
        self.batching = batching or BatchSettings()
        self.max_queue = max_queue  # requests admitted past validation at once; 0: no bound
        self.in_flight = 0
        self.metrics = metrics or ServerMetrics()
        self.metrics.add_gauge(Gauge("zeroserve_queue_depth", "Requests waiting for a batch, per model", self._depths))
        self.metrics.add_gauge(
            Gauge("zeroserve_inference_in_flight", "Inferences admitted and not yet answered", self._in_flight)
        )
        self.metrics.add_gauge(
            Gauge("zeroserve_inference_receiving", "REST inference bodies still arriving", self._receiving)
        )
        self._inference_threads = inference_threads
        # session.run releases the GIL; a bounded pool keeps ORT's own threads from being oversubscribed.
        self._pool = RunPool(inference_threads, "zeroserve-infer")
        self._batchers: dict[OnnxModel, Batcher | None] = {}
        # --performance_hint adaptive: a lone run takes every core, competing runs one each (cores.py), on a pool
        # of their own. Models with short runs stay on the pool above (SHARE_MIN_RUN_SECONDS).
        self.cores = CoreScheduler(cores) if cores > 1 else None
        self._overlapped_at = -math.inf  # time.monotonic() when requests were last seen overlapping
        # Requests whose bodies are still being read (REST): not admitted yet, but in flight. A 600 KB body takes
        # several turns of the loop; without them a request admitted while others were still arriving looked alone
        # (REST binary CNN, 4 connections: 114 instead of 121 req/s, p99 53 instead of 41 ms, in some rounds).
        self.receiving = 0
        self._cores_pool: RunPool | None = None
        if self.cores is not None:
            self._cores_pool = RunPool(cores, "zeroserve-cores")
            self.metrics.add_gauge(
                Gauge(
                    "zeroserve_session_runs_total",
                    "session.run calls under --performance_hint adaptive, by the cores they had: all, or one",
                    self._grants, kind="counter",
                )
            )

    @classmethod
    def from_config(cls, repository: ModelRepository, config: RuntimeConfig) -> DataPlane:
        """The data plane the REST and gRPC servers share, sized and bounded by the server configuration."""
        cores = config.adaptive_cores()
        return cls(
            repository, config.inference_threads, config.inline_run_ms / 1000,
            batching=config.batching, max_queue=config.max_queue_size, cores=cores,
        )

    def close(self) -> None:
        for batcher in self._batchers.values():
            if batcher is not None:
                batcher.close()
        self._pool.shutdown()
        if self._cores_pool is not None:
            self._cores_pool.shutdown()

    def _batcher(self, model: OnnxModel) -> Batcher | None:
        if model not in self._batchers:
            batcher = None
            if self.batching.enabled and batchable(model):
                batcher = Batcher(
                    model, self._pool, self.batching, self._inference_threads, in_flight=self._in_flight_or_arriving
                )
            self._batchers[model] = batcher
        return self._batchers[model]

    def _in_flight_or_arriving(self) -> int:
        """Requests admitted and not yet run, or still arriving (REST bodies being read): a batch's company."""
        return self.in_flight + self.receiving

    def _depths(self) -> dict[Labels, float]:
        return {
            (("model", model.name), ("version", model.version)): float(batcher.depth)
            for model, batcher in self._batchers.items()
            if batcher is not None
        }

    def _grants(self) -> dict[Labels, float]:
        grants = self.cores.grants if self.cores is not None else {}
        return {(("cores", cores),): float(count) for cores, count in grants.items()}

    def _in_flight(self) -> dict[Labels, float]:
        return {(): float(self.in_flight)}

    def _receiving(self) -> dict[Labels, float]:
        return {(): float(self.receiving)}

    def ready(self) -> bool:
        return self.repository.all_ready()

    def server_metadata(self) -> dict[str, Any]:
        from zeroserve.runtime import version

        return {"name": SERVER_NAME, "version": version(), "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None) -> bool:
        return self.repository.find(name, version).state is State.READY

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        model = self.repository.ready_model(name, version)
        return model.metadata(self.repository.versions(name))

    def observe(
        self, name: str, version: str | None, result: InferResult | None, status: int, seconds: float,
        protocol: Protocol,
    ) -> None:
        """Count one answered inference request (REST or gRPC) in the request metrics."""
        if result is not None:
            self.metrics.observe(result.model_name, result.model_version, status, seconds, protocol)
            return
        # Label failures with names the server serves only: a client must not mint new series at will.
        repository = self.repository
        known = name in repository.names() and version in (None, *repository.versions(name))
        self.metrics.observe(name if known else "", (version or "") if known else "", status, seconds, protocol)

    def server_timing(self, result: InferResult) -> str:
        """The ``Server-Timing`` of an answer: queue and compute; the cold start's phases on the first one."""
        timing = result.server_timing()
        if result.coldstart:  # the first answer also tells where the cold start went
            timing = f"{self.repository.coldstart.server_timing()}, {timing}"
        return timing

    async def infer(
        self, name: str, version: str | None, request: InferRequest, *, extra_turn: bool = False
    ) -> InferResult:
        """Run one request. ``extra_turn``: a run short enough for the event loop lets the loop turn once more
        first when other requests are in flight (REST on uvloop asks for it; see below)."""
        model = self.repository.ready_model(name, version)
        feeds = model.feeds(request.inputs)
        output_names: list[str] | None = None
        if request.outputs is not None:
            output_names = [output.name for output in request.outputs]
            if len(set(output_names)) != len(output_names):
                raise InvalidInput("an output is requested more than once")
            model.check_outputs(output_names)
        if self.max_queue and self.in_flight >= self.max_queue:
            raise ServerBusy(f"server is at its limit of {self.max_queue} queued inferences; retry shortly")
        self.in_flight += 1
        if self.in_flight > 1 or self.receiving:
            self._overlapped_at = time.monotonic()
        try:
            submitted = time.perf_counter()
            batch_size = 1
            batcher = self._batcher(model)
            if batcher is not None:
                arrays, started, finished, batch_size = await batcher.run(feeds, output_names)
            elif (
                model.run_seconds < self.inline_seconds
                and _input_bytes(feeds) <= INLINE_MAX_INPUT_BYTES
                and model.cpu_only  # a GPU run at a new shape may tune kernels for tens of ms, holding the loop
            ):
                # Turns of the event loop first: on uvloop, a saturated loop that runs requests as soon as it has
                # read them serves some connections far later than others. One turn: tiny model, 64 connections,
                # p99 284 -> 80-87 ms, 3,100 -> 3,400 req/s (1 connection: p50 within noise). A second one for
                # REST on uvloop while others are in flight (read after the first turn, which admits requests
                # scheduled beside this one): 64 connections, binary p99 101-115 -> 47-53 ms, JSON 93-96 -> 49-56
                # ms over two A/Bs, req/s within 2% at 4, 16 and 64 (a bare uvicorn app with a 150 us handler:
                # 206, 63, 27 ms for none, one, two; on the standard loop 18 ms with none). Not when alone, and not
                # for gRPC, whose calls arrive through grpc's own queue: there it did not help (64 calls in
                # flight: p99 47 -> 60 ms over six rounds, within their spread).
                await asyncio.sleep(0)
                if extra_turn and (self.in_flight > 1 or self.receiving):
                    await asyncio.sleep(0)
                arrays, started, finished = timed_run(model.run, feeds, output_names)
            elif self.cores is not None and model.cpu_only and model.fastest_run_seconds >= SHARE_MIN_RUN_SECONDS:
                # Not for a GPU session (--providers auto on a GPU): it has no cores to share, and ORT gives every
                # thread that runs it a cuDNN/cuBLAS workspace of its own (16 threads on an H200: +1.1 GiB).
                if _short_on_cpu(model, feeds) and await self._alone(self.cores):
                    self.cores.ran_alone()
                    arrays, started, finished = timed_run(model.run, feeds, output_names)
                else:
                    arrays, started, finished = await self._run_on_cores(self.cores, model, feeds, output_names)
            else:
                arrays, started, finished = await self._pool.run(timed_run, model.run, feeds, output_names)
        finally:
            self.in_flight -= 1
        self.metrics.observe_run(model.name, model.version, started - submitted, finished - started, batch_size)
        specs = {spec.name: spec for spec in model.outputs}
        names = output_names if output_names is not None else [spec.name for spec in model.outputs]
        outputs = [
            OutputTensor(out_name, specs[out_name].datatype, array)
            for out_name, array in zip(names, arrays)
        ]
        coldstart = self.repository.coldstart
        first = coldstart.first_response_pending
        coldstart.first_response_pending = False
        return InferResult(
            model.name, model.version, outputs, request.id,
            queue_seconds=started - submitted, compute_seconds=finished - started, coldstart=first,
        )

    async def _alone(self, cores: CoreScheduler) -> bool:
        """Whether this request is the only one in flight (none still arriving), no run is queued or running,
        and no requests overlapped for ``LONE_QUIET_SECONDS``. Asked twice, around one turn of the loop: requests
        whose tasks were already scheduled beside this one are admitted in that turn and make it not alone."""
        if not self._quiet(cores):
            return False
        await asyncio.sleep(0)
        return self._quiet(cores)

    def _quiet(self, cores: CoreScheduler) -> bool:
        now = time.monotonic()
        # A run left behind by a request whose client went away counts too (contended).
        if self.in_flight > 1 or self.receiving or cores.contended:
            self._overlapped_at = now
            return False
        return now - self._overlapped_at >= LONE_QUIET_SECONDS

    async def _run_on_cores(
        self, cores: CoreScheduler, model: OnnxModel, feeds: dict[str, Any], output_names: list[str] | None
    ) -> RunResult:
        assert self._cores_pool is not None
        if cores.contended:
            model.prepare_single_thread_session()  # once; ready for a later contention
        cores.submitted()
        try:
            # A run cancelled before a worker takes it (its client went away) no longer counts as waiting.
            job = self._cores_pool.run(_run_with_cores, cores, model, feeds, output_names, skipped=cores.withdrawn)
        except BaseException:  # never queued (the workers are shut down): it must not count as waiting
            cores.withdrawn()
            raise
        return await job


def _run_with_cores(
    cores: CoreScheduler, model: OnnxModel, feeds: dict[str, Any], output_names: list[str] | None
) -> RunResult:
    """In a worker thread: wait for cores, then run on every thread or on the single-thread session."""
    granted = cores.acquire(can_share=lambda: model.single_thread_ready)
    try:
        run = model.run if granted == cores.cores else model.run_single_thread
        return timed_run(run, feeds, output_names)
    finally:
        cores.release(granted)


def _short_on_cpu(model: OnnxModel, feeds: dict[str, Any]) -> bool:
    """Whether this run may hold the event loop: a CPU session (a GPU one may build an engine for a new shape),
    expected under ``LOOP_RUN_MAX_SECONDS`` by its fastest run scaled up to these inputs (warmup runs one row; a
    request may bring many) and by the recent average."""
    if not model.cpu_only or model.run_seconds >= LOOP_RUN_MAX_SECONDS:
        return False
    scale = max(1.0, _input_bytes(feeds) / max(1, model.fastest_run_bytes))
    return model.fastest_run_seconds * scale < LOOP_RUN_MAX_SECONDS


def _input_bytes(feeds: dict[str, Any]) -> int:
    return sum(array.nbytes for array in feeds.values())
