"""The autoscaler in miniature: which server processes run, which request goes where, when one starts or stops.

A request asks for capacity (``acquire``): a ready process with fewer than ``--max_concurrency`` requests in
flight. When none has room, the request is held (at most ``--queue_depth`` of them; more get "queue full")
and, when there is room for one more process (``--max_processes``) and none is starting, a process starts if
the backoff allows (``backoff.StartLedger.decide``). At most one start is in flight at a time.

While held, a request either gets capacity, or is told that the start failed (``StartFailed``: the start it
waited for failed, or the backoff after a failed start is running and no ready process can serve it), or,
when it asked to be held only so long (``patience``: readiness probes, ``Prefer: wait``), that the start is
still loading (``StillLoading``, with the progress). A process that dies after it became ready is dropped at
once (its exit is awaited, not polled), so nothing more is sent to its port; the requests held for capacity
stay held for the next start. A process idle for ``--idle_timeout`` seconds is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from zeroserve.activator.backoff import StartLedger
from zeroserve.activator.billing import Billing
from zeroserve.activator.process import ServerProcess, StartFailure
from zeroserve.activator.settings import ScaleSettings
from zeroserve.protocol.start import StartState

logger = logging.getLogger("zeroserve.activator")

_UNREADY_GRACE = 5.0  # SIGTERM to SIGKILL for a process that never became ready: it has no requests to drain


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class StartFailed(Exception):
    def __init__(self, state: StartState) -> None:
        super().__init__(state.describe())
        self.state = state


class StillLoading(Exception):
    def __init__(self, state: StartState) -> None:
        super().__init__(state.describe())
        self.state = state


@dataclass(eq=False)
class Backend:
    """A server process slot: starting until ``ready_at`` is set."""

    port: int
    started_by: object | None = None  # the span context of the request that started it (for links)
    process: ServerProcess | None = None
    ready_at: float | None = None
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    routable: bool = True  # False once a connection to it was refused

    @property
    def ready(self) -> bool:
        return self.ready_at is not None and self.routable

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0


@dataclass(slots=True)
class Hold:
    """One request's stay in the queue: what it carries to a process it starts, and what it saw."""

    trace_carrier: Mapping[str, str] = field(default_factory=dict)
    link: object | None = None
    started: bool = False  # this request started a process
    cold: bool = False  # ... or waited while one started
    progress: StartState | None = None  # the start's progress when last seen


class Scaler:
    def __init__(self, server_args: Sequence[str], settings: ScaleSettings,
                 on_start: Callable[[bool], None] | None = None) -> None:
        self.server_args = list(server_args)
        self.settings = settings
        self.ledger = StartLedger(settings.backoff)
        self.backends: list[Backend] = []  # starting and ready, in start order
        self.starting: Backend | None = None
        self.waiting = 0
        self.closing = False
        self._on_start = on_start or (lambda ready: None)
        self._changed = asyncio.Event()
        self._start_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # watchers and stops
        self._processes: set[ServerProcess] = set()
        self._probe_client: httpx.AsyncClient | None = None
        self.billing = Billing()  # each ready process's metering counters, read before it is stopped
        self._ready: set[ServerProcess] = set()  # processes that became ready: they have counters to read

    # --- capacity for requests ---

    async def acquire(self, hold: Hold, patience: float | None = None) -> Backend:
        """Capacity on a ready process (release it after). Raises QueueFull, ShuttingDown, StartFailed, and
        StillLoading when ``patience`` seconds passed while a start was in progress or scheduled."""
        if self.closing:
            raise ShuttingDown
        backend = self._take()
        if backend is not None:
            return backend
        if self.waiting >= self.settings.queue_depth:
            raise QueueFull
        give_up = None if patience is None else time.monotonic() + patience
        self.waiting += 1
        try:
            while True:
                changed = self._changed
                if self.closing:
                    raise ShuttingDown
                backend = self._take()
                if backend is not None:
                    return backend
                wait = self._scale(hold)
                progress = self.progress()
                if progress is not None:
                    hold.cold = True
                    hold.progress = progress
                    if give_up is not None:
                        left = give_up - time.monotonic()
                        if left <= 0:
                            raise StillLoading(progress)
                        wait = left if wait is None else min(wait, left)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), wait)
        finally:
            self.waiting -= 1

    def release(self, backend: Backend) -> None:
        backend.in_flight -= 1
        backend.last_used = time.monotonic()
        self._notify()

    def unreachable(self, backend: Backend) -> None:
        """A connection to ``backend`` was refused: route nothing more there. A process that died is dropped
        by its watcher; one still running but not listening is broken, and is stopped."""
        backend.routable = False
        if backend.process is not None and backend.process.running and backend in self.backends:
            logger.warning("server process %d refuses connections on port %d; stopping it", backend.pid,
                           backend.port)
            self.backends.remove(backend)
            self.ledger.failed("crash", time.monotonic(), f"refused connections on port {backend.port}", None)
            self._stop(backend.process)
        self._notify()

    def progress(self) -> StartState | None:
        """The progress of the start requests wait for: the one in flight, or ``scheduled`` when the next
        one waits for the backoff. None when a process is ready (requests then wait for room on it, which is
        no cold start, even while another process starts) or when nothing is starting."""
        if any(backend.ready for backend in self.backends):
            return None
        if self.starting is not None:
            process = self.starting.process
            return process.progress() if process is not None else StartState("loading", phase="process", elapsed_s=0.0)
        return StartState("loading", phase="scheduled") if self.waiting else None

    def _take(self) -> Backend | None:
        for backend in self.backends:
            if backend.ready and backend.in_flight < self.settings.max_concurrency:
                backend.in_flight += 1
                return backend
        return None

    def _scale(self, hold: Hold) -> float | None:
        """Start a process when one is needed and allowed; returns the seconds until a start may be allowed
        (None: wait for a change). Raises StartFailed as the backoff decides."""
        if self.starting is not None or len(self.backends) >= self.settings.max_processes:
            return None
        now = time.monotonic()
        verdict = self.ledger.decide(now)
        if verdict.start:
            self._begin(hold, now)
            return None
        if verdict.failure is not None and not any(backend.ready for backend in self.backends):
            raise StartFailed(verdict.failure.state(now))
        return verdict.wait_s

    # --- starting, watching, stopping processes ---

    def _begin(self, hold: Hold, now: float) -> None:
        backend = Backend(_free_port(), started_by=hold.link)
        self.backends.append(backend)
        self.starting = backend
        self.ledger.started(now)
        hold.started = True
        self._start_task = asyncio.get_running_loop().create_task(self._start(backend, dict(hold.trace_carrier)))

    async def _start(self, backend: Backend, trace_carrier: dict[str, str]) -> None:
        try:
            try:
                process = await ServerProcess.spawn(self.server_args, backend.port, trace_carrier)
            except OSError as exc:
                self._start_failed(backend, StartFailure(f"could not run the server: {exc}"))
                return
            backend.process = process
            self._processes.add(process)
            logger.info("cold start: server process %d starting on port %d", process.pid, backend.port)
            self._notify()
            failure = await process.wait_ready(self._client(), self.settings.start_timeout)
            if failure is not None:
                self._start_failed(backend, failure)
                return
            backend.ready_at = backend.last_used = time.monotonic()
            self._ready.add(process)
            logger.info("server process %d ready after %.2f s", process.pid, backend.ready_at - process.spawned_at)
            self._on_start(True)
            self._spawn_task(self._watch(backend, process))
        finally:
            if self.starting is backend:
                self.starting = None
            self._notify()

    def _start_failed(self, backend: Backend, failure: StartFailure) -> None:
        if backend in self.backends:
            self.backends.remove(backend)
        recorded = self.ledger.failed("start", time.monotonic(), failure.reason, failure.exit_status)
        status = f"exit status {failure.exit_status}" if failure.exit_status is not None else "still running"
        logger.error("server process %d failed to start (%s): %s; next start in %.0f s at the earliest",
                     backend.pid, status, failure.reason, self.settings.backoff.delay(recorded.streak))
        self._on_start(False)
        if backend.process is not None:
            self._stop(backend.process, _UNREADY_GRACE)

    async def _watch(self, backend: Backend, process: ServerProcess) -> None:
        """Drop a ready process the moment it exits on its own (a crash, for the backoff)."""
        await process.process.wait()
        if backend not in self.backends or self.closing:
            return  # stopped by us
        self.backends.remove(backend)
        failure = await process.exit_failure()
        ready_for = time.monotonic() - (backend.ready_at or process.spawned_at)
        self.ledger.failed("crash", time.monotonic(), failure.reason, failure.exit_status, ready_for=ready_for)
        self._ready.discard(process)
        self.billing.lost()
        logger.warning("server process %d exited with status %s after %.1f s ready: %s", process.pid,
                       failure.exit_status, ready_for, failure.reason)
        self._processes.discard(process)
        self._notify()

    def _stop(self, process: ServerProcess, grace: float | None = None) -> None:
        async def stop() -> None:
            await self._read_bill(process)
            await process.stop(self.settings.stop_grace if grace is None else grace)
            self._processes.discard(process)

        self._spawn_task(stop())

    async def run(self) -> None:
        """Stop processes idle for longer than ``--idle_timeout``; end the backoff streak of long runners."""
        while True:
            await asyncio.sleep(min(0.25, self.settings.idle_timeout / 4))
            now = time.monotonic()
            for backend in list(self.backends):
                if backend.ready_at is None or backend.process is None:
                    continue
                self.ledger.kept_running(now - backend.ready_at)
                if backend.in_flight == 0 and now - backend.last_used > self.settings.idle_timeout:
                    self.backends.remove(backend)
                    logger.info("scale down: server process %d idle for %.1f s, stopping it", backend.pid,
                                now - backend.last_used)
                    self._stop(backend.process)
                    if not self.backends:
                        logger.info("scaled to zero")

    def drain(self) -> None:
        """Turn held requests away and stop the start in progress; ready processes go on serving what they
        were sent until ``close``."""
        self.closing = True
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
        starting = self.starting
        if starting is not None and starting.process is not None:
            self.backends.remove(starting)
            self._stop(starting.process, _UNREADY_GRACE)
        self._notify()

    async def close(self) -> None:
        """Turn held requests away, stop every process (SIGTERM, SIGKILL after the grace), bounded."""
        self.closing = True
        self._notify()
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._start_task
        for backend in self.backends:
            if backend.process is not None:
                self._stop(backend.process, None if backend.ready_at is not None else _UNREADY_GRACE)
        self.backends.clear()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        # Processes retired before (idle, failed) have stopped with their tasks; anything left is stopped here.
        await asyncio.gather(*(self._read_bill(process) for process in self._processes), return_exceptions=True)
        await asyncio.gather(*(process.stop(self.settings.stop_grace) for process in self._processes),
                             return_exceptions=True)
        self._processes.clear()
        if self._probe_client is not None:
            await self._probe_client.aclose()

    def kill_all(self) -> None:
        """SIGKILL whatever still runs: nothing outlives the activator, even when it stops without draining."""
        for process in self._processes:
            if process.running:
                process.kill()
                if process in self._ready:  # no time to read its counters: the summary says so
                    self._ready.discard(process)
                    self.billing.lost()

    async def _read_bill(self, process: ServerProcess) -> None:
        if process in self._ready and process.running:
            self._ready.discard(process)
            await self.billing.collect(self._client(), f"http://127.0.0.1:{process.port}")

    def _client(self) -> httpx.AsyncClient:
        if self._probe_client is None:
            self._probe_client = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=4))
        return self._probe_client

    def _spawn_task(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
