"""The zeroserve exception tree.

    ZeroServeError
    ├── RemoteModelError            a call to a remote model failed: .endpoint, .attempts, .probes, .last_status
    │   ├── RequestRejected         the service answered with an error that resending cannot fix (4xx, 500, ...)
    │   ├── Unavailable             never executed: every attempt was refused or turned away (.retry_after)
    │   │   ├── CircuitOpen         failing fast: recent calls failed hard, the breaker is open
    │   │   ├── ColdStartFailed     the service says its start failed (.start: reason, exit status)
    │   │   └── Unreachable         not a cold start: the host does not resolve, its TLS certificate fails
    │   │                           verification, or nothing listens on its port (also a ConnectionError)
    │   ├── OutcomeUnknown          sent, then failed (504, 502, reset, read timeout); not resent unless idempotent
    │   ├── DeadlineExceeded        the call's deadline passed (also a TimeoutError)
    │   │   └── ColdStartTimeout    the service did not wake up within the cold-start deadline
    │   └── ProtocolError           the answer is not a valid V2 response
    └── ServerError                 raised inside the model server (zeroserve.runtime.server_errors)

Catch ``RemoteModelError`` for "the model call failed"; ``Unavailable`` and its subclasses carry a
``retry_after`` hint in seconds, which the mounted routes send as ``Retry-After``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: `import zeroserve` loads this module and not typing
if TYPE_CHECKING:
    from zeroserve.protocol.start import StartState


class ZeroServeError(Exception):
    """Root of every error zeroserve raises on purpose."""


class RemoteModelError(ZeroServeError):
    """A call to a remote model failed.

    Args:
        message: what went wrong, for people (with the last answer seen, when it matters).
        endpoint: the URL that was called.
        attempts: how many times the request was sent (0 when it never was).
        last_status: the HTTP status of the last answer, or None when no answer came.
        probes: how many readiness probes the wait for a cold start sent.
        start: the start state the service last reported (``Zeroserve-Start``), when it reported one.
    """

    def __init__(self, message: str, *, endpoint: str, attempts: int = 0, last_status: int | None = None,
                 probes: int = 0, start: StartState | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint
        self.attempts = attempts
        self.last_status = last_status
        self.probes = probes
        self.start = start

    def __str__(self) -> str:
        counts = []
        if self.attempts or not self.probes:
            counts.append(f"{self.attempts} attempt{'' if self.attempts == 1 else 's'}")
        else:
            counts.append("not sent")
        if self.probes:
            counts.append(f"{self.probes} readiness probe{'' if self.probes == 1 else 's'}")
        if self.last_status is not None:
            counts.append(f"last status {self.last_status}")
        return f"{self.message} ({self.endpoint}: {', '.join(counts)})"

    def __reduce__(self) -> tuple[object, ...]:  # keyword-only arguments survive pickling
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[RemoteModelError], message: str, state: dict[str, object]) -> RemoteModelError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class RequestRejected(RemoteModelError):
    """The service answered with an error that sending again would not fix, e.g. 400 for a wrong shape.

    ``message`` is the server's own ``{"error": ...}`` text when it sent one.
    """


class Unavailable(RemoteModelError):
    """The request was never executed: the service refused or turned away every attempt.

    Args:
        retry_after: seconds after which trying again makes sense, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        attempts: int = 0,
        last_status: int | None = None,
        retry_after: float | None = None,
        probes: int = 0,
        start: StartState | None = None,
    ) -> None:
        super().__init__(message, endpoint=endpoint, attempts=attempts, last_status=last_status, probes=probes,
                         start=start)
        self.retry_after = retry_after


class CircuitOpen(Unavailable):
    """Recent calls failed hard, so this one fails fast without a request until the breaker probes again."""


class ColdStartFailed(Unavailable):
    """The service answered that its start failed (``Zeroserve-Start: failed``): waiting will not help until it
    is fixed or its next start succeeds. The request never ran.

    ``message`` holds the server's own reason; ``start`` the details (``reason``, ``exit_status``, ``starts``),
    ``retry_after`` when the service will try to start again.
    """

    @property
    def reason(self) -> str | None:
        """The server's own error message, e.g. ONNX Runtime's "INVALID_PROTOBUF ... Protobuf parsing failed"."""
        return self.start.reason if self.start is not None else None

    @property
    def exit_status(self) -> int | None:
        """The exit status of the server process that failed to start, when it exited."""
        return self.start.exit_status if self.start is not None else None


class Unreachable(Unavailable, ConnectionError):
    """Not a cold start, so not waited for: the host does not resolve, its TLS certificate fails verification,
    or nothing has listened on its port for ``ColdStartPolicy.refused_grace`` seconds (a scaled-to-zero
    Knative service or ``zeroserve dev`` always holds its port). The request never ran."""


class OutcomeUnknown(RemoteModelError):
    """The request was sent and then failed (504, 502, connection reset, read timeout).

    The model may have run it, so it is not sent again unless the model is marked idempotent.
    """


class DeadlineExceeded(RemoteModelError, TimeoutError):
    """The call's deadline passed before an answer came."""


class ColdStartTimeout(DeadlineExceeded):
    """The service did not become ready within the cold-start deadline."""


class ProtocolError(RemoteModelError):
    """The answer is not a valid V2 response (bad JSON, sizes that do not add up)."""
