"""Retry-After as servers really send it, good and bad, through a recording proxy in front of a real model server:
NaN and 0 never turn into a storm of probes, NaN on a POST is no crash, and a pause a server asks for holds
every request to it, the readiness probe included."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from flask import Flask

from tests.plugin.conftest import FaultProxy, Forward, Respond, Seen
from zeroserve import AsyncRemoteModel, ColdStartPolicy, RemoteModel, RetryPolicy
from zeroserve.flask import ZeroServe
from zeroserve.protocol.client_codec import encode_request

from conftest import ServerProcess

A = np.ones((1, 4), np.float32)
WARM = ColdStartPolicy(probe_after_idle=None)  # the first request is the payload itself
MakeProxy = Callable[..., FaultProxy]
LOADING = b'{"error":"model \'add\' is loading"}'


@pytest.mark.parametrize("client", ["sync", "async"])
@pytest.mark.parametrize("header", ["NaN", "0"])
def test_a_retry_after_of_nan_or_zero_on_the_probe_leaves_a_floor(server: ServerProcess, fault_proxy: MakeProxy,
                                                                 client: str, header: str) -> None:
    began = time.monotonic()

    def script(seen: Seen, index: int) -> Forward | Respond:
        if seen.path.endswith("/ready") and time.monotonic() - began < 2.0:
            return Respond(503, LOADING, (("retry-after", header),))
        return Forward()

    proxy = fault_proxy(server.url, script)
    if client == "sync":
        with RemoteModel(proxy.url, model="add") as model:
            model.infer({"a": A, "b": A})
    else:
        async def run() -> None:
            async with AsyncRemoteModel(proxy.url, model="add") as model:
                await model.infer({"a": A, "b": A})

        asyncio.run(run())
    probes = [seen for seen in proxy.requests if seen.path.endswith("/ready")]
    assert 2 <= len(probes) <= 2.0 / 0.25 + 2  # at least half the probe interval (0.5 s) apart, not thousands
    assert proxy.count("POST") == 1


def test_a_retry_after_holds_the_probe_and_the_resend(server: ServerProcess, fault_proxy: MakeProxy) -> None:
    def script(seen: Seen, index: int) -> Forward | Respond:
        return Respond(503, LOADING, (("retry-after", "1"),)) if index == 0 else Forward()

    proxy = fault_proxy(server.url, script)
    with RemoteModel(proxy.url, model="add", cold_start=WARM) as model:
        model.infer({"a": A, "b": A})
    first, probe, post = proxy.requests
    assert first.method == "POST" and probe.path.endswith("/ready") and post.method == "POST"
    assert probe.at - first.at >= 0.95  # not 45 ms later: the server asked for a second
    assert post.at >= probe.at


def test_a_nan_retry_after_on_a_post_is_no_crash(server: ServerProcess, fault_proxy: MakeProxy) -> None:
    def script(seen: Seen, index: int) -> Forward | Respond:
        return Respond(429, b"slow down", (("retry-after", "NaN"),)) if index < 2 else Forward()

    proxy = fault_proxy(server.url, script)
    with RemoteModel(proxy.url, model="add", cold_start=WARM,
                     retry=RetryPolicy(backoff=0.01, backoff_max=0.05)) as model:
        np.testing.assert_array_equal(model.infer({"a": A, "b": A})["sum"], A * A)
    assert proxy.count("POST") == 3


def test_a_nan_retry_after_through_the_flask_mount_answers_json(server: ServerProcess,
                                                                fault_proxy: MakeProxy) -> None:
    proxy = fault_proxy(server.url, lambda seen, index: Respond(429, b"slow down", (("retry-after", "NaN"),)))
    app = Flask(__name__)
    extension = ZeroServe(app, url=proxy.url, model="add", prefix="/predict", cold_start=WARM,
                          retry=RetryPolicy(deadline=2, max_attempts=3, backoff=0.01, backoff_max=0.05))
    body, headers = encode_request({"a": A, "b": A})
    try:
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://host") as client:
            answer = client.post("/predict/v2/models/add/infer", content=body, headers=headers)
    finally:
        extension.close(app)
    assert answer.status_code == 503 and answer.headers["content-type"] == "application/json"
    assert "gave up after 3 attempts: 429 too many requests" in answer.json()["error"]
    assert "retry-after" not in answer.headers  # an unreadable hint is not passed on
