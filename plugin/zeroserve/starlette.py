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
from urllib.parse import quote, unquote

try:
    from starlette.routing import Mount, Route
    from starlette.types import Message, Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - depends on the environment
    if exc.name != "starlette":
        raise
    raise ImportError("zeroserve.starlette needs Starlette: pip install 'zeroserve[starlette]'") from exc

from zeroserve import _proxy
from zeroserve._proxy import Answer, Forwarding, HeaderPolicy, ModelCall
from zeroserve._types import WhenCold
from zeroserve.client import AsyncRemoteModel
from zeroserve.errors import RemoteModelError

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
        self.forwarding = Forwarding(when_cold=when_cold, cold_grace=cold_grace, forward_headers=forward_headers,
                                     max_body_bytes=max_body_bytes)
        self.model = model
        self._entered = 0
        self._started = False

    def __repr__(self) -> str:
        return f"ModelRoute({self.model!r}, when_cold={self.when_cold!r})"

    @property
    def when_cold(self) -> WhenCold:
        """``"hold"`` or ``"reject"``."""
        return self.forwarding.when_cold

    @property
    def cold_grace(self) -> float:
        """Seconds a request may wait for a wake-up in ``"reject"`` mode."""
        return self.forwarding.cold_grace

    @property
    def headers(self) -> HeaderPolicy:
        """Which request headers go on to the model service."""
        return self.forwarding.headers

    @property
    def max_body_bytes(self) -> int:
        """Larger request bodies are answered 413."""
        return self.forwarding.max_body_bytes

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
        body = await _read_body(receive, headers, self.forwarding)
        if isinstance(body, Answer):
            await _send_answer(send, body)
            return
        if body is None:
            return  # the client left
        query = scope.get("query_string", b"").decode("latin-1")
        call = self.forwarding.call(target, scope["method"], query, headers, body)
        if isinstance(call, Answer):
            await _send_answer(send, call)
            return
        answer = await _unless_disconnected(receive, self._answer(call))
        if answer is not None:
            await _send_answer(send, answer)

    async def _answer(self, call: ModelCall) -> Answer:
        try:
            if call.inputs is not None:
                result: Any = await self.model.infer(call.inputs, cold_wait=call.cold_wait, context=call.context)
            else:
                result = await self.model.request(call.method, call.path, content=call.content, headers=call.headers,
                                                  cold_wait=call.cold_wait, context=call.context)
        except (RemoteModelError, ValueError) as exc:
            return call.failed(exc)
        return call.answer(result)


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
    _proxy.check_prefix(prefix)
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
    """The path below the prefix as the client sent it: percent-escapes kept, so ``versions/1%23`` stays one
    segment and ``%3F`` no query (``scope["path"]`` is decoded; ``raw_path`` is not)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    relative = path[len(root):] if root and path.startswith(root) else path
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and len(raw) <= _MAX_RAW_PATH:
        text = raw.decode("latin-1").split("?", 1)[0]
        for start, char in enumerate(text):  # the raw tail that decodes to the relative path
            if char == "/" and unquote(text[start:]) == relative:
                return text[start:]
    return quote(relative, safe="/:@!$&'()*+,;=~")  # no raw path from the server: escape what decoding undid


_MAX_RAW_PATH = 8192


async def _read_body(receive: Receive, headers: list[tuple[str, str]],
                     forwarding: Forwarding) -> bytes | Answer | None:
    for name, value in headers:
        if name.lower() == "content-length" and value.isdigit():
            refused = forwarding.too_large(int(value))
            if refused is not None:
                return refused
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        refused = forwarding.too_large(size)
        if refused is not None:
            return refused
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
