"""Retry, cold-start and circuit-breaker decisions, written once and without I/O.

``call_flow`` and ``wake_flow`` are generators in the style of httpx's auth flows: they yield a step
(``Send``, ``Probe``, ``Sleep``, ``Wake``) and receive what happened (an ``Outcome`` for a send or probe,
a ``WakeResult`` for a wake, None after a sleep). ``RemoteModel`` drives them with ``httpx.Client`` and
``time.sleep``, ``AsyncRemoteModel`` with ``httpx.AsyncClient`` and ``asyncio.sleep``; the tests drive
them by hand with a fake clock. Their return value says what the call went through (attempts, cold
start); failures are raised as the ``zeroserve.errors`` tree.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from urllib.parse import urlsplit

from zeroserve._outcome import NEVER_EXECUTED, Kind, Outcome
from zeroserve._state import EndpointState
from zeroserve.errors import (
    CircuitOpen,
    ColdStartFailed,
    ColdStartTimeout,
    DeadlineExceeded,
    OutcomeUnknown,
    RemoteModelError,
    RequestRejected,
    Unavailable,
    Unreachable,
)
from zeroserve.policy import ColdStartPolicy, RetryPolicy

logger = logging.getLogger("zeroserve.client")
Clock = Callable[[], float]
#: A wait for a cold start is logged (INFO) when it begins and then at most this often, in seconds.
PROGRESS_EVERY = 5.0


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
    """What a finished wake-up went through. ``cold``: it met a cold start (a cold sign started it, a probe
    failed, or one took longer than ``slow_probe``). ``init_traceparent``: the server's ``zeroserve.init`` span,
    when an answer named it (the driver fills it in)."""

    probes: int
    seconds: float
    cold: bool
    init_traceparent: str | None = None


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
    init_traceparent: str | None = None

    def absorb(self, part: CallReport) -> None:
        """Add what one request of a call went through (a call may send two: metadata, then infer)."""
        self.attempts += part.attempts
        self.last = part.last or self.last
        self.cold_start = self.cold_start or part.cold_start
        self.cold_wait += part.cold_wait
        self.woke = self.woke or part.woke
        self.init_traceparent = part.init_traceparent or self.init_traceparent


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
    started: float | None = None,
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
        started: when the logical call began, if before this request (the deadlines count from there).
    """
    start = now() if started is None else started
    resend_after_send = retry.idempotent if idempotent is None else idempotent
    limit = start + (retry.deadline if deadline is None else deadline)
    cold_limit = max(limit, start + cold.deadline)
    report = report if report is not None else CallReport()
    admission = state.circuit.admit(now())
    if not admission.allowed:
        raise CircuitOpen(
            f"failing fast: the circuit breaker opened after {state.circuit.policy.failures} hard failures "
            f"in a row; next try in {admission.retry_in:.1f} s",
            endpoint=endpoint,
            retry_after=admission.retry_in,
        )
    settled = False
    try:
        if admission.trial or state.needs_wake(now(), cold.probe_after_idle):
            # Waiting for a possible cold start may take the cold-start budget; a quick answer means the
            # service was warm, and the call keeps its own deadline.
            starting = yield from _wait_for_wake(report, endpoint, state, cold_limit, cold_wait, cold, now)
            if starting is not None:
                raise starting
            if report.cold_start:
                limit = cold_limit
        while True:
            if state.not_before and (pause := state.pause_left(now())) > 0:  # its Retry-After, whoever heard it
                if now() + pause >= limit:
                    raise Unavailable(
                        f"the service asked for {pause:.1f} s without requests (Retry-After), "
                        "which would pass the call's deadline",
                        endpoint=endpoint, attempts=report.attempts, last_status=_status(report), retry_after=pause,
                    )
                yield Sleep(pause)
            remaining = limit - now()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"no answer within the call's deadline of {limit - start:g} s{_last_seen(report.last)}",
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
            _heard(state, outcome, retry.retry_after_max, now())
            if outcome.kind is Kind.START_FAILED:
                raise _start_failed(outcome, endpoint, attempts=report.attempts)
            if outcome.kind is Kind.UNREACHABLE:
                raise Unreachable(outcome.reason, endpoint=endpoint, attempts=report.attempts)
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
                starting = yield from _wait_for_wake(report, endpoint, state, limit, cold_wait, cold, now)
                if starting is not None:
                    raise starting
                continue
            delay = backoff(report.attempts, retry, random)
            if outcome.retry_after is not None:
                delay = max(delay, outcome.retry_after)
            if delay > retry.retry_after_max or now() + delay >= limit:
                raise Unavailable(
                    f"{outcome.reason}; waiting {delay:.1f} s more would pass the call's deadline",
                    endpoint=endpoint, attempts=report.attempts, last_status=outcome.status,
                    retry_after=outcome.retry_after,
                )
            yield Sleep(delay)
    except _Starting as exc:  # a cold start the caller chose not to wait for is no failure of the service
        raise Unavailable(exc.message, endpoint=exc.endpoint, attempts=exc.attempts, last_status=exc.last_status,
                          retry_after=exc.retry_after, start=exc.start) from None
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
    state: EndpointState,
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
    if result.report is not None:
        report.cold_start = report.cold_start or result.report.cold
        report.init_traceparent = result.report.init_traceparent or report.init_traceparent
    if result.error is not None:
        if isinstance(result.error, (ColdStartFailed, ColdStartTimeout)):
            report.cold_start = True  # the call met a cold start, as its wake-up did: one that failed
        raise _rebind(result.error, endpoint, report)
    if result.ready:
        return None
    report.cold_start = True
    sign = state.last_sign
    if now() < limit and cold_wait is not None:
        progress = sign.start.describe() if sign is not None and sign.start is not None else "cold start in progress"
        return _Starting(
            f"the model service is starting ({progress})",
            endpoint=endpoint, attempts=report.attempts, last_status=_status(report),
            retry_after=_first(result.retry_after, sign.retry_after if sign is not None else None, cold.retry_after),
            start=sign.start if sign is not None else None,
        )
    raise ColdStartTimeout(
        f"the model service was not ready after waiting {waited:.1f} s for its cold start{_last_seen(sign)}",
        endpoint=endpoint, attempts=report.attempts, last_status=_status(report),
        start=sign.start if sign is not None else None,
    )


def wake_flow(
    *, endpoint: str, state: EndpointState, cold: ColdStartPolicy, now: Clock, random: Clock
) -> Generator[Probe | Sleep, Outcome | None, WakeReport]:
    """Probe readiness until the model answers ready, within the cold-start deadline.

    A probe is a GET, so it may be retried after anything that may pass: an activator holding the probe
    during a cold start answers once, late; a server answering "not ready" gets probed again after its
    ``Retry-After`` (never sooner than half ``probe_interval``). It stops at once on what waiting cannot fix:
    a 4xx (wrong name, no access), a failed start (``Zeroserve-Start: failed``), a host that does not
    resolve or fails TLS verification; and after ``refused_grace`` seconds of refused connections.
    """
    start = now()
    deadline = start + cold.deadline
    probes = 0
    failed = False
    was_cold = state.last_sign is not None  # a cold sign started this wake-up
    last: Outcome | None = None
    refused_since: float | None = None
    logged: float | None = None
    while True:
        pause = min(state.pause_left(now()), max(deadline - now(), 0.0))
        if pause > 0:
            yield Sleep(pause)
        remaining = deadline - now()
        if remaining <= 0:
            raise ColdStartTimeout(
                f"the model service was not ready within the cold-start deadline of {cold.deadline:g} s"
                f"{_last_seen(last)}",
                endpoint=endpoint, probes=probes, last_status=last.status if last is not None else None,
                start=last.start if last is not None else None,
            )
        sent = now()
        outcome = yield Probe(probes, remaining)
        assert isinstance(outcome, Outcome)
        probes += 1
        if outcome.kind is Kind.SUCCESS:
            took = now() - sent
            state.answered(now())
            return WakeReport(probes, now() - start, cold=was_cold or failed or took >= cold.slow_probe)
        if outcome.kind is Kind.LOADS_ON_REQUEST:  # awake; the call's own request loads the model (a cold start)
            state.answered(now())
            return WakeReport(probes, now() - start, cold=True)
        failed = True
        last = outcome
        _heard(state, outcome, cold.deadline, now())
        if outcome.kind is Kind.START_FAILED:
            raise _start_failed(outcome, endpoint, probes=probes)
        if outcome.kind is Kind.UNREACHABLE:
            raise Unreachable(outcome.reason, endpoint=endpoint, probes=probes)
        status = outcome.status
        if outcome.kind is Kind.ANSWER and status is not None and 400 <= status < 500 and status != 408:
            raise RequestRejected(
                f"the readiness probe was answered {outcome.reason}",
                endpoint=endpoint, probes=probes, last_status=status,
            )
        if outcome.kind is Kind.REFUSED:
            refused_since = sent if refused_since is None else refused_since
            if now() - refused_since >= cold.refused_grace:
                raise Unreachable(
                    f"nothing is listening at {_address(endpoint)}: connections were refused for "
                    f"{now() - refused_since:.1f} s (a service scaled to zero keeps its port open)",
                    endpoint=endpoint, probes=probes,
                )
        else:
            refused_since = None
        if logged is None or now() - logged >= PROGRESS_EVERY:
            logged = now()
            logger.info("waiting for %s to start, %.0f s of %g s: %s", endpoint, logged - start, cold.deadline,
                        _describe(outcome))
        delay = cold.probe_interval * (0.5 + random())
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        delay = min(delay, max(deadline - now(), 0.0))
        if delay > 0:
            yield Sleep(delay)


def backoff(attempts: int, retry: RetryPolicy, random: Clock) -> float:
    """Full jitter: uniform in [0, min(backoff_max, backoff * 2 ** (attempts - 1)))."""
    ceiling = min(retry.backoff_max, retry.backoff * 2.0 ** min(attempts - 1, 62))
    return random() * ceiling


def _heard(state: EndpointState, outcome: Outcome, pause_cap: float, now: float) -> None:
    """Record what a failed request says about the service: how long it asked to be left alone, a cold sign."""
    if outcome.retry_after is not None and outcome.kind is not Kind.START_FAILED:
        state.pause(now + min(outcome.retry_after, pause_cap))
    if outcome.cold:
        state.cold = True
        state.last_sign = outcome


def _start_failed(outcome: Outcome, endpoint: str, *, attempts: int = 0, probes: int = 0) -> ColdStartFailed:
    start = outcome.start
    why = start.describe() if start is not None and start.reason else outcome.reason
    return ColdStartFailed(f"the model service failed to start: {why}", endpoint=endpoint, attempts=attempts,
                           probes=probes, last_status=outcome.status, retry_after=outcome.retry_after, start=start)


def _describe(outcome: Outcome) -> str:
    if outcome.start is not None and not outcome.start.failed:
        return outcome.start.describe()
    return outcome.reason


def _last_seen(last: Outcome | None) -> str:
    """What the service said last, for a message about a wait that ran out."""
    if last is None or not last.reason:
        return ""
    progress = f"; progress: {last.start.describe()}" if last.start is not None and not last.start.failed else ""
    return f"; last answer: {last.reason}{progress}"


def _address(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if not parts.hostname:
        return endpoint
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"[{parts.hostname}]:{port}" if ":" in parts.hostname else f"{parts.hostname}:{port}"


def _first(*values: float | None) -> float | None:
    return next((value for value in values if value is not None), None)


def _status(report: CallReport) -> int | None:
    return report.last.status if report.last is not None else None


def _rebind(error: RemoteModelError, endpoint: str, report: CallReport) -> RemoteModelError:
    """The wake-up's error, restated for this call: its endpoint and sends; the wake-up's probes."""
    restated = copy.copy(error)
    restated.endpoint = endpoint
    restated.attempts = report.attempts
    if restated.last_status is None:
        restated.last_status = _status(report)
    return restated
