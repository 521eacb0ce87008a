"""Serve the example model locally and answer one request: the README's first command runs this.

    python examples/quickstart.py            # serve, show one inference, keep serving until Ctrl-C
    python examples/quickstart.py --once     # serve, show one inference, stop

The model (examples/models/mlp/model.onnx) is a small dense classifier: 16 features in, 4 scores out.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODEL_DIR = Path(__file__).parent / "models" / "mlp"


def wait_until_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"the server was not ready after {timeout} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--once", action="store_true", help="stop after the first answer")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"

    command = [sys.executable, "-m", "zeroserve.runtime", "--model_name", "mlp",
               "--model_dir", str(MODEL_DIR), "--host", "127.0.0.1", "--http_port", str(args.port)]
    print("$", " ".join(command[2:]), flush=True)
    server = subprocess.Popen(command)
    try:
        seconds = wait_until_ready(url, server)
        print(f"\nready after {seconds:.2f} s (process start to /v2/health/ready)\n")

        metadata = httpx.get(f"{url}/v2/models/mlp").json()
        print("GET /v2/models/mlp ->", json.dumps(metadata))
        request = {
            "id": "quickstart-1",
            "inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}],
        }
        started = time.perf_counter()
        response = httpx.post(f"{url}/v2/models/mlp/infer", json=request)
        elapsed_ms = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        print("POST /v2/models/mlp/infer ->", json.dumps(response.json()), f"({elapsed_ms:.1f} ms)")

        if args.once:
            return 0
        print(f"\nserving at {url}; try:\n  curl -s {url}/v2/models/mlp/infer -d '{json.dumps(request)}'\n"
              "Ctrl-C stops it.", flush=True)
        server.wait()
        return server.returncode
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
