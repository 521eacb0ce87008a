"""The zeroserve exception tree.

    ZeroServeError
    ├── RemoteModelError            a call to a remote model failed: .endpoint, .attempts, .last_status
    │   ├── RequestRejected         the service answered with an error that resending cannot fix (4xx, 500, ...)
    │   ├── Unavailable             never executed: every attempt was refused or turned away (.retry_after)
    │   │   └── CircuitOpen         failing fast: recent calls failed hard, the breaker is open
    │   ├── OutcomeUnknown          sent, then failed (504, 502, reset, read timeout); not resent unless idempotent
    │   ├── DeadlineExceeded        the call's deadline passed (also a TimeoutError)
    │   │   └── ColdStartTimeout    the service did not wake up within the cold-start deadline
    │   └── ProtocolError           the answer is not a valid V2 response
    └── ServerError                 raised inside the model server (zeroserve.runtime.server_errors)

Catch ``RemoteModelError`` for "the model call failed"; ``Unavailable`` and ``CircuitOpen`` carry a
``retry_after`` hint in seconds, which the mounted routes send as ``Retry-After``.
"""

from __future__ import annotations


class ZeroServeError(Exception):
    """Root of every error zeroserve raises on purpose."""


class RemoteModelError(ZeroServeError):
    """A call to a remote model failed.

    Args:
        message: what went wrong, for people.
        endpoint: the URL that was called.
        attempts: how many times the request was sent (0 when it never was).
        last_status: the HTTP status of the last answer, or None when no answer came.
    """

    def __init__(self, message: str, *, endpoint: str, attempts: int = 0, last_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint
        self.attempts = attempts
        self.last_status = last_status

    def __str__(self) -> str:
        status = f", last status {self.last_status}" if self.last_status is not None else ""
        plural = "" if self.attempts == 1 else "s"
        return f"{self.message} ({self.endpoint}: {self.attempts} attempt{plural}{status})"

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
    ) -> None:
        super().__init__(message, endpoint=endpoint, attempts=attempts, last_status=last_status)
        self.retry_after = retry_after


class CircuitOpen(Unavailable):
    """Recent calls failed hard, so this one fails fast without a request until the breaker probes again."""


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
