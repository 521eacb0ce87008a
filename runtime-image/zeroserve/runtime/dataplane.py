"""The transport-neutral V2 operations: health, metadata and inference. REST and gRPC are thin over it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from zeroserve.runtime import memory
from zeroserve.runtime.batching import Batcher, batchable
from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.cores import CoreScheduler
from zeroserve.runtime.messages import InferRequest, InferResult, OutputTensor
from zeroserve.runtime.metering import Metering
from zeroserve.runtime.metrics import CallbackCounter, Gauge, Labels, ServerMetrics
from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.model_manager import ModelManager, Use
from zeroserve.runtime.placement import Placement, PlacementSettings, Traffic, choose, extra_turn
from zeroserve.runtime.repository import ModelRepository, State
from zeroserve.runtime.run_stats import RunResult
from zeroserve.runtime.runpool import RunPool
from zeroserve.runtime.server_errors import InvalidInput, ServerBusy
from zeroserve.runtime.settings import BatchSettings

if TYPE_CHECKING:
    from zeroserve.runtime.telemetry import Telemetry

SERVER_NAME = "zeroserve"
# After requests that held this much at once, freed buffers are handed back to the kernel once none is held.
TRIM_AFTER_BYTES = 64 * 1024 * 1024
EXTENSIONS = ["binary_tensor_data", "model_repository"]


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        inference_threads: int,
        placement: PlacementSettings | None = None,
        *,
        batching: BatchSettings | None = None,
        max_queue: int = 0,
        max_inflight_bytes: int = 0,
        metrics: ServerMetrics | None = None,
        billing_memory_bytes: int = 0,
        models: ModelManager | None = None,
    ) -> None:
        self.repository = repository
        self.placement = placement or PlacementSettings()
        self.batching = batching or BatchSettings()
        self.max_queue = max_queue  # requests admitted past validation at once; 0: no bound
        self.max_inflight_bytes = max_inflight_bytes  # request bytes held at once; 0: no budget
        self.bytes_held = 0
        self._peak_held = 0  # the most bytes held since the heap was last trimmed
        self._trimming = False
        self.traffic = Traffic()
        self.metrics = metrics or ServerMetrics()
        self.metering = Metering(billing_memory_bytes, self.metrics)
        self.models = models or ModelManager(RuntimeConfig(), repository, self.metrics)
        self.models.on_unload.append(self._forget)
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
        # The adaptive hint's cores (placement rows 3a/3b), on a pool of their own.
        cores = self.placement.share_cores
        self.cores = CoreScheduler(cores) if cores > 1 else None
        self._cores_pool: RunPool | None = None
        if self.cores is not None:
            self._cores_pool = RunPool(cores, "zeroserve-cores")
            self.metrics.add_counter_callback(
                CallbackCounter(
                    "zeroserve_session_runs_total",
                    "session.run calls under --performance_hint adaptive, by the cores they had: all, or one",
                    self._grants,
                )
            )

    @classmethod
    def from_config(
        cls, repository: ModelRepository, config: RuntimeConfig, telemetry: Telemetry | None = None
    ) -> DataPlane:
        """The data plane the REST and gRPC servers share, sized and bounded by the server configuration."""
        placement = PlacementSettings(
            inline_run_seconds=config.inline_run_ms / 1000, share_cores=config.adaptive_cores()
        )
        metrics = ServerMetrics()
        return cls(
            repository, config.inference_threads, placement, batching=config.batching, max_queue=config.max_queue_size,
            max_inflight_bytes=config.limits.max_inflight_bytes, billing_memory_bytes=config.billing_memory_bytes,
            metrics=metrics, models=ModelManager(config, repository, metrics, telemetry),
        )

    def running_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Tell the policy which event loop serves (the app's lifespan does, on the loop it really runs on: an
        embedding server may bring its own): uvloop gets REST's extra turn (placement.extra_turn)."""
        uvloop = type(loop).__module__.startswith("uvloop")
        self.placement = replace(self.placement, rest_extra_turn=uvloop)

    def admit(self, nbytes: int, *, arriving: bool = False) -> Holding:
        """Refuse a request before its body is read (REST) or decoded (gRPC) when the server is full, with
        ServerBusy (503 and Retry-After): ``--max_queue_size`` requests already admitted, or ``nbytes`` more would
        take the request bytes held past ``--max_inflight_mib``. A request alone is always let in (up to
        ``--max_request_mib``), so the budget never refuses what the server would take when idle.

        Admitted, the request holds ``nbytes`` until the returned ``Holding`` is released (``with`` or
        ``release()``: when its answer is sent). ``arriving``: its body is still being read (REST), which the
        placement policy counts as in flight already, until ``Holding.arrived()``."""
        if self.max_queue and self.traffic.in_flight >= self.max_queue:
            raise ServerBusy(f"server is at its limit of {self.max_queue} queued inferences; retry shortly")
        if self.bytes_held:  # alone, a request is always let in
            self._check_budget(nbytes)
        return Holding(self, nbytes, arriving)

    def _check_budget(self, nbytes: int, own: int = 0) -> None:
        budget = self.max_inflight_bytes
        if budget and self.bytes_held > own and self.bytes_held + nbytes > budget:
            raise ServerBusy(
                f"server is holding {self.bytes_held >> 20} MiB of requests, and {nbytes >> 20} MiB more would pass "
                f"its budget of {budget >> 20} MiB (--max_inflight_mib); retry shortly"
            )

    def _release(self, nbytes: int) -> None:
        """A request's bytes are no longer held. Once none are held after large requests, the heap's free memory
        goes back to the kernel (memory.release_free_memory)."""
        before = self.bytes_held
        self.bytes_held = before - nbytes
        if before > self._peak_held:
            self._peak_held = before
        if not self.bytes_held and self._peak_held >= TRIM_AFTER_BYTES and not self._trimming:
            self._trimming = True
            self._peak_held = 0
            asyncio.get_running_loop().create_task(self._trim())

    async def _trim(self) -> None:
        try:
            await asyncio.to_thread(memory.release_free_memory)
        finally:
            self._trimming = False

    def close(self) -> None:
        for batcher in self._batchers.values():
            if batcher is not None:
                batcher.close()
        self._pool.shutdown()
        if self._cores_pool is not None:
            self._cores_pool.shutdown()

    def _forget(self, model: OnnxModel) -> None:
        """A model is unloaded: its batcher goes with it (a later load makes a new one)."""
        batcher = self._batchers.pop(model, None)
        if batcher is not None:
            batcher.close()

    def _batcher(self, model: OnnxModel) -> Batcher | None:
        if model not in self._batchers:
            batcher = None
            if self.batching.enabled and batchable(model):
                batcher = Batcher(model, self._pool, self.batching, self._inference_threads, in_flight=self._company)
            self._batchers[model] = batcher
        return self._batchers[model]

    def _company(self) -> int:
        return self.traffic.company

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
        return {(): float(self.traffic.in_flight)}

    def _receiving(self) -> dict[Labels, float]:
        return {(): float(self.traffic.receiving)}

    def ready(self) -> bool:
        return self.repository.all_ready()

    def server_metadata(self) -> dict[str, Any]:
        from zeroserve._version import version

        return {"name": SERVER_NAME, "version": version(), "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None) -> bool:
        return self.repository.find(name, version).state is State.READY

    async def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        """A model's metadata, which its session holds: loaded first when the server loads on demand."""
        async with self.models.using(name, version) as use:
            return use.model.metadata(self.repository.versions(name))

    def model_label(self, name: str, version: str | None) -> tuple[str, str]:
        """The (model, version) labels of a request that failed: names the server serves only, so that a client
        cannot mint new metric series at will."""
        repository = self.repository
        known = name in repository.names() and version in (None, *repository.versions(name))
        return (name, version or "") if known else ("", "")

    async def infer(self, name: str, version: str | None, request: InferRequest, *, rest: bool = False) -> InferResult:
        """Run one request where the placement policy says (placement.py), its model loaded first when the server
        loads on demand (model_manager.py). ``rest``: it came over REST.

        One coroutine from here to the run, on purpose: a run on the event loop suspends once or twice, and every
        coroutine between the task and the suspension costs each resumption."""
        models = self.models
        entry = models.use_if_loaded(name, version)
        use: Use | None = None
        if entry is None:  # loaded now (on demand), or refused with the reason
            entry, use = await models.acquire(name, version)
        try:
            model = entry.model
            feeds = model.feeds(request.inputs)
            output_names: list[str] | None = None
            if request.outputs is not None:
                output_names = [output.name for output in request.outputs]
                if len(set(output_names)) != len(output_names):
                    raise InvalidInput("an output is requested more than once")
                model.check_outputs(output_names)
            traffic = self.traffic
            if self.max_queue and traffic.in_flight >= self.max_queue:
                raise ServerBusy(f"server is at its limit of {self.max_queue} queued inferences; retry shortly")
            with traffic.admitted():
                submitted = time.perf_counter()
                batch_size = 1
                batcher = self._batcher(model)
                input_bytes = 0
                for array in feeds.values():
                    input_bytes += array.nbytes
                placement = choose(
                    self.placement, batched=batcher is not None, cpu_only=model.cpu_only, runs=model.stats,
                    input_bytes=input_bytes, quiet=self._quiet,
                )
                if placement is Placement.LOOP:
                    await asyncio.sleep(0)
                    if extra_turn(self.placement, rest=rest, others_in_flight=traffic.others):
                        await asyncio.sleep(0)
                    arrays, started, finished, cpu = model.timed_run(feeds, output_names, on_loop=True)
                elif placement is Placement.BATCH:
                    assert batcher is not None
                    arrays, started, finished, cpu, batch_size = await batcher.run(feeds, output_names)
                elif placement is Placement.LOOP_ALONE or placement is Placement.CORES:
                    cores = self.cores
                    assert cores is not None
                    if placement is Placement.LOOP_ALONE:
                        # Requests whose tasks were already scheduled beside this one are admitted in one turn.
                        await asyncio.sleep(0)
                        if not self._quiet():
                            placement = Placement.CORES
                    if placement is Placement.LOOP_ALONE:
                        cores.ran_alone()
                        arrays, started, finished, cpu = model.timed_run(feeds, output_names, on_loop=True)
                    else:
                        arrays, started, finished, cpu = await self._run_on_cores(cores, model, feeds, output_names)
                else:
                    arrays, started, finished, cpu = await self._pool.run(model.timed_run, feeds, output_names)
        finally:
            models.release(entry)
        self.metrics.observe_run(model.name, model.version, started - submitted, finished - started, batch_size)
        datatypes = model.output_datatypes
        names = output_names if output_names is not None else model.output_names
        result = InferResult(
            model.name, model.version,
            [OutputTensor(out_name, datatypes[out_name], array) for out_name, array in zip(names, arrays)],
            request.id, queue_seconds=started - submitted, compute_seconds=finished - started, cpu_seconds=cpu,
        )
        if use is not None:
            result.load, result.load_span = use.load, use.load_span
        return result

    def _quiet(self) -> bool:
        """Whether traffic is quiet for the placement policy's rows 3a/3b (asked only there)."""
        cores = self.cores
        return cores is not None and self.traffic.quiet(self.placement, cores.contended)

    async def _run_on_cores(
        self, cores: CoreScheduler, model: OnnxModel, feeds: dict[str, Any], output_names: list[str] | None
    ) -> RunResult:
        assert self._cores_pool is not None
        if cores.contended:
            model.prepare_single_thread_session()  # once; ready for a later contention
        cores.submitted()
        try:
            # A run cancelled before a thread takes it (its client went away) no longer counts as waiting.
            job = self._cores_pool.run(_run_with_cores, cores, model, feeds, output_names, skipped=cores.withdrawn)
        except BaseException:  # never queued (the pool is shut down): it must not count as waiting
            cores.withdrawn()
            raise
        return await job


def _run_with_cores(
    cores: CoreScheduler, model: OnnxModel, feeds: dict[str, Any], output_names: list[str] | None
) -> RunResult:
    """In a worker thread: wait for cores, then run on every thread or on the single-thread session."""
    granted = cores.acquire(can_share=lambda: model.single_thread_ready)
    try:
        return model.timed_run(feeds, output_names, single_thread=granted != cores.cores)
    finally:
        cores.release(granted)


class Holding:
    """The bytes one admitted request holds against the data plane's budget (``DataPlane.admit``), until
    ``release()`` or the end of its ``with`` block. A class rather than a generator's context manager: every
    request makes one."""

    __slots__ = ("_dataplane", "nbytes", "_arriving", "_released")

    def __init__(self, dataplane: DataPlane, nbytes: int, arriving: bool) -> None:
        self._dataplane = dataplane
        self.nbytes = nbytes
        self._arriving = arriving
        self._released = False
        dataplane.bytes_held += nbytes
        if arriving:
            dataplane.traffic.receiving += 1

    def __enter__(self) -> Holding:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def arrived(self) -> None:
        """The request's body is read: it no longer counts as arriving."""
        if self._arriving:
            self._arriving = False
            self._dataplane.traffic.receiving -= 1

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.arrived()
        self._dataplane._release(self.nbytes)

    def grow(self, nbytes: int) -> None:
        """Hold ``nbytes`` more (a body of unknown length arriving); ServerBusy when that passes the budget."""
        self._dataplane._check_budget(nbytes, own=self.nbytes)
        self._dataplane.bytes_held += nbytes
        self.nbytes += nbytes
