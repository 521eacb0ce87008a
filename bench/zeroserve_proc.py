"""A zeroserve process with any flags, as multi_model.py drives it: launch, ask, and read what it says about itself
(Server-Timing, /metrics, its log, its resident memory).

The process runs in a session of its own on a free 127.0.0.1 port, its output in a log file of its own, and is
stopped by its PID (``servers.Server.stop``).
"""

from __future__ import annotations

import contextlib
import http.client
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import payloads
import servers

TINY = payloads.json_body("tiny")  # fits every MLP of model_repos.write_mlps
_INDEXED = re.compile(r"(\d+) model\(s\) indexed in ([\d.]+) s")
_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\}\s+(\S+)$|^(\w+)\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


SERVER = ("-m", "zeroserve.runtime")


def start(
    label: str, model_dir: str, flags: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
    model_name: str | None = None, entry: Sequence[str] = SERVER,
) -> servers.Server:
    """Launch ``python -m zeroserve.runtime`` (or ``python *entry``) on ``model_dir`` with ``flags``; does not
    wait."""
    port = servers.free_port()
    argv = [sys.executable, *entry, "--model_dir", model_dir, "--http_port", str(port),
            "--host", servers.HOST, *(("--model_name", model_name) if model_name else ()), *flags]  # fmt: skip
    return servers.spawn(label, model_name or "", port, argv, log, env=env)


@contextlib.contextmanager
def serving(
    label: str, model_dir: str, flags: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
    model_name: str | None = None, deadline_s: float = 120.0, entry: Sequence[str] = SERVER,
) -> Iterator[tuple[servers.Server, float]]:
    """A ready server and its seconds from launch to ``/v2/health/ready`` 200; stopped by PID afterwards."""
    server = start(label, model_dir, flags, log, env, model_name, entry)
    try:
        yield server, server.wait_ready(deadline_s)
    finally:
        server.stop()


def timing(headers: Mapping[str, str]) -> dict[str, float]:
    """The Server-Timing entries of an answer, name -> milliseconds."""
    value = next((v for k, v in headers.items() if k.lower() == "server-timing"), "")
    entries = (part.strip().partition(";dur=") for part in value.split(","))
    return {name: float(ms) for name, sep, ms in entries if sep}


@dataclass(slots=True)
class Answer:
    status: int
    wall_ms: float  # from just before the request is sent to its last byte, on a fresh connection
    timing: dict[str, float]  # Server-Timing, ms
    body: bytes = field(repr=False)
    headers: dict[str, str] = field(repr=False)

    @property
    def loaded(self) -> bool:
        """Whether this request waited for its model to load."""
        return "load" in self.timing

    def fetch_session_warmup(self, prefix: str = "") -> float:
        return sum(self.timing.get(f"{prefix}{phase}", 0.0) for phase in ("fetch", "session", "warmup"))


def infer(server: servers.Server, model: str, body: payloads.Body = TINY, timeout: float = 120.0) -> Answer:
    started = time.perf_counter()
    status, headers, data = servers.request(
        server.port, "POST", f"/v2/models/{model}/infer", body.data, body.headers(), timeout
    )
    return Answer(status, (time.perf_counter() - started) * 1000, timing(headers), data, headers)


def unload(server: servers.Server, model: str) -> int:
    status, _, _ = servers.request(server.port, "POST", f"/v2/repository/models/{model}/unload", b"", {})
    return status


def metrics(server: servers.Server) -> list[tuple[str, dict[str, str], float]]:
    """``GET /metrics`` as (name, labels, value) samples."""
    status, _, data = servers.request(server.port, "GET", "/metrics")
    if status != 200:
        raise server.fail(f"GET /metrics answered {status}")
    samples = []
    for line in data.decode().splitlines():
        match = _SAMPLE.match(line.strip())
        if match and match[1]:
            samples.append((match[1], dict(_LABEL.findall(match[2])), float(match[3])))
        elif match:
            samples.append((match[4], {}, float(match[5])))
    return samples


def metric(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    return sum(v for n, got, v in samples if n == name and all(got.get(k) == w for k, w in labels.items()))


def indexed(server: servers.Server) -> tuple[int, float] | None:
    """(models, seconds) from the server's "N model(s) indexed in X s" log line, if it wrote one."""
    match = _INDEXED.search(server.log_path.read_text(errors="replace"))
    return (int(match[1]), float(match[2])) if match else None


class Checker:
    """Compares an MLP's answers with raw onnxruntime's on the same file and the same input."""

    def __init__(self) -> None:
        self._expected: dict[Path, np.ndarray] = {}

    def wrong(self, answer: Answer, path: Path) -> str | None:
        """Why ``answer`` is not the model at ``path``'s output for ``TINY`` (None when it is)."""
        if answer.status != 200:
            return f"HTTP {answer.status}: {answer.body[:200]!r}"
        if path not in self._expected:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self._expected[path] = session.run(None, {"input": payloads.model_input("tiny")})[0]
        return payloads.check_outputs("tiny", payloads.decode_response(answer.body, answer.headers),
                                      self._expected[path])  # fmt: skip


@dataclass(slots=True)
class Herd:
    statuses: list[int]
    waited_for_load: int  # answers whose Server-Timing has the load they waited for
    send_spread_ms: float  # last send - first send, after the barrier
    wall_ms: list[float]


def herd(server: servers.Server, model: str, size: int) -> Herd:
    """``size`` threads, each on a connection opened beforehand, released together by a barrier, send the same
    first request for ``model``."""
    conns = [http.client.HTTPConnection(servers.HOST, server.port, timeout=120) for _ in range(size)]
    for conn in conns:
        conn.connect()
    barrier = threading.Barrier(size)
    sent = [0.0] * size
    answers: list[Answer | None] = [None] * size

    def one(i: int) -> None:
        barrier.wait()
        sent[i] = time.perf_counter()
        try:
            conns[i].request("POST", f"/v2/models/{model}/infer", body=TINY.data, headers=TINY.headers())
            response = conns[i].getresponse()
            data, headers = response.read(), dict(response.getheaders())
            answers[i] = Answer(response.status, (time.perf_counter() - sent[i]) * 1000, timing(headers), data,
                                headers)  # fmt: skip
        except (OSError, http.client.HTTPException) as exc:
            answers[i] = Answer(0, (time.perf_counter() - sent[i]) * 1000, {}, repr(exc).encode(), {})
        finally:
            conns[i].close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    done = [a for a in answers if a is not None]
    return Herd(
        [a.status for a in done], sum(a.loaded for a in done), (max(sent) - min(sent)) * 1000,
        [round(a.wall_ms, 2) for a in done],
    )
