"""The sans-I/O retry, wake-up and circuit logic, driven by hand: a fake clock, scripted outcomes, no server."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from zeroserve._flow import (
    CallReport,
    Probe,
    Send,
    Sleep,
    Wake,
    WakeReport,
    WakeResult,
    backoff,
    call_flow,
    wake_flow,
)
from zeroserve._outcome import Kind, Outcome, classify_response, parse_retry_after
from zeroserve._state import Circuit, EndpointState
from zeroserve.errors import (
    CircuitOpen,
    ColdStartTimeout,
    DeadlineExceeded,
    OutcomeUnknown,
    RequestRejected,
    Unavailable,
)
from zeroserve.policy import CircuitPolicy, ColdStartPolicy, RetryPolicy

OK = Outcome(Kind.SUCCESS, 200)
BAD_INPUT = Outcome(Kind.ANSWER, 400, reason="400 wrong shape")
REFUSED = Outcome(Kind.REFUSED, cold=True, reason="connection refused by m:80")
QUEUE_FULL = Outcome(Kind.OVERLOADED, 503, reason="503 pending request queue full")
GATEWAY_TIMEOUT = Outcome(Kind.MAYBE, 504, reason="504 activator request timeout")
RESET = Outcome(Kind.MAYBE, reason="the connection broke before an answer")
WARM_ONLY = ColdStartPolicy(probe_after_idle=None)  # no pre-flight probe: the first step is a send


@dataclass
class Run:
    """Drives one flow: time moves only when it sleeps (or a send/wake says it took time)."""

    now: float = 0.0
    steps: list[Any] = field(default_factory=list)
    jitter: float = 0.5

    def clock(self) -> float:
        return self.now

    def random(self) -> float:
        return self.jitter

    def drive(self, flow: Generator[Any, Any, Any], reply: Callable[[Any], Any]) -> Any:
        step = next(flow)
        while True:
            self.steps.append(step)
            if isinstance(step, Sleep):
                self.now += step.seconds
                answer = None
            else:
                answer = reply(step)
            try:
                step = flow.send(answer)
            except StopIteration as done:
                return done.value

    def call(self, outcomes: Iterable[Outcome | WakeResult], state: EndpointState | None = None,
             retry: RetryPolicy | None = None, cold: ColdStartPolicy = WARM_ONLY, took: float = 0.0,
             **options: Any) -> CallReport:
        script = iter(outcomes)

        def reply(step: Any) -> Any:
            self.now += took
            return next(script)

        flow = call_flow(endpoint="http://m/v2/models/m/infer", state=state or EndpointState(CircuitPolicy()),
                         retry=retry or RetryPolicy(), cold=cold, now=self.clock, random=self.random, **options)
        report: CallReport = self.drive(flow, reply)
        return report

    def sends(self) -> list[Send]:
        return [step for step in self.steps if isinstance(step, Send)]

    def sleeps(self) -> list[float]:
        return [step.seconds for step in self.steps if isinstance(step, Sleep)]


# --- calls: what is resent, what is not ---

def test_a_success_is_one_send() -> None:
    run = Run()
    report = run.call([OK])
    assert report.attempts == 1 and not report.cold_start
    assert run.sends() == [Send(0, 60.0)]


def test_a_final_answer_is_returned_not_resent() -> None:
    run = Run()
    report = run.call([BAD_INPUT])
    assert report.attempts == 1 and report.last == BAD_INPUT


def test_queue_full_is_resent_with_full_jitter_backoff() -> None:
    run = Run(jitter=0.5)
    report = run.call([QUEUE_FULL, QUEUE_FULL, QUEUE_FULL, OK], retry=RetryPolicy(backoff=0.1))
    assert report.attempts == 4
    assert [send.resend_count for send in run.sends()] == [0, 1, 2, 3]
    assert run.sleeps() == pytest.approx([0.05, 0.1, 0.2])  # jitter 0.5 x ceilings 0.1, 0.2, 0.4


def test_backoff_ceiling_doubles_and_is_capped() -> None:
    policy = RetryPolicy(backoff=0.1, backoff_max=1.0)
    assert [backoff(n, policy, lambda: 1.0) for n in (1, 2, 3, 4, 5, 60)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff(3, policy, lambda: 0.0) == 0.0


def test_retry_after_is_honoured_exactly() -> None:
    run = Run()
    run.call([Outcome(Kind.OVERLOADED, 429, retry_after=2.0, reason="429"), OK])
    assert run.sleeps() == [2.0]


def test_a_retry_after_past_the_deadline_gives_up_at_once_with_the_hint() -> None:
    run = Run()
    with pytest.raises(Unavailable) as caught:
        run.call([Outcome(Kind.OVERLOADED, 429, retry_after=30.0, reason="429")], retry=RetryPolicy(deadline=10))
    assert caught.value.retry_after == 30.0 and caught.value.attempts == 1 and caught.value.last_status == 429
    assert run.now == 0.0  # it did not sleep first


@pytest.mark.parametrize("outcome", [GATEWAY_TIMEOUT, RESET, Outcome(Kind.MAYBE, 502, cold=True, reason="502")])
def test_a_request_that_may_have_run_is_not_resent(outcome: Outcome) -> None:
    run = Run()
    with pytest.raises(OutcomeUnknown) as caught:
        run.call([outcome])
    assert caught.value.attempts == 1 and caught.value.last_status == outcome.status
    assert len(run.sends()) == 1


def test_an_idempotent_model_resends_after_a_gateway_timeout() -> None:
    run = Run()
    report = run.call([GATEWAY_TIMEOUT, OK], retry=RetryPolicy(idempotent=True))
    assert report.attempts == 2
    run = Run()
    assert run.call([RESET, OK], idempotent=True).attempts == 2  # per call, e.g. a GET


def test_attempts_are_bounded() -> None:
    run = Run()
    with pytest.raises(Unavailable) as caught:
        run.call([QUEUE_FULL] * 10, retry=RetryPolicy(max_attempts=3))
    assert caught.value.attempts == 3 and "gave up after 3 attempts" in caught.value.message


def test_one_deadline_bounds_every_attempt_and_wait() -> None:
    run = Run(jitter=1.0)
    with pytest.raises((Unavailable, DeadlineExceeded)) as caught:
        run.call([QUEUE_FULL] * 100, retry=RetryPolicy(deadline=2.0, backoff=0.5, max_attempts=100), took=0.1)
    assert run.now <= 2.0
    assert caught.value.attempts >= 3
    timeouts = [send.timeout for send in run.sends()]
    assert timeouts == sorted(timeouts, reverse=True) and all(0 < t <= 2.0 for t in timeouts)


def test_a_per_call_deadline_overrides_the_policy() -> None:
    run = Run()
    run.call([OK], deadline=5.0)
    assert run.sends() == [Send(0, 5.0)]


# --- cold starts ---

def test_a_refused_connection_waits_for_the_shared_wake_up_then_resends() -> None:
    run = Run()
    woke = WakeResult(ready=True, report=WakeReport(probes=3, seconds=4.0, cold=True))
    report = run.call([REFUSED, woke, OK], retry=RetryPolicy(deadline=10), cold=ColdStartPolicy(
        deadline=120, probe_after_idle=None))
    assert [type(step) for step in run.steps] == [Send, Wake, Send]
    wake = run.steps[1]
    assert wake.timeout == pytest.approx(120.0)  # the cold-start deadline replaces the call's 10 s
    assert run.steps[2].resend_count == 1
    assert report.cold_start and report.woke and report.attempts == 2


def test_a_not_ready_answer_is_a_cold_signal() -> None:
    run = Run()
    not_ready = classify_response(503, "1", b'{"error":"model \'m\' is still loading"}')
    assert not_ready.kind is Kind.NOT_READY and not_ready.cold
    report = run.call([not_ready, WakeResult(ready=True), OK])
    assert report.cold_start and report.attempts == 2


def test_an_unknown_or_idle_service_is_woken_before_the_payload_goes() -> None:
    state = EndpointState(CircuitPolicy())
    cold = ColdStartPolicy(probe_after_idle=60)
    run = Run()
    report = run.call([WakeResult(ready=True, report=WakeReport(1, 0.01, cold=False)), OK], state=state, cold=cold)
    assert [type(step) for step in run.steps] == [Wake, Send]
    assert report.woke and not report.cold_start  # one quick probe: the service was warm
    run = Run(now=30.0)  # heard from 30 s ago: no probe
    run.call([OK], state=state, cold=cold)
    assert [type(step) for step in run.steps] == [Send]
    run = Run(now=100.0)  # idle for longer than probe_after_idle: probe first
    run.call([WakeResult(ready=True), OK], state=state, cold=cold)
    assert [type(step) for step in run.steps] == [Wake, Send]


def test_a_failed_wake_up_fails_the_call_with_the_calls_own_endpoint() -> None:
    run = Run()
    error = ColdStartTimeout("not ready within 1 s", endpoint="http://m/v2/models/m/ready", probes=4,
                             last_status=503)
    with pytest.raises(ColdStartTimeout) as caught:
        run.call([REFUSED, WakeResult(ready=False, error=error)])
    assert caught.value.endpoint == "http://m/v2/models/m/infer"
    assert (caught.value.attempts, caught.value.probes, caught.value.last_status) == (1, 4, 503)
    assert str(caught.value) == (
        "not ready within 1 s (http://m/v2/models/m/infer: 1 attempt, 4 readiness probes, last status 503)")
    assert isinstance(caught.value, TimeoutError)


def test_a_call_that_may_not_wait_answers_unavailable_with_a_retry_hint() -> None:
    run = Run()
    with pytest.raises(Unavailable) as caught:
        run.call([REFUSED, WakeResult(ready=False)], cold_wait=0.5, cold=ColdStartPolicy(
            probe_after_idle=None, retry_after=7))
    assert run.steps[1] == Wake(0.5)
    assert caught.value.retry_after == 7 and "starting" in caught.value.message


def test_declining_to_wait_for_a_cold_start_is_no_failure_of_the_service() -> None:
    state = EndpointState(CircuitPolicy(failures=1))
    for script in ([REFUSED, WakeResult(ready=False)], [WakeResult(ready=False)], [WakeResult(ready=False)]):
        with pytest.raises(Unavailable) as caught:
            Run().call(script, state=state, cold_wait=0.1)  # later calls know it is cold: they wait first
        assert type(caught.value) is Unavailable
    assert state.circuit.state(0.0) == "closed"


def test_a_wait_that_runs_out_of_time_is_a_cold_start_timeout() -> None:
    run = Run()

    def reply(step: Any) -> Any:
        if isinstance(step, Wake):
            run.now += step.timeout
            return WakeResult(ready=False)
        return REFUSED

    flow = call_flow(endpoint="e", state=EndpointState(CircuitPolicy()), retry=RetryPolicy(deadline=1),
                     cold=ColdStartPolicy(deadline=3, probe_after_idle=None), now=run.clock, random=run.random)
    with pytest.raises(ColdStartTimeout):
        run.drive(flow, reply)
    assert run.now == pytest.approx(3.0)


# --- wake-up probes ---

def drive_wake(run: Run, outcomes: Iterable[Outcome], cold: ColdStartPolicy, took: float = 0.0,
               state: EndpointState | None = None) -> WakeReport:
    script = iter(outcomes)

    def reply(step: Any) -> Any:
        assert isinstance(step, Probe)
        run.now += took
        return next(script)

    flow = wake_flow(endpoint="http://m/v2/models/m/ready", state=state or EndpointState(CircuitPolicy()), cold=cold,
                     now=run.clock, random=run.random)
    report: WakeReport = run.drive(flow, reply)
    return report


def test_probes_follow_retry_after_then_report_a_cold_start() -> None:
    run = Run()
    state = EndpointState(CircuitPolicy())
    state.cold = True
    not_ready = Outcome(Kind.NOT_READY, 503, retry_after=1.0, cold=True)
    report = drive_wake(run, [REFUSED, not_ready, OK], ColdStartPolicy(probe_interval=0.2), state=state)
    assert [step.number for step in run.steps if isinstance(step, Probe)] == [0, 1, 2]
    assert run.sleeps() == pytest.approx([0.2, 1.0])  # interval x (0.5 + jitter 0.5), then Retry-After
    assert report == WakeReport(probes=3, seconds=pytest.approx(1.2), cold=True)
    assert not state.cold and state.last_answer == run.now


def test_one_slow_probe_is_a_cold_start_held_by_an_activator() -> None:
    run = Run()
    assert drive_wake(run, [OK], ColdStartPolicy(slow_probe=1.0), took=4.0).cold
    assert not drive_wake(Run(), [OK], ColdStartPolicy(slow_probe=1.0), took=0.01).cold


def test_a_404_ends_the_wake_up_at_once() -> None:
    with pytest.raises(RequestRejected) as caught:
        drive_wake(Run(), [Outcome(Kind.ANSWER, 404, reason="404 model 'x' not found")], ColdStartPolicy())
    assert caught.value.last_status == 404 and caught.value.probes == 1 and caught.value.attempts == 0


def test_the_wake_up_gives_up_at_the_cold_start_deadline() -> None:
    run = Run()
    with pytest.raises(ColdStartTimeout) as caught:
        drive_wake(run, [REFUSED] * 1000, ColdStartPolicy(deadline=5, probe_interval=0.5))
    assert run.now == pytest.approx(5.0)
    assert caught.value.probes == len([s for s in run.steps if isinstance(s, Probe)]) >= 9
    assert caught.value.message.endswith("last answer: connection refused by m:80")


# --- circuit breaker ---

def test_the_breaker_opens_after_hard_failures_fails_fast_then_lets_one_trial_through() -> None:
    state = EndpointState(CircuitPolicy(failures=2, reset_after=10))
    for _ in range(2):
        with pytest.raises(OutcomeUnknown):
            Run().call([GATEWAY_TIMEOUT], state=state)
    run = Run(now=1.0)
    with pytest.raises(CircuitOpen) as caught:
        run.call([], state=state)
    assert run.steps == [] and caught.value.retry_after == pytest.approx(9.0) and caught.value.attempts == 0
    assert state.circuit.state(1.0) == "open"

    trial = Run(now=11.0)
    second = call_flow(endpoint="e", state=state, retry=RetryPolicy(), cold=WARM_ONLY, now=lambda: 11.0,
                       random=lambda: 0.5)
    # The trial wakes the service first (the breaker marked it cold), and while it runs nobody else goes.
    first_step = None

    def reply(step: Any) -> Any:
        nonlocal first_step
        first_step = first_step or step
        if isinstance(step, Wake):
            with pytest.raises(CircuitOpen):
                next(second)
            return WakeResult(ready=True)
        return OK

    report = trial.drive(call_flow(endpoint="e", state=state, retry=RetryPolicy(), cold=WARM_ONLY,
                                   now=trial.clock, random=trial.random), reply)
    assert isinstance(first_step, Wake) and report.attempts == 1
    assert state.circuit.state(11.0) == "closed"
    assert Run(now=12.0).call([OK], state=state).attempts == 1


def test_a_failed_trial_opens_the_breaker_again() -> None:
    circuit = Circuit(CircuitPolicy(failures=1, reset_after=5))
    assert circuit.failed(0.0)
    assert circuit.admit(5.0).trial
    assert circuit.failed(5.0)
    assert not circuit.admit(6.0).allowed and circuit.admit(10.0).trial


def test_an_answer_is_not_a_hard_failure() -> None:
    state = EndpointState(CircuitPolicy(failures=1))
    for _ in range(3):
        Run().call([BAD_INPUT], state=state)
    assert state.circuit.state(0.0) == "closed"


def test_an_abandoned_trial_lets_the_next_call_try() -> None:
    state = EndpointState(CircuitPolicy(failures=1, reset_after=1))
    with pytest.raises(OutcomeUnknown):
        Run().call([GATEWAY_TIMEOUT], state=state)
    flow = call_flow(endpoint="e", state=state, retry=RetryPolicy(), cold=WARM_ONLY, now=lambda: 2.0,
                     random=lambda: 0.5)
    assert isinstance(next(flow), Wake)
    flow.close()  # e.g. the caller was cancelled
    assert state.circuit.admit(2.0).trial


def test_a_disabled_breaker_never_opens() -> None:
    state = EndpointState(CircuitPolicy(failures=0))
    for _ in range(10):
        with pytest.raises(OutcomeUnknown):
            Run().call([GATEWAY_TIMEOUT], state=state)
    assert state.circuit.admit(0.0).allowed


# --- classifying answers ---

@pytest.mark.parametrize(
    ("status", "retry_after", "body", "kind", "cold"),
    [
        (200, None, b"{}", Kind.SUCCESS, False),
        (400, None, b'{"error":"bad shape"}', Kind.ANSWER, False),
        (404, None, b'{"error":"no model"}', Kind.ANSWER, False),
        (500, None, b'{"error":"boom"}', Kind.ANSWER, False),
        (429, "3", b"", Kind.OVERLOADED, False),
        (503, None, b"pending request queue full", Kind.OVERLOADED, False),
        (503, None, b"context deadline exceeded", Kind.OVERLOADED, True),
        (503, "1", b'{"error":"model \'m\' is still loading"}', Kind.NOT_READY, True),
        (503, None, b'{"error":"Model with name m is not ready."}', Kind.NOT_READY, True),
        (503, None, b'{"ready":false}', Kind.NOT_READY, True),
        (503, None, b'{"error":"model \'m\' failed to load: bad file"}', Kind.ANSWER, False),
        (502, None, b"", Kind.MAYBE, True),
        (504, None, b"activator request timeout", Kind.MAYBE, False),
    ],
)
def test_classify_response(status: int, retry_after: str | None, body: bytes, kind: Kind, cold: bool) -> None:
    outcome = classify_response(status, retry_after, body)
    assert (outcome.kind, outcome.cold, outcome.status) == (kind, cold, status)


def test_error_text_comes_from_the_v2_error_body() -> None:
    assert classify_response(400, None, b'{"error": "input \'a\' has shape [2]"}').reason == (
        "400 input 'a' has shape [2]")


def test_retry_after_forms() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None
