"""Single flight: while one wake-up of a model service runs, every other caller waits on it.

A burst of requests to a scaled-to-zero service must cause one readiness probe, not one cold request
per caller. The first caller starts the work; later callers join the same flight; each waits only as
long as its own budget allows, and a caller that stops waiting (or is cancelled) does not stop the
flight for the others. A finished flight is not reused: the next wake-up starts a new one.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Flight(Generic[T]):
    """One run of the work: its value or its error, once ``done``."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None


class ThreadSingleFlight(Generic[T]):
    """Single flight for threads. The work runs in its own daemon thread (with the starter's context
    variables, so its spans join the starter's trace), so no caller's timeout can cut it short."""

    def __init__(self, name: str = "zeroserve-wake") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._flight: Flight[T] | None = None
        self.started = 0  # flights started so far

    @property
    def running(self) -> bool:
        flight = self._flight
        return flight is not None and not flight.done.is_set()

    def join(self, work: Callable[[], T], timeout: float) -> Flight[T] | None:
        """Start ``work`` unless a flight is running, then wait up to ``timeout`` seconds for it.

        Returns the finished flight, or None when it is still running after ``timeout``.
        """
        flight = self._start(work)
        return flight if flight.done.wait(max(timeout, 0.0)) else None

    def _start(self, work: Callable[[], T]) -> Flight[T]:
        with self._lock:
            flight = self._flight
            if flight is not None and not flight.done.is_set():
                return flight
            flight = self._flight = Flight()
            self.started += 1
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(_run, work, flight), name=self._name, daemon=True)
        thread.start()
        return flight


def _run(work: Callable[[], T], flight: Flight[T]) -> None:
    try:
        flight.value = work()
    except BaseException as exc:  # handed to every waiter
        flight.error = exc
    finally:
        flight.done.set()


class TaskSingleFlight(Generic[T]):
    """Single flight for asyncio. The work runs as its own task; waiters await it through
    ``asyncio.shield``, so a cancelled or timed-out waiter leaves it running for the rest."""

    def __init__(self, name: str = "zeroserve-wake") -> None:
        self._name = name
        self._task: asyncio.Task[T] | None = None
        self.started = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def join(self, work: Callable[[], Coroutine[Any, Any, T]], timeout: float) -> asyncio.Task[T] | None:
        """Start ``work`` unless a flight is running, then wait up to ``timeout`` seconds for it.

        Returns the finished task (read ``.exception()``/``.result()``), or None when it is still running.
        """
        task = self._start(work)
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), max(timeout, 0.0))
            except asyncio.TimeoutError:
                if not task.done():
                    return None
            except asyncio.CancelledError:
                if task.done() and not _current_task_cancelling():
                    return task
                raise
            except Exception:  # the work failed; the caller reads it from the task
                pass
        return task

    def start(self, work: Callable[[], Coroutine[Any, Any, T]]) -> None:
        """Start ``work`` in the background unless a flight is running."""
        self._start(work)

    def _start(self, work: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Task[T]:
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return task
        task = self._task = loop.create_task(work(), name=self._name)
        task.add_done_callback(_retrieve)
        self.started += 1
        return task

    async def aclose(self) -> None:
        """Cancel a running flight (when its client closes) and wait for it to end."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        if task.get_loop() is not asyncio.get_running_loop():
            task.get_loop().call_soon_threadsafe(task.cancel)
            return
        task.cancel()
        try:
            await task
        except BaseException:
            if _current_task_cancelling():
                raise


def _retrieve(task: asyncio.Task[T]) -> None:
    # Mark the error as seen even when every waiter has gone, so asyncio does not log it as lost.
    if not task.cancelled():
        task.exception()


def _current_task_cancelling() -> bool:
    current = asyncio.current_task()
    cancelling = getattr(current, "cancelling", None)  # Python 3.11+
    return bool(cancelling()) if cancelling is not None else False
