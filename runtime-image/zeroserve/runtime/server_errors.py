"""Server-side errors. Each carries the HTTP status the V2 protocol gives it, so one
handler renders ``{"error": "..."}`` for REST and one mapping gives the gRPC status.

    ZeroServeError
    └── ServerError                 500
        ├── InvalidInput            400  malformed request, wrong shape/datatype/size
        │   └── PayloadTooLarge     413  body or tensor over the configured bounds
        ├── ModelNotFound           404  unknown model or version
        ├── ModelNotReady           503  still loading (Retry-After; Zeroserve-Start: loading)
        ├── ServerBusy              503  the inference queue is full (back-pressure; Retry-After)
        ├── ModelLoadError          503  loading failed: storage, bad ONNX, provider (Zeroserve-Start: failed
        │   │                            when a request meets it)
        │   └── StorageError        the model URI cannot be read (missing, no access, no extra)
        └── InferenceError          500  ONNX Runtime failed on a request that passed validation

``retry_after`` (seconds) becomes the ``Retry-After`` header (gRPC: trailing metadata), ``start`` the
``Zeroserve-Start`` marker and the body's ``start`` object (``zeroserve.protocol.start``).
"""

from __future__ import annotations

from http import HTTPStatus

from zeroserve.errors import ZeroServeError
from zeroserve.protocol.start import StartState


class ServerError(ZeroServeError):
    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    retry_after: float | None = None
    start: StartState | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def with_retry_after(self, seconds: float) -> ServerError:
        """This error, telling the client when to ask again."""
        self.retry_after = max(0.0, seconds)
        return self


class InvalidInput(ServerError):
    status = HTTPStatus.BAD_REQUEST


class PayloadTooLarge(InvalidInput):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class ModelNotFound(ServerError):
    status = HTTPStatus.NOT_FOUND


class ModelNotReady(ServerError):
    """The model is still loading: ask again after ``retry_after`` seconds."""

    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, message: str, retry_after: float = 1.0, start: StartState | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.start = start or StartState("loading")


class ServerBusy(ServerError):
    """Too many inferences queued: answered 503 with Retry-After rather than queued without bound."""

    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelLoadError(ServerError):
    """Loading failed. Served as 503: the model is not available, the server is alive. ``start`` is set
    when a request meets the failure (the model failed to start), not while loading raises it."""

    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, message: str, start: StartState | None = None) -> None:
        super().__init__(message)
        self.start = start


class StorageError(ModelLoadError):
    """The model URI cannot be read: it does not exist, access is denied, or an extra is missing."""


class InferenceError(ServerError):
    status = HTTPStatus.INTERNAL_SERVER_ERROR
