"""Load generation: one wrk run (REST), its numbers parsed from the Lua report line; one grpc_load.py run (gRPC)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WRK_DIR = Path(__file__).resolve().parent / "wrk"
REPORT_PREFIX = "WRK_JSON "
GRPC_REPORT_PREFIX = "GRPC_JSON "  # grpc_load.py's report line


class LoadError(RuntimeError):
    """wrk could not run, or printed no report."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """One wrk run: which script and body file, how many connections and threads."""

    name: str
    script: str  # file name under bench/wrk/
    body_file: Path
    connections: int
    threads: int
    header_length: int | None = None  # binary extension only


def wrk_version(wrk: str = "wrk") -> str | None:
    path = shutil.which(wrk)
    if path is None:
        return None
    # wrk prints its version line in the usage text and exits 1 for -v.
    done = subprocess.run([path, "-v"], check=False, capture_output=True, text=True, timeout=10)
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].split(" Copyright")[0] if text else path


def run(scenario: Scenario, url: str, duration_s: float, wrk: str = "wrk", timeout_s: float = 10.0) -> dict[str, Any]:
    """Run wrk once against ``url``; returns its report plus derived rates and the raw text."""
    argv = [
        wrk,
        f"-t{scenario.threads}",
        f"-c{scenario.connections}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={round(timeout_s)}s",
        "--latency",
        "-s",
        str(WRK_DIR / scenario.script),
        url,
        "--",
        str(scenario.body_file),
    ]
    if scenario.header_length is not None:
        argv.append(str(scenario.header_length))
    try:
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
    except FileNotFoundError as exc:
        raise LoadError(f"wrk not found ({exc}); install it: apt-get install -y wrk") from exc
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"wrk did not finish within {duration_s + timeout_s + 30:.0f} s") from exc
    lines = [line for line in done.stdout.splitlines() if line.startswith(REPORT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise LoadError(f"wrk exited {done.returncode} without a report:\n{done.stdout}\n{done.stderr}")
    report: dict[str, Any] = json.loads(lines[-1][len(REPORT_PREFIX) :])
    seconds = report["duration_us"] / 1e6
    errors: dict[str, int] = report["errors"]
    requests: int = report["requests"]
    # wrk's "Non-2xx or 3xx responses" is errors.status; the rest are socket-level failures.
    failed = sum(errors.values())
    report.update(
        scenario=scenario.name,
        connections=scenario.connections,
        threads=scenario.threads,
        requests_per_s=requests / seconds if seconds else 0.0,
        ok_requests_per_s=max(requests - errors["status"], 0) / seconds if seconds else 0.0,
        non_2xx=errors["status"],
        socket_errors=failed - errors["status"],
        has_errors=failed > 0,
        wrk_text=done.stdout.replace(lines[-1], "").strip(),
    )
    return report


def run_grpc(
    address: str, request_file: Path, concurrency: int, duration_s: float, python: str, warmup_s: float = 0.0
) -> dict[str, Any]:
    """Run ``grpc_load.py`` once (its own process, as wrk is); returns its report."""
    argv = [
        python,
        str(Path(__file__).resolve().parent / "grpc_load.py"),
        address,
        str(request_file),
        f"--concurrency={concurrency}",
        f"--duration={duration_s}",
        f"--warmup={warmup_s}",
    ]
    limit = duration_s + warmup_s + 60
    try:
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"grpc_load did not finish within {limit:.0f} s") from exc
    lines = [line for line in done.stdout.splitlines() if line.startswith(GRPC_REPORT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise LoadError(f"grpc_load exited {done.returncode} without a report:\n{done.stdout}\n{done.stderr}")
    report: dict[str, Any] = json.loads(lines[-1][len(GRPC_REPORT_PREFIX) :])
    return report
