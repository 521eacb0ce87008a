"""A remote model mounted in Starlette and FastAPI apps: through httpx.ASGITransport (lifespan driven by the
test) and through a real uvicorn, with a real model server (behind a recording proxy) as the remote."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from tests.plugin.conftest import (
    Activator,
    FaultProxy,
    Forward,
    Seen,
    Spans,
    asgi_lifespan,
    uvicorn_server,
    wait_until,
)
from zeroserve import AsyncRemoteModel, ColdStartPolicy, RemoteModel, RetryPolicy
from zeroserve.protocol.client_codec import encode_request
from zeroserve.starlette import ModelRoute, mount_model

from conftest import ServerProcess

A = np.arange(8, dtype=np.float32).reshape(2, 4)
B = np.full((2, 4), 0.5, dtype=np.float32)
FAST = RetryPolicy(deadline=10, backoff=0.01, backoff_max=0.05)
QUICK_COLD = ColdStartPolicy(deadline=30, probe_interval=0.1)
MakeProxy = Callable[..., FaultProxy]


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("host app")


def host_app(model: AsyncRemoteModel, **options: object) -> tuple[Starlette, ModelRoute, list[str]]:
    """An existing app with its own route and lifespan, and the model mounted at /predict."""
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, str]]:
        events.append("host start")
        yield {"greeting": "hi"}
        events.append("host stop")

    app = Starlette(routes=[Route("/", hello)], lifespan=lifespan)
    route = mount_model(app, "/predict", model, **options)
    return app, route, events


def client_for(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://host")  # type: ignore[arg-type]


def test_the_mounted_routes_serve_the_remote_model(server: ServerProcess, fault_proxy: MakeProxy) -> None:
    proxy = fault_proxy(server.url)
    model = AsyncRemoteModel(proxy.url, model="add", retry=FAST)
    app, route, events = host_app(model)
    body, headers = encode_request({"a": A, "b": B})
    direct = httpx.post(f"{server.url}/v2/models/add/infer", content=body, headers=headers)

    async def main() -> None:
        async with asgi_lifespan(app), client_for(app) as client:
            assert events == ["host start"]
            assert (await client.get("/")).text == "host app"
            status = (await client.get("/predict")).json()
            assert status["model"] == "add" and status["circuit"] == "closed"

            answer = await client.post("/predict", json={"a": A.tolist(), "b": B.tolist()})
            assert answer.status_code == 200 and answer.json() == {"sum": (A * B).tolist()}

            binary = await client.post("/predict/v2/models/add/infer", content=body, headers=headers)
            assert binary.status_code == 200
            assert binary.content == direct.content  # the binary answer, byte for byte
            assert binary.headers["inference-header-content-length"] == direct.headers[
                "inference-header-content-length"]
            assert proxy.seen("POST", "/infer")[-1].body == body  # and the request, untouched

            metadata = await client.get("/predict/v2/models/add")
            assert metadata.json()["name"] == "add"
            assert (await client.get("/predict/v2/models/add/versions/1/ready")).status_code == 200

            # Any V2 client pointed at the prefix works.
            async with AsyncRemoteModel("http://host/predict", model="add",
                                        transport=httpx.ASGITransport(app=app)) as through:
                outputs = await through.infer({"a": A, "b": B})
            np.testing.assert_array_equal(outputs["sum"], A * B)
        assert events == ["host start", "host stop"]
        assert model._http is None  # closed with the host app's lifespan

    asyncio.run(main())


def test_errors_keep_the_v2_shape(server: ServerProcess, fault_proxy: MakeProxy) -> None:
    proxy = fault_proxy(server.url)
    app, _, _ = host_app(AsyncRemoteModel(proxy.url, model="add"), max_body_bytes=1024)

    async def main() -> None:
        async with asgi_lifespan(app), client_for(app) as client:
            wrong = encode_request({"a": np.ones((1, 3), np.float32), "b": np.ones((1, 3), np.float32)},
                                   binary_data=False)
            rejected = await client.post("/predict/v2/models/add/infer", content=wrong[0], headers=wrong[1])
            assert rejected.status_code == 400 and "expects [-1, 4]" in rejected.json()["error"]
            convenience = await client.post("/predict", json={"a": [[1, 2, 3]], "b": [[1, 2, 3]]})
            assert convenience.status_code == 400 and "expects [-1, 4]" in convenience.json()["error"]
            assert (await client.post("/predict", content=b"{nope")).status_code == 400
            other = await client.get("/predict/v2/models/mlp")
            assert other.status_code == 404 and "serves 'add'" in other.json()["error"]
            assert (await client.get("/predict/v2/models/add/infer")).status_code == 405
            assert (await client.get("/predict/v2/health/ready")).status_code == 404
            too_big = await client.post("/predict/v2/models/add/infer", content=b"x" * 2048)
            assert too_big.status_code == 413
        assert proxy.count("POST") == 2  # only the two well-formed requests went out

    asyncio.run(main())


def test_the_host_apps_credentials_stay_home(server: ServerProcess, fault_proxy: MakeProxy, spans: Spans) -> None:
    def script(seen: Seen, index: int) -> Forward:
        return Forward(set_headers=(("set-cookie", "model=1"),))

    proxy = fault_proxy(server.url, script)
    model = AsyncRemoteModel(proxy.url, model="add", headers={"Authorization": "Bearer service-token"},
                             tracer_provider=spans.provider)
    app, _, _ = host_app(model, forward_headers=["X-Request-Id"])
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    body, headers = encode_request({"a": A, "b": B})

    async def main() -> None:
        async with asgi_lifespan(app), client_for(app) as client:
            response = await client.post(
                "/predict/v2/models/add/infer", content=body,
                headers={**headers, "Authorization": "Bearer user-token", "Cookie": "session=user-secret",
                         "X-Request-Id": "r-1", "X-Other": "no", "traceparent": incoming, "baggage": "tenant=acme"},
            )
            assert response.status_code == 200
            assert "set-cookie" not in response.headers

    asyncio.run(main())
    sent = proxy.seen("POST")[0].headers
    assert sent["authorization"] == "Bearer service-token"  # the model service's own credentials
    assert "cookie" not in sent and "x-other" not in sent
    assert sent["x-request-id"] == "r-1"
    # The caller's trace continues: same trace id, this hop's attempt span as parent, baggage kept.
    assert sent["traceparent"].split("-")[1] == incoming.split("-")[1]
    (attempt,) = spans.named("POST")
    assert int(sent["traceparent"].split("-")[2], 16) == attempt.context.span_id
    assert sent["baggage"] == "tenant=acme"


def test_reject_mode_answers_503_at_once_and_wakes_in_the_background(activator: Callable[..., Activator]) -> None:
    cold = activator()
    model = AsyncRemoteModel(cold.url, model="add", retry=FAST,
                             cold_start=ColdStartPolicy(deadline=60, probe_interval=0.1, retry_after=3))
    app, _, _ = host_app(model, when_cold="reject", cold_grace=0.2)

    async def main() -> None:
        async with asgi_lifespan(app), client_for(app) as client:
            began = time.monotonic()
            early = await client.post("/predict", json={"a": A.tolist(), "b": B.tolist()})
            assert time.monotonic() - began < 2
            assert early.status_code == 503 and early.headers["retry-after"] == "3"
            assert "starting" in early.json()["error"]
            assert (await client.get("/predict")).json()["state"] == "waking"
            deadline = time.monotonic() + 60
            while (await client.get("/predict")).json()["state"] != "warm":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            later = await client.post("/predict", json={"a": A.tolist(), "b": B.tolist()})
            assert later.status_code == 200

    asyncio.run(main())
    assert cold.proxy.count("GET", "/ready") == 1  # the one background wake-up
    assert cold.proxy.count("POST") == 1  # the rejected request never reached the model


def test_wake_on_start_and_a_hand_made_mount_with_its_lifespan(server: ServerProcess, fault_proxy: MakeProxy) -> None:
    proxy = fault_proxy(server.url)
    route = ModelRoute(AsyncRemoteModel(proxy.url, model="add", cold_start=ColdStartPolicy(wake_on_start=True)))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with route.lifespan():
            yield

    app = Starlette(routes=[Mount("/models/add", app=route)], lifespan=lifespan)

    async def main() -> None:
        async with asgi_lifespan(app):
            await asyncio.sleep(0)
            deadline = time.monotonic() + 10
            while proxy.count("GET", "/ready") == 0:  # woken at start-up, before any request
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            async with client_for(app) as client:
                response = await client.post("/models/add/", json={"a": A.tolist(), "b": B.tolist()})
                assert response.json() == {"sum": (A * B).tolist()}

    asyncio.run(main())
    # One probe at start-up; then the metadata (for the list inputs' datatypes) and the inference.
    assert [seen.path.rsplit("/", 1)[-1] for seen in proxy.requests] == ["ready", "add", "infer"]


def test_without_a_lifespan_the_route_starts_on_its_first_request(server: ServerProcess) -> None:
    model = AsyncRemoteModel(server.url, model="add")
    app = Starlette(routes=[Mount("/m", app=ModelRoute(model))])

    async def main() -> None:
        async with client_for(app) as client:  # no lifespan at all, as Starlette does for mounted apps
            response = await client.post("/m/", json={"a": A.tolist(), "b": B.tolist()})
            assert response.status_code == 200
        await model.aclose()  # what the lifespan would have done

    asyncio.run(main())


def test_fastapi_app_with_a_mounted_model(server: ServerProcess) -> None:
    app = FastAPI()
    model = AsyncRemoteModel(server.url, model="add")

    @app.get("/items/{item}")
    async def item(item: int) -> dict[str, int]:
        return {"item": item}

    @app.post("/score")
    async def score(payload: dict[str, list[list[float]]]) -> dict[str, list[list[float]]]:
        outputs = await model.infer({"a": payload["a"], "b": payload["b"]})
        return {"score": outputs["sum"].tolist()}

    mount_model(app, "/predict", model)

    async def main() -> None:
        async with asgi_lifespan(app), client_for(app) as client:
            assert (await client.get("/items/3")).json() == {"item": 3}
            assert (await client.get("/openapi.json")).status_code == 200
            assert (await client.post("/score", json={"a": A.tolist(), "b": B.tolist()})).json() == {
                "score": (A * B).tolist()}
            assert (await client.post("/predict", json={"a": A.tolist(), "b": B.tolist()})).json() == {
                "sum": (A * B).tolist()}
        assert model._http is None

    asyncio.run(main())


def test_under_uvicorn_a_held_request_whose_client_left_never_reaches_the_model(
    activator: Callable[..., Activator],
) -> None:
    cold = activator()
    model = AsyncRemoteModel(cold.url, model="add", retry=FAST, cold_start=ColdStartPolicy(deadline=60))
    app, _, events = host_app(model)
    body = b'{"a": [[1, 2, 3, 4]], "b": [[1, 1, 1, 1]]}'
    with uvicorn_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as gone:
            gone.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: cold.proxy.count("GET", "/ready") == 1)  # held on the wake-up
        cold.ready.wait(60)
        with RemoteModel(f"{url}/predict", model="add", retry=FAST) as through:
            np.testing.assert_array_equal(through.infer({"a": A, "b": B})["sum"], A * B)
        with httpx.Client(base_url=url) as client:
            assert client.get("/").text == "host app"
            assert client.post("/predict", content=body).json() == {"sum": [[1, 2, 3, 4]]}
    assert events == ["host start", "host stop"]
    # The wake-up went on; the abandoned request was dropped; only the two later calls ran.
    assert cold.proxy.count("POST") == 2


def test_mount_model_checks_its_prefix(server: ServerProcess) -> None:
    for prefix in ("predict", "/", "/predict/"):
        with pytest.raises(ValueError, match="prefix"):
            mount_model(Starlette(), prefix, AsyncRemoteModel(server.url, model="add"))
    with pytest.raises(ValueError, match="when_cold"):
        ModelRoute(AsyncRemoteModel(server.url, model="add"), when_cold="drop")  # type: ignore[arg-type]


def test_a_host_app_served_twice_gets_a_working_client_each_time(server: ServerProcess) -> None:
    """A host app whose lifespan runs twice (tests, reloads) gets a working client each time."""
    model = AsyncRemoteModel(server.url, model="add")
    app, _, _ = host_app(model)

    async def once() -> int:
        async with asgi_lifespan(app), client_for(app) as client:
            return (await client.post("/predict", json={"a": A.tolist(), "b": B.tolist()})).status_code

    assert asyncio.run(once()) == 200
    assert asyncio.run(once()) == 200


@pytest.mark.parametrize(("sent", "forwarded"), [
    ("/predict/v2/models/add/versions/1%23/infer", "/v2/models/add/versions/1%23/infer"),
    ("/predict/v2/models/add/versions/1%3Fx=1/infer", "/v2/models/add/versions/1%3Fx=1/infer"),
    ("/predict/v2/models/add/versions/1/infer?trace=%2F", "/v2/models/add/versions/1/infer?trace=%2F"),
])
def test_the_raw_path_is_forwarded_as_sent(server: ServerProcess, fault_proxy: MakeProxy, sent: str,
                                           forwarded: str) -> None:
    proxy = fault_proxy(server.url)
    app, _, _ = host_app(AsyncRemoteModel(proxy.url, model="add", cold_start=ColdStartPolicy(probe_after_idle=None)))
    body, headers = encode_request({"a": A, "b": B})
    with uvicorn_server(app) as url:
        raw = httpx.URL(url + sent)  # httpx keeps percent-escapes as they are written
        answer = httpx.post(raw, content=body, headers=headers, timeout=30)
    assert [seen.path for seen in proxy.requests] == [forwarded]
    assert answer.status_code == (200 if "%" not in forwarded.split("?")[0] else 404), answer.text
