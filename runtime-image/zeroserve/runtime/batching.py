"""Adaptive batching: concurrent requests to one model merged along the batch dimension into one session.run.

A request joins the queue of its model; the batcher takes the oldest request and every queued request that
can share its run (same output selection, same dtypes and non-batch dimensions), up to ``max_batch_size``
rows, after waiting at most ``max_queue_delay`` for more to arrive. It waits less once the rows reach the
largest size or a preferred size, and not at all when every request the server has in flight is already in
this batcher: no one is left to wait for. While a batch runs the next one forms, so under load batches grow by
themselves; a lone request runs at once, and clients that each wait for their answer are batched from what
queued while the last run was busy. Outputs are split back by rows, in order. If a merged run fails, each
request is run alone so that an error stays with the request that caused it.

Only models whose every input and output has a dynamic first dimension are batched.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.run_stats import RunResult
from zeroserve.runtime.runpool import RunPool
from zeroserve.runtime.settings import BatchSettings

if TYPE_CHECKING:
    import numpy as np

# A run's result (run_stats.RunResult, its CPU time shared by rows) and the rows of the run it was part of.
BatchResult = tuple[list[Any], float, float, float, int]


def batchable(model: OnnxModel) -> bool:
    """True when every input and output has a dynamic first (batch) dimension."""
    specs = [*model.inputs, *model.outputs]
    return bool(specs) and all(spec.shape and spec.shape[0] == -1 for spec in specs)


@dataclass(slots=True)
class _Pending:
    feeds: dict[str, np.ndarray]
    output_names: list[str] | None
    rows: int
    key: tuple[Any, ...]
    future: asyncio.Future[BatchResult]
    enqueued: float = field(default_factory=time.perf_counter)
    taken: bool = False  # into a batch: counted in Batcher._running until its caller has its answer


class Batcher:
    """The queue and dispatch loop of one model. Create and use it inside the server's event loop."""

    def __init__(
        self,
        model: OnnxModel,
        pool: RunPool,
        settings: BatchSettings,
        slots: int = 1,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        """``in_flight`` counts the requests the server has admitted or is still receiving, for every model;
        None: the oldest request always waits out the delay (unless its batch fills)."""
        self.model = model
        self.settings = settings
        self._pool = pool
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(slots)
        self._loop_task: asyncio.Task[None] | None = None
        self._runs: set[asyncio.Task[None]] = set()
        self._preferred = frozenset(settings.preferred_batch_sizes)
        self._in_flight = in_flight
        self._running = 0  # requests taken into batches, or run at once, whose callers do not have their answer yet

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None) -> BatchResult:
        """Outputs for one request, its run's start and end time, and the size of the batch it ran in."""
        rows = _rows(feeds)
        loop = asyncio.get_running_loop()
        alone = self._in_flight is not None and self._in_flight() <= 1 and not self._queue and not self._running
        if alone or rows is None or rows == 0 or rows >= self.settings.max_batch_size:
            # Alone (nothing else in flight, here or anywhere in the server), too big, or unbatchable: run it now.
            # It counts as running here, so a request arriving meanwhile does not wait for it as for company. It
            # holds no slot: that request then goes to the run pool's queue as a batch of one, behind this run,
            # which keeps the pool busy from one run to the next.
            self._running += 1
            try:
                arrays, started, finished, cpu = await self._pool.run(self.model.timed_run, feeds, output_names)
            finally:
                self._running -= 1
            return arrays, started, finished, cpu, rows or 1
        key = (
            tuple(output_names) if output_names is not None else None,
            tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(feeds.items())),
        )
        pending = _Pending(feeds, output_names, rows, key, loop.create_future())
        self._queue.append(pending)
        self._arrived.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._dispatch_loop(), name=f"batcher-{self.model.name}")
        try:
            return await pending.future
        finally:
            # Here, not when the batch's run ends: the server's in-flight count drops as this returns, so the two
            # counts that decide whether a forming batch waits for company change together.
            if pending.taken:
                self._running -= 1
                self._arrived.set()  # a forming batch may now have no one left to wait for

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()

    async def _dispatch_loop(self) -> None:
        while True:
            while not self._queue:  # the event is also set when a request leaves: wait for one that arrives
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()
            await self._gather(self._queue[0])
            batch = self._take(self._queue[0].key)
            if not batch:  # every caller in it went away
                self._slots.release()
                continue
            for pending in batch:
                pending.taken = True
            self._running += len(batch)
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._runs.add(task)
            task.add_done_callback(self._runs.discard)

    async def _gather(self, first: _Pending) -> None:
        """Wait until the oldest request's batch is full, preferred, or out of time, or no one else can join."""
        deadline = first.enqueued + self.settings.max_queue_delay
        # One turn of the loop: requests whose handlers were already scheduled beside this one join the queue.
        await asyncio.sleep(0)
        while True:
            rows = sum(p.rows for p in self._queue if p.key == first.key)
            if rows >= self.settings.max_batch_size or rows in self._preferred:
                return
            if self._in_flight is not None and self._in_flight() <= len(self._queue) + self._running:
                # Every request in flight is queued or running here. A client answered later may send another,
                # but one that waits for its answer cannot: at one request in flight, the delay would be pure loss.
                return
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self, key: tuple[Any, ...]) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        kept: deque[_Pending] = deque()
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():  # its caller went away (cancelled): nothing to run it for
                continue
            if pending.key == key and rows + pending.rows <= self.settings.max_batch_size:
                batch.append(pending)
                rows += pending.rows
            else:
                kept.append(pending)
        self._queue = kept
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            if len(batch) == 1:
                await self._run_alone(batch)
                return
            try:
                arrays, started, finished, cpu = await self._pool.run(_run_merged, self.model, batch)
            except Exception:
                await self._run_alone(batch)  # find the request that failed; the others still succeed
                return
            total = sum(p.rows for p in batch)
            offset = 0
            for pending in batch:
                parts = [array[offset : offset + pending.rows] for array in arrays]
                offset += pending.rows
                _answer(pending, (parts, started, finished, cpu * pending.rows / total, total))
        except BaseException as exc:  # no caller may wait forever on a future this task owned
            for pending in batch:
                if pending.future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    pending.future.cancel()
                else:
                    pending.future.set_exception(exc)
            raise
        finally:
            self._slots.release()

    async def _run_alone(self, batch: list[_Pending]) -> None:
        for pending in batch:
            try:
                arrays, started, finished, cpu = await self._pool.run(
                    self.model.timed_run, pending.feeds, pending.output_names
                )
            except Exception as exc:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            else:
                _answer(pending, (arrays, started, finished, cpu, pending.rows))


def _rows(feeds: dict[str, np.ndarray]) -> int | None:
    """The shared first dimension of every input, or None when they disagree (then it runs alone)."""
    sizes = {array.shape[0] if array.ndim else -1 for array in feeds.values()}
    return sizes.pop() if len(sizes) == 1 and -1 not in sizes else None


def _run_merged(model: OnnxModel, batch: list[_Pending]) -> RunResult:
    import numpy as np

    names = batch[0].feeds.keys()
    merged = {name: np.concatenate([p.feeds[name] for p in batch]) for name in names}
    arrays, started, finished, cpu = model.timed_run(merged, batch[0].output_names)
    total = sum(p.rows for p in batch)
    if any(array.ndim == 0 or array.shape[0] != total for array in arrays):
        raise ValueError("an output does not keep the batch dimension")
    return arrays, started, finished, cpu


def _answer(pending: _Pending, value: BatchResult) -> None:
    if not pending.future.done():  # the caller may have gone (cancelled) meanwhile
        pending.future.set_result(value)
