"""What REST and gRPC do alike around one inference: its time from received to answered, its bill (metering.py),
its outcome in the request metrics and on its SERVER span, whether it is this process's first answer (its cold
start), and the ``Server-Timing`` it answers with. The transports decode, call the data plane and encode, through
``here`` or ``off_loop`` so that the CPU it costs is counted; this does the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from zeroserve.protocol.start import INIT_SPAN_HEADER
from zeroserve.runtime.messages import InferResult
from zeroserve.runtime.metering import cpu_timed

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from zeroserve.runtime.coldstart import PhaseLog
    from zeroserve.runtime.dataplane import DataPlane
    from zeroserve.runtime.metrics import Protocol
    from zeroserve.runtime.telemetry import Telemetry

T = TypeVar("T")

# Records a span's outcome: the span, the HTTP status (gRPC: its error's), cold start, the request's id.
SpanOutcome = Callable[["Span", int, bool, "str | None"], None]


class Invocation:
    """One inference request, from received to answered. Create it when the request arrives."""

    __slots__ = ("_dataplane", "_telemetry", "_protocol", "_span", "_outcome", "received", "cpu_seconds")

    def __init__(
        self,
        dataplane: DataPlane,
        telemetry: Telemetry,
        protocol: Protocol,
        span: Span | None,
        outcome: SpanOutcome,
    ) -> None:
        self._dataplane = dataplane
        self._telemetry = telemetry
        self._protocol = protocol
        self._span = span
        self._outcome = outcome
        self.received = time.perf_counter()
        self.cpu_seconds = 0.0  # decoding and encoding; the run's own comes with its result

    def here(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` (a decode or an encode) on the event loop, its CPU time counted: there its wall time is
        its CPU time (see OnnxModel.timed_run)."""
        started = time.perf_counter()
        result = function(*args)
        self.cpu_seconds += time.perf_counter() - started
        return result

    async def off_loop(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` in a thread of its own, its CPU time counted: for work large enough to hold every
        other connection if it ran on the event loop."""
        result, cpu = await asyncio.to_thread(cpu_timed, function, *args)
        self.cpu_seconds += cpu
        return result

    def _bill(self, model: str, seconds: float) -> str:
        """The invocation billed (metering.py); its ``Server-Timing`` entry."""
        metering = self._dataplane.metering
        billed_ms = metering.bill(model, seconds, self.cpu_seconds)
        if self._span is not None:
            self._telemetry.set_bill(self._span, metering.details(billed_ms, self.cpu_seconds))
        return f"billed;dur={billed_ms}"

    def answered(self, result: InferResult) -> list[tuple[str, str]]:
        """Record a success; returns the headers (REST) or trailing metadata (gRPC) the answer carries:
        ``server-timing`` (the bill, queue and compute; the cold start's phases on the process's first answer) and,
        on that first answer of a traced process, the init span's traceparent."""
        seconds = time.perf_counter() - self.received
        self.cpu_seconds += result.cpu_seconds
        timing = f"{self._bill(result.model_name, seconds)}, {result.server_timing()}"
        if result.load is not None:  # it waited for its model to load (on demand)
            timing = f"{_load_timing(result.load)}, {timing}"
            if self._span is not None:
                self._telemetry.mark_model_load(self._span, result.load_span)
        headers = [("server-timing", timing)]
        coldstart = self._dataplane.repository.coldstart
        first = coldstart.take_first_answer()
        if first:
            headers[0] = ("server-timing", f"{coldstart.server_timing()}, {timing}")
            traceparent = self._telemetry.init_traceparent()
            if traceparent is not None:
                headers.append((INIT_SPAN_HEADER, traceparent))
        if self._span is not None:
            self._outcome(self._span, 200, first, result.id)
            if first:
                self._telemetry.mark_cold_answer(self._span, coldstart)
        self._dataplane.metrics.observe(result.model_name, result.model_version, 200, seconds, self._protocol)
        return headers

    def failed(self, status: int, name: str, version: str | None, request_id: str | None) -> list[tuple[str, str]]:
        """Record an error answer with its HTTP status (gRPC: the status of the error it answers with); returns
        the headers (trailing metadata) it carries: its bill, for an error is an invocation too."""
        seconds = time.perf_counter() - self.received
        if self._span is not None:
            self._outcome(self._span, status, False, request_id)
        model, model_version = self._dataplane.model_label(name, version)
        timing = self._bill(model, seconds)
        self._dataplane.metrics.observe(model, model_version, status, seconds, self._protocol)
        return [("server-timing", timing)]


def _load_timing(load: PhaseLog) -> str:
    """``load;dur=…, load.fetch;dur=…, load.session;dur=…, load.warmup;dur=…`` (milliseconds)."""
    totals = load.totals()
    parts = [f"load;dur={sum(totals.values()) * 1000:.1f}"]
    parts.extend(f"load.{name};dur={seconds * 1000:.1f}" for name, seconds in totals.items())
    return ", ".join(parts)
