"""The data plane's admission as a unit: the bytes a request holds against the in-flight budget, and the arrival
the placement policy counts, from ``DataPlane.admit`` to the answer (the end-to-end refusals are in
test_memory_bounds.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from zeroserve.runtime.dataplane import DataPlane
from zeroserve.runtime.repository import ModelRepository
from zeroserve.runtime.server_errors import ServerBusy


@pytest.fixture
def dataplane() -> Iterator[DataPlane]:
    plane = DataPlane(ModelRepository(), inference_threads=1, max_inflight_bytes=1000, max_queue=2)
    yield plane
    plane.close()


def test_an_admitted_request_holds_its_bytes_and_counts_as_arriving_until_read(dataplane: DataPlane) -> None:
    held = dataplane.admit(600, arriving=True)
    assert (dataplane.bytes_held, dataplane.traffic.receiving) == (600, 1)
    held.arrived()
    assert (dataplane.bytes_held, dataplane.traffic.receiving) == (600, 0)
    held.release()
    held.release()  # a second release (an error path after the answer) changes nothing
    assert (dataplane.bytes_held, dataplane.traffic.receiving) == (0, 0)


def test_a_request_released_before_its_body_arrived_stops_counting_as_arriving(dataplane: DataPlane) -> None:
    with dataplane.admit(10, arriving=True):  # the client went away mid-body
        assert dataplane.traffic.receiving == 1
    assert (dataplane.bytes_held, dataplane.traffic.receiving) == (0, 0)


def test_past_the_budget_a_request_is_refused_but_alone_one_is_always_let_in(dataplane: DataPlane) -> None:
    alone = dataplane.admit(5000)  # over the whole budget, yet the server is idle
    with pytest.raises(ServerBusy, match="--max_inflight_mib"):
        dataplane.admit(1)
    alone.release()
    first = dataplane.admit(600)
    with pytest.raises(ServerBusy):
        dataplane.admit(600)
    second = dataplane.admit(400)  # exactly at the budget
    assert dataplane.bytes_held == 1000
    for held in (first, second):
        held.release()
    assert dataplane.bytes_held == 0


def test_a_body_of_unknown_length_grows_against_the_budget(dataplane: DataPlane) -> None:
    other = dataplane.admit(500)
    growing = dataplane.admit(0, arriving=True)
    growing.grow(400)
    with pytest.raises(ServerBusy):
        growing.grow(200)
    assert dataplane.bytes_held == 900
    growing.release()
    other.release()
    assert (dataplane.bytes_held, dataplane.traffic.receiving) == (0, 0)
