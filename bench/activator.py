"""Measures of ``zeroserve dev`` (not a test; pytest does not collect it). Run from the repository root:

    .venv/bin/python bench/activator.py coldstart [--rounds 10] [--baseline d28015c]
    .venv/bin/python bench/activator.py never [--seconds 30]
    .venv/bin/python bench/activator.py coverage [--rounds 8]

- coldstart: a request sent to a scaled-to-zero activator, to its first 200 (POST /v2/models/mlp/infer), rounds
  interleaved with the activator of ``--baseline`` (its ``dev.py`` from git, run as a script) in the same run.
- never: a model that can never start (an .onnx cut short): the time to the first answer that says the start
  failed (5 fresh activators), and the processes started in ``--seconds`` by a client that retries as
  ``Retry-After`` says.
- coverage: cold calls inside a CLIENT span of the caller's; the share of each call's wall time covered by the
  server-side spans of its trace (OTLP/HTTP to a loopback receiver), with and without the activator's SERVER span.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import httpx  # noqa: E402

from tests.activator.conftest import BODY, ActivatorProcess, Receiver, wait_until  # noqa: E402

import models  # noqa: E402
from conftest import unused_port  # noqa: E402


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def coldstart(rounds: int, baseline: str, tmp: Path) -> None:
    script = tmp / "dev_baseline.py"
    script.write_text(subprocess.run(["git", "show", f"{baseline}:runtime-image/zeroserve/activator/dev.py"],
                                     cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    args = ["--idle_timeout", "0.3", "--model_name", "mlp", "--model_dir", str(tmp / "mlp")]
    variants = {f"before ({baseline})": [str(script)], "after": ["-m", "zeroserve.activator"]}
    running = {}
    for name, command in variants.items():
        port = unused_port()
        log = (tmp / f"{len(running)}.log").open("wb")
        running[name] = (subprocess.Popen([sys.executable, *command, "--port", str(port), *args], stdout=log,
                                          stderr=log), port)
    time.sleep(3)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with httpx.Client(timeout=60) as client:
        for round_ in range(rounds + 1):  # round 0 warms the page cache
            for name, (process, port) in running.items():
                wait_until(lambda pid=process.pid: not children(pid), 30, "scaled to zero")  # type: ignore[misc]
                time.sleep(0.2)
                began = time.perf_counter()
                response = client.post(f"http://127.0.0.1:{port}/v2/models/mlp/infer", json=BODY)
                assert response.status_code == 200, response.text
                if round_:
                    times[name].append(time.perf_counter() - began)
    for name, (process, _) in running.items():
        process.terminate()
        process.wait(60)
        ms = [t * 1000 for t in times[name]]
        print(f"{name}: {len(ms)} cold calls, median {statistics.median(ms):.0f} ms, mean {statistics.mean(ms):.0f}, "
              f"min {min(ms):.0f}, max {max(ms):.0f}")


def never(seconds: float, tmp: Path) -> None:
    whole = (tmp / "mlp" / "model.onnx").read_bytes()
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "model.onnx").write_bytes(whole[: len(whole) // 3])
    args = ["--model_name", "mlp", "--model_dir", str(tmp / "corrupt")]
    first = []
    for trial in range(5):
        dev = ActivatorProcess(args, tmp / f"never{trial}.log")
        began = time.monotonic()
        response = httpx.post(f"{dev.url}/v2/models/mlp/infer", json=BODY, timeout=60)
        first.append(time.monotonic() - began)
        assert response.headers["zeroserve-start"] == "failed", response.text
        dev.stop()
    print(f"first 'failed' answer: median {statistics.median(first):.2f} s, max {max(first):.2f} s, 1 process each: "
          f"{response.json()['start']}")
    dev = ActivatorProcess(args, tmp / "retry.log")
    began, sent = time.monotonic(), 0
    with httpx.Client(timeout=60) as client:
        while time.monotonic() - began < seconds:
            response = client.post(f"{dev.url}/v2/models/mlp/infer", json=BODY)
            sent += 1
            time.sleep(min(float(response.headers["retry-after"]), max(0.0, seconds - (time.monotonic() - began))))
    dev.stop()
    print(f"{seconds:g} s of requests that wait as Retry-After says: {sent} requests, {dev.starts()} processes started")


def coverage(rounds: int, tmp: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from tests.activator.test_tracing import covered, in_trace

    receiver = Receiver()
    dev = ActivatorProcess(["--model_name", "mlp", "--model_dir", str(tmp / "mlp"), "--idle_timeout", "0.3"],
                           tmp / "coverage.log", receiver.env)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    calls = []
    with httpx.Client(timeout=60) as client:
        for round_ in range(rounds):
            wait_until(lambda n=round_: dev.log().count("scaled to zero") >= n, 30)  # type: ignore[misc]
            time.sleep(0.3)
            with provider.get_tracer("caller").start_as_current_span("infer mlp", kind=SpanKind.CLIENT):
                carrier: dict[str, str] = {}
                TraceContextTextMapPropagator().inject(carrier)
                assert client.post(f"{dev.url}/v2/models/mlp/infer", json=BODY, headers=carrier).status_code == 200
            calls.append(exporter.get_finished_spans()[-1])
    dev.stop()
    time.sleep(1)
    shares = []
    for call in calls:
        spans = in_trace(receiver, call)
        without = [span for span in spans if span.name != "POST"]  # the activator's SERVER span
        shares.append((covered(call, spans), covered(call, without)))
        assert call.end_time is not None and call.start_time is not None
        print(f"cold call of {(call.end_time - call.start_time) / 1e6:.0f} ms: {shares[-1][0]:.3f} covered "
              f"({shares[-1][1]:.3f} without the activator's SERVER span)")
    print(f"median {statistics.median(s[0] for s in shares):.3f} ({statistics.median(s[1] for s in shares):.3f}), "
          f"lowest {min(s[0] for s in shares):.3f} ({min(s[1] for s in shares):.3f})")
    receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["coldstart", "never", "coverage"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--baseline", default="d28015c", help="git revision of the activator to compare with")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="zeroserve-dev-measure-"))
    models.mlp_model(tmp / "mlp" / "model.onnx")
    if args.what == "coldstart":
        coldstart(args.rounds, args.baseline, tmp)
    elif args.what == "never":
        never(args.seconds, tmp)
    else:
        coverage(args.rounds, tmp)


if __name__ == "__main__":
    main()
