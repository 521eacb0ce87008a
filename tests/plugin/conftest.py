"""Plugin fixtures: a fault-injecting loopback proxy, real OpenTelemetry spans, and real servers for host apps.

``FaultProxy`` is a small HTTP/1.1 server on 127.0.0.1 (asyncio, in a thread). Each request it reads is
recorded, then a script decides what really happens to it: forward it to the upstream model server
(after a delay, or held until an event, as Knative's activator holds requests during a cold start),
answer it (503 ``pending request queue full``, 502, 504 ``activator request timeout``, 429 with
``Retry-After``), or reset the connection after the request was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import conftest as root_conftest
from conftest import ServerProcess

HOLD_LIMIT = 60.0  # no request is held longer than this, whatever a test does


@dataclass
class Seen:
    """One request as the proxy read it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Forward:
    delay: float = 0.0
    set_headers: tuple[tuple[str, str], ...] = ()  # replace (or add) these in the upstream's answer


@dataclass(frozen=True)
class Respond:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Reset:
    """Read the request, then abort the connection (RST): the request was sent, no answer comes."""


@dataclass(frozen=True)
class Hold:
    """Hold the request until ``until`` is set (at most HOLD_LIMIT), then do ``then``."""

    until: threading.Event
    then: Forward | Respond | Reset = Forward()


Action = Forward | Respond | Reset | Hold
Script = Callable[[Seen, int], Action]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


class FaultProxy:
    """A loopback HTTP proxy whose ``script(request, index)`` decides each request's fate."""

    def __init__(self, upstream: str | None, script: Script | None = None) -> None:
        self.upstream = upstream
        self.script: Script = script or (lambda seen, index: Forward())
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="fault-proxy", daemon=True)
        self.port = 0
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, method: str | None = None, suffix: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if (method is None or r.method == method) and r.path.endswith(suffix))

    def seen(self, method: str | None = None, suffix: str = "") -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method) and r.path.endswith(suffix)]

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        connections: set[asyncio.Task[None]] = set()

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            try:
                await self._serve(reader, writer, client)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass
            finally:
                connections.discard(task)
                writer.transport.abort()

        async with httpx.AsyncClient(timeout=HOLD_LIMIT) as client:
            server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
            server.close()
            for task in list(connections):
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            await server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: httpx.AsyncClient
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            seen = Seen(method, path, headers, body)
            with self._lock:
                index = len(self.requests)
                self.requests.append(seen)
            action = self.script(seen, index)
            if isinstance(action, Hold):
                deadline = time.monotonic() + HOLD_LIMIT
                while not action.until.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                action = action.then
            if isinstance(action, Reset):
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            if isinstance(action, Respond):
                status, payload, extra = action.status, action.body, list(action.headers)
            else:
                if action.delay:
                    await asyncio.sleep(action.delay)
                if self.upstream is None:
                    status, payload, extra = 502, b"no upstream", []
                else:
                    try:
                        response = await client.request(
                            method, self.upstream + path, content=body,
                            headers={k: v for k, v in headers.items() if k not in _HOP},
                        )
                    except httpx.TransportError as exc:  # what Knative's proxy says when the pod is gone
                        status, payload, extra = 502, f"upstream failed: {exc}".encode(), []
                    else:
                        status, payload = response.status_code, response.content
                        replaced = {name for name, _ in action.set_headers} | _HOP
                        extra = [(k, v) for k, v in response.headers.items() if k not in replaced]
                        extra += action.set_headers
            out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}".encode()]
            out += [f"{k}: {v}".encode("latin-1") for k, v in extra]
            out.append(f"content-length: {len(payload)}".encode())
            writer.write(b"\r\n".join(out) + b"\r\n\r\n" + payload)
            await writer.drain()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Factory: ``fault_proxy(upstream_url, script)``; every proxy made is closed after the test."""
    made: list[FaultProxy] = []

    def make(upstream: str | None, script: Script | None = None) -> FaultProxy:
        proxy = FaultProxy(upstream, script)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


@dataclass
class Spans:
    provider: TracerProvider
    exporter: InMemorySpanExporter

    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [span for span in self.finished() if span.name.startswith(prefix)]


@pytest.fixture
def spans() -> Iterator[Spans]:
    """A real SDK tracer provider exporting to memory (passed to clients, not installed globally)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Spans(provider, exporter)
    provider.shutdown()


def start_server_on(port: int, args: list[str], log_path: Path, monkeypatch: pytest.MonkeyPatch,
                    **options: Any) -> ServerProcess:
    """``conftest.start_server`` on a chosen port (to restart a server where its clients expect it)."""
    with monkeypatch.context() as patch:
        patch.setattr(root_conftest, "unused_port", lambda: port)
        return root_conftest.start_server(args, log_path, **options)


@contextlib.asynccontextmanager
async def asgi_lifespan(app: Any) -> AsyncIterator[None]:
    """Run an ASGI app's lifespan the way a server does (httpx.ASGITransport does not)."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                     inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    message = await asyncio.wait_for(outbox.get(), 30)
    assert message["type"] == "lifespan.startup.complete", message
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        message = await asyncio.wait_for(outbox.get(), 30)
        assert message["type"] == "lifespan.shutdown.complete", message
        await asyncio.wait_for(task, 30)


@contextlib.contextmanager
def uvicorn_server(app: Any) -> Iterator[str]:
    """The app under a real uvicorn on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=root_conftest.unused_port(), log_level="warning",
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def waitress_server(app: Any) -> Iterator[str]:
    """The WSGI app under a real waitress server on a free loopback port, in a thread; yields its URL."""
    import waitress.server
    from waitress import wasyncore

    server = waitress.server.create_server(app, host="127.0.0.1", port=0, threads=8)
    thread = threading.Thread(target=server.run, name="waitress", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"  # type: ignore[union-attr]
    finally:
        # Close every socket from inside waitress's own loop (its trigger runs the function there), so the
        # loop finds its map empty and returns: no socket is closed under a running select().
        sockets = server._map  # type: ignore[union-attr]
        server.trigger.pull_trigger(lambda: wasyncore.close_all(sockets))  # type: ignore[union-attr]
        thread.join(30)
        server.task_dispatcher.shutdown()


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@dataclass
class DevFront:
    """``zeroserve dev`` (the local scale-to-zero front) as a process: Knative's activator in miniature."""

    process: Any
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def dev_front(tmp_path: Path) -> Iterator[Callable[..., DevFront]]:
    """Factory: ``dev_front(*args)`` starts ``python -m zeroserve.activator`` on a free port."""
    import os
    import signal
    import subprocess
    import sys

    fronts: list[DevFront] = []

    def make(*args: str) -> DevFront:
        port = root_conftest.unused_port()
        log_path = tmp_path / f"front{len(fronts)}.log"
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "zeroserve.activator", "--port", str(port), *args],
                stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(),
            )
        front = DevFront(process, port, log_path)
        fronts.append(front)

        def listening() -> bool:  # a TCP connect, not a request: a request would start a server process
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                assert process.poll() is None, front.log()
                return False

        wait_until(lambda: "holding http" in front.log() and listening())
        return front

    yield make
    for front in fronts:
        if front.process.poll() is None:
            front.process.send_signal(signal.SIGTERM)
            try:
                front.process.wait(30)
            except subprocess.TimeoutExpired:
                front.process.kill()
                front.process.wait(10)


class Activator:
    """Scale from zero, as Knative's activator does it: the first request starts the model server process,
    and every request is held until the server is ready, then forwarded. ``proxy`` counts what arrived."""

    def __init__(self, make_proxy: Callable[..., FaultProxy], args: list[str], log_path: Path,
                 then: Callable[[Seen], Forward | Respond | Reset] | None = None) -> None:
        self.args = args
        self.then = then or (lambda seen: Forward())
        self.log_path = log_path
        self.ready = threading.Event()
        self.server: ServerProcess | None = None
        self.failure: BaseException | None = None
        self._started = threading.Lock()
        self._thread: threading.Thread | None = None
        self.proxy = make_proxy(None, self._script)

    @property
    def url(self) -> str:
        return self.proxy.url

    def _script(self, seen: Seen, index: int) -> Action:
        if self._started.acquire(blocking=False):
            self._thread = threading.Thread(target=self._scale_up, name="activator", daemon=True)
            self._thread.start()
        return Hold(self.ready, self.then(seen))

    def _scale_up(self) -> None:
        try:
            self.server = root_conftest.start_server(self.args, self.log_path)
            self.proxy.upstream = self.server.url
        except BaseException as exc:  # the test sees it through .failure and 502s
            self.failure = exc
        finally:
            self.ready.set()

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.join(60)
        if self.server is not None:
            self.server.stop()


@pytest.fixture(scope="session")
def add_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-model repository that starts fast: ``add`` version 1 (a + b) and version 2 (a * b), as in
    the session's ``model_repository``."""
    import models as test_models

    root = tmp_path_factory.mktemp("add-repository")
    test_models.add_model(root / "add" / "1" / "model.onnx", "Add")
    test_models.add_model(root / "add" / "2" / "model.onnx", "Mul")
    return root


@pytest.fixture
def activator(fault_proxy: Callable[..., FaultProxy], add_repository: Path,
              tmp_path: Path) -> Iterator[Callable[..., Activator]]:
    """Factory for a cold model service (``add_repository``) behind an activator-like proxy;
    ``activator(then=...)`` picks what happens to each request once the server is up."""
    made: list[Activator] = []

    def make(then: Callable[[Seen], Forward | Respond | Reset] | None = None) -> Activator:
        made.append(Activator(fault_proxy, ["--model_dir", str(add_repository)], tmp_path / f"cold{len(made)}.log",
                              then))
        return made[-1]

    yield make
    for item in made:
        item.stop()
