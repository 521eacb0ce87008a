"""What a client knows about its model service, shared by all its calls: when the service last answered,
whether it looks cold, the last cold sign it gave, how long it asked to be left alone (``Retry-After``), and
the circuit breaker. Plain state with a lock, no I/O; the flows read and update it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zeroserve.policy import CircuitPolicy

if TYPE_CHECKING:
    from zeroserve._outcome import Outcome


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    trial: bool = False
    retry_in: float = 0.0


_ADMITTED = Admission(True)


class Circuit:
    """A circuit breaker: closed, open for ``reset_after`` seconds after repeated hard failures, then
    half-open, letting exactly one trial call through. Thread-safe; no I/O."""

    def __init__(self, policy: CircuitPolicy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until: float | None = None
        self._trial = False

    def state(self, now: float) -> str:
        if self._open_until is None:
            return "closed"
        return "open" if now < self._open_until or self._trial else "half-open"

    def admit(self, now: float) -> Admission:
        if self._open_until is None or not self.policy.failures:
            return _ADMITTED
        with self._lock:
            if self._open_until is None:
                return _ADMITTED
            if now < self._open_until:
                return Admission(False, retry_in=self._open_until - now)
            if self._trial:  # another call is the trial; it decides
                return Admission(False, retry_in=self.policy.reset_after)
            self._trial = True
            return Admission(True, trial=True)

    def succeeded(self) -> None:
        if self._failures or self._open_until is not None:
            with self._lock:
                self._failures, self._open_until, self._trial = 0, None, False

    def failed(self, now: float) -> bool:
        """Record a hard failure; True when this opened the breaker."""
        if not self.policy.failures:
            return False
        with self._lock:
            self._failures += 1
            if self._trial or self._failures >= self.policy.failures:
                self._open_until, self._trial = now + self.policy.reset_after, False
                return True
            return False

    def abandoned(self) -> None:
        """The trial call ended without a verdict (cancelled): let the next call be the trial."""
        with self._lock:
            self._trial = False


class EndpointState:
    """What a client knows about its service: when it last answered, whether it looks cold, its breaker."""

    def __init__(self, circuit: CircuitPolicy) -> None:
        self.last_answer: float | None = None
        self.cold = False
        self.circuit = Circuit(circuit)
        self.last_sign: Outcome | None = None  # the last sign of a cold start since the service last answered
        self.not_before = 0.0  # no request before this time: the service's Retry-After

    def pause(self, until: float) -> None:
        """The service asked for no request before ``until`` (its ``Retry-After``)."""
        if until > self.not_before:
            self.not_before = until

    def pause_left(self, now: float) -> float:
        """Seconds to wait before the next request to the service, probes included."""
        return self.not_before - now if self.not_before > now else 0.0

    def needs_wake(self, now: float, probe_after_idle: float | None) -> bool:
        if self.cold:
            return True
        if probe_after_idle is None:
            return False
        return self.last_answer is None or now - self.last_answer > probe_after_idle

    def answered(self, now: float) -> None:
        self.last_answer = now
        self.cold = False
        self.last_sign = None

    def describe(self, now: float, probe_after_idle: float | None) -> str:
        if self.cold:
            return "cold"
        if self.last_answer is None:
            return "unknown"
        return "idle" if self.needs_wake(now, probe_after_idle) else "warm"
