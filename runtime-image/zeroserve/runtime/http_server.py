"""uvicorn's HTTP/1.1 protocol (httptools) with the bounds a server facing the public needs, as nginx has them:

- a request head (request line and headers) of at most ``max_head_bytes``, a request target of at most
  ``max_target_bytes`` and a header line of at most ``max_header_line_bytes``: past them the request is answered
  431 (414 for the target) and the connection closed. The parser is never fed more than a bound past the limit,
  so a huge header costs the event loop no more than a small one would;
- a request head must be complete within ``head_timeout`` seconds of its first byte, or of the connection's
  opening: a connection that never sends a request, or sends one a byte at a time, is closed;
- at most ``max_connections`` connections: past it, the connection idle longest is closed to make room, and when
  none is idle the new one is answered 503 and closed. The file descriptors a process may open are finite, and
  once they run out every request fails, however valid.

uvicorn's own keep-alive timeout (``--timeout_keep_alive``) still closes a connection idle between requests.

On a stop, ``take_in_arrived`` runs before uvicorn closes its listener and its idle connections: the requests that
arrived in full before the stop are served, not reset, even when a busy event loop had not read them yet.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_REASONS: Final = {414: "URI Too Long", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_head_bytes: int = 64 * 1024
    max_target_bytes: int = 8 * 1024
    max_header_line_bytes: int = 8 * 1024
    head_timeout: float = 65.0
    max_connections: int = 1024


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration, carrying the connection limits to each protocol instance (pickled with it into
    the processes of ``--workers N``)."""

    def __init__(self, app: Any, *, connection_limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, http=GuardedHttpProtocol, **kwargs)
        self.connection_limits = connection_limits


class _Head:
    """A connection's bounds and where its request head stands."""

    __slots__ = ("limits", "reading", "bytes", "read_bytes", "refused", "timer", "deadline")

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.reading = False  # a head has begun and is not complete yet
        self.bytes = 0  # of the head being read, in the reads before this one
        self.read_bytes = 0  # this read's
        self.refused = False
        self.timer: asyncio.TimerHandle | None = None
        # loop.time() by which the head being read must be complete; between requests, its value from the last
        # head begun (or the connection's opening), which ranks idle connections by how long they have been idle
        self.deadline = 0.0


class GuardedHttpProtocol(HttpToolsProtocol):
    """The bounds cost a request as little as they can: a head's clock starts with the read that brings its first
    bytes, its size is counted only while it spans several reads, and the target and header lines are measured
    once the head is complete (a head that fits in a header line's bound cannot hold a line past it, so a common
    request's lines are never looked at).

    The bounds' state is one slotted object (``head``) beside uvicorn's own attributes, rather than seven more of
    them: CPython 3.11 keeps an instance dictionary compact, and its attribute reads fast, up to 30 keys, and
    uvicorn's protocol already has 28."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.head = _Head(getattr(config, "connection_limits", ConnectionLimits()))
        self.url = b""  # uvicorn sets it when a message begins; a read may end before one has (a stray CRLF)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        crowded = len(self.connections) >= self.head.limits.max_connections
        super().connection_made(transport)
        if crowded and not self._make_room():
            self._refuse(503, f"the server is at its limit of {self.head.limits.max_connections} connections")
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        head = self.head
        if head.refused:
            return
        if not head.reading and (self.cycle is None or self.cycle.response_complete):
            # No request in progress: these are the first bytes of a head, whose clock starts now.
            head.reading = True
            head.bytes = 0
            head.deadline = self.loop.time() + head.limits.head_timeout
            if head.timer is None:
                head.timer = self.loop.call_at(head.deadline, self._head_timed_out)
        reading = head.reading
        head.read_bytes = len(data)
        super().data_received(data)
        if reading and head.reading and not head.refused and not self.transport.is_closing():
            # The head goes on past this read: bounded now, not once it is complete (it might never be).
            head.bytes += len(data)
            if head.bytes > head.limits.max_head_bytes:
                self._refuse(431, f"the request's headers are over {head.limits.max_head_bytes} bytes")
            elif len(self.url) > head.limits.max_target_bytes:
                self._refuse_target()

    # Parser callbacks

    def on_headers_complete(self) -> None:
        head = self.head
        head.reading = False  # the timer stays: cancelling and arming one per request costs more than a check
        limits = head.limits
        if len(self.url) > limits.max_target_bytes:
            self._refuse_target()
            return
        if head.bytes + head.read_bytes > limits.max_header_line_bytes:
            for name, value in self.headers:
                if len(name) + len(value) > limits.max_header_line_bytes:
                    self._refuse(431, f"a header line is over {limits.max_header_line_bytes} bytes ({name[:64]!r}...)")
                    return
        super().on_headers_complete()

    # The bounds

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        head = self.head
        head.deadline = self.loop.time() + head.limits.head_timeout
        head.timer = self.loop.call_at(head.deadline, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head.timer is not None:
            self.head.timer.cancel()
            self.head.timer = None

    def _head_timed_out(self) -> None:
        head = self.head
        head.timer = None
        if self.transport.is_closing() or not (head.reading or self.cycle is None):
            # In a request, or idle between requests, which uvicorn's keep-alive timeout closes: the next head
            # arms this timer again.
            return
        if self.loop.time() < head.deadline:  # a later head than the one the timer was armed for
            head.timer = self.loop.call_at(head.deadline, self._head_timed_out)
            return
        # A connection that never sent a request, or a head too slow to arrive: closed without an answer.
        self.transport.close()

    def _make_room(self) -> bool:
        """Close the connection idle longest (no request in progress, no head begun); False when none is idle."""
        idle = [
            protocol for protocol in self.connections
            if protocol is not self and isinstance(protocol, GuardedHttpProtocol) and protocol._idle()
        ]  # fmt: skip
        if not idle:
            return False
        oldest = min(idle, key=lambda protocol: protocol.head.deadline)
        oldest.transport.close()
        self.connections.discard(oldest)
        return True

    def _idle(self) -> bool:
        cycle = self.cycle
        return (
            not self.head.reading and (cycle is None or cycle.response_complete) and not self.transport.is_closing()
        )

    def _refuse_target(self) -> None:
        self._refuse(414, f"the request target is over {self.head.limits.max_target_bytes} bytes")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a V2 error body and close the connection; the parser reads no more, and uvicorn's
        body callbacks for the rest of this read find a finished request (``_Refused``)."""
        self.head.refused = True
        self._cancel_head_timer()
        if self.cycle is not None and not self.cycle.response_complete:  # a request before it loses its answer
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.cycle = _Refused()  # type: ignore[assignment]
        body = b'{"error":"' + message.replace("\\", "\\\\").replace('"', '\\"').encode("ascii", "replace") + b'"}'
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode("ascii")
        if not self.transport.is_closing():
            self.transport.write(head + body)
            self.transport.close()
        self.logger.warning("refused a connection's request: %d %s", status, message)


class _Refused:
    """Stands in for uvicorn's request cycle once a request is refused: answered already, so uvicorn's callbacks
    (the body's, the connection's end) leave it alone."""

    response_complete = True
    disconnected = True

    def __init__(self) -> None:
        self.message_event = asyncio.Event()


async def take_in_arrived(turns: int = 8) -> None:
    """Turn the event loop a few times: connections waiting in the listen backlog are accepted, and the requests
    already in their buffers read and started, before a stop closes what it finds idle.

    A connection takes four turns from the backlog to a running request (accept, connection_made, read, the
    request's task); a busy loop may have let many pile up, and each turn takes them all in at once."""
    for _ in range(turns):
        await asyncio.sleep(0)

