"""Threads that run blocking calls (``session.run``) for the event loop, with a cheap hand-off.

``loop.run_in_executor`` pays for a ``concurrent.futures.Future`` with its condition lock, the pool's own
bookkeeping and the chaining of that future to an asyncio one, all in Python, several times what one put on a
``queue.SimpleQueue`` and one ``call_soon_threadsafe`` cost (bench/README.md, "Where a request runs"). Under
load that CPU is the event loop's, the one thread every request goes through.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("zeroserve.runtime")

_Job = tuple[
    asyncio.AbstractEventLoop,
    "asyncio.Future[Any]",
    Callable[..., Any],
    tuple[Any, ...],
    Callable[[], None] | None,
    threading.Lock,
]


class RunPool:
    """``count`` threads taking jobs in order; each job's result or exception resolves an asyncio future."""

    def __init__(self, count: int, name: str) -> None:
        if count < 1:
            raise ValueError(f"a run pool needs at least one thread, got {count}")
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{index}", daemon=True) for index in range(count)
        ]
        self._started = False
        self._closed = False
        self._lock = threading.Lock()

    def run(
        self, function: Callable[..., T], *args: Any, skipped: Callable[[], None] | None = None
    ) -> asyncio.Future[T]:
        """``function(*args)`` on a worker; call on the event loop. A job whose future is cancelled before a
        worker takes it is not run, and ``skipped`` (if given) is called once, as soon as the loop sees the cancel."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot run new work: the run pool is shut down")
            if not self._started:  # threads start with the first job: no cost at import or for a server never used
                for thread in self._threads:
                    thread.start()
                self._started = True
            # Whoever takes the claim first decides: a worker runs the job, or the loop withdraws it on cancel.
            claim = threading.Lock()
            if skipped is not None:
                future.add_done_callback(functools.partial(_withdraw_if_cancelled, claim, skipped))
            self._jobs.put((loop, future, function, args, skipped, claim))
        return future

    def shutdown(self) -> None:
        """Let the queued jobs finish, then stop the threads and wait for them."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
        if started:
            for _ in self._threads:
                self._jobs.put(None)
            for thread in self._threads:
                thread.join()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            _run(*job)
            del job  # no reference to the last job's arrays while waiting for the next


def _run(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    function: Callable[..., Any],
    args: tuple[Any, ...],
    skipped: Callable[[], None] | None,
    claim: threading.Lock,
) -> None:
    if not claim.acquire(blocking=False):
        return  # cancelled, and the loop has withdrawn it
    # Read from a worker without the loop's help: a cancelled future stays cancelled, and a cancel that lands
    # after this check only means a result nobody reads, as with concurrent.futures.
    if future.cancelled():
        _call_skipped(skipped)
        return
    try:
        result = function(*args)
    except BaseException as exc:  # handed to the awaiting task, as concurrent.futures does
        if isinstance(exc, StopIteration):  # a future cannot hold one
            error = RuntimeError("the job raised StopIteration")
            error.__cause__ = exc
            exc = error
        _settle(loop, _set_exception, future, exc)
        # The exception's traceback keeps this frame alive: it must not keep the future (a cycle) or the job's
        # arrays (views over a whole request) until the cyclic collector runs.
        del future, function, args
        return
    _settle(loop, _set_result, future, result)


def _withdraw_if_cancelled(claim: threading.Lock, skipped: Callable[[], None], future: asyncio.Future[Any]) -> None:
    if future.cancelled() and claim.acquire(blocking=False):
        skipped()


def _call_skipped(skipped: Callable[[], None] | None) -> None:
    if skipped is None:
        return
    try:
        skipped()
    except Exception:  # the worker must live on
        logger.exception("a skipped job's callback failed")


def _settle(loop: asyncio.AbstractEventLoop, setter: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(setter, *args)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
