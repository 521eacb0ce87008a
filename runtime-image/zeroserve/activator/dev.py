"""Scale to zero on one machine, no cluster: Knative's activator and autoscaler in miniature.

``zeroserve dev --model_dir m.onnx`` holds the port. The first request starts a model server
process and is held (bounded queue) until the server is ready, then forwarded; more processes start
while every running one is at its concurrency limit; a process idle for ``--idle_timeout`` seconds
gets SIGTERM. Where it matters it answers as Knative does: requests wait through a cold start, a
full queue answers 503 ``pending request queue full``, a request not answered in time answers 504
``activator request timeout``. Each response says how long it waited for a process in
``Server-Timing: activator;dur=<ms>``.

Arguments it does not know are passed to every server process (``--model_name``, ``--providers``...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

logger = logging.getLogger("zeroserve.dev")

_HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization te trailers transfer-encoding upgrade host "
    b"content-length".split()
)


@dataclass(frozen=True, slots=True)
class ScaleSettings:
    idle_timeout: float = 30.0  # seconds without requests before a process is stopped
    max_concurrency: int = 8  # in-flight requests per process (Knative's containerConcurrency)
    max_processes: int = 1  # Knative's max-scale
    queue_depth: int = 100  # requests held while no process has room
    request_timeout: float = 300.0  # Knative's default timeoutSeconds
    start_timeout: float = 600.0  # a process not ready by then is killed (Knative's progress deadline)


class QueueFull(Exception):
    pass


class StartFailed(Exception):
    pass


@dataclass(eq=False)
class Backend:
    process: subprocess.Popen[bytes]
    url: str
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)


class Scaler:
    """Starts, tracks and stops server processes; hands out capacity to requests."""

    def __init__(self, server_args: Sequence[str], settings: ScaleSettings) -> None:
        self.server_args = list(server_args)
        self.settings = settings
        self.backends: list[Backend] = []
        self.waiting = 0
        self.cold_starts = 0
        self.start_failure: str | None = None  # why the last start failed; fails the requests waiting on it
        self._changed = asyncio.Condition()
        self._starting = False

    @contextlib.asynccontextmanager
    async def capacity(self) -> AsyncIterator[Backend]:
        backend = await self._acquire()
        try:
            yield backend
        finally:
            backend.in_flight -= 1
            backend.last_used = time.monotonic()
            async with self._changed:
                self._changed.notify_all()

    async def _acquire(self) -> Backend:
        if self.waiting >= self.settings.queue_depth:
            raise QueueFull
        self.waiting += 1
        try:
            async with self._changed:
                while True:
                    for backend in self.backends:
                        if backend.ready and backend.in_flight < self.settings.max_concurrency:
                            backend.in_flight += 1
                            return backend
                    if not self._starting and len(self.backends) < self.settings.max_processes:
                        self._starting = True
                        asyncio.get_running_loop().create_task(self._start())
                    await self._changed.wait()
                    if self.start_failure is not None and not self.backends:
                        raise StartFailed(self.start_failure)
        finally:
            self.waiting -= 1

    async def _start(self) -> None:
        port = _free_port()
        command = [sys.executable, "-m", "zeroserve.runtime", "--host", "127.0.0.1", "--http_port", str(port),
                   *self.server_args]
        backend = Backend(subprocess.Popen(command), f"http://127.0.0.1:{port}")
        self.start_failure = None
        self.backends.append(backend)
        self.cold_starts += 1
        logger.info("cold start: server process %d starting on port %d", backend.process.pid, port)
        try:
            await self._wait_ready(backend)
        except StartFailed as exc:
            if backend not in self.backends:  # stop_all() took it during shutdown: not a failure
                return
            self.backends.remove(backend)
            self.start_failure = str(exc)
            logger.error("%s", exc)
        else:
            backend.ready = True
            logger.info("server process %d ready after %.2f s", backend.process.pid,
                        time.monotonic() - backend.started)
        finally:
            self._starting = False
            async with self._changed:
                self._changed.notify_all()

    async def _wait_ready(self, backend: Backend) -> None:
        deadline = backend.started + self.settings.start_timeout
        async with httpx.AsyncClient(timeout=0.5) as client:
            while True:
                code = backend.process.poll()
                if code is not None:
                    raise StartFailed(f"server process {backend.process.pid} exited with status {code} during start")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{backend.url}/v2/health/ready")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    _stop(backend.process, grace=5)
                    raise StartFailed(f"server process {backend.process.pid} not ready after "
                                      f"{self.settings.start_timeout:.0f} s")
                await asyncio.sleep(0.05)  # Knative's aggressive readiness probing interval

    async def reap(self) -> None:
        """Stop processes idle for longer than the idle timeout, and forget ones that died."""
        while True:
            await asyncio.sleep(min(0.25, self.settings.idle_timeout / 4))
            now = time.monotonic()
            for backend in list(self.backends):
                died = backend.process.poll() is not None and backend.ready
                idle = backend.ready and backend.in_flight == 0 and now - backend.last_used > self.settings.idle_timeout
                if died or idle:
                    self.backends.remove(backend)
                    if idle:
                        logger.info("scale down: server process %d idle for %.1f s, stopping it",
                                    backend.process.pid, now - backend.last_used)
                        await asyncio.to_thread(_stop, backend.process, 30.0)
                    else:
                        logger.warning("server process %d exited with status %s", backend.process.pid,
                                       backend.process.returncode)
                    if not self.backends:
                        logger.info("scaled to zero")

    def stop_all(self) -> None:
        for backend in self.backends:
            _stop(backend.process, grace=30)
        self.backends.clear()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stop(process: subprocess.Popen[bytes], grace: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Activator:
    """The ASGI app holding the port (the activator): every request goes through a scaler-managed server process."""

    def __init__(self, scaler: Scaler) -> None:
        self.scaler = scaler
        self._client: httpx.AsyncClient | None = None
        self._reaper: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:  # type: ignore[type-arg]
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._proxy(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._client = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_keepalive_connections=64))
                self._reaper = asyncio.get_running_loop().create_task(self.scaler.reap())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._reaper is not None:
                    self._reaper.cancel()
                await asyncio.to_thread(self.scaler.stop_all)
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _proxy(self, scope: dict, receive: Any, send: Any) -> None:  # type: ignore[type-arg]
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        arrived = time.monotonic()
        waited: list[float] = []

        async def forward() -> httpx.Response:
            async with self.scaler.capacity() as backend:
                waited.append(time.monotonic() - arrived)
                assert self._client is not None
                path = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
                query = scope.get("query_string", b"").decode("latin-1")
                return await self._client.request(
                    scope["method"],
                    backend.url + path + (f"?{query}" if query else ""),
                    headers=[(k, v) for k, v in scope["headers"] if k not in _HOP_BY_HOP],
                    content=b"".join(chunks),
                )

        try:
            response = await asyncio.wait_for(forward(), self.scaler.settings.request_timeout)
        except QueueFull:
            await _answer(send, 503, b"pending request queue full")
            return
        except asyncio.TimeoutError:
            await _answer(send, 504, b"activator request timeout")
            return
        except (StartFailed, httpx.TransportError) as exc:
            await _answer(send, 502, f"model server unavailable: {exc}".encode())
            return
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.multi_items()
                   if k.encode("latin-1") not in _HOP_BY_HOP and k.lower() != "content-encoding"]
        headers.append((b"server-timing", f"activator;dur={waited[0] * 1000:.1f}".encode()))
        headers.append((b"content-length", str(len(response.content)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": response.content})


async def _answer(send: Any, status: int, text: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(text)).encode())]})
    await send({"type": "http.response.body", "body": text})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zeroserve dev",
        description="Serve a model with scale to zero on this machine: a server process starts on the first "
        "request and stops when idle. Other arguments (--model_dir, --model_name, ...) go to the server.",
    )
    defaults = ScaleSettings()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="port to hold (env PORT; default 8080)")
    parser.add_argument("--idle_timeout", type=float, default=defaults.idle_timeout,
                        help="seconds without requests before a server process stops (default 30)")
    parser.add_argument("--max_concurrency", type=int, default=defaults.max_concurrency,
                        help="in-flight requests per server process (default 8)")
    parser.add_argument("--max_processes", type=int, default=defaults.max_processes,
                        help="server processes at most (default 1)")
    parser.add_argument("--queue_depth", type=int, default=defaults.queue_depth,
                        help="requests held while no process has room; more get 503 (default 100)")
    parser.add_argument("--request_timeout", type=float, default=defaults.request_timeout,
                        help="seconds a request may take, cold start included; then 504 (default 300)")
    parser.add_argument("--start_timeout", type=float, default=defaults.start_timeout,
                        help="seconds a server process may take to become ready (default 600)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = build_parser()
    ns, server_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    settings = ScaleSettings(
        idle_timeout=ns.idle_timeout, max_concurrency=ns.max_concurrency, max_processes=ns.max_processes,
        queue_depth=ns.queue_depth, request_timeout=ns.request_timeout, start_timeout=ns.start_timeout,
    )
    for name in ("idle_timeout", "max_concurrency", "max_processes", "request_timeout", "start_timeout"):
        if getattr(settings, name) <= 0:
            parser.error(f"--{name} must be positive")
    if settings.queue_depth < 0:
        parser.error("--queue_depth must be zero or more")
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness probe otherwise
    port = ns.port if ns.port is not None else int(os.environ.get("PORT", "8080"))
    activator = Activator(Scaler(server_args, settings))
    logger.info("holding http://%s:%d; the model server starts on the first request", ns.host, port)
    uvicorn.run(activator, host=ns.host, port=port, log_config=None, access_log=False, lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
