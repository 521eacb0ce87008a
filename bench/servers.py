"""The servers under test: how to launch each, wait for it, talk to it, and stop it.

Every server is a child process on a free 127.0.0.1 port, with its output in a log file; it is
stopped by its PID (SIGTERM, then SIGKILL after a bounded wait). Callers load one server at a time;
the gRPC phase keeps every server up (idle ones use no CPU) to alternate between them.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"
POLL_SLEEP_S = 0.005
STOP_WAIT_S = 15.0


class ServerError(RuntimeError):
    """A server did not start, answer, or stop as expected. The message carries its log tail."""


@dataclass(frozen=True, slots=True)
class ServerKind:
    """A server under test: its name, the interpreter and module or script that runs it, and what it supports."""

    name: str
    argv_prefix: tuple[str, ...]  # after the interpreter
    extra_args: tuple[str, ...] = ()  # after the KServe-style flags
    # KServe and MLServer serve gRPC whatever they are asked (they need a free --grpc_port every time); zeroserve
    # serves it when given --grpc_port, so its REST measurements run without gRPC, as its REST-only users do.
    grpc_always_on: bool = False
    # An interpreter of its own (MLServer lives in its own virtualenv); None: the run's --python.
    python: Path | None = None
    # Python code that must run without error in that interpreter for the server to start at all.
    probe: str = "import kserve, onnxruntime"
    # Whether it implements the V2 binary tensor extension (run.py still checks, once, what it answers).
    binary_extension: bool = True

    def interpreter(self, python: str) -> str:
        return str(self.python) if self.python is not None else python

    def command(
        self, python: str, model_name: str, model_dir: Path, http_port: int, grpc_port: int, grpc: bool = False
    ) -> list[str]:
        flags = {"--model_name": model_name, "--model_dir": str(model_dir), "--http_port": str(http_port)}
        if grpc or self.grpc_always_on:
            flags["--grpc_port"] = str(grpc_port)
        return [
            self.interpreter(python),
            *self.argv_prefix,
            *(part for flag in flags.items() for part in flag),
            *self.extra_args,
        ]


_PROBE_ZEROSERVE = """
import compileall, importlib.util, sys
import zeroserve.runtime
if importlib.util.find_spec("zeroserve.runtime.__main__") is None:
    sys.exit("zeroserve.runtime has no __main__ module")
for path in zeroserve.__path__:
    compileall.compile_dir(path, quiet=1)
"""
# find_spec, not an import of __main__: a __main__ without a __name__ guard would start serving.
# The probe also compiles zeroserve's sources to bytecode, as the runtime image does when it is built (peers live
# in site-packages, which pip compiled): a cold start then measures what a deployment runs, not the compiler.
# Timestamp-checked bytecode, unlike the image's: sources edited after a run are compiled afresh.

MLSERVER_PYTHON = BENCH_DIR / ".peers" / "mlserver-venv" / "bin" / "python"
# zeroserve's adaptive batching, beside plain zeroserve: up to 8 requests merged into one run, waiting at most 2 ms.
BATCHING_FLAGS = ("--max_batch_size", "8", "--max_queue_delay_us", "2000")

KINDS: dict[str, ServerKind] = {
    # KServe always listens on 0.0.0.0; zeroserve can be kept to loopback, which changes nothing else.
    "zeroserve": ServerKind("zeroserve", ("-m", "zeroserve.runtime"), ("--host", HOST), probe=_PROBE_ZEROSERVE),
    "zeroserve+batching": ServerKind(
        "zeroserve+batching", ("-m", "zeroserve.runtime"), ("--host", HOST, *BATCHING_FLAGS), probe=_PROBE_ZEROSERVE
    ),
    # The hint zeroserve used before adaptive became the default (one run at a time on every core): opt-in
    # with --servers, to see what the adaptive hint changes in the same run.
    "zeroserve+latency": ServerKind(
        "zeroserve+latency",
        ("-m", "zeroserve.runtime"),
        ("--host", HOST, "--performance_hint", "latency"),
        probe=_PROBE_ZEROSERVE,
    ),
    # The standard asyncio loop instead of uvloop (--event_loop): opt-in, to see its tail latency against its
    # throughput in the same run.
    "zeroserve+asyncio": ServerKind(
        "zeroserve+asyncio",
        ("-m", "zeroserve.runtime"),
        ("--host", HOST, "--event_loop", "asyncio"),
        probe=_PROBE_ZEROSERVE,
    ),
    # zeroserve from another checkout (a baseline commit, installed in a virtualenv of its own), beside this one
    # in the same run: opt-in, for before/after comparisons; its interpreter is $ZEROSERVE_BASE_PYTHON.
    "zeroserve@base": ServerKind(
        "zeroserve@base",
        ("-m", "zeroserve.runtime"),
        ("--host", HOST),
        probe=_PROBE_ZEROSERVE,
        python=Path(os.environ.get("ZEROSERVE_BASE_PYTHON", "/nonexistent/zeroserve-base/bin/python")),
    ),
    "kserve": ServerKind("kserve", (str(BENCH_DIR / "peers" / "kserve_onnx.py"),), grpc_always_on=True),
    # MLServer 1.7.1 from its own virtualenv (see bench/README.md); it listens on 127.0.0.1 (peer settings.json).
    "mlserver": ServerKind(
        "mlserver",
        (str(BENCH_DIR / "peers" / "mlserver_onnx.py"),),
        grpc_always_on=True,
        python=MLSERVER_PYTHON,
        probe="import mlserver, onnxruntime",
        binary_extension=False,
    ),
}


def unavailable_reason(kind: str, python: str) -> str | None:
    """Why ``kind`` cannot run with ``python`` (None when it can). Checked in a fresh process (which compiles
    zeroserve's sources, see ``_PROBE_ZEROSERVE``)."""
    spec = KINDS[kind]
    interpreter = spec.interpreter(python)
    if spec.python is not None and not spec.python.exists():
        return f"no interpreter at {spec.python} (see bench/README.md for how to create its virtualenv)"
    try:
        done = subprocess.run([interpreter, "-c", spec.probe], check=False, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "import probe took over 60 s"
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    what = spec.probe.strip().splitlines()[0] if spec.probe != _PROBE_ZEROSERVE else "zeroserve.runtime.__main__"
    return f"cannot {what!r} with {interpreter}: " + (lines[-1] if lines else f"exit code {done.returncode}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on a fresh connection; returns status, headers, body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@dataclass(slots=True)
class Server:
    """A launched server process."""

    kind: str
    model_name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    started_at: float  # perf_counter just before launch
    grpc_port: int | None = None  # None: launched without gRPC

    @property
    def grpc_address(self) -> str:
        assert self.grpc_port is not None, f"{self.kind} was launched without gRPC"
        return f"{HOST}:{self.grpc_port}"

    @property
    def infer_path(self) -> str:
        return f"/v2/models/{self.model_name}/infer"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:])

    def fail(self, what: str) -> ServerError:
        return ServerError(f"{self.kind}: {what}\n--- last lines of {self.log_path} ---\n{self.log_tail()}")

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise self.fail(f"process exited with code {code}")

    def group_pids(self) -> list[int]:
        """The server process and every live process of its process group (worker processes), from /proc.

        The server runs in a session of its own (start_new_session), so its group id is its PID."""
        pids = [self.process.pid]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.process.pid:
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid:  # pgrp
                pids.append(int(entry.name))
        return pids

    def rss_mib(self) -> float | None:
        """Resident memory of the server's processes (itself and its workers, summed), from /proc."""
        total, found = 0, False
        for pid in self.group_pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        found = True
            except OSError:
                continue
        return total / 1024 if found else None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server's processes (workers too) and their reaped children, from /proc."""
        ticks, found = 0, False
        for pid in self.group_pids():
            try:
                # Fields after the parenthesised command name; utime is field 14 of the whole line.
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                if pid == self.process.pid:
                    return None
                continue
            ticks += sum(int(v) for v in fields[11:15])
            found = True
        return ticks / os.sysconf("SC_CLK_TCK") if found else None

    def wait_idle(self, busy_cores: float = 0.1, window_s: float = 0.25, deadline_s: float = 60.0) -> float:
        """Wait until the server uses under ``busy_cores`` CPU; return seconds waited.

        A load run ends with requests still queued in the server (wrk stops counting, the server
        does not stop working); the next measurement must not inherit that backlog.
        """
        start = time.perf_counter()
        before = self.cpu_seconds()
        while before is not None and time.perf_counter() - start < deadline_s:
            time.sleep(window_s)
            after = self.cpu_seconds()
            if after is None or (after - before) / window_s < busy_cores:
                break
            before = after
        self.check_alive()
        return time.perf_counter() - start

    def poll_until(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str], deadline_s: float
    ) -> tuple[float, bytes, dict[str, str]]:
        """Repeat a request every 5 ms until it answers 200; return (seconds since launch, body, headers)."""
        limit = time.perf_counter() + deadline_s
        last = "no answer"
        while True:
            self.check_alive()
            try:
                status, resp_headers, resp_body = request(self.port, method, path, body, headers, timeout=5.0)
                if status == 200:
                    return time.perf_counter() - self.started_at, resp_body, resp_headers
                last = f"HTTP {status}: {resp_body[:200]!r}"
            except (ConnectionError, OSError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.perf_counter() >= limit:
                raise self.fail(f"{method} {path} got no 200 within {deadline_s:.0f} s (last: {last})")
            time.sleep(POLL_SLEEP_S)

    def wait_ready(self, deadline_s: float = 60.0) -> float:
        """Wait for ``GET /v2/health/ready`` == 200; return seconds since launch."""
        elapsed, _, _ = self.poll_until("GET", "/v2/health/ready", None, {}, deadline_s)
        return elapsed

    def stop(self) -> int | None:
        """SIGTERM by PID, SIGKILL after a bounded wait; then clear any leftover of its own group."""
        proc = self.process
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_WAIT_S)
        # The server ran in a session of its own (start_new_session), so its group id is its PID
        # and holds only processes it started (worker processes, if any).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode


def launch(kind: str, python: str, model_name: str, model_dir: Path, log_path: Path, grpc: bool = False) -> Server:
    """Start ``kind`` serving ``model_dir`` on free ports (gRPC too when ``grpc``); does not wait.

    ``python`` runs the server unless its kind has an interpreter of its own (MLServer's virtualenv)."""
    port, grpc_port = free_port(), free_port()
    argv = KINDS[kind].command(python, model_name, model_dir, port, grpc_port, grpc)
    return spawn(kind, model_name, port, argv, log_path, grpc_port=grpc_port if grpc else None)


def spawn(
    kind: str, model_name: str, port: int, argv: list[str], log_path: Path, *,
    env: Mapping[str, str] | None = None, grpc_port: int | None = None,
) -> Server:
    """Start ``argv`` in a session of its own (a server's worker processes stop with it), its command line and
    output appended to ``log_path``; does not wait."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        started = time.perf_counter()
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env else None, start_new_session=True,
        )  # fmt: skip
    return Server(kind, model_name, port, process, log_path, started, grpc_port)


@contextlib.contextmanager
def running(
    kind: str,
    python: str,
    model_name: str,
    model_dir: Path,
    log_path: Path,
    ready_deadline_s: float = 60.0,
    grpc: bool = False,
) -> Iterator[Server]:
    """A ready server for the duration of the block; always stopped afterwards."""
    server = launch(kind, python, model_name, model_dir, log_path, grpc)
    try:
        server.wait_ready(ready_deadline_s)
        yield server
    finally:
        server.stop()
