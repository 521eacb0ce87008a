"""What one request's result means for the call that sent it, decided by pure functions: ``classify_response``
for an HTTP answer, ``classify_error`` for a transport error. The flows in ``zeroserve._flow`` act on the
``Outcome``; the decision table is in docs/plugin.md ("Retries that are safe for POST").
"""

from __future__ import annotations

import enum
import json
import math
import socket
import ssl
from dataclasses import dataclass

import httpx

from zeroserve.protocol.start import FAILED, LOADING, UNLOADED, StartState


class Kind(enum.Enum):
    """What one request's result means for resending it."""

    SUCCESS = "success"  # 2xx
    ANSWER = "answer"  # any other final answer (400, 404, 500, ...): handed to the caller as it is
    NOT_SENT = "not_sent"  # never left this process: connect timeout, pool timeout, write failed
    REFUSED = "refused"  # connection refused: nothing listens (a server restarting), waited for a short grace
    UNREACHABLE = "unreachable"  # never sent and never will be: the host does not resolve, TLS verification failed
    NOT_READY = "not_ready"  # the model server is up but its model is not loaded yet (503 + Retry-After)
    START_FAILED = "start_failed"  # the service says its start failed (503, Zeroserve-Start: failed)
    # A readiness probe answered by a server that loads on demand: the model is not loaded, and the request that
    # needs it loads it (503, Zeroserve-Start: unloaded). Waiting for readiness would wait forever.
    LOADS_ON_REQUEST = "loads_on_request"
    OVERLOADED = "overloaded"  # turned away before dispatch: 429, Knative's 503 "pending request queue full"
    MAYBE = "maybe"  # sent, then failed: 502, 504, connection reset or read timeout after sending


NEVER_EXECUTED = frozenset(
    {Kind.NOT_SENT, Kind.REFUSED, Kind.UNREACHABLE, Kind.NOT_READY, Kind.START_FAILED, Kind.OVERLOADED,
     Kind.LOADS_ON_REQUEST}
)

#: The longest ``Retry-After`` taken as given; a longer (or unreadable) value is clipped to it.
RETRY_AFTER_CAP = 3600.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """The classified result of one request.

    ``cold`` marks results that mean "the service is scaled to zero or starting" (connection refused,
    502, 503 not ready): the call then waits for one shared wake-up probe instead of resending blindly.
    ``reason`` says what happened, with the server's own words; ``start`` is the start state the answer
    carried (``Zeroserve-Start``).
    """

    kind: Kind
    status: int | None = None
    retry_after: float | None = None
    cold: bool = False
    reason: str = ""
    start: StartState | None = None


_QUEUE_FULL = b"pending request queue full"
_ACTIVATOR_DEADLINE = b"context deadline exceeded"
_NOT_READY_MARKERS = (b"not ready", b"still loading", b"is loading", b'"ready":false', b'"ready": false')


def classify_response(status: int, retry_after: str | None, body: bytes, start: str | None = None) -> Outcome:
    """Classify an HTTP answer: resend it or not, and is it a sign of a cold start.

    Args:
        status, body: the answer.
        retry_after: its ``Retry-After`` header.
        start: its ``Zeroserve-Start`` header, the marker of an answer about the service's start.
    """
    if 200 <= status < 300:
        return Outcome(Kind.SUCCESS, status)
    after = parse_retry_after(retry_after) if retry_after is not None else None
    if status == 429:
        return Outcome(Kind.OVERLOADED, status, after, reason="429 too many requests")
    if status == 503:
        if start == UNLOADED:
            return Outcome(Kind.LOADS_ON_REQUEST, status, after, reason="503 not loaded: the request will load it")
        if start in (LOADING, FAILED):
            return _start_outcome(start, after, body)
        lowered = body[:512].lower()
        if _QUEUE_FULL in lowered:
            return Outcome(Kind.OVERLOADED, status, after, reason="503 pending request queue full")
        if _ACTIVATOR_DEADLINE in lowered:  # the activator gave up waiting for capacity before dispatching
            return Outcome(Kind.OVERLOADED, status, after, cold=True, reason="503 no capacity in time")
        if after is not None or any(marker in lowered for marker in _NOT_READY_MARKERS):
            return Outcome(Kind.NOT_READY, status, after, cold=True, reason=_with_text("503 not ready", body))
        return Outcome(Kind.ANSWER, status, after, reason=f"503 {error_message(body)}".rstrip())
    if status == 502:
        return Outcome(Kind.MAYBE, status, after, cold=True, reason=_with_text("502 bad gateway", body))
    if status == 504:
        return Outcome(Kind.MAYBE, status, after, reason=f"504 {error_message(body) or 'gateway timeout'}")
    return Outcome(Kind.ANSWER, status, after, reason=f"{status} {error_message(body)}".rstrip())


def _start_outcome(marker: str, after: float | None, body: bytes) -> Outcome:
    parsed = _json(body)
    state = StartState.from_json(parsed.get("start")) if isinstance(parsed, dict) else None
    if state is None or state.state != marker:  # the header is the marker; the body's details are a bonus
        state = StartState(LOADING if marker == LOADING else FAILED)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    text = error if isinstance(error, str) else state.describe()
    if state.failed:
        if after is None and state.retry_after_s is not None:
            after = _clip(state.retry_after_s)
        return Outcome(Kind.START_FAILED, 503, after, reason=f"503 start failed: {text}", start=state)
    return Outcome(Kind.NOT_READY, 503, after, cold=True, reason=f"503 starting: {text}", start=state)


def classify_error(exc: Exception, timeout: float, address: str) -> Outcome:
    """Classify a transport error: was the request sent, will sending again help, is it a cold start.

    Args:
        exc: the httpx error.
        timeout: the attempt's timeout, for the message.
        address: ``host:port`` of the service, for the message.
    """
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        resolve = _cause(exc, socket.gaierror)
        if resolve is not None:
            host = address.rsplit(":", 1)[0]
            return Outcome(Kind.UNREACHABLE, reason=f"the host {host} does not resolve ({resolve})")
        certificate = _cause(exc, ssl.SSLCertVerificationError)
        if certificate is not None:
            why = getattr(certificate, "verify_message", None) or str(certificate)
            return Outcome(Kind.UNREACHABLE, reason=f"the TLS certificate of {address} fails verification ({why})")
        handshake = _cause(exc, ssl.SSLError)
        if handshake is not None and not isinstance(handshake, _TLS_CUT_SHORT):
            return Outcome(Kind.UNREACHABLE, reason=f"the TLS handshake with {address} failed ({handshake})")
        if _cause(exc, ConnectionRefusedError) is not None:
            return Outcome(Kind.REFUSED, cold=True, reason=f"connection refused by {address}")
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return Outcome(Kind.NOT_SENT, cold=True, reason=f"could not connect to {address} ({detail})")
    if isinstance(exc, httpx.PoolTimeout):
        return Outcome(Kind.NOT_SENT, reason="no free connection in the client's pool")
    if isinstance(exc, (httpx.WriteError, httpx.WriteTimeout)):
        # The body did not all leave, and a V2 server reads the whole body before it runs anything.
        return Outcome(Kind.NOT_SENT, reason=f"the request could not be written ({detail})")
    if isinstance(exc, httpx.ReadTimeout):
        return Outcome(Kind.MAYBE, reason=f"no answer within {timeout:.1f} s")
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return Outcome(Kind.MAYBE, reason=f"the connection broke before an answer ({detail})")
    return Outcome(Kind.MAYBE, reason=f"{type(exc).__name__}: {detail}")


# A connection cut during the handshake (a server going down) is no misconfiguration: treated like any
# other failed connect.
_TLS_CUT_SHORT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc``'s chain of causes (httpx wraps httpcore, which wraps the OS)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def parse_retry_after(value: str) -> float | None:
    """Seconds from a ``Retry-After`` value: delta-seconds or an HTTP date, at least 0 and at most
    ``RETRY_AFTER_CAP``; None when unreadable (``NaN`` included)."""
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return _clip(seconds) if not math.isnan(seconds) else None
    import email.utils
    import time

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return _clip(when.timestamp() - time.time())


def _clip(seconds: float) -> float:
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def error_message(body: bytes) -> str:
    """The text of a V2 error body (``{"error": "..."}``), or the start of any other body."""
    parsed = _json(body)
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return str(parsed["error"])
    text = body[:200].decode("utf-8", "replace")
    return " ".join(text.split())


def _with_text(label: str, body: bytes) -> str:
    text = error_message(body)
    return f"{label}: {text}" if text else label


def _json(body: bytes) -> object:
    if body[:1] != b"{":
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None
