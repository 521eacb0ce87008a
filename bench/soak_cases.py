"""What the soak (``soak.py``) sends: every case, valid or not, with the results it accepts, and how each result
is judged.

A case runs once per call and returns one ``Outcome`` per request it made. Results are words: an HTTP status
(``"400"``; ``"503 busy"`` for the documented refusals, with Retry-After or at the connection cap), ``"grpc
<CODE>"``, or why no answer came (``soak_http.NO_ANSWER``; ``"grpc CANCELLED"`` counts as none), or ``"hung up"``
when the client left on purpose.

Four groups, each run by its own workers: ``rest`` (valid REST on a keep-alive connection, answers checked),
``grpc`` (valid calls, answers checked, and invalid ones), ``invalid`` (malformed or lying REST requests, each on
a fresh connection) and ``abuse`` (slow, silent and vanishing clients).
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from soak_http import CLOSED, NO_ANSWER, REFUSED, RESET, TIMEOUT, Answer, Exchange, KeepAlive, one_shot, request_bytes
from soak_payloads import Sample, grpc_output, infer_path, mismatch, rest_output

HUNG_UP = "hung up"
BUSY = "503 busy"
GRPC_BUSY = "grpc UNAVAILABLE busy"
# The server cancelled a call it had received: no answer, like a reset connection.
GRPC_CANCELLED = "grpc CANCELLED"
DROPPED = NO_ANSWER | {GRPC_CANCELLED}
GRPC_SERVER_ERRORS = frozenset({"grpc INTERNAL", "grpc UNKNOWN", "grpc DATA_LOSS", "grpc UNIMPLEMENTED"})
GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"
SILENT_AT_ONCE = 8  # silent connections a call of the silent case holds together

# How each outcome is judged, one word each (``verdict``).
EXPECTED = "expected"
SERVER_ERROR = "5xx"
WRONG = "wrong answer"
LOST = "lost"
UNEXPECTED = "unexpected"
NOT_ACCEPTED = "not accepted (after SIGTERM)"


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's bounds the invalid cases are built against."""

    keep_alive_s: float
    max_request_bytes: int
    max_bytes_elements: int


@dataclass(frozen=True, slots=True)
class Outcome:
    case: str
    started: float  # monotonic
    connected_at: float | None
    sent_at: float | None  # the last byte of the request left; None: it never fully did
    finished: float
    result: str
    wrong: str | None = None  # why a 200's answer is wrong
    detail: str = ""  # what else was seen: an error message, the start of an unexpected answer


@dataclass(slots=True)
class Session:
    """One worker's view: the server's ports, its own connections, and a turn counter to rotate the samples."""

    port: int
    samples: dict[str, list[Sample]]
    limits: Limits
    http: KeepAlive
    grpc_call: Callable[[bytes], bytes] | None = None
    turn: int = 0

    def sample(self, model: str) -> Sample:
        self.turn += 1
        choices = self.samples[model]
        return choices[self.turn % len(choices)]


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    group: str
    expected: frozenset[str]
    run: Callable[[Session], list[Outcome]] = field(repr=False)
    answer_expected: bool = True  # False: the case expects the server to close, or the client to leave


def status_label(answer: Answer) -> str:
    if answer.status == 503 and ("retry-after" in answer.headers or b"at its limit of" in answer.body):
        return BUSY
    return str(answer.status)


def is_server_error(result: str) -> bool:
    return (result[:1] == "5" and result != BUSY) or result in GRPC_SERVER_ERRORS


def verdict(case: Case, outcome: Outcome, sigterm_at: float | None) -> str:
    """Judge one outcome. A request sent in full before the SIGTERM (or with none sent) that got no answer is lost
    when its case expects one; a request refused or cut after the SIGTERM before it was fully sent was not
    accepted, which is how a server stops."""
    if outcome.result in DROPPED:
        accepted = outcome.sent_at is not None and (sigterm_at is None or outcome.sent_at < sigterm_at)
        if case.answer_expected and accepted:
            return LOST
        if sigterm_at is not None and outcome.finished >= sigterm_at:
            return NOT_ACCEPTED
        return EXPECTED if outcome.result in case.expected else UNEXPECTED
    if is_server_error(outcome.result):
        return SERVER_ERROR
    if outcome.wrong is not None:
        return WRONG
    return EXPECTED if outcome.result in case.expected else UNEXPECTED


def _outcome(case: str, started: float, exchange: Exchange, check: Callable[[Answer], str | None] | None) -> Outcome:
    finished = time.monotonic()
    answer = exchange.answer
    if answer is None:
        return Outcome(case, started, exchange.connected_at, exchange.sent_at, finished, exchange.failure or CLOSED)
    wrong, detail = None, ""
    if answer.status == 200 and check is not None:
        try:
            wrong = check(answer)
        except (ValueError, KeyError, TypeError) as exc:
            wrong = f"undecodable answer: {exc}"
    elif answer.status != 200:
        detail = answer.body[:200].decode("utf-8", "replace")
    return Outcome(case, started, exchange.connected_at, exchange.sent_at, finished, status_label(answer), wrong,
                   detail)  # fmt: skip


def _rest_check(sample: Sample) -> Callable[[Answer], str | None]:
    return lambda answer: mismatch(*rest_output(answer), sample.expected)


# Valid REST, on the worker's keep-alive connection.

def _valid(name: str, model: str, encoding: str) -> Case:
    def run(session: Session) -> list[Outcome]:
        sample = session.sample(model)
        started = time.monotonic()
        exchange = session.http.request(getattr(sample, f"{encoding}_request"))
        return [_outcome(name, started, exchange, _rest_check(sample))]

    return Case(name, "rest", frozenset({"200", BUSY}), run)


# Single requests on a fresh connection, valid or not.

def _fixed(name: str, group: str, data: bytes, expected: set[str], answer_expected: bool = True,
           **send: Any) -> Case:  # fmt: skip
    def run(session: Session) -> list[Outcome]:
        started = time.monotonic()
        return [_outcome(name, started, one_shot(session.port, data, **send), None)]

    return Case(name, group, frozenset(expected), run, answer_expected)


def _slow_body(session: Session) -> list[Outcome]:
    """A valid request trickled in over about a second: answered, and right."""
    sample = session.sample("mlp")
    started = time.monotonic()
    exchange = one_shot(session.port, sample.json_request, pieces=10, gap_s=0.1)
    return [_outcome("slow_body", started, exchange, _rest_check(sample))]


def _hangup_mid_body(session: Session) -> list[Outcome]:
    """Headers promising 100 kB, a few bytes of body, then the client closes."""
    head = request_bytes("POST", infer_path("mlp"), b'{"inputs": [',
                         {"Content-Type": "application/json", "Content-Length": "100000"})  # fmt: skip
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", session.port), timeout=5) as sock:
            connected = time.monotonic()
            sock.sendall(head)
    except OSError as exc:
        return [Outcome("hangup_mid_body", started, None, None, time.monotonic(), REFUSED, detail=repr(exc))]
    return [Outcome("hangup_mid_body", started, connected, None, time.monotonic(), HUNG_UP)]


def _silent(session: Session) -> list[Outcome]:
    """Connections that never send a byte: each must be closed by the server within its keep-alive timeout."""
    limit = session.limits.keep_alive_s + 3.0
    opened: list[tuple[float, socket.socket | None, str]] = []
    for _ in range(SILENT_AT_ONCE):
        started = time.monotonic()
        try:
            opened.append((started, socket.create_connection(("127.0.0.1", session.port), timeout=5), ""))
        except OSError as exc:
            opened.append((started, None, repr(exc)))
    outcomes = []
    for started, sock, error in opened:
        if sock is None:
            outcomes.append(Outcome("silent_connections", started, None, None, time.monotonic(), REFUSED,
                                    detail=error))  # fmt: skip
            continue
        with sock:
            sock.settimeout(max(0.01, started + limit - time.monotonic()))
            try:
                data = sock.recv(4096)
                result = CLOSED if not data else data.split(b" ", 2)[1].decode("latin-1", "replace")
            except (ConnectionResetError, BrokenPipeError):
                result = RESET
            except TimeoutError:
                result = TIMEOUT
        outcomes.append(Outcome("silent_connections", started, started, None, time.monotonic(), result))
    return outcomes


def sigterm_burst(sample: Sample) -> tuple[Case, Callable[[int, Callable[[], None]], Outcome]]:
    """The case of the requests sent just before the SIGTERM, each on its own connection, and how one is sent:
    ``send(port, on_sent)`` calls ``on_sent`` once the request is fully out, then waits for its answer."""
    name = "sigterm_burst"

    def send(port: int, on_sent: Callable[[], None]) -> Outcome:
        started = time.monotonic()
        return _outcome(name, started, one_shot(port, sample.binary_request, on_sent=on_sent), _rest_check(sample))

    return Case(name, "shutdown", frozenset({"200", BUSY}), lambda session: []), send


# gRPC, on the worker's channel.

def _grpc_result(exc: Any) -> tuple[str, str]:
    """The result word of a failed call, and its details. UNAVAILABLE without Retry-After is grpc's own word for a
    connection that failed or broke, not an answer from the server."""
    code, details = exc.code().name, exc.details() or ""
    if code == "UNAVAILABLE":
        if any(key == "retry-after" for key, _ in exc.trailing_metadata() or ()):
            return GRPC_BUSY, details
        refused = "failed to connect" in details.lower() or "connection refused" in details.lower()
        return (REFUSED if refused else CLOSED), details
    if code == "DEADLINE_EXCEEDED":
        return TIMEOUT, details
    return f"grpc {code}", details


def _grpc(name: str, payload: Callable[[Session], tuple[bytes, Sample | None]], expected: set[str]) -> Case:
    def run(session: Session) -> list[Outcome]:
        import grpc

        assert session.grpc_call is not None
        data, sample = payload(session)
        started = time.monotonic()
        wrong, detail = None, ""
        try:
            answer = session.grpc_call(data)
            result = "grpc OK"
            if sample is not None:
                try:
                    wrong = mismatch(*grpc_output(answer), sample.expected)
                except (ValueError, KeyError, TypeError) as exc:
                    wrong = f"undecodable answer: {exc}"
        except grpc.RpcError as exc:
            result, detail = _grpc_result(exc)
        # A call is on the wire as soon as it starts: the channel sends it at once.
        return [Outcome(name, started, started, started, time.monotonic(), result, wrong, detail[:200])]

    return Case(name, "grpc", frozenset(expected), run)


def _grpc_message(model: str, datatype: str, shape: list[int], raw: bytes | None) -> bytes:
    from zeroserve.runtime._proto import open_inference_grpc_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    return bytes(request.SerializeToString())


def _grpc_cases(limits: Limits) -> list[Case]:
    valid = {"grpc OK", GRPC_BUSY}
    invalid = {"grpc INVALID_ARGUMENT", GRPC_BUSY}
    many = limits.max_bytes_elements + 1
    fixed: dict[str, bytes] = {
        "grpc_wrong_shape": _grpc_message("mlp", "FP32", [1, 15], b"\0" * 60),
        "grpc_raw_too_short": _grpc_message("mlp", "FP32", [1, 16], b"\0" * 32),
        "grpc_not_protobuf": b"\xff\xff\xff not a protobuf message",
        "grpc_unknown_model": _grpc_message("no_such_model", "FP32", [1, 16], b"\0" * 64),
        "grpc_bytes_many_tiny": _grpc_message("identity_bytes", "BYTES", [1, many], b"\0\0\0\0" * many),
    }
    expected = {"grpc_unknown_model": {"grpc NOT_FOUND"}, "grpc_bytes_many_tiny": {"grpc RESOURCE_EXHAUSTED"}}

    def sampled(model: str) -> Callable[[Session], tuple[bytes, Sample | None]]:
        def payload(session: Session) -> tuple[bytes, Sample | None]:
            sample = session.sample(model)
            return sample.grpc_request, sample

        return payload

    def constant(data: bytes) -> Callable[[Session], tuple[bytes, Sample | None]]:
        return lambda session: (data, None)

    return [
        _grpc("grpc_mlp", sampled("mlp"), valid),
        _grpc("grpc_conv", sampled("conv"), valid),
        _grpc("grpc_bytes", sampled("identity_bytes"), valid),
        *(_grpc(name, constant(data), expected.get(name, invalid) | {GRPC_BUSY}) for name, data in fixed.items()),
    ]


def _infer(body: bytes, headers: dict[str, str] | None = None, model: str = "mlp") -> bytes:
    return request_bytes("POST", infer_path(model), body, {"Content-Type": "application/json", **(headers or {})})


def _tensor(**changes: Any) -> bytes:
    tensor = {"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16, **changes}
    return json.dumps({"inputs": [tensor]}).encode()


def _binary(header: dict[str, Any], raw: bytes, model: str = "mlp", header_length: int | None = None) -> bytes:
    head = json.dumps(header).encode()
    length = len(head) if header_length is None else header_length
    return request_bytes("POST", infer_path(model), head + raw, {
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(length)})  # fmt: skip


def _binary_input(shape: list[int], size: int, datatype: str = "FP32") -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": shape, "datatype": datatype,
                        "parameters": {"binary_data_size": size}}]}  # fmt: skip


def _invalid_requests(limits: Limits) -> dict[str, tuple[bytes, set[str]]]:
    """Each invalid REST request on the wire, and the status it must get."""
    good = _tensor()
    many = limits.max_bytes_elements + 1
    bomb = gzip.compress(b"\0" * (limits.max_request_bytes + 2**20), compresslevel=9)
    head = "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return {
        "json_malformed": (_infer(b'{"inputs": ['), {"400"}),
        "json_not_an_object": (_infer(b"[1, 2, 3]"), {"400"}),
        "wrong_shape": (_infer(_tensor(shape=[1, 15], data=[0.5] * 15)), {"400"}),
        "wrong_datatype": (_infer(_tensor(datatype="FP64")), {"400"}),
        "strings_for_fp32": (_infer(_tensor(data=["a"] * 16)), {"400"}),
        "shape_contradicts_data": (_infer(_tensor(shape=[100_000, 16])), {"400"}),
        "binary_shape_contradicts_data": (_binary(_binary_input([100_000, 16], 64), b"\0" * 64), {"400"}),
        "binary_truncated": (_binary(_binary_input([1, 16], 64), b"\0" * 32), {"400"}),
        "binary_header_length_lies": (_binary(_binary_input([1, 16], 64), b"\0" * 64, header_length=10**6), {"400"}),
        "bytes_many_tiny_binary": (
            _binary(_binary_input([1, many], 4 * many, "BYTES"), b"\0\0\0\0" * many, "identity_bytes"), {"413"}),
        "bytes_many_tiny_json": (_infer(json.dumps({"inputs": [{"name": "input", "shape": [1, many],
                                                                 "datatype": "BYTES", "data": [""] * many}]}).encode(),
                                        model="identity_bytes"), {"413"}),
        "unknown_model": (_infer(good, model="no_such_model"), {"404"}),
        "unknown_version": (request_bytes("POST", "/v2/models/mlp/versions/9/infer", good), {"404"}),
        "wrong_method": (request_bytes("GET", infer_path("mlp")), {"405"}),
        "unknown_route": (request_bytes("GET", "/v3/nothing/here"), {"404"}),
        "gzip_bomb": (_infer(bomb, {"Content-Encoding": "gzip"}), {"413"}),
        "gzip_corrupt": (_infer(b"\x1f\x8b not gzip at all", {"Content-Encoding": "gzip"}), {"400"}),
        "encoding_unsupported": (_infer(good, {"Content-Encoding": "br"}), {"400"}),
        "content_length_short": (_infer(good, {"Content-Length": "10"}), {"400"}),
        "content_length_not_a_number": ((head + "Content-Length: ten\r\n\r\n").encode() + good, {"400"}),
        "content_length_twice": ((head + f"Content-Length: 10\r\nContent-Length: {len(good)}\r\n\r\n").encode()
                                 + good, {"400"}),
        "content_length_and_chunked": ((head + "Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
                                       + good, {"400"}),
        "content_length_over_limit": (_infer(b"{}", {"Content-Length": str(2**40)}), {"413"}),
        "huge_header": (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2**17 + b"\r\n\r\n", {"431"}),
        "long_header_line": (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Line: " + b"a" * 10_000 + b"\r\n\r\n",
                             {"431"}),
        "long_target": (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {"414"}),
    }


def build_cases(limits: Limits) -> list[Case]:
    """Every case of the soak, in the order its workers cycle through them."""
    rest = [
        _valid("rest_json_mlp", "mlp", "json"),
        _valid("rest_binary_mlp", "mlp", "binary"),
        _valid("rest_gzip_mlp", "mlp", "gzip"),
        _valid("rest_binary_conv", "conv", "binary"),
        _valid("rest_json_fp32_identity", "identity_fp32", "json"),
        _valid("rest_binary_fp32_identity", "identity_fp32", "binary"),
        _valid("rest_json_bytes", "identity_bytes", "json"),
        _valid("rest_binary_bytes", "identity_bytes", "binary"),
    ]
    invalid = [_fixed(name, "invalid", data, expected | {BUSY})
               for name, (data, expected) in _invalid_requests(limits).items()]  # fmt: skip
    slow_head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    abuse = [
        Case("silent_connections", "abuse", frozenset({CLOSED}), _silent, answer_expected=False),
        _fixed("slow_head", "abuse", slow_head, {CLOSED, RESET}, answer_expected=False, pieces=len(slow_head),
               gap_s=(limits.keep_alive_s + 3) / len(slow_head), timeout=limits.keep_alive_s + 3),
        Case("slow_body", "abuse", frozenset({"200", BUSY}), _slow_body),
        Case("hangup_mid_body", "abuse", frozenset({HUNG_UP}), _hangup_mid_body, answer_expected=False),
        # Promises 1000 bytes, sends 20, then shuts its sending side: the server sees the body end early.
        _fixed("content_length_long_then_eof", "abuse", _infer(_tensor()[:20], {"Content-Length": "1000"}),
               {CLOSED, "400"}, answer_expected=False, half_close=True),
    ]
    return rest + _grpc_cases(limits) + invalid + abuse
