"""Start-up, serving, drain and shutdown: one sequence for every server mode, and the one place signals are handled.

REST (alone, or with gRPC beside it) runs under uvicorn, whose lifespan enters ``serving``; gRPC alone runs
``serving`` itself. Either way:

    start   the gRPC listener, when gRPC is served; then model loading, as a background task so that liveness
            answers while readiness waits (a worker of ``--workers N`` waits for its models, or for a stop, before
            it accepts connections: see ``app.create_app``)
    serve   until a stop is requested: SIGTERM or SIGINT, or a model that failed to load under --exit_on_error
    drain   the listeners refuse new requests (uvicorn closes its socket, gRPC refuses new calls) and the ones in
            flight get ``--shutdown_timeout`` seconds
    stop    loading is cancelled (it ends once the step under way, a download or a session build, returns), the run
            threads finish their jobs and end, the telemetry is flushed

``Stop`` holds the signal handlers: installed in the main thread only, they record the signal and call what
registered for it; they never raise. A signal is how a platform asks a process to stop, so the process then exits
0 (130 after Ctrl-C), not by re-raising the signal as uvicorn does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

from zeroserve.runtime.loader import load_in_background
from zeroserve.runtime.server_errors import ServerError

if TYPE_CHECKING:
    from zeroserve.runtime.config import RuntimeConfig
    from zeroserve.runtime.dataplane import DataPlane
    from zeroserve.runtime.grpc import GrpcServer
    from zeroserve.runtime.repository import ModelRepository
    from zeroserve.runtime.telemetry import Telemetry

logger = logging.getLogger("zeroserve.runtime")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stop:
    """A request to stop the server: from a signal, or from the server itself (a failed load).

    ``chain``: also call the handler that was installed before (when the server that runs the app installs its
    own, e.g. uvicorn in a ``--workers`` process, or a server embedding the app)."""

    def __init__(self, *, chain: bool = False) -> None:
        self.chain = chain
        self.signal: int | None = None  # the first signal received
        self.requested = False
        self.failure: ServerError | None = None  # why the server stopped itself
        self._hooks: list[Callable[[bool], None]] = []  # called with force=True on a second SIGINT
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._capturing = False

    @property
    def exit_code(self) -> int:
        """0 for a stop asked by SIGTERM, 130 after SIGINT (Ctrl-C), 1 after a failed load."""
        if self.failure is not None:
            return 1
        return 130 if self.signal == signal.SIGINT else 0

    def on_stop(self, hook: Callable[[bool], None]) -> None:
        """Call ``hook(force)`` when a stop is requested (at once if it was): it only sets flags or schedules work,
        as it may run inside a signal handler."""
        self._hooks.append(hook)
        if self.requested:
            hook(False)

    def request(self, failure: ServerError | None = None, *, force: bool = False) -> None:
        if failure is not None and self.failure is None:
            self.failure = failure
        first = not self.requested
        self.requested = True
        if first or force:
            for hook in list(self._hooks):
                hook(force)
        for loop, event in self._waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there any more
                loop.call_soon_threadsafe(event.set)

    async def wait(self) -> None:
        if self.requested:
            return
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        self._waiters.append(waiter)
        try:
            if not self.requested:  # a request between the check above and the registration
                await event.wait()
        finally:
            self._waiters.remove(waiter)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Handle SIGTERM and SIGINT while in this block (main thread only; re-entered, it does nothing)."""
        if self._capturing or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: FrameType | None) -> None:
            force = self.requested and signum == signal.SIGINT  # a second Ctrl-C: stop without draining
            if self.signal is None:
                self.signal = int(signum)
            self.request(force=force)
            before = previous.get(signum)
            if self.chain and callable(before):
                before(signum, frame)

        self._capturing = True
        for sig in _SIGNALS:
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for number, before in previous.items():
                signal.signal(number, before)
            self._capturing = False


@contextlib.asynccontextmanager
async def serving(
    config: RuntimeConfig,
    repository: ModelRepository,
    dataplane: DataPlane,
    telemetry: Telemetry,
    stop: Stop,
    *,
    grpc_server: GrpcServer | None = None,
    load_first: bool = False,
    on_load_failure: Callable[[ServerError], None] | None = None,
) -> AsyncIterator[None]:
    """Start, serve until the block ends, then drain and stop (the sequence in this module's docstring).

    ``load_first``: return only once the models are loaded, or a stop was requested meanwhile. A failed load stops
    the server under ``--exit_on_error`` (``on_load_failure`` is called first, e.g. by a worker that exits at once);
    without it the server goes on answering 503 with the reason."""

    def failed(exc: ServerError) -> None:
        if on_load_failure is not None:
            on_load_failure(exc)
        if config.exit_on_error:
            stop.request(exc)

    loading: asyncio.Task[None] | None = None
    reaper: asyncio.Task[None] | None = None
    try:
        with stop.capture():
            if grpc_server is not None:
                await grpc_server.start()  # in this event loop, beside REST
                loop = asyncio.get_running_loop()
                # Both listeners stop accepting at the same moment, under one drain deadline.
                stop.on_stop(lambda force: _call_soon(loop, grpc_server.begin_stop))
            loading = asyncio.create_task(
                load_in_background(config, repository, failed, telemetry), name="zeroserve-load"
            )
            reaper = asyncio.create_task(dataplane.models.reap_idle(), name="zeroserve-idle-models")
            if load_first:
                stopped = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait([loading, stopped], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopped.cancel()
                if stop.requested and not loading.done():
                    logger.info("stopping before the models finished loading")
            yield
    finally:
        if grpc_server is not None:
            await grpc_server.stop()
        for task in (loading, reaper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        dataplane.close()
        await asyncio.to_thread(telemetry.shutdown)  # flushes the spans of the requests just drained


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to stop
        loop.call_soon_threadsafe(callback)
