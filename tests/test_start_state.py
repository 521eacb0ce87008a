"""The start-state contract (zeroserve.protocol.start): what a 503 says about a start, read and written."""

from __future__ import annotations

import math

import pytest

from zeroserve.protocol.start import StartState, retry_after_value


def test_round_trip_keeps_only_what_is_known() -> None:
    state = StartState("loading", phase="fetch", elapsed_s=2.5, done_bytes=5 << 20, total_bytes=20 << 20)
    assert state.to_json() == {
        "state": "loading", "phase": "fetch", "elapsed_s": 2.5, "done_bytes": 5 << 20, "total_bytes": 20 << 20,
    }
    assert StartState.from_json(state.to_json()) == state


@pytest.mark.parametrize(
    "value", [None, [], "failed", {"state": "broken"}, {"reason": "x"}],
)
def test_what_is_not_a_start_object_reads_as_none(value: object) -> None:
    assert StartState.from_json(value) is None


def test_fields_of_the_wrong_type_are_dropped() -> None:
    state = StartState.from_json(
        {"state": "failed", "reason": 7, "exit_status": True, "starts": 3, "retry_after_s": math.nan}
    )
    assert state == StartState("failed", starts=3)


def test_describe_for_people() -> None:
    loading = StartState(
        "loading", phase="fetch", elapsed_s=4.0, done_bytes=50 << 20, total_bytes=200 << 20,
        bytes_per_s=12.5 * 2**20, eta_s=12.0,
    )
    assert loading.describe() == "fetch, 50.0 MiB of 200.0 MiB, 12.5 MiB/s, about 12 s left, 4.0 s so far"
    failed = StartState("failed", reason="INVALID_PROTOBUF: parse error", exit_status=1, starts=3)
    assert failed.failed and failed.describe() == "INVALID_PROTOBUF: parse error; exit status 1; 3 starts"


@pytest.mark.parametrize(("seconds", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (2.1, "3"), (math.inf, "1")])
def test_retry_after_is_whole_seconds_and_never_zero(seconds: float, header: str) -> None:
    assert retry_after_value(seconds) == header
