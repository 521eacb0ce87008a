"""Cold start to first inference, zeroserve beside KServe's and MLServer's Python servers, in one run.

    .venv/bin/python bench/coldstart.py [--rounds 5] [--model tiny]

Each round launches every server once (interleaved, so machine noise hits all alike), from process launch to
the first successful POST /v2/models/NAME/infer (polled every 5 ms), then stops it. zeroserve's first answer also
carries its own breakdown (Server-Timing: init, fetch, session, warmup), printed as medians.

MLServer 1.7.1 runs from its own virtualenv (it pins an older FastAPI; its workers need uvloop 0.21):
    python3 -m venv bench/.peers/mlserver-venv
    bench/.peers/mlserver-venv/bin/pip install mlserver==1.7.1 uvloop==0.21.0 onnxruntime numpy
It is skipped with a note when that virtualenv is missing.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers

import models

BENCH = Path(__file__).resolve().parent
MLSERVER_PYTHON = BENCH / ".peers" / "mlserver-venv" / "bin" / "python"
BODY = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


def launch_command(kind: str, model_dir: Path, port: int, grpc_port: int) -> list[str]:
    flags = ["--model_name", "tiny", "--model_dir", str(model_dir), "--http_port", str(port)]
    if kind == "zeroserve":
        return [sys.executable, "-m", "zeroserve.runtime", *flags, "--host", "127.0.0.1"]
    if kind == "kserve":
        return [sys.executable, str(BENCH / "peers" / "kserve_onnx.py"), *flags, "--grpc_port", str(grpc_port)]
    return [str(MLSERVER_PYTHON), str(BENCH / "peers" / "mlserver_onnx.py"), *flags, "--grpc_port", str(grpc_port)]


def cold_start(kind: str, model_dir: Path, log: Path) -> tuple[float, dict[str, float]]:
    port, grpc_port = servers.free_port(), servers.free_port()
    started = time.perf_counter()
    with log.open("ab") as out:
        # Its own process group: MLServer starts worker processes, which must go with it.
        process = subprocess.Popen(
            launch_command(kind, model_dir, port, grpc_port), stdout=out, stderr=out, start_new_session=True
        )
    try:
        with httpx.Client(timeout=2) as client:
            while time.perf_counter() - started < 120:
                if process.poll() is not None:
                    raise RuntimeError(f"{kind} exited with {process.returncode}; see {log}")
                try:
                    response = client.post(f"http://127.0.0.1:{port}/v2/models/tiny/infer", json=BODY)
                    if response.status_code == 200:
                        elapsed = time.perf_counter() - started
                        timing = response.headers.get("server-timing", "")
                        entries = (part.partition(";dur=") for part in timing.split(",") if ";dur=" in part)
                        phases = {name.strip(): float(ms) / 1000 for name, _, ms in entries}
                        return elapsed, phases
                except httpx.TransportError:
                    pass
                time.sleep(0.005)
        raise RuntimeError(f"{kind} did not answer within 120 s; see {log}")
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    kinds = ["zeroserve", "kserve"] + (["mlserver"] if MLSERVER_PYTHON.exists() else [])
    if "mlserver" not in kinds:
        print(f"mlserver skipped: no virtualenv at {MLSERVER_PYTHON} (see this script's docstring)")
    work = Path(tempfile.mkdtemp(prefix="zeroserve-coldstart-"))
    models.write_models(work, ["tiny"])
    model_dir = work / "tiny"
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    phases: list[dict[str, float]] = []
    for _ in range(args.rounds):
        for kind in kinds:
            elapsed, breakdown = cold_start(kind, model_dir, work / f"{kind}.log")
            times[kind].append(elapsed)
            if kind == "zeroserve":
                phases.append(breakdown)
    base = statistics.median(times["zeroserve"])
    print(f"\ncold start to first inference, tiny model, median of {args.rounds} (logs in {work})")
    print("| server | median s | min s | zeroserve / server |\n|---|---|---|---|")
    for kind in kinds:
        median = statistics.median(times[kind])
        print(f"| {kind} | {median:.3f} | {min(times[kind]):.3f} | {base / median:.2f}x |")
    names = [name for name in phases[0] if name not in ("queue", "infer")]
    print("\nzeroserve's own breakdown (Server-Timing of the first answer, medians, s): " + ", ".join(
        f"{name} {statistics.median(p.get(name, 0.0) for p in phases):.3f}" for name in names
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
