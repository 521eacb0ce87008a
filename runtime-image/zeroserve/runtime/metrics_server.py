"""``GET /metrics`` on a port of its own (``--metrics_port``) for the gRPC-only server, which has no HTTP
listener to put it on.

A minimal HTTP/1.x responder on asyncio streams, in the server's event loop: one request per connection,
answered and closed; a Prometheus scrape needs no more, and no HTTP framework is imported for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from zeroserve.runtime.metrics import ServerMetrics

logger = logging.getLogger("zeroserve.runtime")

_MAX_HEAD = 16 * 1024  # request line and headers; a scraper sends a few hundred bytes
_READ_TIMEOUT = 10.0
_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsServer:
    """Serves ``metrics.render()`` at ``GET /metrics`` (and ``HEAD``) on ``host:port``."""

    def __init__(self, metrics: ServerMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind and serve; raises OSError when the port cannot be had."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=_MAX_HEAD)
        logger.info("metrics at http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        request_line = head.split(b"\r\n", 1)[0].split()
        method = request_line[0] if request_line else b""
        path = request_line[1].split(b"?", 1)[0] if len(request_line) > 1 else b""
        extra = ""
        if path != b"/metrics":
            status, body = "404 Not Found", b"not found; metrics are at /metrics\n"
            content_type = "text/plain; charset=utf-8"
        elif method not in (b"GET", b"HEAD"):
            status, body, content_type = "405 Method Not Allowed", b"", "text/plain; charset=utf-8"
            extra = "allow: GET, HEAD\r\n"
        else:
            status, body, content_type = "200 OK", self.metrics.render().encode(), _CONTENT_TYPE
        response = (
            f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n{extra}"
            "connection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(ConnectionError):
            writer.write(response if method == b"HEAD" else response + body)
            await writer.drain()
        writer.close()
