"""The placement policy as a pure function: each row of its table, and the traffic it reads."""

from __future__ import annotations

import time

import numpy as np
import pytest

from zeroserve.runtime.placement import Placement, PlacementSettings, Traffic, choose, extra_turn
from zeroserve.runtime.run_stats import RunStats

SHARING = PlacementSettings(inline_run_seconds=0.0003, share_cores=2)


def feeds(nbytes: int) -> dict[str, np.ndarray]:
    return {"input": np.zeros(nbytes, np.uint8)}


def runs(average: float, fastest: float | None = None, fastest_bytes: int = 64) -> RunStats:
    stats = RunStats()
    stats.record(fastest if fastest is not None else average, feeds(fastest_bytes))
    stats.average_seconds = average
    return stats


@pytest.mark.parametrize(
    ("settings", "batched", "cpu_only", "stats", "input_bytes", "quiet", "expected"),
    [
        # row 1: a batcher wins over everything, even a run short enough for the loop
        (SHARING, True, True, runs(0.0001), 64, True, Placement.BATCH),
        # row 2: tiny CPU runs with small inputs stay on the loop
        (SHARING, False, True, runs(0.0001), 64, False, Placement.LOOP),
        # ... but not with inputs over the cap, nor on a GPU session
        (SHARING, False, True, runs(0.0001), 65 * 1024, True, Placement.POOL),
        (SHARING, False, False, runs(0.0001), 64, True, Placement.POOL),
        # row 3a: a lone, quiet, short-enough run gets every core on the loop
        (SHARING, False, True, runs(0.005), 64, True, Placement.LOOP_ALONE),
        # row 3b: the same run with company shares the cores
        (SHARING, False, True, runs(0.005), 64, False, Placement.CORES),
        # row 3b: a request far larger than the fastest run could hold the loop too long
        (SHARING, False, True, runs(0.005, 0.005, 64), 64 * 20, True, Placement.CORES),
        # row 3b: an average over the loop's limit
        (SHARING, False, True, runs(0.06, 0.005), 64, True, Placement.CORES),
        # row 4: short runs (fastest under 1 ms) gain nothing from sharing
        (SHARING, False, True, runs(0.0005), 64, True, Placement.POOL),
        # row 4: other hints share no cores
        (PlacementSettings(), False, True, runs(0.005), 64, True, Placement.POOL),
        # before any run (warmup off): not on the loop, and not judged short enough to hold it
        (SHARING, False, True, RunStats(), 64, True, Placement.CORES),
    ],
)
def test_each_row_of_the_table(
    settings: PlacementSettings, batched: bool, cpu_only: bool, stats: RunStats, input_bytes: int, quiet: bool,
    expected: Placement,
) -> None:
    asked: list[bool] = []

    def traffic_quiet() -> bool:
        asked.append(quiet)
        return quiet

    placement = choose(
        settings, batched=batched, cpu_only=cpu_only, runs=stats, input_bytes=input_bytes, quiet=traffic_quiet
    )
    assert placement is expected
    # Traffic is asked about only where the table reads it (rows 3a/3b): a request on the loop never pays for it.
    assert bool(asked) == (placement in (Placement.LOOP_ALONE, Placement.CORES))


def test_rests_extra_turn_only_on_uvloop_and_only_with_company() -> None:
    uvloop = PlacementSettings(rest_extra_turn=True)
    assert extra_turn(uvloop, rest=True, others_in_flight=True)
    assert not extra_turn(uvloop, rest=True, others_in_flight=False)
    assert not extra_turn(uvloop, rest=False, others_in_flight=True)  # gRPC
    assert not extra_turn(PlacementSettings(), rest=True, others_in_flight=True)  # the standard loop


def test_traffic_is_quiet_only_after_a_spell_without_overlap() -> None:
    settings = PlacementSettings(lone_quiet_seconds=0.05)
    traffic = Traffic()
    with traffic.admitted():
        assert traffic.quiet(settings, cores_contended=False)  # never overlapped
        assert not traffic.quiet(settings, cores_contended=True)  # a run left behind holds cores
        traffic.receiving += 1  # a body still arriving (DataPlane.admit counts it) is company
        assert traffic.others and traffic.company == 2
        traffic.receiving -= 1
        assert not traffic.quiet(settings, cores_contended=False)  # within the spell after that overlap
    time.sleep(0.06)
    with traffic.admitted():
        assert traffic.quiet(settings, cores_contended=False)
    assert (traffic.in_flight, traffic.receiving) == (0, 0)


def test_run_stats_keep_the_fastest_run_and_a_moving_average() -> None:
    stats = RunStats()
    stats.record(0.010, feeds(100))
    stats.record(0.002, feeds(50))
    stats.record(0.020, feeds(400))
    assert stats.fastest_seconds == 0.002 and stats.fastest_input_bytes == 50
    assert stats.average_seconds == pytest.approx(0.8 * (0.8 * 0.010 + 0.2 * 0.002) + 0.2 * 0.020)
    stats.restart_average()
    stats.record(0.004, feeds(60))
    assert stats.average_seconds == 0.004 and stats.fastest_seconds == 0.002
    stats.reset()
    assert stats.fastest_seconds == float("inf") and stats.fastest_input_bytes == 0
