"""Mount a remote model in a Starlette or FastAPI app (extra ``starlette``).

    from zeroserve import AsyncRemoteModel
    from zeroserve.starlette import mount_model

    app = Starlette(routes=[...])              # or FastAPI()
    mount_model(app, "/predict", AsyncRemoteModel("https://mlp.default.example.com", model="mlp"))

One call adds the model's routes under the prefix (see ``zeroserve._proxy``) and puts the route's
start-up and shut-down into the host app's lifespan. Starlette never runs a mounted app's lifespan,
so a ``ModelRoute`` placed with ``Mount`` by hand offers ``route.lifespan()`` to compose into the host's
own, and otherwise starts lazily on its first request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

try:
    from starlette.routing import Mount, Route
    from starlette.types import Message, Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - depends on the environment
    if exc.name != "starlette":
        raise
    raise ImportError("zeroserve.starlette needs Starlette: pip install 'zeroserve[starlette]'") from exc

from zeroserve import _proxy
from zeroserve._proxy import Answer, HeaderPolicy, Target
from zeroserve._types import WhenCold
from zeroserve.client import AsyncRemoteModel
from zeroserve.errors import RemoteModelError
from zeroserve.tracing import incoming_context

__all__ = ["ModelRoute", "mount_model"]


class ModelRoute:
    """An ASGI app serving one remote model's routes, for ``Mount(prefix, app=route)``.

    Args:
        model: the remote model; the route closes it when its lifespan ends.
        when_cold: ``"hold"`` keeps a request waiting while the service wakes (up to the cold-start
            deadline); ``"reject"`` answers 503 with ``Retry-After`` once ``cold_grace`` has passed,
            while the wake-up goes on in the background.
        cold_grace: seconds a request may wait for a wake-up in ``"reject"`` mode.
        forward_headers: request headers to forward besides the protocol's own. Cookies and
            ``Authorization`` of the host app are not forwarded unless listed here; credentials for the
            model service belong in the model's ``headers=``/``auth=``.
        max_body_bytes: larger request bodies are answered 413.
    """

    def __init__(
        self,
        model: AsyncRemoteModel,
        *,
        when_cold: WhenCold = "hold",
        cold_grace: float = 0.5,
        forward_headers: Iterable[str] = (),
        max_body_bytes: int = _proxy.MAX_BODY_BYTES,
    ) -> None:
        if when_cold not in ("hold", "reject"):
            raise ValueError(f"when_cold must be 'hold' or 'reject', got {when_cold!r}")
        self.model = model
        self.when_cold = when_cold
        self.cold_grace = cold_grace
        self.headers = HeaderPolicy(forward_headers)
        self.max_body_bytes = max_body_bytes
        self._entered = 0
        self._started = False

    def __repr__(self) -> str:
        return f"ModelRoute({self.model!r}, when_cold={self.when_cold!r})"

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Start (wake the service if ``cold_start.wake_on_start``) and, on exit, close the model client.

        Compose it into the host app's lifespan: ``async with route.lifespan(): yield``.
        """
        self._entered += 1
        try:
            if self._entered == 1:
                await self._start()
            yield
        finally:
            self._entered -= 1
            if self._entered == 0:
                self._started = False
                await self.model.aclose()

    async def _start(self) -> None:
        self._started = True
        if self.model.cold_start.wake_on_start:
            await self.model.wake(background=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # run as an app of its own (not mounted)
            await _serve_lifespan(self, receive, send)
            return
        if scope["type"] != "http":
            return
        await self.handle(scope, receive, send, _relative_path(scope))

    async def handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        """Serve ``path`` (relative to the prefix)."""
        if not self._started:
            await self._start()
        target = _proxy.resolve(scope["method"], path, self.model.model)
        if isinstance(target, Answer):
            await _send_answer(send, target)
            return
        if target.kind == "status":
            await _send_answer(send, _proxy.status_answer(self.model, self.model.waking))
            return
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]]
        body = await _read_body(receive, headers, self.max_body_bytes)
        if isinstance(body, Answer):
            await _send_answer(send, body)
            return
        if body is None:
            return  # the client left
        answer = await _unless_disconnected(receive, self._answer(scope, target, headers, body))
        if answer is not None:
            await _send_answer(send, answer)

    async def _answer(self, scope: Scope, target: Target, headers: list[tuple[str, str]], body: bytes) -> Answer:
        cold_wait = self.cold_grace if self.when_cold == "reject" else None
        context = incoming_context(dict((name.lower(), value) for name, value in headers))
        try:
            if target.kind == "predict":
                inputs = _proxy.predict_inputs(body)
                if isinstance(inputs, Answer):
                    return inputs
                try:
                    outputs = await self.model.infer(inputs, cold_wait=cold_wait, context=context)
                except ValueError as exc:
                    return _proxy.json_answer(400, {"error": str(exc)})
                return _proxy.predict_answer(outputs)
            query = scope.get("query_string", b"").decode("latin-1")
            response = await self.model.request(
                scope["method"], target.path + (f"?{query}" if query else ""), content=body or None,
                headers=self.headers.outgoing(headers), cold_wait=cold_wait, context=context,
            )
        except RemoteModelError as exc:
            return _proxy.error_answer(exc)
        return _proxy.upstream_answer(response)


class _Root:
    """The prefix itself (``/predict``, without a trailing slash), which ``Mount`` does not match."""

    def __init__(self, route: ModelRoute) -> None:
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.route.handle(scope, receive, send, "")


def mount_model(app: Any, prefix: str, model: AsyncRemoteModel, **options: Any) -> ModelRoute:
    """Serve ``model`` under ``prefix`` of a Starlette or FastAPI ``app``; returns the ``ModelRoute``.

    The route's lifespan joins the host app's (wake-up on start if the model's cold-start policy asks,
    client closed on shut-down). ``options`` are ``ModelRoute``'s.
    """
    if not prefix.startswith("/") or prefix == "/" or prefix.endswith("/"):
        raise ValueError(f"prefix must look like '/predict' (a leading slash, none at the end), got {prefix!r}")
    route = ModelRoute(model, **options)
    router = app.router
    router.routes.append(Route(prefix, endpoint=_Root(route), methods=["GET", "POST"]))
    router.routes.append(Mount(prefix, app=route))
    host_lifespan = router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(host: Any) -> AsyncIterator[Any]:
        async with route.lifespan(), host_lifespan(host) as state:
            yield state

    router.lifespan_context = lifespan
    return route


def _relative_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):]
    return path


async def _read_body(receive: Receive, headers: list[tuple[str, str]], limit: int) -> bytes | Answer | None:
    for name, value in headers:
        if name.lower() == "content-length" and value.isdigit() and int(value) > limit:
            return _proxy.too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return _proxy.too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _unless_disconnected(receive: Receive, work: Any) -> Answer | None:
    """Run ``work``; if the client disconnects first, cancel it (a held request whose caller left must
    not reach the model) and return None. A shared wake-up it was waiting on keeps going."""
    task: asyncio.Task[Answer] = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _send_answer(send: Send, answer: Answer) -> None:
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in answer.headers.items()]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


async def _serve_lifespan(route: ModelRoute, receive: Receive, send: Send) -> None:
    message = await receive()
    assert message["type"] == "lifespan.startup"
    async with route.lifespan():
        await send({"type": "lifespan.startup.complete"})
        await receive()
    await send({"type": "lifespan.shutdown.complete"})
