"""How a remote model call retries, waits for a cold start, and fails fast: three small frozen values."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Resending requests that were never executed, inside one overall deadline.

    By default only failures that prove the model never ran the request are resent: connection refused
    or reset before the request was written, 429, Knative's 503 ``pending request queue full``, and a
    model server's 503 "not ready". A 504, a 502, or a connection lost after the request was sent is
    resent only when ``idempotent`` is true.

    Args:
        deadline: seconds one call may take in all, attempts and waits included, while the service is
            warm. A call that meets a cold start gets the cold-start deadline instead.
        max_attempts: most times one request is sent.
        backoff: first backoff ceiling in seconds; it doubles per resend ("full jitter": the wait is
            uniform between 0 and the ceiling).
        backoff_max: largest backoff ceiling.
        retry_after_max: longest ``Retry-After`` honoured; a longer one ends the call with ``Unavailable``.
        connect_timeout: seconds to wait for a TCP connection before treating the service as cold.
        idempotent: the model may run a request twice without harm, so resend after any failure.
    """

    deadline: float = 60.0
    max_attempts: int = 10
    backoff: float = 0.1
    backoff_max: float = 5.0
    retry_after_max: float = 60.0
    connect_timeout: float = 5.0
    idempotent: bool = False

    def __post_init__(self) -> None:
        _positive(deadline=self.deadline, backoff=self.backoff, backoff_max=self.backoff_max,
                  connect_timeout=self.connect_timeout)
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.retry_after_max < 0:
            raise ValueError(f"retry_after_max must not be negative, got {self.retry_after_max}")


@dataclass(frozen=True, slots=True)
class ColdStartPolicy:
    """Waiting for a scaled-to-zero service to wake up.

    When a call finds the service cold (connection refused, 502, a 503 "not ready"), or the service has
    not answered for ``probe_after_idle`` seconds, one readiness probe per model wakes it
    (``GET /v2/models/{name}/ready``) while every other call waits for that probe instead of sending its
    payload into the cold start.

    Args:
        deadline: seconds a call may spend when it meets a cold start, counted from the call's start.
            The default is Knative's default request timeout (``timeoutSeconds``, 300 s).
        probe_interval: seconds between readiness probes when the service answers "not ready" without
            a ``Retry-After`` (an activator holding the probe needs no repeat).
        probe_after_idle: probe first when nothing was heard from the service for this long, or never;
            None sends calls straight away and wakes only on a cold signal.
        slow_probe: a probe that takes longer than this was held by a cold start (Knative's activator
            holds requests while a pod starts), so the call reports a cold start.
        refused_grace: seconds the wake-up keeps probing while connections are refused (a server that is
            restarting) before the call fails with ``Unreachable`` ("nothing is listening at host:port").
            A scaled-to-zero service never refuses: Knative's activator and ``zeroserve dev`` hold its port.
        wake_on_start: wake the service when the app starts (mounted routes), before the first request.
        retry_after: the ``Retry-After`` seconds a mounted route answers with while the service is cold
            and the route is set to reject instead of hold, when the server gave no estimate.
    """

    deadline: float = 300.0
    probe_interval: float = 0.5
    probe_after_idle: float | None = 60.0
    slow_probe: float = 1.0
    refused_grace: float = 20.0
    wake_on_start: bool = False
    retry_after: float = 5.0

    def __post_init__(self) -> None:
        _positive(deadline=self.deadline, probe_interval=self.probe_interval, slow_probe=self.slow_probe,
                  retry_after=self.retry_after)
        if self.probe_after_idle is not None and self.probe_after_idle < 0:
            raise ValueError(f"probe_after_idle must not be negative, got {self.probe_after_idle}")
        if not self.refused_grace >= 0:
            raise ValueError(f"refused_grace must not be negative, got {self.refused_grace}")


@dataclass(frozen=True, slots=True)
class CircuitPolicy:
    """Failing fast after repeated hard failures, then probing back.

    A hard failure is a call that ended without an answer from the model: ``Unavailable``,
    ``OutcomeUnknown``, ``DeadlineExceeded``. After ``failures`` of them in a row the breaker opens and
    calls raise ``CircuitOpen`` at once; after ``reset_after`` seconds one call goes through (waking the
    service first), and its result closes the breaker or opens it again.

    Args:
        failures: hard failures in a row that open the breaker; 0 turns the breaker off.
        reset_after: seconds the breaker stays open before one trial call.
    """

    failures: int = 5
    reset_after: float = 30.0

    def __post_init__(self) -> None:
        if self.failures < 0:
            raise ValueError(f"failures must not be negative, got {self.failures}")
        _positive(reset_after=self.reset_after)


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
