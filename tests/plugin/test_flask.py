"""A remote model mounted in Flask apps by the ZeroServe extension: through httpx.WSGITransport and under a
real WSGI server (waitress), several apps per process, no event loop, single flight from server threads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from tests.plugin.conftest import Activator, FaultProxy, Spans, waitress_server
from zeroserve import ColdStartPolicy, RemoteModel, RetryPolicy
from zeroserve.flask import ZeroServe
from zeroserve.protocol.client_codec import encode_request

from conftest import ServerProcess

A = np.arange(8, dtype=np.float32).reshape(2, 4)
B = np.full((2, 4), 0.5, dtype=np.float32)
FAST = RetryPolicy(deadline=10, backoff=0.01, backoff_max=0.05)
MakeProxy = Callable[..., FaultProxy]


def make_app(extension: ZeroServe, **config: str) -> Flask:
    app = Flask(__name__)
    app.config.update(config)

    @app.get("/")
    def home() -> ResponseReturnValue:
        return "host app"

    @app.post("/score")
    def score() -> ResponseReturnValue:
        # The extension's model, called from the app's own view: synchronous, no event loop anywhere.
        loop_running = asyncio._get_running_loop() is not None
        outputs = extension.model.infer({"a": request.json["a"], "b": request.json["b"]})  # type: ignore[index]
        return jsonify(score=outputs["sum"].tolist(), loop=loop_running)

    extension.init_app(app)
    return app


def wsgi_client(app: Flask) -> httpx.Client:
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://host")


def test_the_blueprint_serves_the_remote_model(server: ServerProcess, fault_proxy: MakeProxy) -> None:
    proxy = fault_proxy(server.url)
    predict = ZeroServe(url=proxy.url, model="add", prefix="/predict", retry=FAST)
    app = make_app(predict)
    body, headers = encode_request({"a": A, "b": B})
    direct = httpx.post(f"{server.url}/v2/models/add/infer", content=body, headers=headers)
    with wsgi_client(app) as client:
        assert client.get("/").text == "host app"
        assert client.get("/predict").json()["model"] == "add"
        assert client.post("/predict", json={"a": A.tolist(), "b": B.tolist()}).json() == {"sum": (A * B).tolist()}
        binary = client.post("/predict/v2/models/add/infer", content=body, headers=headers)
        assert binary.status_code == 200 and binary.content == direct.content
        assert proxy.seen("POST")[-1].body == body
        assert client.get("/predict/v2/models/add").json()["name"] == "add"
        assert client.get("/predict/v2/models/add/ready").status_code == 200
        assert client.post("/score", json={"a": A.tolist(), "b": B.tolist()}).json() == {
            "score": (A * B).tolist(), "loop": False}
        # errors in the V2 shape
        assert client.get("/predict/v2/models/other").status_code == 404
        assert client.get("/predict/v2/models/add/infer").status_code == 405
        wrong = client.post("/predict", json={"a": [[1, 2, 3]], "b": [[1, 2, 3]]})
        assert wrong.status_code == 400 and "expects [-1, 4]" in wrong.json()["error"]
    # A V2 client pointed at the prefix works too.
    with RemoteModel("http://host/predict", model="add", transport=httpx.WSGITransport(app=app)) as through:
        np.testing.assert_array_equal(through.infer({"a": A, "b": B})["sum"], A * B)
    assert app.extensions["zeroserve"]["zeroserve"].model is predict.get_model(app)
    predict.close(app)


def test_one_extension_serves_several_apps_each_with_its_own_state(server: ServerProcess,
                                                                    fault_proxy: MakeProxy) -> None:
    first_proxy, second_proxy = fault_proxy(server.url), fault_proxy(server.url)
    shared = ZeroServe(prefix="/m")
    first = make_app(shared, ZEROSERVE_URL=first_proxy.url, ZEROSERVE_MODEL="add")
    second = make_app(shared, ZEROSERVE_URL=second_proxy.url, ZEROSERVE_MODEL="add")
    other = ZeroServe(first, name="identity", url=server.url, model="identity_int32", prefix="/identity")
    with wsgi_client(first) as one, wsgi_client(second) as two:
        assert one.post("/m", json={"a": [[1, 1, 1, 1]], "b": [[2, 2, 2, 2]]}).json() == {"sum": [[2, 2, 2, 2]]}
        assert two.post("/m", json={"a": [[1, 1, 1, 1]], "b": [[3, 3, 3, 3]]}).json() == {"sum": [[3, 3, 3, 3]]}
        assert two.post("/m", json={"a": [[1, 1, 1, 1]], "b": [[3, 3, 3, 3]]}).status_code == 200
        assert one.post("/identity", json={"input": [[7]]}).json() == {"output": [[7]], "copy": [[7]]}
        assert two.get("/identity").status_code == 404
    assert first_proxy.count("POST") == 1 and second_proxy.count("POST") == 2
    assert shared.get_model(first) is not shared.get_model(second)
    assert set(first.extensions["zeroserve"]) == {"zeroserve", "identity"}
    assert other.get_model(first).model == "identity_int32"
    for app in (first, second):
        shared.close(app)
    other.close(first)


def test_configuration_mistakes_are_reported(server: ServerProcess) -> None:
    with pytest.raises(RuntimeError, match="ZEROSERVE_URL and ZEROSERVE_MODEL"):
        ZeroServe(Flask(__name__))
    app = Flask(__name__)
    extension = ZeroServe(app, url=server.url, model="add")
    with pytest.raises(RuntimeError, match="already registered"):
        extension.init_app(app)
    with pytest.raises(RuntimeError, match="not initialised"):
        ZeroServe(name="other").get_model(app)
    with pytest.raises(ValueError, match="prefix"):
        ZeroServe(Flask(__name__), url=server.url, model="add", prefix="/x/")
    assert app.url_map.bind("h").match("/models/add") == ("zeroserve_zeroserve.root", {})
    extension.close(app)


def test_the_host_apps_credentials_stay_home(server: ServerProcess, fault_proxy: MakeProxy) -> None:
    proxy = fault_proxy(server.url)
    extension = ZeroServe(url=proxy.url, model="add", prefix="/predict", headers={"Authorization": "Bearer svc"},
                          forward_headers=["x-request-id"])
    app = make_app(extension)
    body, headers = encode_request({"a": A, "b": B})
    with wsgi_client(app) as client:
        response = client.post("/predict/v2/models/add/infer", content=body, headers={
            **headers, "Authorization": "Bearer user", "Cookie": "session=secret", "X-Request-Id": "r-9"})
        assert response.status_code == 200
    sent = proxy.seen("POST")[0].headers
    assert sent["authorization"] == "Bearer svc" and sent["x-request-id"] == "r-9" and "cookie" not in sent
    extension.close(app)

    # A model service that shares the app's users may be given their Authorization, by allow-listing it.
    shared = ZeroServe(url=proxy.url, model="add", prefix="/predict", forward_headers=["Authorization"])
    app = make_app(shared)
    with wsgi_client(app) as client:
        client.post("/predict/v2/models/add/infer", content=body,
                    headers={**headers, "Authorization": "Bearer user", "Cookie": "session=secret"})
    sent = proxy.seen("POST")[-1].headers
    assert sent["authorization"] == "Bearer user" and "cookie" not in sent
    shared.close(app)


def test_under_waitress_a_cold_start_is_woken_once_for_concurrent_requests(
    activator: Callable[..., Activator], spans: Spans
) -> None:
    cold = activator()
    extension = ZeroServe(url=cold.url, model="add", prefix="/predict", retry=FAST,
                          cold_start=ColdStartPolicy(deadline=60, slow_probe=0.2), tracer_provider=spans.provider)
    app = make_app(extension)
    body, headers = encode_request({"a": A, "b": B})
    statuses: list[int] = []
    with waitress_server(app) as url:
        def call() -> None:
            with httpx.Client(timeout=60) as client:
                statuses.append(client.post(f"{url}/predict/v2/models/add/infer", content=body,
                                            headers=headers).status_code)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        extension.close(app)
    assert statuses == [200] * 6
    assert cold.proxy.count("GET", "/ready") == 1 and cold.proxy.count("POST") == 6
    calls = spans.named("zeroserve request")
    assert len(calls) == 6 and all(dict(s.attributes or {})["zeroserve.coldstart"] for s in calls)


def test_reject_mode_and_wake_on_start(activator: Callable[..., Activator]) -> None:
    cold = activator()
    extension = ZeroServe(url=cold.url, model="add", prefix="/predict", when_cold="reject", cold_grace=0.1,
                          retry=FAST, cold_start=ColdStartPolicy(deadline=60, wake_on_start=True, retry_after=2))
    app = make_app(extension)  # init_app starts waking the service in a background thread
    with wsgi_client(app) as client:
        began = time.monotonic()
        early = client.post("/predict", json={"a": A.tolist(), "b": B.tolist()})
        assert time.monotonic() - began < 2
        assert early.status_code == 503 and early.headers["retry-after"] == "2"
        assert cold.ready.wait(60)
        deadline = time.monotonic() + 30
        while client.get("/predict").json()["state"] != "warm":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/predict", json={"a": A.tolist(), "b": B.tolist()}).status_code == 200
    assert cold.proxy.count("GET", "/ready") == 1
    extension.close(app)


def test_the_path_is_forwarded_with_its_escapes(server: ServerProcess, fault_proxy: MakeProxy) -> None:
    proxy = fault_proxy(server.url)
    extension = ZeroServe(url=proxy.url, model="add", prefix="/predict",
                          cold_start=ColdStartPolicy(probe_after_idle=None))
    app = make_app(extension)
    body, headers = encode_request({"a": A, "b": B})
    with wsgi_client(app) as client:
        for path in ("/predict/v2/models/add/versions/1%23/infer", "/predict/v2/models/add/versions/1%3Fx/infer"):
            assert client.post(path, content=body, headers=headers).status_code == 404
    extension.close(app)
    assert [seen.path for seen in proxy.requests] == ["/v2/models/add/versions/1%23/infer",
                                                      "/v2/models/add/versions/1%3Fx/infer"]
