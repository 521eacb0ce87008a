"""GPU benchmark: zeroserve on the CUDA execution provider beside raw onnxruntime on the same GPU, in one run.

    python bench/gpu_bench.py [--duration 5] [--concurrency 1,16,64] [--json PATH]

Needs ``onnxruntime-gpu`` and a GPU; ``wrk`` for the REST cells and ``grpcio`` for the gRPC ones (a cell whose
tool is missing is skipped and says so). The model is ``image`` from ``bench/models.py`` (224x224 CNN).

1. Raw onnxruntime on CUDA: ``session.run`` latency at batch 1 and throughput with 1, 4 and 16 Python threads
   sharing one session (the ceiling a server can reach without merging requests), and at batch 8.
2. Cold start on CUDA, from launch to the first answered inference, with zeroserve's own breakdown
   (Server-Timing), for ``--cudnn_conv_algo_search`` HEURISTIC (the default) and EXHAUSTIVE (ORT's).
3. Throughput: each server configuration under REST binary (wrk) and gRPC (``grpc_load.py``) at each
   concurrency, answers checked against raw onnxruntime on CUDA first.

It prints a table and writes the raw numbers as JSON. Ratios are against the raw ceiling of this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline  # bench/ modules, beside this file
import load
import payloads
import servers

import models

MODEL = "image"
CUDA = "CUDAExecutionProvider"
HOST_FLAGS = ("-m", "zeroserve.runtime")
# The configurations under test: the image's default (--providers auto finds CUDA), batching, and worker
# processes (each with its own CUDA context and copy of the model): one event loop cannot feed a fast GPU.
CONFIGS: dict[str, tuple[str, ...]] = {
    "zeroserve-gpu": ("--host", servers.HOST, "--providers", "auto"),
    "zeroserve-gpu+batching": ("--host", servers.HOST, "--providers", "cuda", *servers.BATCHING_FLAGS),
    "zeroserve-gpu+4workers": ("--host", servers.HOST, "--providers", "cuda", "--workers", "4"),
    "zeroserve-gpu+4workers+batching": (
        "--host", servers.HOST, "--providers", "cuda", "--workers", "4", *servers.BATCHING_FLAGS,
    ),  # fmt: skip
    "zeroserve-gpu+4runs": ("--host", servers.HOST, "--providers", "cuda", "--inference_threads", "4"),
    # Batching without patience: batches form only from what queues while a run is busy (Triton's default).
    "zeroserve-gpu+batching-nodelay": (
        "--host", servers.HOST, "--providers", "cuda", "--max_batch_size", "8", "--max_queue_delay_us", "0",
    ),  # fmt: skip
}
DEFAULT_CONFIGS = "zeroserve-gpu,zeroserve-gpu+batching,zeroserve-gpu+4workers,zeroserve-gpu+4workers+batching"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raw_cuda(models_dir: Path, duration: float) -> dict[str, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(models_dir / MODEL / "model.onnx"), providers=[CUDA, "CPUExecutionProvider"])
    assert session.get_providers()[0] == CUDA, session.get_providers()
    one = {"input": payloads.model_input(MODEL)}
    eight = {"input": np.repeat(one["input"], 8, axis=0)}
    result: dict[str, Any] = {"latency": baseline.call_latency(session, one, duration)}
    for threads in (1, 4, 16):
        result[f"throughput_{threads}threads_per_s"] = baseline.throughput(session, one, threads, duration)
    result["throughput_batch8_4threads_per_s"] = 8 * baseline.throughput(session, eight, 4, duration)
    result["ceiling_per_s"] = max(result[f"throughput_{t}threads_per_s"] for t in (1, 4, 16))
    cpu = ort.InferenceSession(str(models_dir / MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, one)[0]
    result["max_abs_diff_vs_cpu"] = float(np.abs(expected - cpu.run(None, one)[0]).max())
    result["expected"] = expected
    result["conv_algo_search"] = {search: _algo_search(models_dir, search, one, eight) for search in ALGO_SEARCHES}
    return result


ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


def _algo_search(
    models_dir: Path, search: str, one: dict[str, np.ndarray], eight: dict[str, np.ndarray]
) -> dict[str, float]:
    """What cuDNN's algorithm search costs on first runs (each new shape) and gives back on later runs."""
    import onnxruntime as ort

    started = time.perf_counter()
    options = {"cudnn_conv_algo_search": search}
    session = ort.InferenceSession(str(models_dir / MODEL / "model.onnx"), providers=[(CUDA, options)])
    created = time.perf_counter()
    session.run(None, one)
    first = time.perf_counter()
    session.run(None, eight)
    first_eight = time.perf_counter()
    return {
        "create_s": created - started,
        "first_run_s": first - created,
        "first_run_batch8_s": first_eight - first,
        "p50_us": baseline.call_latency(session, one, 1.0)["p50_us"],
        "p50_batch8_us": baseline.call_latency(session, eight, 1.0)["p50_us"],
    }


def cold_start(models_dir: Path, out_dir: Path, extra: tuple[str, ...], label: str) -> dict[str, Any]:
    body = payloads.json_body(MODEL)
    port = servers.free_port()
    argv = [
        sys.executable, *HOST_FLAGS, "--host", servers.HOST, "--http_port", str(port),
        "--model_name", MODEL, "--model_dir", str(models_dir / MODEL), *extra,
    ]  # fmt: skip
    log_path = out_dir / f"cold-{label}.log"
    with log_path.open("ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = servers.Server(label, MODEL, port, process, log_path, started)
    try:
        elapsed, _, headers = server.poll_until("POST", server.infer_path, body.data, body.headers(), 180)
    finally:
        server.stop()
    timing = next((value for name, value in headers.items() if name.lower() == "server-timing"), "")
    phases = {
        name.strip(): float(ms) / 1000
        for name, _, ms in (part.partition(";dur=") for part in timing.split(","))
        if ms
    }  # fmt: skip
    return {"first_answer_s": elapsed, "phases_s": phases}


def throughput(
    models_dir: Path, out_dir: Path, name: str, flags: tuple[str, ...], expected: np.ndarray,
    concurrency: list[int], duration: float, tools: dict[str, bool],
) -> dict[str, Any]:  # fmt: skip
    servers.KINDS[name] = servers.ServerKind(name, HOST_FLAGS, flags, probe=servers.KINDS["zeroserve"].probe)
    cells: dict[str, Any] = {}
    binary = payloads.binary_body(MODEL)
    body_file = out_dir / "image_binary.bin"
    body_file.write_bytes(binary.data)
    request_file = out_dir / "image_grpc.bin"
    if tools["grpc"]:
        import grpc_load

        request_file.write_bytes(grpc_load.request_bytes(MODEL, "input", payloads.model_input(MODEL)))
    python = sys.executable
    log_path = out_dir / f"{name}.log"
    with servers.running(name, python, MODEL, models_dir / MODEL, log_path, 180, grpc=tools["grpc"]) as server:
        status, headers, data = servers.request(server.port, "POST", server.infer_path, binary.data, binary.headers())
        problem = f"HTTP {status}" if status != 200 else None
        if problem is None:
            got = payloads.decode_response(data, headers)["logits"]
            scale = float(np.abs(expected).max()) or 1.0
            if float(np.abs(got - expected).max()) > 1e-3 * scale:
                problem = f"answer differs from raw onnxruntime on CUDA by {float(np.abs(got - expected).max()):.3g}"
        cells["answer"] = problem or "ok"
        cells["gpu_memory_ready_mib"] = _gpu_memory_mib()
        for c in concurrency:
            if tools["wrk"]:
                spec = load.Scenario(f"rest-binary c{c}", "binary.lua", body_file, c, min(c, 4), binary.header_length)
                load.run(spec, server.url + server.infer_path, 1.0)  # warm-up, discarded
                stats = load.run(spec, server.url + server.infer_path, duration)
                cells[f"rest-binary c{c}"] = {
                    "per_s": stats["ok_requests_per_s"], "errors": stats["non_2xx"] + stats["socket_errors"],
                    "p50_ms": stats["latency_us"]["percentiles"]["50"] / 1e3,
                    "p99_ms": stats["latency_us"]["percentiles"]["99"] / 1e3,
                }  # fmt: skip
                if "--workers" not in flags:  # /metrics answers for one worker of several: no means then
                    cells[f"rest-binary c{c}"].update(server_means(server))
                log(f"  {name} rest-binary c{c}: {cells[f'rest-binary c{c}']}")
            if tools["grpc"]:
                stats = load.run_grpc(server.grpc_address, request_file, c, duration, python, warmup_s=1.0)
                cells[f"grpc c{c}"] = {
                    "per_s": stats["ok_requests_per_s"], "errors": sum(stats["failures"].values()),
                    "p50_ms": stats["latency_us"]["percentiles"]["50"] / 1e3,
                    "p99_ms": stats["latency_us"]["percentiles"]["99"] / 1e3,
                }  # fmt: skip
                if "--workers" not in flags:
                    cells[f"grpc c{c}"].update(server_means(server))
                log(f"  {name} grpc c{c}: {cells[f'grpc c{c}']}")
        cells["gpu_memory_loaded_mib"] = _gpu_memory_mib()
    return cells


_last_metrics: dict[int, dict[str, float]] = {}
# zeroserve's histograms whose means tell where a cell's time went, server side (seconds, or rows per run).
_MEANS = {
    "rows_per_run": "zeroserve_batch_size",
    "queue_ms": "zeroserve_inference_queue_duration_seconds",
    "compute_ms": "zeroserve_inference_compute_duration_seconds",
    "request_ms": "zeroserve_inference_request_duration_seconds",
}


def server_means(server: servers.Server) -> dict[str, float | None]:
    """Means of zeroserve's histograms over the requests since the last call for this server: rows per run,
    and the time a request spent queued, in session.run, and in the server overall (ms)."""
    status, _, data = servers.request(server.port, "GET", "/metrics")
    if status != 200:
        return {}
    sums: dict[str, float] = {}
    for line in data.decode().splitlines():
        name, _, value = line.partition("{")
        if name.endswith(("_sum", "_count")) and not line.startswith("#"):
            sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    before = _last_metrics.get(server.port, {})
    _last_metrics[server.port] = sums
    means: dict[str, float | None] = {}
    for key, family in _MEANS.items():
        count = sums.get(f"{family}_count", 0.0) - before.get(f"{family}_count", 0.0)
        total = sums.get(f"{family}_sum", 0.0) - before.get(f"{family}_sum", 0.0)
        scale = 1.0 if key == "rows_per_run" else 1e3
        means[key] = total / count * scale if count else None
    return means


def _gpu_memory_mib() -> float | None:
    """GPU memory in use on device 0 (every process: only the server under test holds any)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--id=0", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        return float(out.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--cold_rounds", type=int, default=2, help="0: no cold starts")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--out_dir", type=Path, help="keep models and server logs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        print(f"onnxruntime {ort.__version__} offers no {CUDA}: install onnxruntime-gpu", file=sys.stderr)
        return 2
    tools = {"wrk": load.wrk_version() is not None, "grpc": _grpc_usable()}
    result: dict[str, Any] = {"onnxruntime": ort.__version__, "tools": tools, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="zs-gpu-bench-") as tmp:
        out_dir = args.out_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        models_dir = out_dir / "models"
        models.write_models(models_dir, [MODEL])
        log("raw onnxruntime on CUDA")
        raw = raw_cuda(models_dir, args.duration)
        expected = raw.pop("expected")
        result["raw"] = raw
        log(f"  {raw}")
        cold: dict[str, list[dict[str, Any]]] = {}
        # Round 0 warms the page cache and CUDA's caches, and is left out.
        for round_ in range(args.cold_rounds + 1 if args.cold_rounds else 0):
            for search in ("HEURISTIC", "EXHAUSTIVE"):
                flags = ("--providers", "cuda", "--cudnn_conv_algo_search", search)
                sample = cold_start(models_dir, out_dir, flags, f"cuda-{search}")
                log(f"  cold start {search} round {round_}: {sample}")
                if round_:
                    cold.setdefault(search, []).append(sample)
        result["cold_start"] = {
            search: {"median_first_answer_s": statistics.median(x["first_answer_s"] for x in runs), "samples": runs}
            for search, runs in cold.items()
        }  # fmt: skip
        concurrency = [int(c) for c in args.concurrency.split(",")]
        result["servers"] = {}
        for name in args.configs.split(","):
            log(f"{name}: {' '.join(CONFIGS[name])}")
            result["servers"][name] = throughput(
                models_dir, out_dir, name, CONFIGS[name], expected, concurrency, args.duration, tools
            )
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _grpc_usable() -> bool:
    try:
        import grpc  # noqa: F401

        from zeroserve.runtime._proto import open_inference_grpc_pb2  # noqa: F401  (checks protobuf's version)
    except Exception as exc:  # an old grpcio or protobuf raises at import
        log(f"gRPC cells skipped: {type(exc).__name__}: {exc}")
        return False
    return True


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def report(result: dict[str, Any]) -> str:
    raw = result["raw"]
    ceiling = raw["ceiling_per_s"]
    lines = [
        f"onnxruntime {result['onnxruntime']}, {result['cpus']} CPUs; raw session.run on CUDA, batch 1: "
        f"p50 {raw['latency']['p50_us']:.0f} us, ceiling {ceiling:.0f}/s "
        f"(1/4/16 threads {raw['throughput_1threads_per_s']:.0f}/{raw['throughput_4threads_per_s']:.0f}/"
        f"{raw['throughput_16threads_per_s']:.0f}; batch 8: {raw['throughput_batch8_4threads_per_s']:.0f} images/s); "
        f"max |CUDA - CPU| {raw['max_abs_diff_vs_cpu']:.2g}",
    ]
    for search, row in raw["conv_algo_search"].items():
        lines.append(
            f"cudnn_conv_algo_search {search}: session {row['create_s']:.2f} s, first run {row['first_run_s']:.3f} s, "
            f"first batch-8 run {row['first_run_batch8_s']:.3f} s; then p50 {row['p50_us']:.0f} us "
            f"(batch 8: {row['p50_batch8_us']:.0f} us)"
        )
    for search, row in result["cold_start"].items():
        phases = row["samples"][-1]["phases_s"]
        lines.append(
            f"cold start, {search}: first answer {row['median_first_answer_s']:.2f} s (last: "
            + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
            + ")"
        )
    header = (
        "| server | answer | cell | per s | x raw ceiling | p50 ms | p99 ms | errors | rows per run "
        "| server: queue ms | run ms | request ms |"
    )
    lines += ["", header, "|---" * 12 + "|"]
    for name, cells in result["servers"].items():
        lines.append(
            f"| {name} | GPU memory | ready {cells.get('gpu_memory_ready_mib')} MiB, "
            f"after load {cells.get('gpu_memory_loaded_mib')} MiB |" + " |" * 9
        )
        for cell, stats in cells.items():
            if not cell.startswith(("rest", "grpc")):
                continue
            ratio = stats["per_s"] / ceiling if ceiling else float("nan")
            lines.append(
                f"| {name} | {cells['answer']} | {cell} | {stats['per_s']:.0f} | {ratio:.2f} | "
                f"{stats['p50_ms']:.2f} | {stats['p99_ms']:.2f} | {stats['errors']} | "
                f"{_number(stats.get('rows_per_run'))} | {_number(stats.get('queue_ms'))} | "
                f"{_number(stats.get('compute_ms'))} | {_number(stats.get('request_ms'))} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
