"""The sans-I/O flows on starts that go wrong or take long, and on Retry-After, driven by hand with a fake clock:
a failed start, a host that cannot be reached, nothing listening, a slow start's progress, pauses a server asks for.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
from typing import Any

import httpx
import pytest

from tests.plugin.test_flow import OK, REFUSED, WARM_ONLY, Run, drive_wake
from zeroserve._flow import PROGRESS_EVERY, Probe, Send, Sleep, Wake, WakeResult, call_flow, wake_flow
from zeroserve._outcome import RETRY_AFTER_CAP, Kind, Outcome, classify_error, classify_response, parse_retry_after
from zeroserve._state import EndpointState
from zeroserve.errors import ColdStartFailed, ColdStartTimeout, Unavailable, Unreachable
from zeroserve.policy import CircuitPolicy, ColdStartPolicy, RetryPolicy
from zeroserve.protocol.start import StartState

FAILED_BODY = (b'{"error":"model \'m\' failed to start: INVALID_PROTOBUF","start":{"state":"failed","reason":'
               b'"INVALID_PROTOBUF: Protobuf parsing failed.","exit_status":1,"starts":3,"retry_after_s":20.0}}')
FAILED = classify_response(503, None, FAILED_BODY, "failed")
DNS = Outcome(Kind.UNREACHABLE, reason="the host no-such-host.invalid does not resolve ([Errno -2] Name or service "
                                      "not known)")


def loading(**progress: Any) -> Outcome:
    state = StartState("loading", **progress)
    return classify_response(503, "1", b'{"error":"loading","start":' + _json(state.to_json()) + b"}", "loading")


def _json(value: Any) -> bytes:
    import json

    return json.dumps(value).encode()


# --- classifying the start-state marker ---

def test_the_failed_marker_is_a_start_failure_with_the_servers_reason() -> None:
    assert FAILED.kind is Kind.START_FAILED and not FAILED.cold
    assert FAILED.start is not None and FAILED.start.exit_status == 1 and FAILED.start.starts == 3
    assert FAILED.retry_after == 20.0  # from the body when the header is missing
    assert FAILED.reason == "503 start failed: model 'm' failed to start: INVALID_PROTOBUF"
    assert classify_response(503, "7", FAILED_BODY, "failed").retry_after == 7.0  # the header wins


def test_the_loading_marker_is_a_cold_sign_carrying_progress() -> None:
    outcome = loading(phase="fetch", done_bytes=2**20, total_bytes=4 * 2**20)
    assert (outcome.kind, outcome.cold, outcome.retry_after) == (Kind.NOT_READY, True, 1.0)
    assert outcome.start is not None and outcome.start.phase == "fetch"


def test_a_marker_without_details_still_counts_and_a_503_without_marker_is_unchanged() -> None:
    bare = classify_response(503, None, b"", "failed")
    assert bare.kind is Kind.START_FAILED and bare.start == StartState("failed")
    readiness = classify_response(503, None, b'{"ready":false,"start":{"state":"failed","reason":"bad file"}}',
                                  "failed")
    assert readiness.reason == "503 start failed: bad file"  # a readiness answer has no "error": the reason
    assert classify_response(503, None, b'{"error":"model failed to load"}').kind is Kind.ANSWER


# --- classifying transport errors (built as httpx raises them: httpx <- httpcore <- the OS) ---

def _connect_error(cause: BaseException) -> httpx.ConnectError:
    try:
        try:
            raise cause
        except BaseException as os_error:
            raise httpx.ConnectError(str(os_error)) from os_error
    except httpx.ConnectError as error:
        return error


@pytest.mark.parametrize(
    ("cause", "kind", "words"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), Kind.UNREACHABLE, "does not resolve"),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), Kind.UNREACHABLE, "fails verification"),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), Kind.UNREACHABLE, "handshake"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), Kind.NOT_SENT, "could not connect"),
        (ConnectionRefusedError(111, "Connection refused"), Kind.REFUSED, "connection refused by h:8080"),
        (OSError(113, "No route to host"), Kind.NOT_SENT, "could not connect"),
    ],
)
def test_transport_errors(cause: BaseException, kind: Kind, words: str) -> None:
    outcome = classify_error(_connect_error(cause), 5.0, "h:8080")
    assert outcome.kind is kind and words in outcome.reason
    assert outcome.cold is (kind in (Kind.REFUSED, Kind.NOT_SENT))


# --- a failed start ends the call at once ---

def test_a_failed_start_answered_to_the_payload_raises_at_once() -> None:
    run = Run()
    with pytest.raises(ColdStartFailed) as caught:
        run.call([FAILED])
    error = caught.value
    assert run.steps == [Send(0, 60.0)] and run.now == 0.0
    assert "INVALID_PROTOBUF: Protobuf parsing failed." in error.message and "exit status 1" in error.message
    assert (error.reason, error.exit_status, error.retry_after) == ("INVALID_PROTOBUF: Protobuf parsing failed.", 1,
                                                                    20.0)
    assert isinstance(error, Unavailable) and error.attempts == 1 and error.last_status == 503


def test_a_failed_start_answered_to_the_probe_ends_the_wake_up_and_the_call() -> None:
    run = Run()
    with pytest.raises(ColdStartFailed) as caught:
        drive_wake(run, [loading(phase="process"), FAILED], ColdStartPolicy(probe_interval=0.2))
    assert caught.value.probes == 2 and run.now == pytest.approx(1.0)  # one Retry-After of the loading answer
    run = Run()
    with pytest.raises(ColdStartFailed) as rebound:
        run.call([REFUSED, WakeResult(ready=False, error=caught.value)])
    assert (rebound.value.attempts, rebound.value.probes) == (1, 2) and rebound.value.start is not None
    assert rebound.value.endpoint == "http://m/v2/models/m/infer"


# --- what is not a cold start fails fast ---

def test_an_unreachable_host_fails_on_the_first_send_or_probe() -> None:
    run = Run()
    with pytest.raises(Unreachable) as caught:
        run.call([DNS])
    assert run.steps == [Send(0, 60.0)] and "does not resolve" in str(caught.value)
    run = Run()
    with pytest.raises(Unreachable) as probed:
        drive_wake(run, [DNS], ColdStartPolicy())
    assert probed.value.probes == 1 and run.sleeps() == []
    assert isinstance(probed.value, ConnectionError)


def test_refused_connections_are_waited_for_only_a_grace() -> None:
    run = Run()
    with pytest.raises(Unreachable) as caught:
        drive_wake(run, [REFUSED] * 100, ColdStartPolicy(refused_grace=3.0, probe_interval=0.5), took=0.01)
    assert 3.0 <= run.now < 3.6
    assert caught.value.message.startswith("nothing is listening at m:80: connections were refused for 3.")
    assert caught.value.probes == len([step for step in run.steps if isinstance(step, Probe)])


def test_an_answer_between_refusals_starts_the_grace_again() -> None:
    run = Run()
    not_ready = Outcome(Kind.NOT_READY, 503, cold=True, reason="503 not ready")
    script = [REFUSED] * 5 + [not_ready] + [REFUSED] * 5 + [OK]
    report = drive_wake(run, script, ColdStartPolicy(refused_grace=4.5, probe_interval=1.0))
    assert report.probes == 12 and run.now == pytest.approx(11.0)  # refused 8 s in all, never 4.5 s in a row


def test_the_grace_never_outlasts_the_cold_start_deadline() -> None:
    with pytest.raises(ColdStartTimeout):
        drive_wake(Run(), [REFUSED] * 100, ColdStartPolicy(deadline=2.0, refused_grace=30.0))


# --- a slow start is shown while it lasts ---

def test_a_slow_start_logs_its_progress_every_few_seconds_and_times_out_with_it(
        caplog: pytest.LogCaptureFixture) -> None:
    run = Run()
    answers = [loading(phase="fetch", elapsed_s=float(n), done_bytes=n * 2**20, total_bytes=40 * 2**20)
               for n in range(100)]
    caplog.set_level(logging.INFO, logger="zeroserve.client")
    with pytest.raises(ColdStartTimeout) as caught:
        drive_wake(run, answers, ColdStartPolicy(deadline=21.0))
    records = [record for record in caplog.records if record.name == "zeroserve.client"]
    assert len(records) == math.ceil(21.0 / PROGRESS_EVERY)  # at 0, 5, 10, 15, 20 s, not once a probe
    assert all(record.levelno == logging.INFO for record in records)
    assert "fetch, 0.0 MiB of 40.0 MiB" in records[0].getMessage()
    assert records[0].getMessage().startswith("waiting for http://m/v2/models/m/ready to start, 0 s of 21 s: fetch")
    message = caught.value.message
    assert "progress: fetch, 20.0 MiB of 40.0 MiB" in message and "last answer: 503 starting: loading" in message
    assert caught.value.start is not None and caught.value.start.done_bytes == 20 * 2**20


def test_a_crash_loop_without_reason_ends_at_the_deadline_with_the_last_answer_and_true_counts() -> None:
    crash = classify_response(502, None, b"model server unavailable: connection reset")
    run = Run()
    with pytest.raises(ColdStartTimeout) as woke:
        drive_wake(run, [crash] * 1000, ColdStartPolicy(deadline=10.0, probe_interval=0.5))
    probes = len([step for step in run.steps if isinstance(step, Probe)])
    assert woke.value.probes == probes and woke.value.last_status == 502
    call = Run()
    with pytest.raises(ColdStartTimeout) as caught:
        call.call([WakeResult(ready=False, error=woke.value)], cold=ColdStartPolicy(deadline=10.0))
    text = str(caught.value)
    assert "last answer: 502 bad gateway: model server unavailable: connection reset" in text
    assert f"not sent, {probes} readiness probes, last status 502" in text and "0 attempts" not in text


# --- Retry-After: validated, and honoured before any request to the service ---

@pytest.mark.parametrize(
    ("value", "seconds"),
    [("NaN", None), ("nan", None), ("inf", RETRY_AFTER_CAP), ("1e999", RETRY_AFTER_CAP), ("-1", 0.0),
     ("86400", RETRY_AFTER_CAP), ("0", 0.0), ("2.5", 2.5), ("", None)],
)
def test_retry_after_values_are_checked(value: str, seconds: float | None) -> None:
    assert parse_retry_after(value) == seconds


def test_a_retry_after_of_zero_or_nan_still_leaves_a_floor_between_probes() -> None:
    for header in ("0", "NaN", "-5"):
        run = Run(jitter=0.0)  # the shortest jittered interval
        not_ready = classify_response(503, header, b'{"error":"model is loading"}')
        with pytest.raises(ColdStartTimeout):
            drive_wake(run, [not_ready] * 10_000, ColdStartPolicy(deadline=3.0, probe_interval=0.5))
        probes = len([step for step in run.steps if isinstance(step, Probe)])
        assert probes <= 3.0 / 0.25 + 1, header  # half probe_interval apart at least, not thousands


def test_a_nan_retry_after_on_a_send_backs_off_instead() -> None:
    run = Run()
    report = run.call([classify_response(429, "NaN", b""), OK], retry=RetryPolicy(backoff=0.1))
    assert report.attempts == 2 and run.sleeps() == pytest.approx([0.05])


def test_retry_after_on_a_not_ready_answer_holds_the_probe_and_the_resend() -> None:
    run = Run()
    state = EndpointState(CircuitPolicy())
    not_ready = classify_response(503, "1", b'{"error":"model \'m\' is loading"}')
    flow = call_flow(endpoint="e", state=state, retry=RetryPolicy(), cold=WARM_ONLY, now=run.clock,
                     random=run.random)

    def reply(step: Any) -> Any:
        if isinstance(step, Send):
            return not_ready if step.resend_count == 0 else OK
        assert isinstance(step, Wake)
        wake = wake_flow(endpoint="e/ready", state=state, cold=WARM_ONLY, now=run.clock, random=run.random)
        first = next(wake)
        assert first == Sleep(1.0), "the probe waits out the Retry-After"
        run.now += 1.0
        assert isinstance(wake.send(None), Probe)
        with pytest.raises(StopIteration):
            wake.send(OK)
        return WakeResult(ready=True)

    report = run.drive(flow, reply)
    assert report.attempts == 2 and run.now == pytest.approx(1.0)
    assert [type(step) for step in run.steps] == [Send, Wake, Send]  # no second pause: it has passed


def test_a_pause_heard_by_one_call_holds_the_next_call_too() -> None:
    state = EndpointState(CircuitPolicy())
    Run().call([classify_response(429, "3", b""), OK], state=state)  # now == 3 after its own wait
    state.pause(10.0)
    run = Run(now=4.0)
    run.call([OK], state=state)
    assert run.steps[0] == Sleep(6.0) and isinstance(run.steps[1], Send)
    with pytest.raises(Unavailable) as caught:
        Run(now=4.0).call([], state=state, deadline=2.0)  # the pause would pass the call's deadline
    assert caught.value.retry_after == pytest.approx(6.0)


# --- the wake-up's own span agrees with the call's ---

def test_a_wake_up_started_by_a_cold_sign_reports_a_cold_start_even_when_quick() -> None:
    state = EndpointState(CircuitPolicy())
    run = Run()
    run.call([classify_response(503, "0", b"model is loading"), WakeResult(ready=True), OK], state=state)
    assert state.last_sign is None  # the service answered since
    state.last_sign = loading()
    assert drive_wake(Run(), [OK], ColdStartPolicy(), state=state).cold
    assert not drive_wake(Run(), [OK], ColdStartPolicy()).cold  # a pre-flight probe of a warm service
