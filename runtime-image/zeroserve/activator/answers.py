"""The answers the activator gives itself, when it does not forward a request: status, headers, V2 error body.

Every body is the V2 error shape ``{"error": "..."}``; an answer about a start adds ``start`` (the contract in
``zeroserve.protocol.start``) and the ``Zeroserve-Start`` header. Knative's wording is kept where Knative has
an answer (``pending request queue full``, ``activator request timeout``), so clients written for Knative
classify them the same way.

=========================================  ======  ==========================  ================================
situation                                   status  headers                     delivered to a server process?
=========================================  ======  ==========================  ================================
the last start failed (and during backoff)  503     Zeroserve-Start: failed,    no
                                                    Retry-After
held longer than it asked (readiness probe  503     Zeroserve-Start: loading,   no
after ``--probe_hold``, ``Prefer: wait``)           Retry-After: 1
the queue of held requests is full          503     -                           no
request timeout while held for a start      504     Zeroserve-Start: loading    no
request timeout after forwarding            504     -                           yes: it may have run
could not connect to any process            503     Retry-After: 1              no
connection lost after sending               502     -                           yes: it may have run
target not origin-form (``/path``)          400     -                           no
body over ``--max_request_mib``             413     -                           no
shutting down                               503     -                           no
=========================================  ======  ==========================  ================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from zeroserve.protocol.start import START_HEADER, StartState, retry_after_value

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = field(default=())

    @property
    def start_state(self) -> str | None:
        start = self.body.get("start")
        return start.get("state") if isinstance(start, dict) else None

    def encode(self) -> tuple[Headers, bytes]:
        content = json.dumps(self.body, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        headers += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in self.headers]
        return headers, content


def start_failed(state: StartState) -> Answer:
    """The last start failed: its reason and exit status, when the next may begin."""
    retry = retry_after_value(state.retry_after_s or 0.0)
    return Answer(503, {"error": f"the model server failed to start: {state.describe()}", "start": state.to_json()},
                  ((START_HEADER, "failed"), ("retry-after", retry)))


def still_loading(state: StartState, readiness: bool) -> Answer:
    """A request held as long as it asked to be, while a process starts; ``readiness`` answers as the
    server's own readiness endpoint does (``"ready": false``) besides the error."""
    body: dict[str, Any] = {"error": f"the model server is still loading: {state.describe()}"}
    if readiness:
        body["ready"] = False
    body["start"] = state.to_json()
    return Answer(503, body, ((START_HEADER, "loading"), ("retry-after", "1")))


def queue_full() -> Answer:
    return Answer(503, {"error": "pending request queue full"})


def request_timeout(timeout: float, held: StartState | None) -> Answer:
    """``held``: the start's progress when the request was still held (it never reached a process)."""
    if held is None:
        return Answer(504, {"error": f"activator request timeout: no answer within --request_timeout {timeout:g} s"})
    error = (f"activator request timeout: the model server was not ready within --request_timeout {timeout:g} s "
             f"({held.describe()}); the request was not delivered")
    return Answer(504, {"error": error, "start": held.to_json()}, ((START_HEADER, "loading"),))


def not_delivered(detail: str) -> Answer:
    return Answer(503, {"error": f"no model server process could be reached ({detail}); the request was not "
                                 "delivered"}, (("retry-after", "1"),))


def connection_lost(pid: int, detail: str) -> Answer:
    return Answer(502, {"error": f"model server process {pid} closed the connection before answering ({detail}); "
                                 "the request may have run"})


def bad_target(target: bytes) -> Answer:
    shown = target[:200].decode("latin-1")
    return Answer(400, {"error": f"the request target must be a path starting with '/', got {shown!r}"})


def bad_length(value: bytes) -> Answer:
    return Answer(400, {"error": f"Content-Length must be a number, got {value[:40].decode('latin-1')!r}"})


def too_large(size: int | None, limit: int) -> Answer:
    what = f"request body of {size} bytes" if size is not None else "request body"
    return Answer(413, {"error": f"{what} is over the limit of {limit} bytes (--max_request_mib)"})


def shutting_down() -> Answer:
    return Answer(503, {"error": "zeroserve dev is shutting down"})
