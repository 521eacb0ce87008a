"""The start backoff as a plain object driven by a clock the test holds: kubelet's CrashLoopBackOff, its
per-minute bound, and which failures are answered (a failed start) or waited out (a crash)."""

from __future__ import annotations

import pytest

from zeroserve.activator.backoff import BackoffPolicy, StartLedger
from zeroserve.activator.process import exit_reason, exit_status


def run_failing_starts(policy: BackoffPolicy, until: float, start_takes: float) -> list[float]:
    """When starts happen for a model that can never start, with requests always waiting."""
    ledger = StartLedger(policy)
    now, starts = 0.0, []
    while now < until:
        verdict = ledger.decide(now)
        if verdict.start:
            starts.append(now)
            ledger.started(now)
            now += start_takes
            ledger.failed("start", now, "INVALID_PROTOBUF", 1)
        else:
            assert verdict.failure is not None and verdict.failure.reason == "INVALID_PROTOBUF"
            assert verdict.wait_s > 0
            now += verdict.wait_s
    return starts


@pytest.mark.parametrize("start_takes", [0.3, 1.0, 3.0])
def test_a_model_that_never_starts_is_tried_at_most_ten_times_in_30_s(start_takes: float) -> None:
    starts = run_failing_starts(BackoffPolicy(), until=30.0, start_takes=start_takes)
    assert len(starts) <= 10
    gaps = [later - earlier - start_takes for earlier, later in zip(starts, starts[1:])]
    assert gaps == pytest.approx([1, 2, 4, 8, 16][: len(gaps)])  # doubling from 1 s


def test_the_backoff_doubles_to_its_cap() -> None:
    policy = BackoffPolicy(initial=1.0, max=30.0)
    assert [policy.delay(n) for n in range(0, 8)] == [0, 1, 2, 4, 8, 16, 30, 30]


def test_the_minute_bound_holds_even_with_no_backoff() -> None:
    starts = run_failing_starts(BackoffPolicy(initial=0.01, max=0.01, starts_per_minute=4), until=120.0,
                                start_takes=0.1)
    for first in starts:
        assert sum(1 for other in starts if first <= other < first + 60) <= 4
    assert len(starts) == 8  # four a minute, for two minutes


def test_starts_without_failures_are_not_bounded() -> None:
    ledger = StartLedger(BackoffPolicy(starts_per_minute=10))
    for second in range(30):  # scale from zero every 2 s, as a short --idle_timeout does
        assert ledger.decide(second * 2.0).start
        ledger.started(second * 2.0)


def test_a_failed_start_is_answered_with_the_time_to_the_next() -> None:
    ledger = StartLedger(BackoffPolicy())
    ledger.started(0.0)
    ledger.failed("start", 1.0, "boom", 1)
    verdict = ledger.decide(1.25)
    assert not verdict.start and verdict.failure is not None
    state = verdict.failure.state(1.25)
    assert state.to_json() == {"state": "failed", "reason": "boom", "exit_status": 1, "starts": 1,
                               "retry_after_s": 0.75}
    assert ledger.decide(2.0).start


def test_a_crash_is_waited_out_not_answered() -> None:
    ledger = StartLedger(BackoffPolicy())
    ledger.started(0.0)
    ledger.failed("crash", 5.0, "killed by SIGKILL", 137, ready_for=4.0)
    verdict = ledger.decide(5.5)
    assert not verdict.start and verdict.failure is None and verdict.wait_s == pytest.approx(0.5)


def test_a_process_that_ran_long_enough_ends_the_streak() -> None:
    ledger = StartLedger(BackoffPolicy(initial=1.0, reset=60.0))
    for at in (0.0, 2.0, 5.0):
        ledger.started(at)
        ledger.failed("start", at + 0.5, "boom", 1)
    assert ledger.streak == 3
    ledger.started(100.0)
    ledger.kept_running(59.0)
    assert ledger.streak == 3
    ledger.kept_running(60.0)
    assert ledger.streak == 0 and ledger.decide(161.0).start
    ledger.failed("crash", 200.0, "killed by SIGKILL", 137, ready_for=100.0)
    assert ledger.streak == 1  # a long run before the crash: a fresh streak


def test_exit_reasons_come_from_what_the_server_said() -> None:
    said = ["INFO starting", "ERROR model failed", "zeroserve: cannot load model m.onnx: INVALID_PROTOBUF", ""]
    assert exit_reason(said, 1) == "cannot load model m.onnx: INVALID_PROTOBUF"
    assert exit_reason(["INFO loading"], -9) == "killed by SIGKILL"
    assert exit_reason(["Traceback (most recent call last):", '  File "x"', "ValueError: bad flag"], 1) == (
        "ValueError: bad flag")
    assert exit_reason([], 2) == "exited with status 2 and printed nothing on stderr"
    assert (exit_status(1), exit_status(-9), exit_status(-15)) == (1, 137, 143)
