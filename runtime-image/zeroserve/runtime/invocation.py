"""What REST and gRPC do alike around one inference: its time from received to answered, its outcome in the
request metrics and on its SERVER span, whether it is this process's first answer (its cold start), and the
``Server-Timing`` it answers with. The transports decode, call the data plane and encode; this does the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from zeroserve.protocol.start import INIT_SPAN_HEADER
from zeroserve.runtime.messages import InferResult

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from zeroserve.runtime.dataplane import DataPlane
    from zeroserve.runtime.metrics import Protocol
    from zeroserve.runtime.telemetry import Telemetry

# Records a span's outcome: the span, the HTTP status (gRPC: its error's), cold start, the request's id.
SpanOutcome = Callable[["Span", int, bool, "str | None"], None]


class Invocation:
    """One inference request, from received to answered. Create it when the request arrives."""

    __slots__ = ("_dataplane", "_telemetry", "_protocol", "_span", "_outcome", "received")

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

    def answered(self, result: InferResult) -> list[tuple[str, str]]:
        """Record a success; returns the headers (REST) or trailing metadata (gRPC) the answer carries:
        ``server-timing`` (queue and compute; the cold start's phases on the process's first answer) and, on that
        first answer of a traced process, the init span's traceparent."""
        coldstart = self._dataplane.repository.coldstart
        first = coldstart.take_first_answer()
        timing = result.server_timing()
        extra: list[tuple[str, str]] = []
        if first:
            timing = f"{coldstart.server_timing()}, {timing}"
            traceparent = self._telemetry.init_traceparent()
            if traceparent is not None:
                extra.append((INIT_SPAN_HEADER, traceparent))
        if self._span is not None:
            self._outcome(self._span, 200, first, result.id)
            if first:
                self._telemetry.mark_cold_answer(self._span, coldstart)
        self._dataplane.observe(
            result.model_name, result.model_version, result, 200, time.perf_counter() - self.received, self._protocol
        )
        return [("server-timing", timing), *extra]

    def failed(self, status: int, name: str, version: str | None, request_id: str | None) -> None:
        """Record an error answer with its HTTP status (gRPC: the status of the error it answers with)."""
        if self._span is not None:
            self._outcome(self._span, status, False, request_id)
        self._dataplane.observe(name, version, None, status, time.perf_counter() - self.received, self._protocol)
