"""Which models are loaded, and when they load and unload: scale to zero per model, inside one server.

``--model_loading`` says when a model loads: ``eager`` (every model at start, loader.py), ``on_demand`` (indexed
at start; the first request for a model loads it, and every request that arrives meanwhile waits on that one
load), or ``explicit`` (only the repository API loads, as in Triton's explicit mode). Then:

- room: before a load, the least recently used idle model is unloaded while ``--max_loaded_models`` or
  ``--max_loaded_mib`` would be passed. A model's memory is what loading it cost the process (its resident set
  before and after the session was built and warmed up), measured at its first load and kept across unloads;
  before that, twice its files. A model with requests in flight is never unloaded under them: with none idle,
  the request that needed room is answered 503 with Retry-After;
- idleness: ``--model_idle_timeout`` unloads a model after that long without requests;
- failure: a model that fails to load answers 503 with the reason, stays UNAVAILABLE with it in the index, and
  is tried again by a request after a backoff (5 s, doubling to 5 min), or at once through the API.

Loads and unloads run one at a time: their memory is measured, and they compete for the same cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio.to_thread

from zeroserve.protocol.start import StartState
from zeroserve.runtime import memory
from zeroserve.runtime.coldstart import PhaseLog
from zeroserve.runtime.loader import load_entry
from zeroserve.runtime.metrics import LOAD_BUCKETS, Counter, Gauge, Histogram, Labels, ServerMetrics
from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.repository import Entry, ModelRepository, State
from zeroserve.runtime.server_errors import ModelLoadError, ModelNotReady, ServerBusy, ServerError

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext

    from zeroserve.runtime.config import RuntimeConfig
    from zeroserve.runtime.telemetry import Telemetry

logger = logging.getLogger("zeroserve.runtime")

RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0
UNLOAD_WAIT_SECONDS = 30.0  # the API's unload waits this long for the model's requests in flight


@dataclass(slots=True)
class Use:
    """A model in use by one request, and the load it waited for, if any (for its Server-Timing and span)."""

    model: OnnxModel
    load: PhaseLog | None = None
    load_span: SpanContext | None = None


class ModelManager:
    def __init__(
        self, config: RuntimeConfig, repository: ModelRepository, metrics: ServerMetrics,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config
        self.settings = config.loading
        self.repository = repository
        self.telemetry = telemetry
        self.on_unload: list[Callable[[OnnxModel], None]] = []  # who holds a model's objects (batchers) lets go
        self._loads: dict[int, asyncio.Task[None]] = {}  # by id(entry): one load of a model at a time
        self._lock: asyncio.Lock | None = None
        self._loads_total = Counter("zeroserve_model_loads_total", "Model loads, by model and outcome")
        self._unloads_total = Counter("zeroserve_model_unloads_total", "Model unloads, by model and reason")
        self._load_seconds = Histogram(
            "zeroserve_model_load_duration_seconds", "Time to load a model: fetch, session and warmup", LOAD_BUCKETS
        )
        for counter in (self._loads_total, self._unloads_total):
            metrics.add_counter(counter)
        metrics.add_histogram(self._load_seconds)
        metrics.add_gauge(Gauge("zeroserve_models_loaded", "Models loaded now", self._loaded_count))
        metrics.add_gauge(
            Gauge("zeroserve_models_loaded_bytes", "Memory of the models loaded now, as measured", self._loaded_bytes)
        )

    # --- for requests ---

    def using(self, name: str, version: str | None) -> _Using:
        """``async with models.using(name, version) as use``: the model for one request, loaded first when it is
        not and the server loads on demand; it counts as in use (never unloaded) until the block ends. Raises what a
        request for it must be answered."""
        return _Using(self, name, version)

    def use_if_loaded(self, name: str, version: str | None) -> Entry | None:
        """The entry of a loaded model, now in use by one request until ``release``; None when it is not loaded
        (then ``using`` loads it, or says why not). The fast path of every inference."""
        entry = self.repository.find(name, version)
        if entry.state is not State.READY:
            return None
        entry.in_flight += 1
        return entry

    @staticmethod
    def release(entry: Entry) -> None:
        entry.in_flight -= 1
        entry.last_used = time.monotonic()

    async def acquire(self, name: str, version: str | None) -> tuple[Entry, Use]:
        """The entry of a model, loaded first when it is not and the server loads on demand, now in use by one
        request until ``release``; raises what a request for it must be answered."""
        entry = self.repository.find(name, version)
        use = Use(entry.model)
        if entry.state is not State.READY:
            if self.settings.mode != "on_demand":
                self._refuse(entry)
            use.load, use.load_span = await self._loaded(entry)
        entry.in_flight += 1
        return entry, use

    def _refuse(self, entry: Entry) -> None:
        if entry.state is State.UNLOADED and self.settings.mode == "explicit":
            name = entry.model.name
            raise ModelNotReady(
                f"model '{name}' is not loaded, and this server loads models only when asked "
                f"(--model_loading explicit): POST /v2/repository/models/{name}/load",
                1.0, StartState("failed", reason="not loaded; --model_loading explicit loads through the API"),
            )
        self.repository.ready_model(entry.model.name, entry.model.version)  # raises why it is not ready

    async def _loaded(self, entry: Entry, *, retry_now: bool = False) -> tuple[PhaseLog | None, SpanContext | None]:
        """Wait for ``entry``'s one load (starting it if none runs); the load's record for this request."""
        now = time.monotonic()
        if entry.state is State.FAILED and now < entry.retry_at and not retry_now:
            raise ModelLoadError(
                f"model '{entry.model.name}' failed to load: {entry.error} (tried again in "
                f"{entry.retry_at - now:.0f} s)",
                StartState("failed", reason=entry.error, retry_after_s=round(entry.retry_at - now, 1)),
            ).with_retry_after(entry.retry_at - now)
        task = self._loads.get(id(entry))
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(entry), name=f"zeroserve-load-{entry.model.name}")
            self._loads[id(entry)] = task
            task.add_done_callback(lambda _: self._loads.pop(id(entry), None))
        await asyncio.shield(task)  # a request that goes away does not cancel the load for the others
        log = PhaseLog()
        log.phases = entry.phases
        return log, entry.load_span

    # --- the repository API ---

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """The repository extension's index: every model version, its state and why."""
        rows = []
        for entry in self.repository.entries():
            if ready_only and entry.state is not State.READY:
                continue
            reason = entry.error or "" if entry.state is State.FAILED else ""
            if entry.state is State.UNLOADED:
                reason = "unloaded"
            rows.append({"name": entry.model.name, "version": entry.model.version,
                         "state": entry.state.index_state, "reason": reason})
        return rows

    async def load(self, name: str) -> None:
        """Load every version of ``name`` (the API's load; a failed model is tried again at once)."""
        for entry in self.repository.versions_of(name):
            if entry.state is not State.READY:
                await self._loaded(entry, retry_now=True)

    async def unload(self, name: str) -> None:
        """Unload every version of ``name`` once its requests in flight have finished (the API's unload)."""
        entries = self.repository.versions_of(name)
        deadline = time.monotonic() + UNLOAD_WAIT_SECONDS
        while any(entry.in_flight for entry in entries):
            if time.monotonic() > deadline:
                raise ServerBusy(f"model '{name}' still has requests in flight after {UNLOAD_WAIT_SECONDS:g} s")
            await asyncio.sleep(0.01)
        async with self._serialized():
            for entry in entries:
                if entry.state is State.READY and not entry.in_flight:
                    await self._unload(entry, "api")

    # --- scale to zero per model ---

    async def reap_idle(self) -> None:
        """Unload models idle for ``--model_idle_timeout`` seconds, until cancelled (a task of the lifecycle)."""
        timeout = self.settings.idle_timeout
        if timeout <= 0:
            return
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            idle = [e for e in self.repository.entries() if e.state is State.READY and not e.in_flight
                    and now - e.last_used > timeout]  # fmt: skip
            if idle:
                async with self._serialized():
                    for entry in idle:
                        if entry.state is State.READY and not entry.in_flight:  # still idle, after the wait
                            await self._unload(entry, "idle")

    # --- loading and unloading ---

    @contextlib.asynccontextmanager
    async def _serialized(self) -> AsyncIterator[None]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            yield

    async def _load(self, entry: Entry) -> None:
        model = entry.model
        async with self._serialized():
            if entry.state is State.READY:
                return
            await self._make_room(entry)
            entry.state, entry.error = State.LOADING, None
            log = PhaseLog()
            entry.phases = log.phases
            before = memory.resident_bytes()
            started_ns, started = time.time_ns(), time.perf_counter()
            failure: ServerError | None = None
            try:
                await anyio.to_thread.run_sync(load_entry, entry, self.config, log)
            except ServerError as exc:
                failure = exc
            except Exception as exc:  # a crash inside the load is this model's failure, not the server's
                logger.exception("model '%s' version %s: loading crashed", model.name, model.version)
                failure = ServerError(f"loading crashed: {exc}")
            seconds = time.perf_counter() - started
            labels: Labels = (("model", model.name),)
            if self.telemetry is not None:
                entry.load_span = self.telemetry.record_model_load(model.name, model.version, started_ns, log, failure)
            if failure is not None:
                entry.state, entry.error = State.FAILED, failure.message
                entry.failures += 1
                backoff = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (entry.failures - 1))
                entry.retry_at = time.monotonic() + backoff
                model.unload()
                self._loads_total.inc((*labels, ("outcome", "failed")))
                logger.error("model '%s' version %s failed to load: %s", model.name, model.version, failure.message)
                raise ModelLoadError(
                    f"model '{model.name}' failed to load: {failure.message}",
                    StartState("failed", reason=failure.message),
                ).with_retry_after(entry.retry_at - time.monotonic())
            entry.failures = 0
            if not entry.cost_bytes:
                entry.cost_bytes = max(memory.resident_bytes() - before, entry.size_bytes)
            entry.last_used = time.monotonic()
            self._loads_total.inc((*labels, ("outcome", "ready")))
            self._load_seconds.observe(labels, seconds)
            logger.info("model '%s' version %s loaded on demand in %.3f s (%d MiB)", model.name, model.version,
                        seconds, entry.cost_bytes >> 20)

    async def _make_room(self, entry: Entry) -> None:
        """Unload least recently used idle models until ``entry`` fits both bounds; ServerBusy when it cannot."""
        limit_models, limit_bytes = self.settings.max_loaded_models, self.settings.max_loaded_bytes
        needed = _cost(entry)
        while True:
            loaded = [
                e for e in self.repository.entries() if e.state in (State.READY, State.LOADING) and e is not entry
            ]
            over_count = bool(limit_models) and len(loaded) + 1 > limit_models
            over_bytes = bool(limit_bytes) and sum(_cost(e) for e in loaded) + needed > limit_bytes
            if not (over_count or over_bytes):
                return
            idle = [e for e in loaded if e.state is State.READY and not e.in_flight]
            if not idle:
                if over_bytes and not loaded:
                    return  # alone over the budget: load it anyway, it could never fit otherwise
                bound = f"{limit_models} models" if over_count else f"{limit_bytes >> 20} MiB"
                raise ServerBusy(
                    f"no room to load model '{entry.model.name}': the {len(loaded)} models loaded ({bound} at most) "
                    "all have requests in flight; retry shortly"
                )
            victim = min(idle, key=lambda e: e.last_used)
            await self._unload(victim, "evicted_count" if over_count else "evicted_memory")

    async def _unload(self, entry: Entry, reason: str) -> None:
        """Unload an entry with nothing in flight (the caller holds the lock and checked)."""
        model = entry.model
        entry.state = State.UNLOADING
        for hook in self.on_unload:
            hook(model)
        model.unload()
        entry.state = State.UNLOADED
        self._unloads_total.inc((("model", model.name), ("reason", reason)))
        logger.info("model '%s' version %s unloaded (%s)", model.name, model.version, reason)
        await anyio.to_thread.run_sync(_release_memory)

    def _loaded_count(self) -> dict[Labels, float]:
        return {(): float(sum(e.state is State.READY for e in self.repository.entries()))}

    def _loaded_bytes(self) -> dict[Labels, float]:
        return {(): float(sum(e.cost_bytes for e in self.repository.entries() if e.state is State.READY))}


def _cost(entry: Entry) -> int:
    """A model's memory when loaded: as measured, or twice its files before its first load."""
    return entry.cost_bytes or 2 * entry.size_bytes


def _release_memory() -> None:
    gc.collect()  # the session's Python wrappers may sit in a reference cycle
    memory.release_free_memory()


class _Using:
    """The ``async with`` block of ``ModelManager.using``: a class rather than a generator's context manager, for
    every inference enters one."""

    __slots__ = ("_manager", "_name", "_version", "_entry")

    def __init__(self, manager: ModelManager, name: str, version: str | None) -> None:
        self._manager, self._name, self._version = manager, name, version
        self._entry: Entry | None = None

    async def __aenter__(self) -> Use:
        self._entry, use = await self._manager.acquire(self._name, self._version)
        return use

    async def __aexit__(self, *exc: object) -> None:
        if self._entry is not None:
            ModelManager.release(self._entry)
