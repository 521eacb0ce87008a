"""Sharing the CPU quota between runs: all cores to a lone run, one core each when runs compete.

ONNX Runtime spreads one run over its intra-op threads, which is the fastest way to answer one request. Under
load it is not: the threads of one run wait on each other at every operator, spin while they wait, and take
the cores the event loop needs to decode the next request. Several runs side by side on one thread each finish
more work, while a lone run on one thread is slower. So the ``adaptive`` hint (``--performance_hint``) gives a
run every core when nothing else is running or waiting, and one core (on a second, single-thread session of the
model) when others are. bench/README.md ("Where a request runs") has the numbers.

``CoreScheduler`` hands out those cores as tokens to the worker threads that call ``session.run``. The
decision is taken in the worker, just before the run: a worker that finishes a run picks up the next one
without a trip through the event loop, which is busy decoding requests under load. A short run that is alone is
the exception: the data plane runs it on the event loop itself and counts it with ``ran_alone`` (placement.py
says when).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class CoreScheduler:
    """Tokens for ``cores`` CPU cores, shared by the worker threads of one server.

    The event loop calls ``submitted`` when it hands a run to the worker pool (and ``withdrawn`` if that run
    is cancelled before it starts); the worker calls ``acquire`` before the run and ``release`` after it.
    A run gets every core when they are all free and no other run is queued or waiting for cores, or when it
    cannot share (its model has no single-thread session); otherwise one core. A run that cannot share holds
    back new one-core grants while it waits, so runs that can share do not keep it from the cores forever.
    ``acquire`` blocks until it can grant one of those."""

    def __init__(self, cores: int) -> None:
        if cores < 1:
            raise ValueError(f"cores must be at least 1, got {cores}")
        self.cores = cores
        self._free = cores
        self._pending = 0  # submitted, not yet started
        self._waiting = 0  # started, blocked in acquire
        self._waiting_for_all = 0  # of those, runs that cannot share
        self._changed = threading.Condition()
        self.grants = {"all": 0, "one": 0}  # runs so far, by the cores they were given (for /metrics)

    @property
    def contended(self) -> bool:
        """Whether a run submitted now would have to share the cores or wait (read without the lock: a hint)."""
        # In the order a run moves through them (under the lock): pending, waiting, holding cores. Read the other
        # way round, a run could move from a count not yet read to one already read and be missed.
        return self._pending > 0 or self._waiting > 0 or self._free < self.cores

    def submitted(self) -> None:
        with self._changed:
            self._pending += 1

    def withdrawn(self) -> None:
        """A submitted run that will never start (cancelled while queued, or never queued)."""
        with self._changed:
            self._pending -= 1
            self._changed.notify_all()

    def acquire(self, can_share: Callable[[], bool]) -> int:
        """Block until cores are granted to the run about to start; returns how many: ``cores`` or 1.

        ``can_share`` is asked again each time the run is woken: a single-thread session may become ready
        while it waits."""
        with self._changed:
            self._pending -= 1
            self._waiting += 1
            counted_for_all = False  # whether this run is in _waiting_for_all
            try:
                while True:
                    share = can_share()
                    if counted_for_all == share:  # it needs every core now and did not before, or the reverse
                        self._waiting_for_all += -1 if share else 1
                        counted_for_all = not share
                    others = self._pending + self._waiting - 1
                    if self._free == self.cores and (not share or others == 0):
                        self._free = 0
                        self.grants["all"] += 1
                        return self.cores
                    if share and self._free >= 1 and self._waiting_for_all == 0:
                        self._free -= 1
                        self.grants["one"] += 1
                        return 1
                    self._changed.wait()
            finally:
                self._waiting -= 1
                if counted_for_all:
                    self._waiting_for_all -= 1
                self._changed.notify_all()  # the counts others decide on changed

    def ran_alone(self) -> None:
        """Count a run that took every core without asking: nothing else was running or queued (the data plane
        runs such a run on the event loop, which submits nothing while it runs)."""
        with self._changed:
            self.grants["all"] += 1

    def release(self, cores: int) -> None:
        with self._changed:
            self._free += cores
            self._changed.notify_all()
