"""When the next server process may start: kubelet's CrashLoopBackOff, for one machine. Pure: no I/O, no clock.

A *failure* is a start that failed (the process exited, reported a failed load on its readiness endpoint, or
was not ready within ``--start_timeout``) or a *crash* (a process that had become ready died without being
asked to). Failures in a row make a streak; after the n-th the next start waits
``delay(n) = min(backoff_max, backoff_initial * 2 ** (n - 1))``. A process that stays ready for
``backoff_reset`` seconds ends the streak. While a streak lasts, whatever the delays, at most
``starts_per_minute`` processes start in any 60 s. Without failures starts are not bounded: scaling from zero
again and again (a short ``--idle_timeout``) is what the tool is for.

Defaults (1 s doubling to 30 s, reset after 60 s ready, 10 starts a minute) and why: kubelet waits 10 s doubling
to 5 min and resets after 10 min of running, which suits a cluster; a developer who fixes a model file wants the
next start within seconds. With a start that fails in about a second, a model that can never start is tried at
0, 2, 5, 10 and 19 s: five processes in the first 30 s, six in the first minute, and only while requests keep
coming (a start happens on demand). The per-minute bound holds when a user sets a tiny backoff.

The difference between the two kinds of failure is what waiting requests are told. After a failed start they
are answered at once, with the reason (waiting will not help until the model is fixed, or the next start
succeeds). After a crash the model did start before, so requests are held for the next start, as Knative holds
them while kubelet restarts a container.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from zeroserve.protocol.start import StartState

WINDOW = 60.0  # seconds: "starts per minute"

FailureKind = Literal["start", "crash"]


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    initial: float = 1.0  # seconds before the start after a first failure
    max: float = 30.0  # the doubling stops here
    reset: float = 60.0  # seconds a process must stay ready to end a streak of failures
    starts_per_minute: int = 10

    def delay(self, streak: int) -> float:
        """Seconds between the ``streak``-th failure in a row and the next start."""
        if streak <= 0:
            return 0.0
        return min(self.max, self.initial * 2.0 ** min(streak - 1, 62))


@dataclass(frozen=True, slots=True)
class Failure:
    """Why the last process failed, and when the next may start."""

    kind: FailureKind
    reason: str
    exit_status: int | None
    at: float
    streak: int  # failures in a row, this one included
    next_start: float  # time (monotonic) from which the next start may begin

    def state(self, now: float) -> StartState:
        """The ``start`` object of the answer to a request that this failure turns away."""
        return StartState("failed", reason=self.reason, exit_status=self.exit_status, starts=self.streak,
                          retry_after_s=round(max(self.next_start - now, 0.0), 3))


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a request that needs a new process gets: a start now, a wait of ``wait_s`` (then ask again), or,
    with ``failure`` set, the answer that the last start failed (when no ready process can serve it)."""

    start: bool
    wait_s: float = 0.0
    failure: Failure | None = None


class StartLedger:
    """The starts of the last minute and the streak of failures: all that the decision below needs."""

    def __init__(self, policy: BackoffPolicy) -> None:
        self.policy = policy
        self.streak = 0
        self.last_failure: Failure | None = None
        self.total = 0
        self._recent: deque[float] = deque()

    def decide(self, now: float) -> Verdict:
        """May a new process start now? The decision table:

        ========================  ==========================  ===========================================
        last failure              the next start may begin    verdict
        ========================  ==========================  ===========================================
        none (no streak)          -                           start
        a failed start or crash   now                         start
        a failed start            later (backoff or cap)      ``failure``: answer it, Retry-After = the wait
        a crash                   later (backoff or cap)      wait that long, then ask again
        ========================  ==========================  ===========================================

        During a streak, the next start may begin at the later of: the last failure plus ``delay(streak)``,
        and, when ``starts_per_minute`` is reached, the moment the oldest of the last minute's starts leaves
        the window.
        """
        self._forget(now)
        failure = self.last_failure
        if failure is None:
            return Verdict(start=True)
        allowed = failure.next_start
        if len(self._recent) >= self.policy.starts_per_minute:
            allowed = max(allowed, self._recent[0] + WINDOW)
        if allowed <= now:
            return Verdict(start=True)
        if failure.kind == "start":
            failure = Failure(failure.kind, failure.reason, failure.exit_status, failure.at, failure.streak, allowed)
            return Verdict(start=False, wait_s=allowed - now, failure=failure)
        return Verdict(start=False, wait_s=allowed - now)

    def started(self, now: float) -> None:
        self._forget(now)
        self._recent.append(now)
        self.total += 1

    def failed(self, kind: FailureKind, now: float, reason: str, exit_status: int | None,
               ready_for: float = 0.0) -> Failure:
        """Record a failure; ``ready_for``: how long a crashed process had been ready (a long run ends the
        streak first, as kubelet forgets a container's restarts after it ran long enough)."""
        if ready_for >= self.policy.reset:
            self.streak = 0
        self.streak += 1
        self.last_failure = Failure(kind, reason, exit_status, now, self.streak, now + self.policy.delay(self.streak))
        return self.last_failure

    def kept_running(self, ready_for: float) -> None:
        """A process has been ready for ``ready_for`` seconds: after ``reset`` of them the streak is over."""
        if ready_for >= self.policy.reset and self.streak:
            self.streak = 0
            self.last_failure = None

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0] <= now - WINDOW:
            self._recent.popleft()
