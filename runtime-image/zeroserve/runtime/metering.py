"""Every invocation metered as a serverless platform bills it, and the instance beside it.

- billed duration: the wall time from the request received to its answer, rounded up to the millisecond (as
  Lambda rounds);
- memory: the container's memory limit (cgroup), or ``--billing_memory_mib``; GB-seconds = billed seconds x GB,
  where a GB is 1024 MiB as Lambda counts it (a "1 GB" function running 200 ms costs 0.2 GB-s);
- CPU seconds: the CPU time of the threads that decoded, ran and encoded the invocation. ONNX Runtime's own
  intra-op threads, which a run may use beside the thread that calls it, are not counted;
- the instance: the process's whole life x its memory, so that idle cost shows beside used cost.

Exposed as ``Server-Timing: billed;dur=<ms>`` on every answer (gRPC: trailing metadata), on the invocation's
span, and as Prometheus counters ``zeroserve_billed_gb_seconds_total``, ``zeroserve_invocation_cpu_seconds_total``
(both by model), ``zeroserve_invocations_total`` and ``zeroserve_instance_gb_seconds_total``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from zeroserve.runtime.metrics import CallbackCounter, Labels, ServerMetrics

T = TypeVar("T")

GB = 2**30  # Lambda's GB: 1024 MB
_FAMILIES = (
    ("zeroserve_billed_gb_seconds_total", "Billed GB-seconds of invocations, by model"),
    ("zeroserve_invocation_cpu_seconds_total", "CPU seconds of invocations (decode, run, encode), by model"),
    ("zeroserve_invocations_total", "Invocations billed, by model"),
)


@dataclass(slots=True)
class Bill:
    """What one invocation costs, for its span."""

    billed_ms: int
    gb_seconds: float
    cpu_seconds: float


class Metering:
    """Bills invocations against ``memory_bytes`` and counts them in ``metrics``."""

    def __init__(self, memory_bytes: int, metrics: ServerMetrics, started: float | None = None) -> None:
        self.memory_bytes = memory_bytes
        self._gb = memory_bytes / GB
        self._started = time.monotonic() if started is None else started
        # Per model: billed GB-seconds, CPU seconds, invocations; read when /metrics is scraped. One list per model
        # rather than three labelled counters, for every invocation adds to all three.
        self._totals: dict[str, list[float]] = {}
        for index, (name, help_text) in enumerate(_FAMILIES):
            metrics.add_counter_callback(CallbackCounter(name, help_text, functools.partial(self._read, index)))
        metrics.add_counter_callback(
            CallbackCounter(
                "zeroserve_instance_gb_seconds_total", "This process's life so far times its memory, in GB-seconds",
                self._instance,
            )
        )
        metrics.add_gauge_value("zeroserve_billing_memory_bytes", "The memory invocations are billed for", memory_bytes)

    def bill(self, model: str, seconds: float, cpu_seconds: float) -> int:
        """Bill one invocation of ``model`` that took ``seconds`` and ``cpu_seconds``; returns its billed
        milliseconds (``Bill`` has the rest, for a span)."""
        billed_ms = math.ceil(seconds * 1000) or 1
        totals = self._totals.get(model)
        if totals is None:
            totals = self._totals[model] = [0.0, 0.0, 0.0]
        totals[0] += billed_ms / 1000 * self._gb
        totals[1] += cpu_seconds
        totals[2] += 1
        return billed_ms

    def details(self, billed_ms: int, cpu_seconds: float) -> Bill:
        """An invocation's bill in full, GB-seconds included (for its span)."""
        return Bill(billed_ms, billed_ms / 1000 * self._gb, cpu_seconds)

    def _read(self, index: int) -> dict[Labels, float]:
        return {(("model", model),): totals[index] for model, totals in self._totals.items()}

    def _instance(self) -> dict[Labels, float]:
        return {(): (time.monotonic() - self._started) * self._gb}


def cpu_timed(function: Callable[..., T], *args: object) -> tuple[T, float]:
    """``function(*args)`` and the CPU time this thread spent on it (for work run in a thread of its own)."""
    started = time.thread_time()
    result = function(*args)
    return result, time.thread_time() - started
