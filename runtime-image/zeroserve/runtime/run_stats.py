"""How long a model's runs take, which is what the placement policy decides on (``OnnxModel.timed_run`` records
every run).

Runs finish on several threads at once (the run pool, the core-sharing pool, the event loop), so the numbers
are updated under a lock; the policy reads them without one (a float read is atomic, and a hint a run old is
good enough to place the next request).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

# outputs, run started, run finished (perf_counter), and the CPU time of the thread that ran it
RunResult = tuple[list[Any], float, float, float]

_INF = float("inf")


class RunStats:
    """The moving average of a model's runs on every intra-op thread, and its fastest run with that run's input
    bytes: what the model costs when nothing competes with it, which an average taken under load overstates."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.average_seconds = _INF
        self.fastest_seconds = _INF
        self.fastest_input_bytes = 0

    def record(self, seconds: float, feeds: Mapping[str, Any]) -> None:
        """One run of ``seconds`` on ``feeds`` (arrays: their bytes are counted only for a new fastest run)."""
        with self._lock:
            previous = self.average_seconds
            self.average_seconds = seconds if previous == _INF else 0.8 * previous + 0.2 * seconds
            if seconds < self.fastest_seconds:
                self.fastest_seconds = seconds
                self.fastest_input_bytes = sum(array.nbytes for array in feeds.values())

    def restart_average(self) -> None:
        """Forget the average (the first run of a session pays one-time costs that are not a run's)."""
        with self._lock:
            self.average_seconds = _INF

    def reset(self) -> None:
        """Forget everything (a new session: its runs are measured afresh)."""
        with self._lock:
            self.average_seconds = self.fastest_seconds = _INF
            self.fastest_input_bytes = 0
