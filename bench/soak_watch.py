"""The soak's watcher: the server's memory every second and its liveness latency every 250 ms.

It runs in a process of its own (``soak.py`` starts it with multiprocessing), so that its liveness probes do not
wait for the load generator's threads to release the GIL: the latency it reports is the server's and the
loopback's.
"""

from __future__ import annotations

import json
import threading
import time
from multiprocessing.synchronize import Event
from pathlib import Path

from soak_http import KeepAlive, request_bytes

RSS_EVERY_S = 1.0
LIVE_EVERY_S = 0.25
LIVE_TIMEOUT_S = 5.0


def memory_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of ``pid`` in KiB, from /proc; None once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    try:
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (KeyError, ValueError, IndexError):
        return None  # a zombie has no memory lines


def sample_memory(pid: int, origin: float, stop: Event, series: list[tuple[float, float, float]]) -> None:
    """Append (seconds since ``origin``, RSS MiB, peak RSS MiB) every second until ``stop`` or the process ends."""
    while not stop.is_set():
        kib = memory_kib(pid)
        if kib is None:
            return
        series.append((round(time.monotonic() - origin, 3), kib[0] / 1024, kib[1] / 1024))
        stop.wait(RSS_EVERY_S)


def probe_liveness(port: int, origin: float, stop: Event, series: list[tuple[float, float | None, str]]) -> None:
    """Append (seconds since ``origin``, latency ms or None, result) for ``GET /v2/health/live`` every 250 ms, on a
    keep-alive connection, until ``stop``."""
    connection = KeepAlive(port, timeout=LIVE_TIMEOUT_S)
    request = request_bytes("GET", "/v2/health/live")
    try:
        while not stop.is_set():
            started = time.monotonic()
            exchange = connection.request(request)
            took = time.monotonic() - started
            if exchange.answer is not None:
                result = str(exchange.answer.status)
                series.append((round(started - origin, 3), round(took * 1000, 3), result))
            else:
                series.append((round(started - origin, 3), None, exchange.failure or "no answer"))
            stop.wait(max(0.0, LIVE_EVERY_S - took))
    finally:
        connection.close()


def watch(pid: int, port: int, origin: float, stop: Event, out: str, limit_s: float) -> None:
    """Sample until ``stop`` is set (or for ``limit_s`` at most), then write both series to ``out`` as JSON.
    ``origin`` is a monotonic time of the parent's (one clock for the whole machine on Linux), so both processes'
    times line up."""
    memory: list[tuple[float, float, float]] = []
    liveness: list[tuple[float, float | None, str]] = []
    threads = [
        threading.Thread(target=sample_memory, args=(pid, origin, stop, memory), daemon=True),
        threading.Thread(target=probe_liveness, args=(port, origin, stop, liveness), daemon=True),
    ]
    for thread in threads:
        thread.start()
    stop.wait(limit_s)
    stop.set()
    for thread in threads:
        thread.join(LIVE_TIMEOUT_S + 1)
    Path(out).write_text(json.dumps({"memory": memory, "liveness": liveness}))
