"""Server-side errors. Each carries the HTTP status the V2 protocol gives it, so one
handler renders ``{"error": "..."}`` for REST (and one mapping serves gRPC later).

    ZeroServeError
    └── ServerError                 500
        ├── InvalidInput            400  malformed request, wrong shape/datatype/size
        │   └── PayloadTooLarge     413  body or tensor over the configured bounds
        ├── ModelNotFound           404  unknown model or version
        ├── ModelNotReady           503  still loading (carries retry_after seconds)
        │   └── ServerBusy          503  the inference queue is full (back-pressure)
        ├── ModelLoadError          500/503  loading failed: storage, bad ONNX, provider
        │   └── StorageError        the model URI cannot be read (missing, no access, no extra)
        └── InferenceError          500  ONNX Runtime failed on a request that passed validation
"""

from __future__ import annotations

from http import HTTPStatus

from zeroserve.errors import ZeroServeError


class ServerError(ZeroServeError):
    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServerError):
    status = HTTPStatus.BAD_REQUEST


class PayloadTooLarge(InvalidInput):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class ModelNotFound(ServerError):
    status = HTTPStatus.NOT_FOUND


class ModelNotReady(ServerError):
    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerBusy(ModelNotReady):
    """Too many inferences queued: answered 503 with Retry-After rather than queued without bound."""


class ModelLoadError(ServerError):
    """Loading failed. Served as 503: the model is not available, the server is alive."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class StorageError(ModelLoadError):
    """The model URI cannot be read: it does not exist, access is denied, or an extra is missing."""


class InferenceError(ServerError):
    status = HTTPStatus.INTERNAL_SERVER_ERROR
