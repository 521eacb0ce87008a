"""gRPC load: a small asyncio client keeping N ModelInfer calls in flight, and the gRPC request/answer codec.

Usage: python bench/grpc_load.py HOST:PORT REQUEST_FILE --concurrency N --duration S [--warmup S]

No ghz or h2load here, so this is the load generator (``run.py`` runs it as its own process, like wrk).
It sends one prebuilt ``ModelInferRequest`` (the file holds its serialized bytes) over one HTTP/2
connection with N concurrent calls: N coroutines on one grpc.aio channel, each sending its next call
as soon as its last one is answered (closed loop, like wrk's connections). Bytes go out as they are
and answers are not parsed in the loop (``run.py`` checks an answer before each run), so the client
spends its CPU on gRPC itself. It prints one JSON line: completed calls, calls per second with status
OK, status codes of failed calls, latency percentiles (µs, from just before the call to its answer)
and the client's own CPU time, which competes with the server for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

METHOD = "/inference.GRPCInferenceService/ModelInfer"
MAX_MESSAGE = 2**31 - 1
REPORT_PREFIX = "GRPC_JSON "


def request_bytes(model: str, input_name: str, array: np.ndarray) -> bytes:
    """A serialized ModelInferRequest: one FP32 input in raw_input_contents (what tritonclient sends)."""
    from zeroserve.runtime._proto import open_inference_grpc_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="FP32", shape=list(array.shape))
    request.raw_input_contents.append(np.ascontiguousarray(array, np.float32).tobytes())
    return request.SerializeToString()


def decode_answer(data: bytes) -> dict[str, np.ndarray]:
    """Outputs of a serialized ModelInferResponse by name, raw or typed (FP32/FP64/INT64/INT32)."""
    from zeroserve.runtime._proto import open_inference_grpc_pb2 as pb

    response = pb.ModelInferResponse.FromString(data)
    dtypes = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4"}
    fields = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "INT32": "int_contents"}
    arrays = {}
    for index, output in enumerate(response.outputs):
        if index < len(response.raw_output_contents):
            flat = np.frombuffer(response.raw_output_contents[index], dtype=dtypes[output.datatype])
        else:
            flat = np.asarray(getattr(output.contents, fields[output.datatype]), dtype=dtypes[output.datatype])
        arrays[output.name] = flat.reshape(list(output.shape))
    return arrays


async def call_once(address: str, payload: bytes, timeout: float = 30.0) -> tuple[str, bytes | None, str]:
    """One call on a fresh channel: (status code name, answer bytes or None, details)."""
    import grpc

    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        try:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
            answer = await call(payload, timeout=timeout)
            return "OK", answer, ""
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, None, exc.details() or ""


async def _load(
    address: str, payload: bytes, concurrency: int, duration: float, warmup: float, method: str = METHOD
) -> dict[str, Any]:
    import grpc

    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        # Bytes in, bytes out: no (de)serialization in the client.
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        latencies: list[int] = []
        failures: Counter[str] = Counter()
        clock = time.perf_counter_ns
        measuring = False

        async def worker(deadline: int) -> None:
            while True:
                start = clock()
                if start >= deadline:
                    return
                try:
                    await call(payload, timeout=30)
                    if measuring:
                        latencies.append(clock() - start)
                except grpc.aio.AioRpcError as exc:
                    if measuring:
                        failures[exc.code().name] += 1

        if warmup > 0:
            deadline = clock() + int(warmup * 1e9)
            await asyncio.gather(*(worker(deadline) for _ in range(concurrency)))
        measuring = True
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        started = clock()
        deadline = started + int(duration * 1e9)
        await asyncio.gather(*(worker(deadline) for _ in range(concurrency)))
        elapsed = (clock() - started) / 1e9
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    values = np.asarray(latencies, dtype=np.float64) / 1e3
    ok = len(latencies)
    failed = sum(failures.values())
    client_cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "concurrency": concurrency,
        "duration_s": elapsed,
        "requests": ok + failed,
        "ok_requests": ok,
        "ok_requests_per_s": ok / elapsed if elapsed else 0.0,
        "failures": dict(failures),
        "has_errors": failed > 0,
        "latency_us": {
            "mean": float(values.mean()) if ok else None,
            "max": float(values.max()) if ok else None,
            "percentiles": {
                str(p): float(np.percentile(values, p)) if ok else None for p in (50, 90, 99)
            },
        },
        "client_cpu_s": client_cpu,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST:PORT of the gRPC server")
    parser.add_argument("request_file", type=Path, help="a serialized ModelInferRequest")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds of calls before measuring (discarded)")
    parser.add_argument("--method", default=METHOD, help=f"full method name (default {METHOD})")
    args = parser.parse_args(argv)
    payload = args.request_file.read_bytes()
    load = _load(args.address, payload, args.concurrency, args.duration, args.warmup, args.method)
    try:
        import uvloop
    except ModuleNotFoundError:
        report = asyncio.run(load)
    else:
        report = uvloop.run(load)
    print(REPORT_PREFIX + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
