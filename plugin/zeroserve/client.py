"""RemoteModel and AsyncRemoteModel: a model served over the V2 protocol, called like a local function.

Both share ``_BaseRemoteModel`` (configuration, encoding, decoding) and the call scope of ``zeroserve._call``
(a call's span and flows, one attempt's span and classification), and drive the same sans-I/O flows from
``zeroserve._flow``: the sync one with ``httpx.Client`` and ``time.sleep``, the async one with
``httpx.AsyncClient`` and ``asyncio.sleep``. Only the I/O differs between the two.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from zeroserve._call import CallScope, CallSpec, WakeScope
from zeroserve._flow import CallReport, Probe, Send, Sleep, WakeReport, WakeResult
from zeroserve._model import NoCookies, _BaseRemoteModel
from zeroserve._outcome import Outcome
from zeroserve._single_flight import TaskSingleFlight, ThreadSingleFlight
from zeroserve.errors import ColdStartTimeout
from zeroserve.protocol import client_codec as v2

if TYPE_CHECKING:
    import numpy as np
    from opentelemetry.context import Context

    from zeroserve._types import Headers, Inputs

__all__ = ["AsyncRemoteModel", "RemoteModel"]


class RemoteModel(_BaseRemoteModel):
    """A remote V2 model, called synchronously (httpx.Client). Thread-safe; one instance per model.

    Args:
        url: the model service, e.g. ``https://mlp.default.example.com`` (a Knative Service URL).
        model: the name the model is served under.
        version: a model version; the server's newest when None.
        binary: send and receive tensors with the binary extension (default) or as JSON.
        retry, cold_start, circuit: the policies (``zeroserve.policy``).
        headers: sent with every request, e.g. an ``Authorization`` for the model service or the
            ``Host`` a Knative ingress routes on.
        auth: httpx authentication for the model service.
        provider: ``faas.invoked_provider`` on spans.
        invoked_name: ``faas.invoked_name`` on spans (the model name by default).
        tracer_provider: an OpenTelemetry tracer provider; the global one when None.
        transport: an httpx transport (``httpx.WSGITransport``, a mock, or one with custom TLS).
    """

    _wake_flight: ThreadSingleFlight[WakeReport]

    def _init_io(self, transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None) -> None:
        if transport is not None and not isinstance(transport, httpx.BaseTransport):
            raise TypeError("RemoteModel needs a sync transport (httpx.BaseTransport, e.g. httpx.WSGITransport)")
        self._transport = transport
        self._http: httpx.Client | None = None
        self._lock = threading.Lock()
        self._wake_flight = ThreadSingleFlight()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        with self._lock:
            client, self._http = self._http, None
        if client is not None:
            client.close()

    @property
    def http(self) -> httpx.Client:
        """The underlying httpx client (created on first use)."""
        client = self._http
        if client is None:
            with self._lock:
                client = self._http
                if client is None:
                    client = self._http = httpx.Client(
                        transport=self._transport, headers=self._headers, auth=self._auth, cookies=NoCookies()
                    )
        return client

    def infer(
        self,
        inputs: Inputs,
        *,
        outputs: Sequence[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        headers: Headers | None = None,
        timeout: float | None = None,
        cold_wait: float | None = None,
        context: Context | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the model: input name -> array (or nested list) in, output name -> numpy array out.

        Lists and scalars take the input's datatype from the model's metadata (fetched once).

        Args:
            outputs: only these outputs (all when None).
            parameters: V2 request parameters.
            request_id: the request's ``id``.
            headers: extra headers for this call.
            timeout: this call's deadline in seconds (``retry.deadline`` when None).
            cold_wait: the longest to wait for a cold start before raising ``Unavailable`` (None: up to
                the cold-start deadline).
            context: the OpenTelemetry context to parent this call's spans (the current one when None).

        Raises:
            ValueError: the inputs cannot be encoded (not numbers, ragged lists).
            RemoteModelError: the call failed; the subclass says how (``zeroserve.errors``): e.g.
                ``RequestRejected`` (a wrong shape), ``ColdStartFailed`` (the service cannot start, with its
                reason), ``ColdStartTimeout``, ``Unreachable`` (no such host, TLS verification failed, nothing
                listening), ``OutcomeUnknown`` (it may have run).
        """
        spec = CallSpec("infer", "POST", self._infer_path, timeout=timeout, cold_wait=cold_wait, context=context)
        with self._scope(spec) as scope:
            plain = v2.has_plain_values(inputs)
            if plain and self._datatypes is None:  # part of this call: a cold start met here is the call's
                self._metadata_answer(self._run(scope, self._metadata_spec(spec)), scope.part)
            body, content_headers = self._encode(inputs, self._datatypes if plain else None, outputs, parameters,
                                                 request_id, headers)
            response = self._run(scope, spec.with_content(body, content_headers))
        return self._outputs(response, scope.part)

    def metadata(self, *, cold_wait: float | None = None, context: Context | None = None) -> dict[str, Any]:
        """The model's metadata (name, versions, inputs and outputs with datatypes and shapes)."""
        response, report = self._call(CallSpec("metadata", "GET", self._metadata_path, cold_wait=cold_wait,
                                               context=context))
        return self._metadata_answer(response, report)

    def ready(self, timeout: float = 5.0) -> bool:
        """Whether the model answers ready now: one GET, no retries, no waiting for a cold start."""
        spec = CallSpec("ready", "GET", self._ready_path)
        with self._scope(spec) as scope:
            scope.report.attempts = 1
            outcome = self._send(spec, 0, timeout, scope)
        return self._readiness(outcome)

    def wake(self, *, background: bool = False) -> None:
        """Make the service ready: one readiness probe shared by every caller, within the cold-start deadline.

        Args:
            background: start the wake-up and return at once (e.g. on app start-up).

        Raises:
            ColdStartFailed, ColdStartTimeout, Unreachable, RequestRejected: the wake-up failed (not raised with
                ``background``: the next call meets the failure).
        """
        flight = self._wake_flight.join(self._wake_work, 0.0 if background else self.cold_start.deadline + 5.0)
        if background:
            return
        if flight is None:
            raise ColdStartTimeout("the wake-up did not finish", endpoint=self._public_url + self._ready_path)
        if flight.error is not None:
            raise flight.error

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: Headers | None = None,
        idempotent: bool | None = None,
        timeout: float | None = None,
        cold_wait: float | None = None,
        context: Context | None = None,
    ) -> httpx.Response:
        """Send any V2 request of the service (``path`` starts with ``/v2/``) with the retry and cold-start
        handling of ``infer``; returns the final answer whatever its status (mounted routes proxy it).

        Args:
            idempotent: resend after failures past sending (GET and HEAD always may).
            timeout: this call's deadline in seconds.
            cold_wait: the longest to wait for a cold start before raising ``Unavailable``.
            context: the OpenTelemetry context to parent this call's spans (the current one when None).
        """
        self._check_path(path)
        response, _ = self._call(CallSpec("request", method, path, content, headers, idempotent, timeout, cold_wait,
                                          context))
        return response

    # --- the driver ---

    def _call(self, spec: CallSpec) -> tuple[httpx.Response, CallReport]:
        with self._scope(spec) as scope:
            return self._run(scope, spec), scope.part

    def _run(self, scope: CallScope, spec: CallSpec) -> httpx.Response:
        """Drive the flow of one request of the call in ``scope`` to its final answer."""
        scope.begin(spec)
        reply: Outcome | WakeResult | None = None
        while (step := scope.next(reply)) is not None:
            if isinstance(step, Send):
                reply = self._send(spec, step.resend_count, step.timeout, scope)
            elif isinstance(step, Sleep):
                time.sleep(step.seconds)
                reply = None
            else:
                reply = self._flight_result(self._wake_flight.join(self._wake_work, step.timeout))
        return scope.answer

    def _send(self, spec: CallSpec, resend_count: int, timeout: float, scope: CallScope | WakeScope) -> Outcome:
        attempt = self._attempt(spec, resend_count, timeout, scope)
        try:
            response = self.http.request(spec.method, self.url + spec.path, content=spec.content,
                                         headers=attempt.headers, timeout=attempt.httpx_timeout)
        except httpx.RequestError as exc:
            return attempt.failed(exc)
        except BaseException:
            attempt.abandoned()
            raise
        return attempt.answered(response)

    def _wake_work(self) -> WakeReport:
        probe = self._probe_spec()
        with self._wake_scope() as scope:
            reply: Outcome | None = None
            while (step := scope.next(reply)) is not None:
                if isinstance(step, Probe):
                    reply = self._send(probe, step.number, step.timeout, scope)
                else:
                    time.sleep(step.seconds)
                    reply = None
            return scope.result


class AsyncRemoteModel(_BaseRemoteModel):
    """A remote V2 model, called from asyncio code (httpx.AsyncClient). Same arguments as ``RemoteModel``;
    ``transport`` is an ``httpx.AsyncBaseTransport`` (e.g. ``httpx.ASGITransport``)."""

    _wake_flight: TaskSingleFlight[WakeReport]

    def _init_io(self, transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None) -> None:
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError("AsyncRemoteModel needs an async transport (httpx.AsyncBaseTransport, "
                            "e.g. httpx.ASGITransport)")
        self._async_transport = transport
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._wake_flight = TaskSingleFlight()

    async def __aenter__(self) -> AsyncRemoteModel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop a running wake-up and close the connection pool."""
        await self._wake_flight.aclose()
        client, self._http = self._http, None
        if client is not None and self._http_loop is asyncio.get_running_loop():
            await client.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        """The underlying httpx client, created on first use in the running event loop."""
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            # A pool belongs to the loop it was made in; a new loop (a test, a restarted app) gets its own.
            self._http = httpx.AsyncClient(
                transport=self._async_transport, headers=self._headers, auth=self._auth, cookies=NoCookies()
            )
            self._http_loop = loop
        return self._http

    async def infer(
        self,
        inputs: Inputs,
        *,
        outputs: Sequence[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        headers: Headers | None = None,
        timeout: float | None = None,
        cold_wait: float | None = None,
        context: Context | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the model; see ``RemoteModel.infer``."""
        spec = CallSpec("infer", "POST", self._infer_path, timeout=timeout, cold_wait=cold_wait, context=context)
        with self._scope(spec) as scope:
            plain = v2.has_plain_values(inputs)
            if plain and self._datatypes is None:
                self._metadata_answer(await self._run(scope, self._metadata_spec(spec)), scope.part)
            body, content_headers = self._encode(inputs, self._datatypes if plain else None, outputs, parameters,
                                                 request_id, headers)
            response = await self._run(scope, spec.with_content(body, content_headers))
        return self._outputs(response, scope.part)

    async def metadata(self, *, cold_wait: float | None = None, context: Context | None = None) -> dict[str, Any]:
        """The model's metadata; see ``RemoteModel.metadata``."""
        response, report = await self._call(CallSpec("metadata", "GET", self._metadata_path, cold_wait=cold_wait,
                                                     context=context))
        return self._metadata_answer(response, report)

    async def ready(self, timeout: float = 5.0) -> bool:
        """Whether the model answers ready now; see ``RemoteModel.ready``."""
        spec = CallSpec("ready", "GET", self._ready_path)
        with self._scope(spec) as scope:
            scope.report.attempts = 1
            outcome = await self._send(spec, 0, timeout, scope)
        return self._readiness(outcome)

    async def wake(self, *, background: bool = False) -> None:
        """Make the service ready; see ``RemoteModel.wake``."""
        if background:
            self._wake_flight.start(self._wake_work)
            return
        task = await self._wake_flight.join(self._wake_work, self.cold_start.deadline + 5.0)
        if task is None:
            raise ColdStartTimeout("the wake-up did not finish", endpoint=self._public_url + self._ready_path)
        task.result()

    async def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: Headers | None = None,
        idempotent: bool | None = None,
        timeout: float | None = None,
        cold_wait: float | None = None,
        context: Context | None = None,
    ) -> httpx.Response:
        """Send any V2 request of the service; see ``RemoteModel.request``."""
        self._check_path(path)
        response, _ = await self._call(CallSpec("request", method, path, content, headers, idempotent, timeout,
                                                cold_wait, context))
        return response

    # --- the driver ---

    async def _call(self, spec: CallSpec) -> tuple[httpx.Response, CallReport]:
        with self._scope(spec) as scope:
            return await self._run(scope, spec), scope.part

    async def _run(self, scope: CallScope, spec: CallSpec) -> httpx.Response:
        """Drive the flow of one request of the call in ``scope`` to its final answer."""
        scope.begin(spec)
        reply: Outcome | WakeResult | None = None
        while (step := scope.next(reply)) is not None:
            if isinstance(step, Send):
                reply = await self._send(spec, step.resend_count, step.timeout, scope)
            elif isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                reply = None
            else:
                reply = self._task_result(await self._wake_flight.join(self._wake_work, step.timeout))
        return scope.answer

    async def _send(self, spec: CallSpec, resend_count: int, timeout: float,
                    scope: CallScope | WakeScope) -> Outcome:
        attempt = self._attempt(spec, resend_count, timeout, scope)
        try:
            response = await self.http.request(spec.method, self.url + spec.path, content=spec.content,
                                               headers=attempt.headers, timeout=attempt.httpx_timeout)
        except httpx.RequestError as exc:
            return attempt.failed(exc)
        except BaseException:
            attempt.abandoned()
            raise
        return attempt.answered(response)

    async def _wake_work(self) -> WakeReport:
        probe = self._probe_spec()
        with self._wake_scope() as scope:
            reply: Outcome | None = None
            while (step := scope.next(reply)) is not None:
                if isinstance(step, Probe):
                    reply = await self._send(probe, step.number, step.timeout, scope)
                else:
                    await asyncio.sleep(step.seconds)
                    reply = None
            return scope.result
