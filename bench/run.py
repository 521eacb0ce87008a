"""One benchmark run: the throughput matrix of each server beside raw onnxruntime, and cold starts.

Usage: .venv/bin/python bench/run.py [--quick] [--servers zeroserve,kserve] [--models tiny,image,large]
       [--protocols rest-json,rest-binary,grpc] [--concurrency 1,4,16,64] [--duration S]

The matrix is server x model x protocol x concurrency. All numbers come from the same run on the same machine,
because on a shared machine only ratios measured together mean anything. REST: servers run one at a time, one
model at a time; gRPC: every server up together, loaded one at a time in alternating rounds. Each runs on free
127.0.0.1 ports and is stopped by PID. Writes ``bench/results/<stamp>/results.json`` (raw numbers, ratios, goals,
machine facts, flags) and ``report.md``, and prints the report. Exits 1 when any request failed or any answer was
wrong (see "FLAGS"), 0 otherwise; a skipped server or an unsupported protocol is not a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc_load
import load
import matrix
import numpy as np
import payloads
import report
import servers
from settings import COLD_START_SERVERS, Settings, parse_args

import models

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mlserver_version() -> str | None:
    python = servers.MLSERVER_PYTHON
    if not python.exists():
        return None
    probe = "import importlib.metadata as m; print(m.version('mlserver'))"
    done = subprocess.run([str(python), "-c", probe], check=False, capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or None


def machine_facts() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models_named = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cpu_model = models_named[0] if models_named else platform.processor()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": _version("onnxruntime"),
        "kserve": _version("kserve"),
        "mlserver": _mlserver_version(),
        "zeroserve": _version("zeroserve"),
        "numpy": _version("numpy"),
        "wrk": load.wrk_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


class Run:
    """The state of one run: where files go, what was measured, what went wrong."""

    def __init__(self, settings: Settings, out_dir: Path) -> None:
        self.settings = settings
        self.out_dir = out_dir
        self.models_dir = RESULTS_DIR / "models"
        self.flags: list[str] = []
        self.result: dict[str, Any] = {
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "settings": dataclasses.asdict(settings),
            "machine": machine_facts(),
            "servers": {},
            "flags": self.flags,
        }
        self.expected: dict[str, np.ndarray] = {}
        self.bodies: dict[str, payloads.Body] = {}
        self.body_files: dict[str, Path] = {}
        self.grpc_requests: dict[str, Path] = {}  # model -> serialized ModelInferRequest

    def flag(self, message: str) -> None:
        print(f"FLAG: {message}", file=sys.stderr)
        self.flags.append(message)

    def log(self, message: str) -> None:
        print(f"[{dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)

    # -- preparation ------------------------------------------------------------------------------

    def prepare(self) -> None:
        models.write_models(self.models_dir, self.settings.models)
        for model in self.settings.models:
            for name, body in (
                (f"{model}_json", payloads.json_body(model)),
                (f"{model}_binary", payloads.binary_body(model)),
            ):
                path = self.out_dir / "bodies" / f"{name}.bin"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(body.data)
                self.bodies[name], self.body_files[name] = body, path
            input_name, _, _ = payloads.MODELS[model]
            path = self.out_dir / "bodies" / f"{model}_grpc.bin"
            path.write_bytes(grpc_load.request_bytes(model, input_name, payloads.model_input(model)))
            self.grpc_requests[model] = path

    def baseline(self, when: str = "start") -> None:
        """Raw onnxruntime numbers. Run at the start (the reference, and the expected outputs) and
        again at the end (``baseline_end``), so drift in the machine's load during the run shows."""
        self.log(f"raw onnxruntime baseline at {when} ({self.settings.baseline_s:g} s per measurement)")
        out = self.out_dir / f"baseline-{when}.json"
        argv = [
            *(self.settings.python, str(BENCH_DIR / "baseline.py"), str(self.models_dir)),
            *("--duration", str(self.settings.baseline_s), "--json", str(out)),
            *(part for model in self.settings.models for part in ("--only", model)),
        ]
        if when == "start":
            argv += ["--expected", str(self.out_dir / "expected")]
        subprocess.run(argv, check=True, timeout=120 + 30 * self.settings.baseline_s)
        if when != "start":
            self.result[f"baseline_{when}"] = json.loads(out.read_text())
            return
        self.result["baseline"] = json.loads(out.read_text())
        self.result["machine"]["onnxruntime"] = self.result["baseline"]["onnxruntime"]
        for model in self.settings.models:
            self.expected[model] = np.load(self.out_dir / "expected" / f"{model}.npy")

    # -- per-server measurements ------------------------------------------------------------------

    def check_answer(self, server: servers.Server, model: str, body_name: str) -> str:
        """Send one request and compare the answer with raw onnxruntime; 'ok' or what is wrong."""
        body = self.bodies[body_name]
        status, headers, data = servers.request(server.port, "POST", server.infer_path, body.data, body.headers())
        if status != 200:
            return f"HTTP {status}: {data[:300]!r}"
        try:
            got = payloads.decode_response(data, headers)
        except (ValueError, KeyError, TypeError) as exc:
            return f"undecodable response ({exc}): {data[:300]!r}"
        return payloads.check_outputs(model, got, self.expected[model]) or "ok"

    def check_grpc_answer(self, server: servers.Server, model: str) -> str:
        """One ModelInfer call, its answer compared with raw onnxruntime's; 'ok' or what is wrong."""
        payload = self.grpc_requests[model].read_bytes()
        code, answer, details = asyncio.run(grpc_load.call_once(server.grpc_address, payload))
        if answer is None:
            return f"gRPC {code}: {details[:300]}"
        try:
            got = grpc_load.decode_answer(answer)
        except (ValueError, KeyError) as exc:
            return f"undecodable answer ({exc})"
        return payloads.check_outputs(model, got, self.expected[model]) or "ok"

    def cold_start_once(self, kind: str, label: str) -> float:
        """Launch, poll POST infer every 5 ms until a 200, stop; seconds from launch to that answer."""
        body = self.bodies["tiny_json"]
        log_path = self.out_dir / "logs" / f"{kind}-cold-{label}.log"
        server = servers.launch(kind, self.settings.python, "tiny", self.models_dir / "tiny", log_path)
        try:
            elapsed, data, headers = server.poll_until(
                "POST", server.infer_path, body.data, body.headers(), deadline_s=120
            )
        finally:
            server.stop()
        problem = payloads.check_outputs("tiny", payloads.decode_response(data, headers), self.expected["tiny"])
        if problem:
            self.flag(f"{kind} cold start {label}: first answer wrong: {problem}")
        return elapsed

    def cold_starts(self, kinds: Sequence[str]) -> None:
        """One warm-up launch per server, then rounds of one launch each, alternating the order."""
        n = self.settings.cold_starts
        self.log(f"cold start: 1 warm-up + {n} launches per server, interleaved")
        samples: dict[str, list[float]] = {k: [] for k in kinds}
        live = list(kinds)
        for round_ in range(n + 1):
            for kind in list(live) if round_ % 2 == 0 else list(reversed(live)):
                try:
                    samples[kind].append(self.cold_start_once(kind, "warmup" if round_ == 0 else str(round_)))
                except servers.ServerError as exc:
                    self.flag(f"{kind} cold start aborted: {str(exc).splitlines()[0]}")
                    self.result["servers"][kind].setdefault("errors", []).append(str(exc))
                    print(exc, file=sys.stderr)
                    live.remove(kind)
        for kind in live:
            self.result["servers"][kind]["cold_start"] = {
                "median_s": statistics.median(samples[kind][1:]),
                "samples_s": samples[kind][1:],
                "warmup_s": samples[kind][0],
                "poll_sleep_s": servers.POLL_SLEEP_S,
            }

    def scenario(
        self, server: servers.Server, name: str, body_name: str, connections: int, threads: int
    ) -> dict[str, Any]:
        """Warm up, let the server drain, then one measured wrk run with the server's CPU time."""
        body = self.bodies[body_name]
        script = "binary.lua" if body.header_length is not None else "json.lua"
        spec = load.Scenario(name, script, self.body_files[body_name], connections, threads, body.header_length)
        url = server.url + server.infer_path
        load.run(spec, url, self.settings.warmup_s)  # discarded
        drained_s = server.wait_idle()
        cpu_before = server.cpu_seconds()
        stats = load.run(spec, url, self.settings.duration_s)
        cpu_after = server.cpu_seconds()
        stats["drain_before_s"] = drained_s
        stats["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        if cpu_before is not None and cpu_after is not None and stats["requests"]:
            stats["server_cpu_ms_per_request"] = (cpu_after - cpu_before) * 1e3 / stats["requests"]
        server.wait_idle()
        if stats["has_errors"]:
            self.flag(
                f"{server.kind} {name}: {stats['non_2xx']} non-2xx responses, "
                f"{stats['socket_errors']} socket errors of {stats['requests']} requests"
            )
        if not stats["requests"]:
            self.flag(f"{server.kind} {name}: no request completed in {self.settings.duration_s:g} s")
        p50_ms = stats["latency_us"]["percentiles"]["50"] / 1e3
        self.log(f"  {server.kind} {name}: {stats['ok_requests_per_s']:.1f} req/s, p50 {p50_ms:.2f} ms")
        return stats

    def raw_p50_us(self, model: str, seconds: float) -> float | None:
        """Raw session.run p50 of ``model`` now (a short run in its own process), for a ratio with a
        server's single-call run measured right after it: the machine's load drifts within a run."""
        out = self.out_dir / f"raw-{model}-{dt.datetime.now():%H%M%S%f}.json"
        argv = [
            *(self.settings.python, str(BENCH_DIR / "baseline.py"), str(self.models_dir)),
            *("--only", model, "--latency-only", "--duration", str(seconds), "--json", str(out)),
        ]
        subprocess.run(argv, check=True, timeout=120 + 10 * seconds)
        p50: float | None = json.loads(out.read_text()).get(model, {}).get("latency", {}).get("p50_us")
        return p50

    def grpc_window(self, server: servers.Server, model: str, concurrency: int, seconds: float) -> dict[str, Any]:
        """One measured grpc_load.py run against an idle server, with the server's CPU time."""
        drained_s = server.wait_idle()
        cpu_before = server.cpu_seconds()
        request, python = self.grpc_requests[model], self.settings.python
        stats = load.run_grpc(server.grpc_address, request, concurrency, seconds, python)
        cpu_after = server.cpu_seconds()
        stats["drain_before_s"] = drained_s
        stats["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        if cpu_before is not None and cpu_after is not None:
            stats["server_cpu_s"] = cpu_after - cpu_before
        return stats

    def grpc_scenario(self, running: dict[str, servers.Server], name: str, model: str, concurrency: int) -> None:
        """Every server under the same gRPC load, in ``grpc_rounds`` rounds of alternating order, so that
        drift in the shared machine's load falls on all of them alike. A single-call scenario also measures
        raw session.run in each round, just before the servers (``raw_p50_us_adjacent``)."""
        rounds = self.settings.grpc_rounds
        # Windows of half a REST cell: a p99 from one 2.5 s window rests on its 2-3 slowest calls, which one
        # hiccup of the shared machine decides, so the median of 4 such windows is reported (2 decided nothing:
        # CNN c1, each server's p99 swung 13 <-> 20 ms between the two rounds of one run).
        seconds = self.settings.duration_s / 2 if rounds > 1 else self.settings.duration_s
        for server in running.values():  # discarded warm-up
            load.run_grpc(server.grpc_address, self.grpc_requests[model], concurrency, self.settings.warmup_s,
                          self.settings.python)
        windows: dict[str, list[dict[str, Any]]] = {kind: [] for kind in running}
        raw: list[float] = []
        for round_ in range(rounds):
            if concurrency == 1:
                p50 = self.raw_p50_us(model, seconds)
                if p50 is not None:
                    raw.append(p50)
            order = list(running) if round_ % 2 == 0 else list(reversed(running))
            for kind in order:
                windows[kind].append(self.grpc_window(running[kind], model, concurrency, seconds))
        for kind, parts in windows.items():
            stats = _combine(parts)
            if raw:
                stats["raw_p50_us_adjacent"] = statistics.median(raw)
                stats["raw_p50_us_rounds"] = raw
            self.result["servers"][kind].setdefault("load", {})[name] = stats
            if stats["has_errors"]:
                self.flag(f"{kind} {name}: failed calls {stats['failures']} of {stats['requests']}")
            if not stats["ok_requests"]:
                self.flag(f"{kind} {name}: no call completed in {self.settings.duration_s:g} s")
            p50 = stats["latency_us"]["percentiles"]["50"]
            p50_text = "–" if p50 is None else f"{p50 / 1e3:.2f} ms"
            self.log(f"  {kind} {name}: {stats['ok_requests_per_s']:.1f} calls/s, p50 {p50_text}")

    def grpc_phase(self, kinds: Sequence[str], model: str) -> None:
        """Every server serving one model with gRPC on, all up at once (an idle one uses no CPU; measured:
        under 0.01 core), each answer checked, then each concurrency with the servers interleaved."""
        self.log(f"{', '.join(kinds)}: {model} model over gRPC, interleaved in {self.settings.grpc_rounds} rounds")
        with contextlib.ExitStack() as stack:
            running: dict[str, servers.Server] = {}
            for kind in kinds:  # launched together, then waited for: MLServer alone takes ~10 s to start here
                log_path = self.out_dir / "logs" / f"{kind}-{model}-grpc.log"
                running[kind] = servers.launch(
                    kind, self.settings.python, model, self.models_dir / model, log_path, grpc=True
                )
                stack.callback(running[kind].stop)
            for kind, server in list(running.items()):  # one that never starts leaves the others to measure
                try:
                    server.wait_ready(deadline_s=120)
                except servers.ServerError as exc:
                    self.result["servers"][kind].setdefault("errors", []).append(str(exc))
                    self.flag(f"{kind} {model} gRPC: {str(exc).splitlines()[0]} (logs: {self.out_dir / 'logs'})")
                    print(exc, file=sys.stderr)
                    server.stop()
                    del running[kind]
            for kind, server in running.items():
                check = f"{model}_grpc"
                checks = self.result["servers"][kind].setdefault("checks", {})
                checks[check] = self.check_grpc_answer(server, model)
                if checks[check] != "ok":
                    self.flag(f"{kind} {check}: wrong answer: {checks[check]}")
            for kind, server in running.items():  # all up, all idle: each one's own footprint with gRPC on
                server.wait_idle()
                self.result["servers"][kind].setdefault("rss_idle_grpc_mib", {})[model] = server.rss_mib()
            for concurrency in self.settings.concurrency:
                self.grpc_scenario(running, matrix.cell(model, "grpc", concurrency), model, concurrency)

    def measure_grpc(self, kinds: Sequence[str]) -> None:
        for model in self.settings.models:
            try:
                self.grpc_phase(kinds, model)
            except (servers.ServerError, load.LoadError, OSError, subprocess.SubprocessError) as exc:
                for kind in kinds:
                    self.result["servers"][kind].setdefault("errors", []).append(str(exc))
                self.flag(f"{model} gRPC: aborted: {str(exc).splitlines()[0]} (logs: {self.out_dir / 'logs'})")
                print(exc, file=sys.stderr)

    def binary_supported(self, kind: str, server: servers.Server, model: str) -> bool:
        """A server that does not claim the binary extension is asked once, with one binary request; what it
        answered is recorded, and its binary cells say "unsupported" unless that answer was right."""
        data = self.result["servers"][kind]
        if servers.KINDS[kind].binary_extension:
            return True
        if "binary_extension" not in data:
            answer = self.check_answer(server, model, f"{model}_binary")
            data["binary_extension"] = {"supported": answer == "ok", "model": model, "answer": answer}
            self.log(f"  {kind} binary extension: {answer}")
        return bool(data["binary_extension"]["supported"])

    def model_phase(self, kind: str, model: str) -> None:
        """One server serving one model over REST: check its answers, idle RSS, the load cells, stop it."""
        data = self.result["servers"][kind]
        checks, loads = data.setdefault("checks", {}), data.setdefault("load", {})
        self.log(f"{kind}: {model} model over REST")
        log_path = self.out_dir / "logs" / f"{kind}-{model}.log"
        model_dir = self.models_dir / model
        with servers.running(kind, self.settings.python, model, model_dir, log_path, ready_deadline_s=120) as server:
            binary = self.binary_supported(kind, server, model)
            for body_name in (f"{model}_json", f"{model}_binary") if binary else (f"{model}_json",):
                checks[body_name] = self.check_answer(server, model, body_name)
                if checks[body_name] != "ok":
                    self.flag(f"{kind} {body_name}: wrong answer: {checks[body_name]}")
            server.wait_idle()
            data.setdefault("rss_idle_mib", {})[model] = server.rss_mib()
            for protocol in (p for p in self.settings.protocols if p in matrix.REST_PROTOCOLS):
                body_name = f"{model}_{matrix.PROTOCOLS[protocol][0]}"
                for concurrency in self.settings.concurrency:
                    name = matrix.cell(model, protocol, concurrency)
                    if protocol == "rest-binary" and not binary:
                        loads[name] = {"unsupported": data["binary_extension"]["answer"]}
                        continue
                    loads[name] = self.scenario(server, name, body_name, concurrency, min(2, concurrency))
            data.setdefault("rss_mib", {})[model] = server.rss_mib()

    def measure_server(self, kind: str) -> None:
        for model in self.settings.models:
            try:
                self.model_phase(kind, model)
            except (servers.ServerError, load.LoadError, OSError, subprocess.SubprocessError) as exc:
                self.result["servers"][kind].setdefault("errors", []).append(str(exc))
                self.flag(f"{kind} {model}: aborted: {str(exc).splitlines()[0]} (logs: {self.out_dir / 'logs'})")
                print(exc, file=sys.stderr)

    # -- the whole run ----------------------------------------------------------------------------

    def execute(self) -> None:
        self.prepare()
        available: list[str] = []
        for kind in self.settings.servers:
            reason = servers.unavailable_reason(kind, self.settings.python)
            self.result["servers"][kind] = {"skipped": reason} if reason else {}
            if reason:
                print(f"SKIP {kind}: {reason}", file=sys.stderr)
            else:
                available.append(kind)
        self.baseline()
        rest = any(p in matrix.REST_PROTOCOLS for p in self.settings.protocols)
        cold = [k for k in available if k in COLD_START_SERVERS]
        if cold and rest and self.settings.cold_starts > 0:
            if "tiny" in self.settings.models:
                self.cold_starts(cold)
            else:
                self.log("cold starts skipped: they launch the tiny model, which --models leaves out")
        if available and rest:
            for kind in available:
                self.measure_server(kind)
        if available and "grpc" in self.settings.protocols:
            self.measure_grpc(available)
        self.baseline("end")
        self.result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        self.result["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.result["ratios"] = report.ratios(self.result)
        self.result["goals"] = report.goals(self.result)


def _combine(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One scenario's numbers from its rounds: totals for counts and CPU, medians of the rounds' percentiles."""
    duration = sum(part["duration_s"] for part in parts)
    requests = sum(part["requests"] for part in parts)
    ok = sum(part["ok_requests"] for part in parts)
    failures: dict[str, int] = {}
    for part in parts:
        for code, count in part["failures"].items():
            failures[code] = failures.get(code, 0) + count

    def median_of(key: str) -> float | None:
        values = [part["latency_us"]["percentiles"][key] for part in parts]
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    cpu = [part.get("server_cpu_s") for part in parts]
    stats: dict[str, Any] = {
        "concurrency": parts[0]["concurrency"],
        "duration_s": duration,
        "requests": requests,
        "ok_requests": ok,
        "ok_requests_per_s": ok / duration if duration else 0.0,
        "failures": failures,
        "has_errors": bool(failures),
        "latency_us": {"percentiles": {key: median_of(key) for key in ("50", "90", "99")}},
        "client_cpu_s": sum(part["client_cpu_s"] for part in parts),
        "rounds": [
            {k: part[k] for k in ("ok_requests_per_s", "latency_us", "loadavg_after", "drain_before_s")}
            for part in parts
        ],
    }
    if requests and all(c is not None for c in cpu):
        stats["server_cpu_ms_per_request"] = sum(c for c in cpu if c is not None) * 1e3 / requests
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv, __doc__.splitlines()[0])
    if load.wrk_version() is None:
        print("wrk not found on PATH; install it: apt-get update && apt-get install -y wrk", file=sys.stderr)
        return 2
    out_dir = RESULTS_DIR / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(settings, out_dir)
    run.execute()
    table = report.markdown(run.result)
    (out_dir / "results.json").write_text(json.dumps(run.result, indent=2, default=str) + "\n")
    (out_dir / "report.md").write_text(table + "\n")
    print(table)
    print(f"\nresults: {out_dir / 'results.json'}", file=sys.stderr)
    return 1 if run.flags else 0


if __name__ == "__main__":
    sys.exit(main())
