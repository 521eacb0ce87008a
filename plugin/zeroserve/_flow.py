"""Retry, cold-start and circuit-breaker decisions, written once and without I/O.

``call_flow`` and ``wake_flow`` are generators in the style of httpx's auth flows: they yield a step
(``Send``, ``Probe``, ``Sleep``, ``Wake``) and receive what happened (an ``Outcome`` for a send or probe,
a ``WakeResult`` for a wake, None after a sleep). ``RemoteModel`` drives them with ``httpx.Client`` and
``time.sleep``, ``AsyncRemoteModel`` with ``httpx.AsyncClient`` and ``asyncio.sleep``; the tests drive
them by hand with a fake clock. Their return value says what the call went through (attempts, cold
start); failures are raised as the ``zeroserve.errors`` tree.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Generator
from dataclasses import dataclass

from zeroserve._state import EndpointState
from zeroserve.errors import (
    CircuitOpen,
    ColdStartTimeout,
    DeadlineExceeded,
    OutcomeUnknown,
    RemoteModelError,
    RequestRejected,
    Unavailable,
)
from zeroserve.policy import ColdStartPolicy, RetryPolicy

Clock = Callable[[], float]


class Kind(enum.Enum):
    """What one request's result means for resending it."""

    SUCCESS = "success"  # 2xx
    ANSWER = "answer"  # any other final answer (400, 404, 500, ...): handed to the caller as it is
    NOT_SENT = "not_sent"  # never left this process: connect refused or timed out, pool timeout, write failed
    NOT_READY = "not_ready"  # the model server is up but its model is not loaded yet (503 + Retry-After)
    OVERLOADED = "overloaded"  # turned away before dispatch: 429, Knative's 503 "pending request queue full"
    MAYBE = "maybe"  # sent, then failed: 502, 504, connection reset or read timeout after sending


NEVER_EXECUTED = frozenset({Kind.NOT_SENT, Kind.NOT_READY, Kind.OVERLOADED})


@dataclass(frozen=True, slots=True)
class Outcome:
    """The classified result of one request.

    ``cold`` marks results that mean "the service is scaled to zero or starting" (connection refused,
    502, 503 not ready): the call then waits for one shared wake-up probe instead of resending blindly.
    """

    kind: Kind
    status: int | None = None
    retry_after: float | None = None
    cold: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Send:
    """Send the request; ``resend_count`` is 0 for the first attempt. Reply with an ``Outcome``."""

    resend_count: int
    timeout: float


@dataclass(frozen=True, slots=True)
class Probe:
    """Send one readiness probe (``GET /v2/models/{name}/ready``). Reply with an ``Outcome``."""

    number: int
    timeout: float


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait this many seconds. Reply with None."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Wake:
    """Wait, at most ``timeout`` seconds, for the model's one shared wake-up. Reply with a ``WakeResult``."""

    timeout: float


@dataclass(frozen=True, slots=True)
class WakeReport:
    """What a finished wake-up went through."""

    probes: int
    seconds: float
    cold: bool


@dataclass(frozen=True, slots=True)
class WakeResult:
    """How a call's wait for the wake-up ended: ready, failed (``error``), or still waking (neither)."""

    ready: bool
    error: RemoteModelError | None = None
    report: WakeReport | None = None
    retry_after: float | None = None


@dataclass(slots=True)
class CallReport:
    """What one logical call went through; the driver puts it on the call's span."""

    attempts: int = 0
    last: Outcome | None = None
    cold_start: bool = False
    cold_wait: float = 0.0
    woke: bool = False


_HARD = (Unavailable, OutcomeUnknown, DeadlineExceeded)


class _Starting(Unavailable):
    """Internal: the service is waking and this call may not wait (raised to the caller as Unavailable)."""


def call_flow(
    *,
    endpoint: str,
    state: EndpointState,
    retry: RetryPolicy,
    cold: ColdStartPolicy,
    now: Clock,
    random: Clock,
    idempotent: bool | None = None,
    deadline: float | None = None,
    cold_wait: float | None = None,
    report: CallReport | None = None,
) -> Generator[Send | Sleep | Wake, Outcome | WakeResult | None, CallReport]:
    """One logical call: send, resend what is safe to resend, wait for cold starts, all inside a deadline.

    Args:
        endpoint: the URL, for error messages.
        state: the client's shared knowledge of the service (updated here).
        retry, cold: the policies.
        now: a monotonic clock; random: uniform in [0, 1), for jitter.
        idempotent: overrides ``retry.idempotent`` for this call (GETs are idempotent).
        deadline: overrides ``retry.deadline`` for this call.
        cold_wait: the longest this call waits for a cold start before raising ``Unavailable``
            (a mounted route set to reject rather than hold passes a short grace); None waits up to
            the cold-start deadline.
        report: filled in as the call goes (the driver reads it even when the call fails).
    """
    start = now()
    resend_after_send = retry.idempotent if idempotent is None else idempotent
    limit = start + (retry.deadline if deadline is None else deadline)
    cold_limit = max(limit, start + cold.deadline)
    report = report if report is not None else CallReport()
    admission = state.circuit.admit(start)
    if not admission.allowed:
        raise CircuitOpen(
            f"failing fast: the circuit breaker opened after {state.circuit.policy.failures} hard failures "
            f"in a row; next try in {admission.retry_in:.1f} s",
            endpoint=endpoint,
            retry_after=admission.retry_in,
        )
    settled = False
    try:
        if admission.trial or state.needs_wake(start, cold.probe_after_idle):
            # Waiting for a possible cold start may take the cold-start budget; a quick answer means the
            # service was warm, and the call keeps its own deadline.
            starting = yield from _wait_for_wake(report, endpoint, cold_limit, cold_wait, cold, now)
            if starting is not None:
                raise starting
            if report.cold_start:
                limit = cold_limit
        while True:
            remaining = limit - now()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"no answer within the call's deadline of {limit - start:g} s",
                    endpoint=endpoint, attempts=report.attempts, last_status=_status(report),
                )
            outcome = yield Send(report.attempts, remaining)
            assert isinstance(outcome, Outcome)
            report.attempts += 1
            report.last = outcome
            if outcome.kind is Kind.SUCCESS or outcome.kind is Kind.ANSWER:
                state.answered(now())
                state.circuit.succeeded()
                settled = True
                return report
            if outcome.cold:
                state.cold = True
            if outcome.kind not in NEVER_EXECUTED and not resend_after_send:
                raise OutcomeUnknown(
                    f"{outcome.reason}; the request was sent and may have run, so it is not sent again "
                    "(mark the model idempotent to allow it)",
                    endpoint=endpoint, attempts=report.attempts, last_status=outcome.status,
                )
            if report.attempts >= retry.max_attempts:
                raise Unavailable(
                    f"gave up after {report.attempts} attempts: {outcome.reason}",
                    endpoint=endpoint, attempts=report.attempts, last_status=outcome.status,
                    retry_after=outcome.retry_after,
                )
            if outcome.cold:
                report.cold_start = True
                limit = max(limit, cold_limit)
                starting = yield from _wait_for_wake(report, endpoint, limit, cold_wait, cold, now)
                if starting is not None:
                    raise starting
                continue
            delay = backoff(report.attempts, retry, random) if outcome.retry_after is None else outcome.retry_after
            if delay > retry.retry_after_max or now() + delay >= limit:
                raise Unavailable(
                    f"{outcome.reason}; waiting {delay:.1f} s more would pass the call's deadline",
                    endpoint=endpoint, attempts=report.attempts, last_status=outcome.status,
                    retry_after=outcome.retry_after,
                )
            yield Sleep(delay)
    except _Starting as exc:  # a cold start the caller chose not to wait for is no failure of the service
        raise Unavailable(exc.message, endpoint=exc.endpoint, attempts=exc.attempts, last_status=exc.last_status,
                          retry_after=exc.retry_after) from None
    except RemoteModelError as exc:
        if not settled:
            settled = True
            if isinstance(exc, _HARD):
                if state.circuit.failed(now()):
                    state.cold = True  # the trial after reset_after wakes the service first
            else:
                state.circuit.succeeded()  # the service answered
        raise
    finally:
        if not settled and admission.trial:
            state.circuit.abandoned()


def _wait_for_wake(
    report: CallReport,
    endpoint: str,
    limit: float,
    cold_wait: float | None,
    cold: ColdStartPolicy,
    now: Clock,
) -> Generator[Wake, Outcome | WakeResult | None, _Starting | None]:
    """Wait for the shared wake-up; returns the error to raise when the caller may not wait any longer."""
    started = now()
    timeout = limit - started if cold_wait is None else min(limit - started, cold_wait)
    result = yield Wake(max(timeout, 0.0))
    assert isinstance(result, WakeResult)
    waited = now() - started
    report.cold_wait += waited
    report.woke = True
    if result.report is not None and result.report.cold:
        report.cold_start = True
    if result.error is not None:
        raise _rebind(result.error, endpoint, report)
    if result.ready:
        return None
    report.cold_start = True
    if now() < limit and cold_wait is not None:
        return _Starting(
            "the model service is starting (cold start in progress)",
            endpoint=endpoint, attempts=report.attempts, last_status=_status(report),
            retry_after=result.retry_after if result.retry_after is not None else cold.retry_after,
        )
    raise ColdStartTimeout(
        f"the model service was not ready after waiting {waited:.1f} s for its cold start",
        endpoint=endpoint, attempts=report.attempts, last_status=_status(report),
    )


def wake_flow(
    *, endpoint: str, state: EndpointState, cold: ColdStartPolicy, now: Clock, random: Clock
) -> Generator[Probe | Sleep, Outcome | None, WakeReport]:
    """Probe readiness until the model answers ready, within the cold-start deadline.

    A probe is a GET, so every failure may be retried. An activator holding the probe during a cold
    start answers once, late; a server answering "not ready" gets probed again after its ``Retry-After``
    (or ``probe_interval``). A 4xx means the model will not appear by waiting (wrong name, no access).
    """
    start = now()
    deadline = start + cold.deadline
    probes = 0
    failed = False
    last: Outcome | None = None
    while True:
        remaining = deadline - now()
        if remaining <= 0:
            reason = f": {last.reason}" if last is not None and last.reason else ""
            raise ColdStartTimeout(
                f"the model service was not ready within the cold-start deadline of {cold.deadline:g} s{reason}",
                endpoint=endpoint, attempts=probes, last_status=last.status if last is not None else None,
            )
        sent = now()
        outcome = yield Probe(probes, remaining)
        assert isinstance(outcome, Outcome)
        probes += 1
        last = outcome
        if outcome.kind is Kind.SUCCESS:
            took = now() - sent
            state.answered(now())
            return WakeReport(probes, now() - start, cold=failed or took >= cold.slow_probe)
        failed = True
        status = outcome.status
        if outcome.kind is Kind.ANSWER and status is not None and 400 <= status < 500 and status != 408:
            raise RequestRejected(
                f"the readiness probe was answered {outcome.reason}",
                endpoint=endpoint, attempts=probes, last_status=status,
            )
        delay = outcome.retry_after if outcome.retry_after is not None else cold.probe_interval * (0.5 + random())
        delay = min(delay, max(deadline - now(), 0.0))
        if delay > 0:
            yield Sleep(delay)


def backoff(attempts: int, retry: RetryPolicy, random: Clock) -> float:
    """Full jitter: uniform in [0, min(backoff_max, backoff * 2 ** (attempts - 1)))."""
    ceiling = min(retry.backoff_max, retry.backoff * 2.0 ** min(attempts - 1, 62))
    return random() * ceiling


def _status(report: CallReport) -> int | None:
    return report.last.status if report.last is not None else None


def _rebind(error: RemoteModelError, endpoint: str, report: CallReport) -> RemoteModelError:
    """The wake-up's error, restated for this call (its endpoint and attempts, not the probe's)."""
    message = f"{error.message} (readiness probe: {error.attempts} tries)"
    last = error.last_status if error.last_status is not None else _status(report)
    if isinstance(error, Unavailable):
        return type(error)(message, endpoint=endpoint, attempts=report.attempts, last_status=last,
                           retry_after=error.retry_after)
    return type(error)(message, endpoint=endpoint, attempts=report.attempts, last_status=last)


# --- classifying answers (pure) ---

_QUEUE_FULL = b"pending request queue full"
_ACTIVATOR_DEADLINE = b"context deadline exceeded"
_NOT_READY_MARKERS = (b"not ready", b"still loading", b"is loading", b'"ready":false', b'"ready": false')


def classify_response(status: int, retry_after: str | None, body: bytes) -> Outcome:
    """Classify an HTTP answer: resend it or not, and is it a sign of a cold start."""
    if 200 <= status < 300:
        return Outcome(Kind.SUCCESS, status)
    after = parse_retry_after(retry_after) if retry_after is not None else None
    if status == 429:
        return Outcome(Kind.OVERLOADED, status, after, reason="429 too many requests")
    if status == 503:
        lowered = body[:512].lower()
        if _QUEUE_FULL in lowered:
            return Outcome(Kind.OVERLOADED, status, after, reason="503 pending request queue full")
        if _ACTIVATOR_DEADLINE in lowered:  # the activator gave up waiting for capacity before dispatching
            return Outcome(Kind.OVERLOADED, status, after, cold=True, reason="503 no capacity in time")
        if after is not None or any(marker in lowered for marker in _NOT_READY_MARKERS):
            return Outcome(Kind.NOT_READY, status, after, cold=True, reason="503 model not ready")
        return Outcome(Kind.ANSWER, status, after, reason=f"503 {error_message(body)}")
    if status == 502:
        return Outcome(Kind.MAYBE, status, after, cold=True, reason="502 bad gateway")
    if status == 504:
        return Outcome(Kind.MAYBE, status, after, reason=f"504 {error_message(body) or 'gateway timeout'}")
    return Outcome(Kind.ANSWER, status, after, reason=f"{status} {error_message(body)}".rstrip())


def parse_retry_after(value: str) -> float | None:
    """Seconds from a ``Retry-After`` value: delta-seconds or an HTTP date; None when unreadable."""
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    import email.utils
    import time

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def error_message(body: bytes) -> str:
    """The text of a V2 error body (``{"error": "..."}``), or the start of any other body."""
    if body[:1] == b"{":
        import json

        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            return str(parsed["error"])
    text = body[:200].decode("utf-8", "replace")
    return " ".join(text.split())

