"""Serve the example model with scale to zero on this machine, and watch a cold start, a warm request and the
scale-down. The README's first command runs this.

    python examples/quickstart.py            # then keeps serving (and scaling to zero) until Ctrl-C
    python examples/quickstart.py --once     # stops after the scale-down
    python examples/quickstart.py --port 8081

It runs `python -m zeroserve.activator` (the same as `zeroserve dev`): the port is held, the first
request starts a model server process, and the process stops after --idle_timeout seconds without requests.
The model (examples/models/mlp/model.onnx) is a small dense classifier: 16 features in, 4 scores out.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import httpx

MODEL_DIR = Path(__file__).parent / "models" / "mlp"
REQUEST = {"id": "quickstart", "inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
HOLDING = "holding http://"  # zeroserve dev's line once it holds its port


class Log:
    """zeroserve dev's log, read as it comes: shown as it comes, or kept for the end (``--once``)."""

    def __init__(self, stream: IO[bytes], show: bool) -> None:
        self.lines: list[str] = []
        self.holding = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(stream, show), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes], show: bool) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if show:
                print(line, file=sys.stderr, flush=True)
            if HOLDING in line:
                self.holding.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def wait_until_holding(dev: subprocess.Popen[bytes], log: Log, port: int, timeout: float = 30.0) -> None:
    """Until zeroserve dev says it holds the port: a port something else holds is never mistaken for ours."""
    deadline = time.monotonic() + timeout
    while not log.holding.wait(0.05):
        if dev.poll() is not None:
            log.join(5)
            said = "\n".join(log.lines[-5:])
            if "already in use" in said:
                raise SystemExit(f"{said}\n\nport {port} is taken by another program; pick another port:\n"
                                 f"  ./scripts/quickstart --port {port + 1}")
            raise SystemExit(f"{said}\n\nzeroserve dev exited with status {dev.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"zeroserve dev did not take port {port} within {timeout:.0f} s")


def infer(client: httpx.Client, url: str, label: str) -> None:
    started = time.perf_counter()
    response = client.post(f"{url}/v2/models/mlp/infer", json=REQUEST, timeout=120)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    # Server-Timing: how long zeroserve dev held the request for a server process, and the server's own
    # phases (init, fetch, session, ... on a cold start; queue and infer always), each "name;dur=milliseconds".
    timing = dict(part.strip().split(";dur=") for part in response.headers.get("server-timing", "").split(",")
                  if ";dur=" in part)
    if "activator" not in timing:
        raise SystemExit(f"{url} answered, but not through zeroserve dev (no 'activator' in Server-Timing)")
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
    dev = subprocess.Popen(command, stderr=subprocess.PIPE)
    assert dev.stderr is not None
    log = Log(dev.stderr, show=not args.once)
    try:
        wait_until_holding(dev, log, args.port)
        with httpx.Client() as client:
            infer(client, url, "cold")
            infer(client, url, "warm")
        print(f"\nno more requests: the server process stops after {idle:g} s idle (scale to zero)", flush=True)
        if args.once:
            time.sleep(idle + 1.5)
            return 0
        print(f"\nserving at {url}; try:\n  curl -s {url}/v2/models/mlp/infer -d '{json.dumps(REQUEST)}'\n"
              "Ctrl-C stops it.", flush=True)
        dev.wait()
        return dev.returncode
    except KeyboardInterrupt:  # zeroserve dev got the same Ctrl-C and stops by itself
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C reaches zeroserve dev, which stops at once
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
        dev.wait(60)
        log.join(5)
        said = [line for line in log.lines if "zeroserve.activator" in line or "ready on" in line]
        if args.once and said:
            print("\nzeroserve dev said:\n" + "\n".join("  " + line for line in said))


if __name__ == "__main__":
    sys.exit(main())
