"""A bounded soak of the real server: one ``python -m zeroserve.runtime`` process (REST and gRPC) under a mix of
valid and invalid requests for ``--duration`` seconds, its memory and liveness sampled throughout, then a SIGTERM
while the load goes on. Not a test (pytest does not collect it). Run from the repository root:

    .venv/bin/python bench/soak.py                 # 10 minutes
    .venv/bin/python bench/soak.py --quick         # 60 seconds
    .venv/bin/python bench/soak.py --duration 120 --clients 3

Prints the report and writes it (``report.txt``, ``report.json``) with the server's log under
``bench/results/soak-<stamp>/``. Exits 1 when the server answered a 5xx, crashed, lost an accepted request, gave a
wrong answer or one a case does not expect, failed a liveness probe, exited non-zero or drained past
``--shutdown_timeout``; 0 otherwise. What each case sends and accepts: ``soak_cases.py``; bench/README.md, "Soak".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import soak_report
import soak_watch
from servers import free_port
from soak_cases import EXPECTED, GRPC_METHOD, Case, Limits, Outcome, Session, build_cases, sigterm_burst, verdict
from soak_http import HOST, REFUSED, KeepAlive, one_shot, request_bytes
from soak_payloads import Sample, build_samples, heavy_sample, write_models
from soak_report import Control, Tally

Samples = dict[str, list[Sample]]
BurstSend = Callable[[int, Callable[[], None]], Outcome]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REQUEST_TIMEOUT_S = 30.0
READY_DEADLINE_S = 60.0
EXIT_GRACE_S = 15.0  # past --shutdown_timeout, before the soak kills a server that has not exited
AFTER_EXIT_S = 1.0  # load kept on after the server exited, so that refusals are seen and counted
# Pauses between one worker's requests: the valid ones keep the server busy, the heavier abuse leaves it room.
PAUSE_S = {"rest": 0.0, "grpc": 0.0, "invalid": 0.02, "abuse": 0.05}
REFUSED_PAUSE_S = 0.05
BURST = 8  # heavy requests sent in full just before the SIGTERM, each on its own connection

# Keeps every bound small enough to be reached within a soak (gzip bomb, BYTES elements, idle connections).
MAX_REQUEST_MIB = 32
SERVER_FLAGS = {
    "--max_inflight_mib": "256",
    "--max_connections": "256",
    "--timeout_keep_alive": "5",
    "--max_request_mib": str(MAX_REQUEST_MIB),
    "--max_bytes_elements": str(2**20),  # the default, stated: the BYTES case sends one element more
    "--shutdown_timeout": "10",
}


def work(cases: Sequence[Case], session: Session, tally: Tally, control: Control, pause_s: float) -> None:
    """Run ``cases`` in turn until told to stop."""
    turn = 0
    while not control.stop_load.is_set():
        case = cases[turn % len(cases)]
        turn += 1
        outcomes = case.run(session)
        for outcome in outcomes:
            tally.record(case, outcome, control)
        refused = any(outcome.result == REFUSED for outcome in outcomes)
        control.stop_load.wait(REFUSED_PAUSE_S if refused else pause_s)


def grpc_caller(address: str) -> tuple[Any, Any]:
    """A channel of the worker's own, and a bytes-in, bytes-out ModelInfer call on it."""
    import grpc

    options = [("grpc.max_receive_message_length", 2**30), ("grpc.max_send_message_length", 2**30)]
    channel = grpc.insecure_channel(address, options=options)
    method = channel.unary_unary(GRPC_METHOD)
    return channel, lambda data: method(data, timeout=REQUEST_TIMEOUT_S)


def worker(group: str, cases: list[Case], session: Session, tally: Tally, control: Control, grpc_address: str) -> None:
    channel = None
    if group == "grpc":
        channel, session.grpc_call = grpc_caller(grpc_address)
    try:
        work(cases, session, tally, control, PAUSE_S[group])
    finally:
        session.http.close()
        if channel is not None:
            channel.close()


@dataclass(frozen=True, slots=True)
class Target:
    """The server under soak."""

    process: subprocess.Popen[bytes]
    port: int
    grpc_address: str
    log_path: Path


def launch(repository: Path, log_path: Path) -> Target:
    port, grpc_port = free_port(), free_port()
    argv = [sys.executable, "-m", "zeroserve.runtime", "--host", HOST, "--http_port", str(port),
            "--grpc_port", str(grpc_port), "--model_dir", str(repository),
            *(part for flag in SERVER_FLAGS.items() for part in flag)]  # fmt: skip
    with log_path.open("wb") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    return Target(process, port, f"{HOST}:{grpc_port}", log_path)


def wait_ready(target: Target) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        if target.process.poll() is not None:
            raise RuntimeError(f"the server exited with code {target.process.returncode} before it was ready")
        exchange = one_shot(target.port, request_bytes("GET", "/v2/health/ready"), timeout=2)
        if exchange.answer is not None and exchange.answer.status == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the server was not ready within {READY_DEADLINE_S:.0f} s")


def preflight(cases: list[Case], target: Target, samples: Samples, limits: Limits) -> None:
    """Run every case once, alone: anything not as expected here is a broken soak, not a soak finding."""
    session = Session(target.port, samples, limits, KeepAlive(target.port, REQUEST_TIMEOUT_S))
    channel, session.grpc_call = grpc_caller(target.grpc_address)
    problems = []
    try:
        for case in cases:
            for outcome in case.run(session):
                if verdict(case, outcome, None) != EXPECTED:
                    problems.append(f"{case.name}: {outcome.result} {outcome.wrong or outcome.detail}")
    finally:
        session.http.close()
        channel.close()
    if problems:
        raise SystemExit("the soak's own checks failed before the load began:\n  " + "\n  ".join(problems))


def start_workers(
    cases: list[Case], clients: int, target: Target, samples: Samples, limits: Limits, control: Control
) -> tuple[list[threading.Thread], list[Tally]]:
    """``clients`` workers per group, each starting at another case of its group."""
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.group, []).append(case)
    threads, tallies = [], []
    for group, members in groups.items():
        for index in range(clients):
            tally = Tally()
            session = Session(target.port, samples, limits, KeepAlive(target.port, REQUEST_TIMEOUT_S), turn=index)
            shift = index * len(members) // clients
            rotated = members[shift:] + members[:shift]
            thread = threading.Thread(target=worker, args=(group, rotated, session, tally, control,
                                                           target.grpc_address),
                                      name=f"{group}-{index}", daemon=True)  # fmt: skip
            threads.append(thread)
            tallies.append(tally)
            thread.start()
    return threads, tallies


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def log_errors(path: Path) -> list[str]:
    """The server log's ERROR and CRITICAL lines and tracebacks (warnings are its refusals, expected here)."""
    return [line for line in path.read_text(errors="replace").splitlines()
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]  # fmt: skip


def progress(control: Control, tallies: list[Tally], pid: int) -> None:
    elapsed = time.monotonic() - control.origin
    memory = soak_watch.memory_kib(pid)
    rss = f"{memory[0] / 1024:.0f} MiB" if memory else "gone"
    print(f"[{elapsed:4.0f} s] {sum(t.requests for t in tallies):,} requests, server RSS {rss}", flush=True)


def run_load(target: Target, control: Control, tallies: list[Tally], duration: float) -> float | None:
    """Let the load run for ``duration`` seconds; return the moment the server died, or None when it lived."""
    deadline = control.origin + duration
    next_progress = control.origin + 60.0
    while (now := time.monotonic()) < deadline:
        if target.process.poll() is not None:
            return now
        if now >= next_progress:
            progress(control, tallies, target.process.pid)
            next_progress += 60.0
        time.sleep(0.25)
    return None


def send_burst(target: Target, send: BurstSend, tally: Tally, case: Case, control: Control) -> list[threading.Thread]:
    """BURST requests on connections of their own; returns once each is fully sent (or failed), answers pending."""
    out = [threading.Event() for _ in range(BURST)]

    def one(flag: threading.Event) -> None:
        try:
            tally.record(case, send(target.port, flag.set), control)
        finally:
            flag.set()

    threads = [threading.Thread(target=one, args=(flag,), daemon=True, name="burst") for flag in out]
    for thread in threads:
        thread.start()
    for flag in out:
        flag.wait(REQUEST_TIMEOUT_S)
    return threads


def stop_server(target: Target, control: Control) -> dict[str, Any]:
    """SIGTERM under load; wait (bounded) for the exit, its code and the drain's length."""
    shutdown_timeout = float(SERVER_FLAGS["--shutdown_timeout"])
    control.sigterm_at = time.monotonic()
    target.process.send_signal(signal.SIGTERM)
    try:
        code: int | None = target.process.wait(timeout=shutdown_timeout + EXIT_GRACE_S)
    except subprocess.TimeoutExpired:
        target.process.kill()
        target.process.wait(timeout=EXIT_GRACE_S)
        code = None
    drain = time.monotonic() - control.sigterm_at
    return {"exit_code": code, "drain_s": round(drain, 3), "shutdown_timeout_s": shutdown_timeout,
            "killed": code is None}  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load before the SIGTERM")
    parser.add_argument("--quick", action="store_true", help="60 s (sets --duration)")
    parser.add_argument("--clients", type=int, default=2, help="workers per group (rest, grpc, invalid, abuse)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 60.0
    if args.clients < 1 or args.duration <= 0:
        parser.error("--clients and --duration must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = RESULTS_DIR / f"soak-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        report = soak(args, Path(tmp), out_dir)
    text = soak_report.render(report)
    print(text)
    (out_dir / "report.txt").write_text(text + "\n")
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    print(f"written to {out_dir}")
    return 1 if report["failures"] else 0


def soak(args: argparse.Namespace, tmp: Path, out_dir: Path) -> dict[str, Any]:
    """Models, server, preflight, the load with its watcher, the SIGTERM; returns the report's data."""
    repository = tmp / "repository"
    write_models(repository)
    samples = build_samples(repository)
    burst_case, burst_send = sigterm_burst(heavy_sample(repository))
    limits = Limits(float(SERVER_FLAGS["--timeout_keep_alive"]), MAX_REQUEST_MIB * 2**20,
                    int(SERVER_FLAGS["--max_bytes_elements"]))  # fmt: skip
    cases = build_cases(limits)
    target = launch(repository, out_dir / "server.log")
    try:
        wait_ready(target)
        preflight(cases, target, samples, limits)
        control = Control(time.monotonic(), 60.0 if args.duration >= 300 else 10.0)
        watch_stop, watcher, watch_path = start_watcher(target, control, tmp, args.duration)
        threads, tallies = start_workers(cases, args.clients, target, samples, limits, control)
        died_at = run_load(target, control, tallies, args.duration)
        shutdown = None
        if died_at is None:
            control.stop_phase.set()
            time.sleep(0.5)  # every request in flight now finishes inside the stop phase, and is kept whole
            burst_tally = Tally()
            tallies.append(burst_tally)
            threads += send_burst(target, burst_send, burst_tally, burst_case, control)
            watch_stop.set()
            shutdown = stop_server(target, control)
        watch_stop.set()
        time.sleep(AFTER_EXIT_S)
        control.stop_load.set()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT_S + 5)
        series = stop_watcher(watcher, watch_path)
    finally:
        if target.process.poll() is None:
            target.process.kill()
            target.process.wait(timeout=EXIT_GRACE_S)
    crash = {"crashed": died_at is not None, "exit_code": target.process.returncode,
             "at_s": None if died_at is None else round(died_at - control.origin, 1),
             "log_tail": log_tail(target.log_path) if died_at is not None else ""}  # fmt: skip
    return soak_report.build(
        config={"duration_s": args.duration, "clients": args.clients, "server_flags": SERVER_FLAGS,
                "pauses_s": PAUSE_S, "sigterm_burst": BURST, "cpus": os.cpu_count(),
                "loadavg_end": os.getloadavg()},  # fmt: skip
        cases=[*cases, burst_case],
        tallies=tallies,
        control=control,
        series=series,
        crash=crash,
        shutdown=shutdown,
        stuck_workers=[thread.name for thread in threads if thread.is_alive()],
        log_errors=log_errors(target.log_path),
    )


def start_watcher(target: Target, control: Control, tmp: Path, duration: float) -> tuple[Any, Any, Path]:
    """The memory and liveness watcher, in a process of its own; returns its stop event, process and output."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    path = tmp / "watch.json"
    process = context.Process(target=soak_watch.watch, args=(target.process.pid, target.port, control.origin, stop,
                                                             str(path), duration + 60), daemon=True)  # fmt: skip
    process.start()
    return stop, process, path


def stop_watcher(process: Any, path: Path) -> dict[str, Any]:
    process.join(soak_watch.LIVE_TIMEOUT_S + 5)
    if process.is_alive():
        process.kill()
        process.join(5)
    series: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"memory": [], "liveness": []}
    return series


if __name__ == "__main__":
    sys.exit(main())
