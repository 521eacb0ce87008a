"""One model server process: started in a session of its own, its stderr echoed and its last lines kept, its
readiness and start-up progress probed, the reason it failed read from what it said, stopped within a bound.

- Session: the child gets its own session and process group, so a Ctrl-C in the terminal (SIGINT to the
  foreground group) reaches only the activator, which then stops its children with SIGTERM; a child never
  prints a ``KeyboardInterrupt`` traceback of its own. Signals go to the child's group, which holds the
  workers of ``--workers N`` too.
- stderr: read by the event loop in chunks, echoed to the activator's stderr as it comes (the developer sees
  the server's log), the last ``TAIL_LINES`` lines kept. Readiness is probed every 50 ms (Knative's aggressive
  probing) and at once whenever the process writes to stderr: the server logs when its models become ready,
  so the probe that finds it ready follows at once. When the process exits during its start, the reason is
  its last ``zeroserve: <reason>`` line (the server's own message for a failed start), else the last line
  that names an error, else the signal that killed it.
- Trace context: the request that starts the process passes ``TRACEPARENT``/``TRACESTATE`` in the child's
  environment (OpenTelemetry's environment carrier); the server parents its ``zeroserve.init`` span there.
  Those two are never inherited from the activator's own environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx

from zeroserve.protocol.start import START_HEADER, StartState

TAIL_LINES = 50
_LINE_MAX = 2000  # characters kept of one line: a reason, not a dump
_PROBE_INTERVAL = 0.05  # Knative's aggressive readiness probing
_PROBE_TIMEOUT = 0.5
_EXIT_WAIT = 3.0  # seconds a server that reported a failed start has to exit by itself
_REASON_PREFIX = "zeroserve: "
_ERROR_LINE = re.compile(r"^\w[\w.]*(Error|Exception|Exit|Interrupt)\b|\bERROR\b|\berror\b")


@dataclass(frozen=True, slots=True)
class StartFailure:
    """Why a process did not become ready; ``exit_status`` is set when it exited (128 + N for signal N)."""

    reason: str
    exit_status: int | None = None


class ServerProcess:
    """A running ``python -m zeroserve.runtime`` child on a loopback port."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.pid = process.pid
        self.spawned_at = time.monotonic()
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._server_progress: StartState | None = None  # the last "loading" state the server reported
        self.echo = True  # stderr goes on to ours until writing there fails
        self._said = asyncio.Event()  # set on output: the server logs as its state changes, so probe now
        assert process.stderr is not None
        self._reader = asyncio.get_running_loop().create_task(self._echo(process.stderr))

    @classmethod
    async def spawn(cls, server_args: Sequence[str], port: int, trace_carrier: Mapping[str, str]) -> ServerProcess:
        command = [sys.executable, "-m", "zeroserve.runtime", "--host", "127.0.0.1", "--http_port", str(port),
                   *server_args]
        env = {key: value for key, value in os.environ.items() if key not in ("TRACEPARENT", "TRACESTATE")}
        env.update(trace_carrier)
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
            start_new_session=True,
        )
        return cls(process, port)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def progress(self, now: float | None = None) -> StartState:
        """The start's progress: the server's last report (phase, bytes), timed from the spawn; ``process``
        while the server cannot answer yet (its interpreter and imports)."""
        elapsed = round((time.monotonic() if now is None else now) - self.spawned_at, 3)
        reported = self._server_progress
        if reported is None:
            return StartState("loading", phase="process", elapsed_s=elapsed)
        return StartState("loading", phase=reported.phase, elapsed_s=elapsed, done_bytes=reported.done_bytes,
                          total_bytes=reported.total_bytes, bytes_per_s=reported.bytes_per_s, eta_s=reported.eta_s)

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float) -> StartFailure | None:
        """Probe ``/v2/health/ready`` until it answers 200 (None) or the start fails (why)."""
        deadline = self.spawned_at + timeout
        url = f"http://127.0.0.1:{self.port}/v2/health/ready"
        exited = asyncio.ensure_future(self.process.wait())
        try:
            while True:
                if exited.done():
                    return await self.exit_failure()
                probed = await self._probe(client, url)
                if probed is True:
                    return None
                if isinstance(probed, StartFailure):
                    # With --exit_on_error (the default) the server exits right after saying so: wait a moment
                    # for its exit status and its own last words.
                    await asyncio.wait([exited], timeout=_EXIT_WAIT)
                    if not exited.done():
                        return probed
                    said = await self.exit_failure()
                    own = any(line.startswith(_REASON_PREFIX) for line in self.tail)
                    return StartFailure(said.reason if own else probed.reason, said.exit_status)
                if time.monotonic() > deadline:
                    phase = self.progress().phase
                    return StartFailure(f"not ready within --start_timeout {timeout:g} s (still in phase {phase})")
                self._said.clear()
                spoke = asyncio.ensure_future(self._said.wait())
                await asyncio.wait([exited, spoke], timeout=_PROBE_INTERVAL, return_when=asyncio.FIRST_COMPLETED)
                spoke.cancel()
        finally:
            exited.cancel()

    async def _probe(self, client: httpx.AsyncClient, url: str) -> bool | StartFailure:
        """True: ready; False: not yet; a StartFailure: the server says its start failed."""
        try:
            response = await client.get(url, timeout=_PROBE_TIMEOUT)
        except httpx.TransportError:
            return False  # not listening yet
        if response.status_code == 200:
            return True
        state = _start_state(response)
        if state is not None and state.failed:  # --no-exit_on_error: the server stays up and says why
            return StartFailure(state.reason or f"the server reports a failed start: {response.text[:_LINE_MAX]}")
        if state is not None:
            self._server_progress = state
        return False

    async def exit_failure(self) -> StartFailure:
        """Why the process exited: its own last words, once its stderr has been read to the end."""
        code = await self.process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 2.0)  # a grandchild may hold the pipe open
        return StartFailure(exit_reason(list(self.tail), code), exit_status(code))

    async def stop(self, grace: float) -> int:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds; returns the exit code."""
        if self.running:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                self._signal(signal.SIGKILL)
        code = await self.process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 2.0)
        return code

    def kill(self) -> None:
        """SIGKILL the process group now (the last resort when the activator stops without draining)."""
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)  # its own session: the group id is its pid

    async def _echo(self, stream: asyncio.StreamReader) -> None:
        out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
        partial = b""
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            self._said.set()
            if out is not None and self.echo:
                try:
                    out.write(chunk)
                    out.flush()
                except OSError:  # our stderr is gone; keep reading, or the child blocks on a full pipe
                    self.echo = False
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()[-_LINE_MAX * 4:]
            self.tail.extend(line.decode("utf-8", "replace").rstrip()[:_LINE_MAX] for line in lines)
        if partial:
            self.tail.append(partial.decode("utf-8", "replace").rstrip()[:_LINE_MAX])


def exit_status(code: int) -> int:
    """An exit status as a shell (and kubelet) reports it: 128 + N for a process killed by signal N."""
    return 128 - code if code < 0 else code


def exit_reason(lines: Sequence[str], code: int) -> str:
    """The reason a process gave for exiting: its last ``zeroserve: ...`` line, else its last line that
    names an error, else the signal that killed it, else its last line."""
    for line in reversed(lines):
        if line.startswith(_REASON_PREFIX):
            return line[len(_REASON_PREFIX):].strip()
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    for line in reversed(lines):
        if _ERROR_LINE.search(line):
            return line.strip()
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return last or f"exited with status {code} and printed nothing on stderr"


def _start_state(response: httpx.Response) -> StartState | None:
    if response.status_code != 503 or START_HEADER not in response.headers:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return StartState.from_json(body.get("start")) if isinstance(body, dict) else None
