"""What this process's cold start spent its time on: phases recorded as they happen, read by the
Server-Timing header of the first response and by the init span (telemetry.py) afterwards.

Recording is plain bookkeeping (no OpenTelemetry here), so it costs nothing when tracing is off.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from zeroserve.protocol.start import StartState


@dataclass(slots=True)
class Phase:
    name: str  # fetch, session, warmup, ...
    start_ns: int  # wall clock, time.time_ns()
    end_ns: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


class ByteProgress:
    """Bytes done of a total, counted from the threads that move them (a fetch's range reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0
        self.done = 0
        self.started = time.monotonic()

    def expect(self, total: int) -> None:
        with self._lock:
            self.total, self.done, self.started = total, 0, time.monotonic()

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count

    def rate(self) -> float:
        """Bytes per second so far (0 until a second's worth of time has passed, which would say little)."""
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed >= 0.5 else 0.0


def process_start_ns() -> int:
    """When this process started (wall clock): interpreter start-up and imports are part of a cold start.

    Linux: /proc/self/stat field 22 (start time in clock ticks after boot) against /proc/uptime, both to
    10 ms (/proc/stat's boot time is whole seconds, too coarse). Elsewhere, or if /proc is unreadable: now.
    """
    try:
        with open("/proc/self/stat") as stat:
            after_name = stat.read().rsplit(")", 1)[1].split()
        started_after_boot = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, counted from 1
        with open("/proc/uptime") as uptime:
            now_after_boot = float(uptime.read().split()[0])
        now = time.time_ns()
    except (OSError, ValueError, IndexError):
        return time.time_ns()
    return now - int(max(0.0, now_after_boot - started_after_boot) * 1e9)


class PhaseLog:
    """Phases recorded as they happen: a process's cold start (``ColdStart``), or one model's load."""

    def __init__(self) -> None:
        self.phases: list[Phase] = []
        self.bytes = ByteProgress()  # what a fetch has read of the model's bytes

    def begin(self, name: str, **attributes: Any) -> Phase:
        phase = Phase(name, time.time_ns(), attributes=attributes)
        self.phases.append(phase)
        return phase

    @staticmethod
    def end(phase: Phase, **attributes: Any) -> None:
        phase.end_ns = time.time_ns()
        phase.attributes.update(attributes)

    def current_phase(self) -> str:
        """The phase under way (``fetch``, ``session``, ``warmup``), or ``process`` before the first one."""
        for phase in reversed(self.phases):
            if not phase.end_ns:
                return phase.name
        return self.phases[-1].name if self.phases else "process"

    def totals(self) -> dict[str, float]:
        """Seconds per phase name (a repository of several models has one session phase per model)."""
        totals: dict[str, float] = {}
        for phase in self.phases:
            if phase.end_ns:
                totals[phase.name] = totals.get(phase.name, 0.0) + phase.seconds
        return totals


class ColdStart(PhaseLog):
    """The init record of one process. ``ready_ns`` is set when every model is ready; ``recorded`` once the start
    is recorded whole (its init span too), which is when the server says it is ready: the first answer then always
    has the whole cold start to tell."""

    def __init__(self) -> None:
        super().__init__()
        self.process_start_ns = process_start_ns()
        self.ready_ns: int | None = None
        self.recorded = False
        self._first_answer_pending = True

    def progress(self) -> StartState:
        """Where the start is now: its phase, its time so far and, while fetching, bytes and throughput."""
        phase = self.current_phase()
        state = StartState("loading", phase=phase, elapsed_s=round(self.elapsed_seconds(), 3))
        bytes_ = self.bytes
        if phase != "fetch" or not bytes_.total:
            return state
        rate = bytes_.rate()
        eta = (bytes_.total - bytes_.done) / rate if rate else None
        return StartState(
            "loading", phase=phase, elapsed_s=state.elapsed_s, done_bytes=bytes_.done, total_bytes=bytes_.total,
            bytes_per_s=round(rate, 1) if rate else None, eta_s=round(eta, 1) if eta is not None else None,
        )

    def take_first_answer(self) -> bool:
        """True once: for the first inference this process answers once its start is recorded, by either
        protocol (its cold start). A request sent before readiness, by a client that did not wait for it, is
        answered without it."""
        if not self.recorded:
            return False
        first, self._first_answer_pending = self._first_answer_pending, False
        return first

    @property
    def init_seconds(self) -> float | None:
        if self.ready_ns is None:
            return None
        return (self.ready_ns - self.process_start_ns) / 1e9

    def elapsed_seconds(self) -> float:
        return (time.time_ns() - self.process_start_ns) / 1e9

    def server_timing(self) -> str:
        """``init;dur=…, fetch;dur=…, session;dur=…, warmup;dur=…`` (milliseconds), summed per phase name."""
        parts = []
        if self.init_seconds is not None:
            parts.append(f"init;dur={self.init_seconds * 1000:.1f}")
        parts.extend(f"{name};dur={seconds * 1000:.1f}" for name, seconds in self.totals().items())
        return ", ".join(parts)
