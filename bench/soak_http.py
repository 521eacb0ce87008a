"""Raw HTTP/1.1 for the soak (``soak.py``): requests written byte for byte on a socket, so that malformed and
lying ones can be sent at all, with the two moments that decide whether a request was accepted before a SIGTERM
(connection established, request fully sent) and what came back (an answer, or why none).

No client library here: httpx and http.client refuse to send most of the malformed requests, retry on their own,
and do not say when the last byte left.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

HOST = "127.0.0.1"
HEAD_LIMIT = 256 * 1024  # an answer's head larger than this is not HTTP from our server
BODY_LIMIT = 64 * 2**20
READ_CHUNK = 65536

# Why a request got no answer: the words the soak's report counts by.
REFUSED = "refused"  # the connection was not established
RESET = "reset"  # the server reset the connection (ECONNRESET, EPIPE)
CLOSED = "closed"  # the server closed the connection without answering
TIMEOUT = "timeout"  # no answer within the client's deadline
NO_ANSWER = frozenset({REFUSED, RESET, CLOSED, TIMEOUT})


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


@dataclass(slots=True)
class Exchange:
    """One request on the wire: monotonic times of connection and last byte sent, and its answer or why none."""

    connected_at: float | None = None
    sent_at: float | None = None
    answer: Answer | None = None
    failure: str | None = None  # one of NO_ANSWER, or "error <exception name>"


def failure_of(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return RESET
    if isinstance(exc, TimeoutError):
        return TIMEOUT
    if isinstance(exc, EOFError):
        return CLOSED
    return f"error {type(exc).__name__}"


def connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    return sock.recv(READ_CHUNK)


def _read_exactly(sock: socket.socket, buffer: bytearray, size: int, deadline: float) -> bytes:
    while len(buffer) < size:
        chunk = _recv(sock, deadline)
        if not chunk:
            raise EOFError("closed in the middle of an answer")
        buffer += chunk
    data = bytes(buffer[:size])
    del buffer[:size]
    return data


def _read_line(sock: socket.socket, buffer: bytearray, deadline: float) -> bytes:
    while b"\r\n" not in buffer:
        if len(buffer) > HEAD_LIMIT:
            raise ValueError("an answer line over the head limit")
        chunk = _recv(sock, deadline)
        if not chunk:
            raise EOFError("closed in the middle of an answer")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\r\n")
    buffer[:] = rest
    return line


def _read_chunked(sock: socket.socket, buffer: bytearray, deadline: float) -> bytes:
    body = bytearray()
    while len(body) <= BODY_LIMIT:
        size = int(_read_line(sock, buffer, deadline).split(b";")[0], 16)
        if size == 0:
            while _read_line(sock, buffer, deadline):  # trailers, up to the empty line
                pass
            return bytes(body)
        body += _read_exactly(sock, buffer, size + 2, deadline)[:size]
    raise ValueError("a chunked answer over the body limit")


def read_answer(sock: socket.socket, timeout: float) -> Answer | None:
    """The next answer on ``sock``; None when the server closed the connection before its first byte.

    Raises ``EOFError`` when it closed in the middle of one, ``OSError`` (``TimeoutError`` past ``timeout``)."""
    deadline = time.monotonic() + timeout
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > HEAD_LIMIT:
            raise ValueError("an answer head over the head limit")
        chunk = _recv(sock, deadline)
        if not chunk:
            if buffer:
                raise EOFError("closed in the middle of an answer's head")
            return None
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    buffer[:] = rest
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _read_chunked(sock, buffer, deadline)
    elif "content-length" in headers:
        body = _read_exactly(sock, buffer, int(headers["content-length"]), deadline)
    else:
        while len(buffer) <= BODY_LIMIT and (chunk := _recv(sock, deadline)):
            buffer += chunk
        body = bytes(buffer)
    return Answer(status, headers, body)


def send(sock: socket.socket, data: bytes, pieces: int = 1, gap_s: float = 0.0) -> None:
    """Send ``data``, in ``pieces`` writes ``gap_s`` apart (a slow client) when asked."""
    step = max(1, -(-len(data) // pieces))
    for offset in range(0, len(data), step):
        if offset and gap_s:
            time.sleep(gap_s)
        sock.sendall(data[offset : offset + step])


def _answer_after_send(sock: socket.socket, exchange: Exchange, timeout: float, send_error: OSError | None) -> None:
    """Read the answer; when sending failed, the server may still have answered first (431, 413): read it."""
    try:
        answer = read_answer(sock, timeout)
    except (OSError, EOFError, ValueError) as exc:
        exchange.failure = failure_of(send_error or exc)
        return
    if answer is None:
        exchange.failure = failure_of(send_error) if send_error is not None else CLOSED
    else:
        exchange.answer = answer


def one_shot(
    port: int,
    data: bytes,
    timeout: float = 30.0,
    *,
    pieces: int = 1,
    gap_s: float = 0.0,
    half_close: bool = False,
    on_sent: Callable[[], None] | None = None,
) -> Exchange:
    """One request on a fresh connection (sent in ``pieces``; ``half_close``: then shut the sending side;
    ``on_sent`` is called once its last byte is out)."""
    exchange = Exchange()
    try:
        sock = connect(port, timeout)
    except OSError as exc:
        exchange.failure = failure_of(exc)
        return exchange
    with sock:
        exchange.connected_at = time.monotonic()
        send_error: OSError | None = None
        try:
            send(sock, data, pieces, gap_s)
            exchange.sent_at = time.monotonic()
            if on_sent is not None:
                on_sent()
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            send_error = exc
        _answer_after_send(sock, exchange, timeout, send_error)
    return exchange


class KeepAlive:
    """One persistent connection, reopened when the server closed it (as a pooling client does)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._connected_at: float | None = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _stale(self) -> bool:
        """Readable while idle: the server closed it (or wrote something unasked); a pool would not reuse it."""
        assert self._sock is not None
        readable, _, _ = select.select([self._sock], [], [], 0)
        return bool(readable)

    def request(self, data: bytes) -> Exchange:
        exchange = Exchange()
        if self._sock is not None and self._stale():
            self.close()
        if self._sock is None:
            try:
                self._sock = connect(self.port, self.timeout)
            except OSError as exc:
                exchange.failure = failure_of(exc)
                return exchange
            self._connected_at = time.monotonic()
        exchange.connected_at = self._connected_at
        send_error: OSError | None = None
        try:
            self._sock.sendall(data)
            exchange.sent_at = time.monotonic()
        except OSError as exc:
            send_error = exc
        _answer_after_send(self._sock, exchange, self.timeout, send_error)
        if exchange.answer is None or exchange.answer.closes:
            self.close()
        return exchange


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """A well-formed HTTP/1.1 request with Content-Length (unless ``headers`` sets its own framing)."""
    fields = {"Host": HOST, **(headers or {})}
    if not any(name.lower() in ("content-length", "transfer-encoding") for name in fields) and (
        body or method in ("POST", "PUT")
    ):
        fields["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return head.encode("latin-1") + b"\r\n" + body
