"""RunPool: real threads and a real event loop; results, exceptions, order, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
import traceback

import pytest

from zeroserve.runtime.runpool import RunPool


def test_results_and_exceptions_reach_the_awaiting_task() -> None:
    workers = RunPool(2, "test-workers")

    def fail() -> None:
        raise ValueError("broken run")

    async def main() -> None:
        assert await workers.run(pow, 2, 10) == 1024
        with pytest.raises(ValueError, match="broken run"):
            await workers.run(fail)
        names = await asyncio.gather(*(workers.run(lambda: threading.current_thread().name) for _ in range(20)))
        assert set(names) <= {"test-workers_0", "test-workers_1"}

    asyncio.run(main())
    workers.shutdown()


def test_at_most_count_jobs_run_at_once() -> None:
    workers = RunPool(3, "test-workers")
    running, most = 0, 0
    lock = threading.Lock()

    def job() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.01)
        with lock:
            running -= 1

    async def main() -> None:
        await asyncio.gather(*(workers.run(job) for _ in range(30)))

    asyncio.run(main())
    workers.shutdown()
    assert most == 3


def test_a_job_cancelled_while_queued_never_runs_and_says_so() -> None:
    workers = RunPool(1, "test-workers")
    release = threading.Event()
    ran: list[str] = []
    skipped: list[str] = []

    async def main() -> None:
        blocker = workers.run(release.wait, 5)
        queued = workers.run(ran.append, "queued", skipped=lambda: skipped.append("queued"))
        queued.cancel()
        await asyncio.sleep(0)  # the loop runs the cancelled future's callbacks
        assert skipped == ["queued"]  # withdrawn at once, not when a worker gets to it
        release.set()
        assert await blocker is True
        assert await workers.run(ran.append, "after") is None  # the worker went on to the next job

    asyncio.run(main())
    workers.shutdown()
    assert ran == ["after"] and skipped == ["queued"]


def test_shutdown_finishes_queued_jobs_then_refuses_new_ones() -> None:
    workers = RunPool(1, "test-workers")
    done: list[int] = []

    async def main() -> list[asyncio.Future[None]]:
        return [workers.run(lambda i=i: (time.sleep(0.005), done.append(i))[1]) for i in range(5)]

    loop = asyncio.new_event_loop()
    futures = loop.run_until_complete(main())
    workers.shutdown()  # joins: every queued job has run
    assert done == [0, 1, 2, 3, 4]
    loop.run_until_complete(asyncio.sleep(0))  # the loop applies the results the workers handed it
    assert all(future.done() for future in futures)
    with pytest.raises(RuntimeError, match="shut down"):
        loop.run_until_complete(main())
    loop.close()
    assert not any(thread.name.startswith("test-workers") for thread in threading.enumerate())


def test_no_threads_until_the_first_job() -> None:
    before = {thread.name for thread in threading.enumerate()}
    workers = RunPool(2, "idle-workers")
    assert not any(name.startswith("idle-workers") for name in {t.name for t in threading.enumerate()} - before)
    workers.shutdown()
    with pytest.raises(ValueError):
        RunPool(0, "none")


def test_a_result_for_a_closed_loop_is_dropped_quietly() -> None:
    workers = RunPool(1, "test-workers")
    release = threading.Event()
    loop = asyncio.new_event_loop()

    async def main() -> None:
        workers.run(release.wait, 5)

    loop.run_until_complete(main())
    loop.close()
    release.set()
    workers.shutdown()  # the worker met a closed loop and still stopped cleanly
    assert not any(thread.name.startswith("test-workers") for thread in threading.enumerate())


def test_stop_iteration_reaches_the_caller_as_a_runtime_error() -> None:
    workers = RunPool(1, "test-workers")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="StopIteration") as info:
            await workers.run(next, iter(()))
        assert isinstance(info.value.__cause__, StopIteration)
        assert await workers.run(pow, 3, 2) == 9  # the worker lives on

    asyncio.run(main())
    workers.shutdown()


def test_a_failed_job_does_not_keep_its_arguments_alive() -> None:
    """The exception's traceback holds the worker's frame: that frame must not hold the job's arguments (a
    request's arrays) or its future (a cycle through the exception) until the cyclic collector runs."""

    def fail(payload: bytes) -> None:
        raise ValueError("broken run")

    workers = RunPool(1, "test-workers")

    async def main() -> BaseException:
        try:
            await workers.run(fail, b"request bytes")
        except ValueError as exc:
            return exc
        raise AssertionError("the job did not fail")

    error = asyncio.run(main())
    workers.shutdown()
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    worker_frames = [frame for frame in frames if frame.f_code.co_name == "_run"]
    assert worker_frames, [frame.f_code.co_name for frame in frames]
    for frame in worker_frames:
        assert not {"future", "args", "function"} & set(frame.f_locals)
