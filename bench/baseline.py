"""Raw onnxruntime baseline: what ``session.run`` alone does on the benchmark models.

Usage: python bench/baseline.py MODELS_DIR [--duration S] [--json OUT] [--expected DIR] [--only MODEL] [--latency-only]

Run as its own process by ``run.py`` (while no server runs), so the numbers share the machine
state of the server runs they are compared with. Sessions use onnxruntime's defaults (intra-op
threads = physical cores), as a server does unless told otherwise.

For every model (``tiny``, ``image``, ``large``): per-call latency of ``run`` at batch 1, in microseconds
(p50, p99, mean), and the throughput ceiling in inferences/s with 1 thread calling ``run`` in a loop, with
2 threads sharing one session (``run`` releases the GIL), and with 2 threads sharing a session limited to one
intra-op thread (one core per run: what zeroserve's adaptive hint does under load); the best of the three is the
model's raw ceiling.

``--only MODEL --latency-only`` measures one model's per-call latency and nothing else: ``run.py`` uses it right
before a server's single-call run, so that "server p50 / session.run p50" compares numbers taken moments apart
on a machine whose load drifts.

``--expected DIR`` also writes each model's output for the request tensor of ``payloads.py`` to
``DIR/<model>.npy``, which ``run.py`` compares every server's answers with.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from payloads import MODELS, model_input


def _session(models_dir: Path, model: str, intra_op_threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads  # 0: onnxruntime's default
    return ort.InferenceSession(
        str(models_dir / model / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )


def _percentiles_us(samples_ns: Sequence[int]) -> dict[str, float]:
    values = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {
        "p50_us": float(np.percentile(values, 50)),
        "p99_us": float(np.percentile(values, 99)),
        "mean_us": float(values.mean()),
        "calls": len(values),
    }


def call_latency(session: ort.InferenceSession, feeds: dict[str, np.ndarray], duration: float) -> dict[str, float]:
    """Time each ``run`` call for ``duration`` seconds, after a short warm-up."""
    for _ in range(20):
        session.run(None, feeds)
    samples: list[int] = []
    clock = time.perf_counter_ns
    deadline = clock() + int(duration * 1e9)
    while True:
        start = clock()
        session.run(None, feeds)
        end = clock()
        samples.append(end - start)
        if end >= deadline:
            break
    return _percentiles_us(samples)


def throughput(session: ort.InferenceSession, feeds: dict[str, np.ndarray], threads: int, duration: float) -> float:
    """Inferences per second with ``threads`` Python threads calling ``run`` in a loop."""
    counts = [0] * threads
    stop = threading.Event()

    def loop(slot: int) -> None:
        while not stop.is_set():
            session.run(None, feeds)
            counts[slot] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(duration)
    stop.set()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - start)


def measure(
    models_dir: Path,
    duration: float,
    expected_dir: Path | None,
    only: Sequence[str] = tuple(MODELS),
    latency_only: bool = False,
) -> dict[str, object]:
    results: dict[str, object] = {"onnxruntime": ort.__version__, "duration_s": duration}
    for model in only:
        if not (models_dir / model / "model.onnx").exists():
            continue
        session = _session(models_dir, model)
        input_name, _, _ = MODELS[model]
        feeds = {input_name: model_input(model)}
        if expected_dir is not None:
            expected_dir.mkdir(parents=True, exist_ok=True)
            np.save(expected_dir / f"{model}.npy", session.run(None, feeds)[0])
        entry: dict[str, object] = {"latency": call_latency(session, feeds, duration)}
        if not latency_only:
            entry["throughput_1thread_per_s"] = throughput(session, feeds, 1, duration)
            entry["throughput_2threads_per_s"] = throughput(session, feeds, 2, duration)
            single_thread = _session(models_dir, model, intra_op_threads=1)
            entry["throughput_2threads_1intra_per_s"] = throughput(single_thread, feeds, 2, duration)
        results[model] = entry
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--json", type=Path, help="write results here (default: stdout)")
    parser.add_argument("--expected", type=Path, help="write expected outputs <model>.npy here")
    parser.add_argument("--only", action="append", choices=sorted(MODELS), help="measure this model only")
    parser.add_argument("--latency-only", action="store_true", help="per-call latency only, no throughput")
    args = parser.parse_args(argv)
    results = measure(args.models_dir, args.duration, args.expected, args.only or tuple(MODELS), args.latency_only)
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
