"""Serve the example model with scale to zero on this machine, and watch a cold start, a warm request and the
scale-down. The README's first command runs this.

    python examples/quickstart.py            # then keeps serving (and scaling to zero) until Ctrl-C
    python examples/quickstart.py --once     # stops after the scale-down

It runs `python -m zeroserve.activator` (the same as `zeroserve dev`): the port is held, the first
request starts a model server process, and the process stops after --idle_timeout seconds without requests.
The model (examples/models/mlp/model.onnx) is a small dense classifier: 16 features in, 4 scores out.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODEL_DIR = Path(__file__).parent / "models" / "mlp"
REQUEST = {"id": "quickstart", "inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"zeroserve dev exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on port {port} after {timeout} s")


def infer(client: httpx.Client, url: str, label: str) -> None:
    started = time.perf_counter()
    response = client.post(f"{url}/v2/models/mlp/infer", json=REQUEST, timeout=120)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    # Server-Timing: the front's wait for a server process, the server's own phases (init, session, ...
    # on a cold start; queue and infer always), each "name;dur=milliseconds".
    timing = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
    phases = ", ".join(f"{name} {float(ms):.1f} ms" for name, ms in timing.items())
    print(f"\n{label}: POST /v2/models/mlp/infer -> {response.status_code} in {elapsed * 1000:.0f} ms ({phases})")
    print("  ", json.dumps(response.json()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--idle_timeout", type=float, help="seconds before scale-down (default 3 with --once, else 30)")
    parser.add_argument("--once", action="store_true", help="stop after the scale-down")
    args = parser.parse_args()
    idle = args.idle_timeout or (3.0 if args.once else 30.0)
    url = f"http://127.0.0.1:{args.port}"

    command = [sys.executable, "-m", "zeroserve.activator", "--port", str(args.port),
               "--idle_timeout", str(idle), "--model_name", "mlp", "--model_dir", str(MODEL_DIR)]
    print("$ zeroserve dev", " ".join(command[3:]), flush=True)
    front = subprocess.Popen(command, stderr=subprocess.PIPE if args.once else None)
    try:
        wait_for_port(args.port, front)
        with httpx.Client() as client:
            infer(client, url, "cold")
            infer(client, url, "warm")
        print(f"\nno more requests: the server process stops after {idle:.0f} s idle (scale to zero)", flush=True)
        if args.once:
            time.sleep(idle + 1.5)
            return 0
        print(f"\nserving at {url}; try:\n  curl -s {url}/v2/models/mlp/infer -d '{json.dumps(REQUEST)}'\n"
              "Ctrl-C stops it.", flush=True)
        front.wait()
        return front.returncode
    except KeyboardInterrupt:
        return 0
    finally:
        if front.poll() is None:
            front.send_signal(signal.SIGTERM)
            front.wait(30)
        if args.once and front.stderr is not None:
            log = front.stderr.read().decode(errors="replace")
            print("\nzeroserve dev said:\n" + "\n".join(
                "  " + line for line in log.splitlines() if "zeroserve.dev" in line or "ready on" in line
            ))


if __name__ == "__main__":
    sys.exit(main())
