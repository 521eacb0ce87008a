"""Single flight, with real threads and a real event loop: one run of the work however many callers join."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from zeroserve._single_flight import TaskSingleFlight, ThreadSingleFlight


def test_threads_joining_a_running_flight_share_one_run() -> None:
    single: ThreadSingleFlight[str] = ThreadSingleFlight()
    release = threading.Event()
    runs = []

    def work() -> str:
        runs.append(threading.current_thread().name)
        release.wait(10)
        return "ready"

    results: list[str | None] = []
    joined = threading.Barrier(9)

    def caller() -> None:
        joined.wait(10)
        flight = single.join(work, 10)
        results.append(flight.value if flight else None)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    joined.wait(10)
    time.sleep(0.1)
    assert single.running
    release.set()
    for thread in threads:
        thread.join(10)
    assert runs == ["zeroserve-wake"] and single.started == 1
    assert results == ["ready"] * 8
    assert not single.running


def test_a_thread_waits_only_its_own_budget_and_the_flight_goes_on() -> None:
    single: ThreadSingleFlight[int] = ThreadSingleFlight()
    release = threading.Event()
    started = time.monotonic()
    assert single.join(lambda: release.wait(10) and 1, 0.05) is None  # gave up waiting
    assert time.monotonic() - started < 1
    assert single.running
    release.set()
    flight = single.join(lambda: 2, 5)  # joins the same flight: its value, not a new run
    assert flight is not None and flight.value == 1 and single.started == 1


def test_an_error_reaches_every_waiter_and_the_next_join_starts_afresh() -> None:
    single: ThreadSingleFlight[int] = ThreadSingleFlight()

    def fail() -> int:
        raise RuntimeError("no")

    flight = single.join(fail, 5)
    assert flight is not None and isinstance(flight.error, RuntimeError)
    flight = single.join(lambda: 3, 5)
    assert flight is not None and flight.value == 3 and single.started == 2


def test_tasks_joining_share_one_run_and_a_cancelled_waiter_does_not_cancel_it() -> None:
    async def main() -> None:
        single: TaskSingleFlight[str] = TaskSingleFlight()
        release = asyncio.Event()
        runs = 0

        async def work() -> str:
            nonlocal runs
            runs += 1
            await release.wait()
            return "ready"

        waiters = [asyncio.ensure_future(single.join(work, 10)) for _ in range(8)]
        await asyncio.sleep(0.05)
        waiters[0].cancel()  # e.g. its HTTP client went away
        with pytest.raises(asyncio.CancelledError):
            await waiters[0]
        assert single.running
        release.set()
        tasks = await asyncio.gather(*waiters[1:])
        assert runs == 1 and single.started == 1
        assert all(task is not None and task.result() == "ready" for task in tasks)

    asyncio.run(main())


def test_a_task_waits_only_its_own_budget_and_errors_are_not_lost() -> None:
    async def main() -> None:
        single: TaskSingleFlight[int] = TaskSingleFlight()

        async def slow() -> int:
            await asyncio.sleep(0.2)
            raise RuntimeError("probe failed")

        assert await single.join(slow, 0.01) is None
        assert single.running
        task = await single.join(slow, 5)
        assert task is not None and isinstance(task.exception(), RuntimeError)
        single.start(slow)  # a background start, never awaited by anyone: closing cancels it
        await single.aclose()
        assert not single.running

    asyncio.run(main())
