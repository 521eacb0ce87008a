"""What RemoteModel and AsyncRemoteModel share: configuration, paths, encoding requests and decoding answers,
and the pieces their drivers are built from (a call's scope and flows, one attempt: ``zeroserve._call``)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import time
from collections.abc import Mapping, Sequence
from http.cookiejar import CookieJar
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from zeroserve import _flow
from zeroserve._call import Attempt, CallFlow, CallScope, CallSpec, WakeScope
from zeroserve._flow import CallReport, WakeReport, WakeResult
from zeroserve._outcome import Kind, Outcome, error_message
from zeroserve._single_flight import Flight, TaskSingleFlight, ThreadSingleFlight
from zeroserve._state import EndpointState
from zeroserve.errors import ProtocolError, RemoteModelError, RequestRejected, Unavailable
from zeroserve.policy import CircuitPolicy, ColdStartPolicy, RetryPolicy
from zeroserve.protocol import client_codec as v2
from zeroserve.protocol.binary import HEADER_LENGTH
from zeroserve.tracing import CallSpans

if TYPE_CHECKING:
    import numpy as np
    from opentelemetry.trace import TracerProvider

    from zeroserve._types import Headers, Inputs

_VERSIONED = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?")


class _BaseRemoteModel:
    def __init__(
        self,
        url: str,
        model: str,
        *,
        version: str | None = None,
        binary: bool = True,
        retry: RetryPolicy | None = None,
        cold_start: ColdStartPolicy | None = None,
        circuit: CircuitPolicy | None = None,
        headers: Headers | None = None,
        auth: httpx.Auth | tuple[str, str] | None = None,
        provider: str = "knative",
        invoked_name: str | None = None,
        tracer_provider: TracerProvider | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        base = httpx.URL(url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"url must be an http:// or https:// URL of the model service, got {url!r}")
        if not model:
            raise ValueError("model must be the name the model is served under")
        self.url = str(base).rstrip("/")
        self.model = model
        self.version = version
        self.binary = binary
        self.retry = retry or RetryPolicy()
        self.cold_start = cold_start or ColdStartPolicy()
        self.circuit = circuit or CircuitPolicy()
        self.state = EndpointState(self.circuit)
        self._headers = dict(headers or {})
        self._auth = auth
        # Errors and spans name the endpoint without any credentials the URL may hold.
        self._public_url = str(base.copy_with(username=None, password=None)).rstrip("/")
        model_path = f"/v2/models/{quote(model, safe='')}"
        if version is not None:
            model_path += f"/versions/{quote(version, safe='')}"
        self._metadata_path = model_path
        self._ready_path = model_path + "/ready"
        self._infer_path = model_path + "/infer"
        self._invoked_name = invoked_name or model
        self._provider = provider
        self._tracer_provider = tracer_provider
        self._call_spans: CallSpans | None = None
        self._wake_flight: ThreadSingleFlight[WakeReport] | TaskSingleFlight[WakeReport]
        self._templates: dict[str, str] = {}
        self._datatypes: dict[str, str] | None = None
        self._init_io(transport)

    def _init_io(self, transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._public_url!r}, model={self.model!r})"

    @property
    def waking(self) -> bool:
        """Whether a wake-up of the service is running now."""
        return self._wake_flight.running

    # --- shared pieces of the drivers ---

    @property
    def _spans(self) -> CallSpans:
        if self._call_spans is None:  # created on first use: it looks up the package version
            base = httpx.URL(self._public_url)
            self._call_spans = CallSpans(
                model=self.model, invoked_name=self._invoked_name, provider=self._provider, address=base.host,
                port=base.port or (443 if base.scheme == "https" else 80), tracer_provider=self._tracer_provider,
            )
        return self._call_spans

    def _scope(self, spec: CallSpec) -> CallScope:
        """The scope of one logical call; ``begin`` starts a flow for one of its requests."""
        return CallScope(self._spans, spec, time.monotonic(), self._call_flow)

    def _call_flow(self, spec: CallSpec, report: CallReport, started: float) -> CallFlow:
        idempotent = spec.idempotent
        if idempotent is None and spec.method in ("GET", "HEAD"):
            idempotent = True
        return _flow.call_flow(
            endpoint=self._public_url + spec.path, state=self.state, retry=self.retry, cold=self.cold_start,
            now=time.monotonic, random=random.random, idempotent=idempotent, deadline=spec.timeout,
            cold_wait=spec.cold_wait, report=report, started=started,
        )

    def _wake_scope(self) -> WakeScope:
        return WakeScope(self._spans, _flow.wake_flow(
            endpoint=self._public_url + self._ready_path, state=self.state, cold=self.cold_start,
            now=time.monotonic, random=random.random,
        ))

    def _attempt(self, spec: CallSpec, resend_count: int, timeout: float, scope: CallScope | WakeScope) -> Attempt:
        return Attempt(self._spans, spec, self._public_url + spec.path, self._template(spec.path), resend_count,
                       timeout, self.retry.connect_timeout, scope)

    def _probe_spec(self) -> CallSpec:
        return CallSpec("wake", "GET", self._ready_path)

    def _metadata_spec(self, call: CallSpec) -> CallSpec:
        """The metadata request an infer with plain lists sends first, as part of the same call."""
        return dataclasses.replace(call, method="GET", path=self._metadata_path, content=None, headers=None,
                                   idempotent=True)

    @staticmethod
    def _wake_result(finished: bool, value: WakeReport | None, error: BaseException | None) -> WakeResult:
        if not finished:
            return WakeResult(ready=False)
        if error is None:
            return WakeResult(ready=True, report=value)
        if isinstance(error, RemoteModelError):
            return WakeResult(ready=False, error=error)
        raise error

    def _template(self, path: str) -> str:
        template = self._templates.get(path)
        if template is None:
            template = _VERSIONED.sub(
                lambda match: "/v2/models/{model}" + ("/versions/{version}" if match.group(1) else ""), path, 1
            )
            if len(self._templates) < 64:
                self._templates[path] = template
        return template

    def _outputs(self, response: httpx.Response, report: CallReport) -> dict[str, np.ndarray]:
        endpoint = self._public_url + self._infer_path
        if response.status_code != 200:
            raise RequestRejected(
                error_message(response.content) or f"status {response.status_code}",
                endpoint=endpoint, attempts=report.attempts, last_status=response.status_code,
            )
        try:
            decoded = v2.decode_response(response.content, response.headers.get(HEADER_LENGTH))
        except ValueError as exc:
            raise ProtocolError(str(exc), endpoint=endpoint, attempts=report.attempts,
                                last_status=response.status_code) from None
        return decoded.outputs

    def _metadata_answer(self, response: httpx.Response, report: CallReport) -> dict[str, Any]:
        endpoint = self._public_url + self._metadata_path
        if response.status_code != 200:
            raise RequestRejected(
                error_message(response.content) or f"status {response.status_code}",
                endpoint=endpoint, attempts=report.attempts, last_status=response.status_code,
            )
        try:
            metadata = response.json()
        except ValueError:
            metadata = None
        if not isinstance(metadata, dict):
            raise ProtocolError("model metadata is not a JSON object", endpoint=endpoint,
                                attempts=report.attempts, last_status=response.status_code)
        self._datatypes = v2.input_datatypes(metadata)
        return metadata

    def _encode(self, inputs: Inputs, datatypes: Mapping[str, str] | None, outputs: Sequence[str] | None,
                parameters: Mapping[str, Any] | None, request_id: str | None,
                headers: Headers | None) -> tuple[bytes, dict[str, str]]:
        body, content_headers = v2.encode_request(inputs, binary_data=self.binary, datatypes=datatypes,
                                                  outputs=outputs, parameters=parameters, request_id=request_id)
        if headers:
            content_headers.update(headers)
        return body, content_headers

    def _readiness(self, outcome: Outcome) -> bool:
        if outcome.kind is Kind.SUCCESS:
            self.state.answered(time.monotonic())
        elif outcome.cold:
            self.state.cold = True
        return outcome.kind is Kind.SUCCESS

    @staticmethod
    def _check_path(path: str) -> None:
        if not path.startswith("/v2/"):
            raise ValueError(f"path must be a V2 path starting with /v2/, got {path!r}")

    @classmethod
    def _flight_result(cls, flight: Flight[WakeReport] | None) -> WakeResult:
        if flight is None:
            return cls._wake_result(False, None, None)
        return cls._wake_result(True, flight.value, flight.error)

    def _task_result(self, task: asyncio.Task[WakeReport] | None) -> WakeResult:
        if task is None:
            return self._wake_result(False, None, None)
        if task.cancelled():  # the client is closing
            closing = Unavailable("the wake-up was cancelled: the client is closing",
                                  endpoint=self._public_url + self._ready_path)
            return self._wake_result(True, None, closing)
        failure = task.exception()
        return self._wake_result(True, None if failure else task.result(), failure)


class NoCookies(CookieJar):
    """Keeps no cookies. The client is shared by every user of a host app, so a cookie the model
    service sets must never come back on someone else's request."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Any) -> None:
        pass
