"""The server's own memory: VmRSS and VmHWM of ``python -m zeroserve.runtime`` serving the tiny model.

Usage: python bench/server_rss.py [--runs N] [--requests N] [--no-s3] [--grpc]

``zeroserve render --max-loaded-mib`` sizes a container as this baseline plus the models' budget plus the
request budget (docs/deploy.md, "Many models in one service"); this measures the first term. Each run starts a
fresh server on 127.0.0.1 and reads ``/proc/PID/status`` once ``/v2/health/ready`` answers 200 (``ready``) and
again after ``--requests`` JSON inferences (``served``). The model comes from a local folder and, unless
``--no-s3``, from a moto S3 server through ``s3://`` (the server then imports s3fs, aiobotocore and botocore, as a
repository on S3 makes it do). The tiny model's own share is a few hundred KiB, so what is left is the
interpreter, the server stack, ONNX Runtime and the storage client.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import s3

import models

REQUEST = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}


def _status_mib(pid: int) -> dict[str, float]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024  # kB
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def measure(model_dir: str, env: Mapping[str, str], requests: int, grpc: bool) -> dict[str, float]:
    port = _free_port()
    extra = ["--protocol", "both", "--grpc_port", str(_free_port())] if grpc else []
    process = subprocess.Popen(
        [sys.executable, "-m", "zeroserve.runtime", "--model_dir", model_dir, "--model_name", "tiny",
         "--http_port", str(port), *extra],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=5) as client:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited {process.returncode}: {process.stderr.read().decode()}")  # type: ignore[union-attr]
                try:
                    if client.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} not ready in 60 s")
                time.sleep(0.05)
            ready = _status_mib(process.pid)
            for _ in range(requests):
                client.post("/v2/models/tiny/infer", json=REQUEST).raise_for_status()
            served = _status_mib(process.pid)
    finally:
        process.terminate()
        process.wait(15)
    return {"ready_rss": ready["VmRSS"], "served_rss": served["VmRSS"], "served_hwm": served["VmHWM"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--no-s3", dest="s3", action="store_false")
    parser.add_argument("--grpc", action="store_true", help="serve gRPC too (--protocol both)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        local = models.write_models(root / "models", ["tiny"])["tiny"].parent
        sources: dict[str, tuple[str, dict[str, str]]] = {"local": (str(local), {})}
        with s3.moto_server(root / "moto.log") if args.s3 else contextlib.nullcontext() as server:
            if server is not None:
                [uri] = s3.upload_models(server, "rss", {"tiny": local / "model.onnx"}).values()
                sources["s3"] = (uri, server.aws_env())
            for source, (model_dir, env) in sources.items():
                runs = [measure(model_dir, env, args.requests, args.grpc) for _ in range(args.runs)]
                summary = {key: round(statistics.median(run[key] for run in runs), 1) for key in runs[0]}
                summary["max_served_hwm"] = round(max(run["served_hwm"] for run in runs), 1)
                head = {"source": source, "grpc": args.grpc, "runs": args.runs, "requests": args.requests}
                print(json.dumps({**head, **summary}))


if __name__ == "__main__":
    main()
