"""What the plugin's client costs per call: RemoteModel.infer against a raw httpx post to the same server.

    .venv/bin/python bench/client_overhead.py            # about a minute
    .venv/bin/python bench/client_overhead.py --quick

One zeroserve process serves the example model (16 FP32 in, 4 out) on 127.0.0.1. In one run, with the
variants interleaved round by round (so machine noise hits them alike), it times sequential calls of:

- ``raw post``: httpx.Client.post of a pre-encoded binary body, no decoding (the floor);
- ``raw + codec``: the same, plus encoding the request and decoding the answer with zeroserve's codec;
- ``RemoteModel``: ``RemoteModel.infer`` (no OpenTelemetry SDK: the API's no-op spans);
- ``RemoteModel + SDK``: the same with an SDK tracer provider recording every span (no exporter I/O);
- and the async pair: httpx.AsyncClient.post vs ``AsyncRemoteModel.infer``.

It prints median and p90 latency per variant and each one's median over ``raw post``. A second table
isolates the client's own CPU cost: the same calls against an in-process ``httpx.MockTransport`` that answers
a canned binary response (no sockets, no server), reporting the least-disturbed round's median (on a shared
machine, the other rounds measure the neighbours). ``--out`` writes every number as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np

from zeroserve import AsyncRemoteModel, RemoteModel
from zeroserve.protocol.client_codec import decode_response, encode_request

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "examples" / "models" / "mlp"


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "zeroserve.runtime", "--host", "127.0.0.1", "--http_port", str(port),
         "--model_name", "mlp", "--model_dir", str(MODEL_DIR)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "server exited"
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    process.kill()
    raise SystemExit("server not ready in 60 s")


def timed(call: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


async def timed_async(call: Callable[[], Awaitable[object]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_us": statistics.median(ordered) * 1e6, "p90_us": ordered[int(len(ordered) * 0.9)] * 1e6,
            "calls": len(ordered)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()
    rounds, per_round = (5, 200) if args.quick else (15, 400)

    from opentelemetry.sdk.trace import TracerProvider

    process, url = start_server()
    features = np.full((1, 16), 0.5, dtype=np.float32)
    body, headers = encode_request({"input": features})
    infer_url = f"{url}/v2/models/mlp/infer"
    samples: dict[str, list[float]] = {}
    try:
        raw = httpx.Client()
        model = RemoteModel(url, model="mlp")
        traced = RemoteModel(url, model="mlp", tracer_provider=TracerProvider())

        def raw_post() -> object:
            return raw.post(infer_url, content=body, headers=headers).raise_for_status()

        def raw_codec() -> object:
            encoded, content_headers = encode_request({"input": features})
            response = raw.post(infer_url, content=encoded, headers=content_headers)
            return decode_response(response.content, response.headers.get("inference-header-content-length"))

        sync_variants: dict[str, Callable[[], object]] = {
            "raw post": raw_post,
            "raw + codec": raw_codec,
            "RemoteModel": lambda: model.infer({"input": features}),
            "RemoteModel + SDK": lambda: traced.infer({"input": features}),
        }
        for call in sync_variants.values():
            timed(call, 100)  # warm connections and caches
        for round_number in range(rounds):
            names = list(sync_variants)
            if round_number % 2:
                names.reverse()
            for name in names:
                samples.setdefault(name, []).extend(timed(sync_variants[name], per_round))

        async def run_async() -> None:
            async with httpx.AsyncClient() as client, AsyncRemoteModel(url, model="mlp") as amodel:
                async def async_raw() -> object:
                    return (await client.post(infer_url, content=body, headers=headers)).raise_for_status()

                async def async_model() -> object:
                    return await amodel.infer({"input": features})

                variants = {"async raw post": async_raw, "AsyncRemoteModel": async_model}
                for call in variants.values():
                    await timed_async(call, 100)
                for round_number in range(rounds):
                    names = list(variants)
                    if round_number % 2:
                        names.reverse()
                    for name in names:
                        samples.setdefault(name, []).extend(await timed_async(variants[name], per_round))

        asyncio.run(run_async())
        raw.close()
        model.close()
        traced.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)

    in_process = measure_in_process(rounds, per_round)
    results = {name: summary(values) for name, values in samples.items()}
    floor = results["raw post"]["median_us"]
    async_floor = results["async raw post"]["median_us"]
    print(f"{'variant':<20} {'median us':>10} {'p90 us':>10} {'x raw':>7}")
    for name, numbers in results.items():
        base = async_floor if name.startswith("async") or name.startswith("Async") else floor
        numbers["ratio_to_raw"] = numbers["median_us"] / base
        print(f"{name:<20} {numbers['median_us']:>10.0f} {numbers['p90_us']:>10.0f} {numbers['ratio_to_raw']:>7.2f}")
    print(f"\nin-process (MockTransport), best round's median per call:\n{'variant':<20} {'us':>10} {'x raw':>7}")
    for name, micros in in_process.items():
        print(f"{name:<20} {micros:>10.1f} {micros / in_process['raw post']:>7.2f}")
    if args.out:
        args.out.write_text(json.dumps({"loopback": results, "in_process_us": in_process, "rounds": rounds,
                                        "per_round": per_round, "cpus": os.cpu_count(),
                                        "load_average": os.getloadavg()}, indent=2))
    return 0


def measure_in_process(rounds: int, per_round: int) -> dict[str, float]:
    """Per-call cost of the client machinery alone: httpx.MockTransport answers a canned binary response."""
    output = np.arange(4, dtype=np.float32).reshape(1, 4)
    header = json.dumps({"model_name": "mlp", "model_version": "1", "outputs": [
        {"name": "output", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}]}).encode()
    answer = header + output.tobytes()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=answer, headers={"content-type": "application/octet-stream",
                                                             "inference-header-content-length": str(len(header))})

    transport = httpx.MockTransport(handler)
    features = np.full((1, 16), 0.5, dtype=np.float32)
    body, headers = encode_request({"input": features})
    client = httpx.Client(transport=transport)
    model = RemoteModel("http://model", model="mlp", transport=transport)

    def raw_codec() -> object:
        encoded, content_headers = encode_request({"input": features})
        response = client.post("http://model/v2/models/mlp/infer", content=encoded, headers=content_headers)
        return decode_response(response.content, response.headers.get("inference-header-content-length"))

    variants: dict[str, Callable[[], object]] = {
        "raw post": lambda: client.post("http://model/v2/models/mlp/infer", content=body, headers=headers),
        "raw + codec": raw_codec,
        "RemoteModel": lambda: model.infer({"input": features}),
    }
    best: dict[str, float] = {}
    for call in variants.values():
        timed(call, 200)
    for _ in range(rounds):
        for name, call in variants.items():
            median = statistics.median(timed(call, per_round)) * 1e6
            best[name] = min(best.get(name, median), median)
    client.close()
    model.close()
    return best


if __name__ == "__main__":
    sys.exit(main())
