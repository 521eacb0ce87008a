"""Where one inference runs: one pure policy, one table, one frozen settings value (``PlacementSettings``).

``choose`` decides; the first row that matches wins:

    | row | when                                                                     | placement   |
    |-----|--------------------------------------------------------------------------|-------------|
    | 1   | the model has a batcher (``--max_batch_size`` > 1, batchable model)       | BATCH       |
    | 2   | CPU session, average run < ``inline_run_seconds``, inputs ≤              | LOOP        |
    |     | ``inline_max_input_bytes``                                               |             |
    | 3   | cores are shared (``share_cores``: the adaptive hint, 2+ cores), CPU     |             |
    |     | session, fastest run ≥ ``share_min_run_seconds``, and                    |             |
    | 3a  |   the run is expected under ``loop_run_max_seconds`` and traffic is quiet | LOOP_ALONE  |
    | 3b  |   otherwise                                                              | CORES       |
    | 4   | anything else (GPU sessions, short runs with big inputs, other hints)     | POOL        |

- BATCH: the model's batcher merges it with concurrent requests (batching.py).
- LOOP: ``session.run`` on the event loop's thread: for a tiny model the hand-off to a thread and back costs
  more than the run. The loop turns once first (twice when ``extra_turn`` says so), so that requests read in the
  same turn are admitted beside it.
- LOOP_ALONE: on the event loop's thread with every core, as KServe runs every request: a lone request skips the
  hand-offs. ``choose`` is asked again after one turn of the loop; a request admitted in that turn makes it CORES.
- CORES: the core-sharing pool (cores.py): every core when alone, one core each when runs compete.
- POOL: the run pool (runpool.py), one run at a time on every intra-op thread (``--inference_threads`` at once).

Why each rule and threshold is so, with the numbers and the command that measured them: bench/README.md,
"Where a request runs". Only CPU sessions may hold the loop or share cores: a GPU run at a new shape may tune
kernels or build an engine for tens of ms, and every thread that runs a GPU session holds a workspace of its own.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from zeroserve.runtime.run_stats import RunStats

INLINE_MAX_INPUT_BYTES: Final = 64 * 1024


class Placement(enum.Enum):
    BATCH = "batch"
    LOOP = "loop"
    LOOP_ALONE = "loop_alone"
    CORES = "cores"
    POOL = "pool"


@dataclass(frozen=True, slots=True)
class PlacementSettings:
    """The thresholds of the table above (seconds and bytes)."""

    inline_run_seconds: float = 0.0003  # --inline_run_ms; 0: never LOOP
    inline_max_input_bytes: int = INLINE_MAX_INPUT_BYTES
    share_cores: int = 0  # cores the adaptive hint shares between runs; 0: rows 3a/3b off
    share_min_run_seconds: float = 0.001
    loop_run_max_seconds: float = 0.05
    lone_quiet_seconds: float = 1.0  # after requests overlapped, lone ones stay off the loop this long
    # A second turn of the loop before a LOOP run, for REST while others are in flight: set when the server finds
    # itself on uvloop, whose saturated loop otherwise serves some connections far later than others.
    rest_extra_turn: bool = False


def choose(
    settings: PlacementSettings,
    *,
    batched: bool,
    cpu_only: bool,
    runs: RunStats,
    input_bytes: int,
    quiet: Callable[[], bool],
) -> Placement:
    """The placement of one request (the table in this module's docstring). ``quiet`` says whether traffic is
    quiet (``Traffic.quiet``); it is asked only for the row that needs it."""
    if batched:
        return Placement.BATCH
    if not cpu_only:
        return Placement.POOL
    if runs.average_seconds < settings.inline_run_seconds and input_bytes <= settings.inline_max_input_bytes:
        return Placement.LOOP
    if settings.share_cores and runs.fastest_seconds >= settings.share_min_run_seconds:
        if quiet() and _short_enough(settings, runs, input_bytes):
            return Placement.LOOP_ALONE
        return Placement.CORES
    return Placement.POOL


def _short_enough(settings: PlacementSettings, runs: RunStats, input_bytes: int) -> bool:
    """Expected under ``loop_run_max_seconds`` by the average, and by the fastest run scaled up to these inputs
    (warmup runs one row; a request may bring many)."""
    if runs.average_seconds >= settings.loop_run_max_seconds:
        return False
    scale = max(1.0, input_bytes / max(1, runs.fastest_input_bytes))
    return runs.fastest_seconds * scale < settings.loop_run_max_seconds


def extra_turn(settings: PlacementSettings, *, rest: bool, others_in_flight: bool) -> bool:
    """Whether a LOOP run lets the loop turn a second time: REST on uvloop (``rest_extra_turn``) while others are in
    flight, asked after the first turn (which admits the requests scheduled beside this one). A lone request
    never waits for it."""
    return settings.rest_extra_turn and rest and others_in_flight


class Traffic:
    """The requests in flight, as the policy sees them: admitted and not answered, or still arriving (a REST body
    being read over several turns of the loop is in flight before it is admitted: ``DataPlane.admit`` counts it in
    ``receiving``), and when requests last overlapped. Used on the event loop only."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.receiving = 0
        self.overlapped_at = -float("inf")  # time.monotonic() when requests were last seen overlapping
        self._admitted = _Admitted(self)

    def admitted(self) -> _Admitted:
        """Count a request from admission to its answer (``with traffic.admitted(): ...``)."""
        return self._admitted

    @property
    def others(self) -> bool:
        """Whether a request in flight has company (for one admitted itself)."""
        return self.in_flight > 1 or self.receiving > 0

    def quiet(self, settings: PlacementSettings, cores_contended: bool) -> bool:
        """Alone, no run queued or holding cores (a run left behind by a client that went away counts), and no
        requests seen overlapping for ``lone_quiet_seconds``."""
        now = time.monotonic()
        if self.others or cores_contended:
            self.overlapped_at = now
            return False
        return now - self.overlapped_at >= settings.lone_quiet_seconds

    @property
    def company(self) -> int:
        """Requests admitted or still arriving: what a forming batch may wait for."""
        return self.in_flight + self.receiving


class _Admitted:
    """``Traffic.admitted``'s ``with`` block. A class rather than a generator's context manager: every request
    enters one, and a generator's costs several times as much."""

    __slots__ = ("_traffic",)

    def __init__(self, traffic: Traffic) -> None:
        self._traffic = traffic

    def __enter__(self) -> None:
        traffic = self._traffic
        traffic.in_flight += 1
        if traffic.in_flight > 1 or traffic.receiving:
            traffic.overlapped_at = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self._traffic.in_flight -= 1
