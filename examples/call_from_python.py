"""Call a remote model from plain Python, through a real cold start.

    python examples/call_from_python.py                      # starts `zeroserve dev` here, scaled to zero
    python examples/call_from_python.py --url https://mlp.default.example.com

Without --url it runs the example model behind `zeroserve dev` (scale to zero on this machine), so the first
call meets a cold start. A too-tight cold-start deadline gives up with ColdStartTimeout (a TimeoutError);
a realistic one waits for the service, which the first attempt already started waking; then a warm call.
Last, what is no cold start is not waited for: a host that does not resolve fails at once with Unreachable.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from zeroserve import ColdStartPolicy, ColdStartTimeout, RemoteModel, RetryPolicy, Unreachable

MODEL_DIR = Path(__file__).parent / "models" / "mlp"


def start_dev_front() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    front = subprocess.Popen(
        [sys.executable, "-m", "zeroserve.activator", "--port", str(port), "--model_name", "mlp",
         "--model_dir", str(MODEL_DIR), "--idle_timeout", "60"],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:  # a TCP connect, not a request: a request would start the model server
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return front, f"http://127.0.0.1:{port}"
        except OSError:
            if front.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("zeroserve dev did not start") from None
            time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="the model service (default: start `zeroserve dev` here)")
    parser.add_argument("--model", default="mlp")
    args = parser.parse_args()
    front, url = (None, args.url) if args.url else start_dev_front()
    features = np.full((1, 16), 0.5, dtype=np.float32)
    try:
        impatient = RemoteModel(url, model=args.model, cold_start=ColdStartPolicy(deadline=0.2))
        try:
            impatient.infer({"input": features})
            print("tight deadline: the service was already warm")
        except ColdStartTimeout as exc:
            print(f"tight deadline: {type(exc).__name__} after {exc.probes} readiness probe(s), "
                  f"{exc.attempts} sends: {exc.message}")
        finally:
            impatient.close()

        with RemoteModel(url, model=args.model, retry=RetryPolicy(deadline=30),
                         cold_start=ColdStartPolicy(deadline=120)) as model:
            for label in ("cold", "warm"):
                started = time.perf_counter()
                scores = model.infer({"input": features})["output"]
                took = (time.perf_counter() - started) * 1000
                print(f"{label}: output {scores.shape} {scores.dtype} in {took:.0f} ms -> class {int(scores.argmax())}")
            print("ready:", model.ready(), "| inputs:", model.metadata()["inputs"])

        started = time.perf_counter()
        with RemoteModel("http://no-such-host.invalid:8080", model=args.model) as nowhere:
            try:
                nowhere.infer({"input": features})
            except Unreachable as exc:  # no 300 s wait for a cold start that cannot come
                took = time.perf_counter() - started
                print(f"unreachable: {type(exc).__name__} in {took:.1f} s: {exc.message}")
        return 0
    finally:
        if front is not None:
            front.terminate()
            front.wait(30)


if __name__ == "__main__":
    sys.exit(main())
