"""Launch the MLServer peer with KServe-style flags, so the bench harness starts it like the others.

    <mlserver venv>/bin/python bench/peers/mlserver_onnx.py --model_name NAME --model_dir PATH \
        --http_port P --grpc_port G

It writes MLServer's settings.json and model-settings.json to a temporary folder and runs ``mlserver start``
there (MLServer 1.7.1 wants its own virtualenv: see bench/README.md). Defaults are MLServer's own (one
parallel worker process), except that its metrics server gets a free port of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

PEER_DIR = Path(__file__).resolve().parent / "mlserver"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_name", required=True)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--http_port", type=int, required=True)
    parser.add_argument("--grpc_port", type=int, required=True)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="mlserver-peer-"))
    settings = {
        "http_port": args.http_port,
        "grpc_port": args.grpc_port,
        "metrics_port": free_port(),
        "host": "127.0.0.1",
        "debug": False,
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    model_folder = folder / args.model_name
    model_folder.mkdir()
    model_settings = {
        "name": args.model_name,
        "implementation": "onnx_model.OnnxModel",
        "parameters": {"uri": str(Path(args.model_dir).resolve())},
    }
    (model_folder / "model-settings.json").write_text(json.dumps(model_settings))
    shutil.copy(PEER_DIR / "onnx_model.py", model_folder / "onnx_model.py")
    mlserver = Path(sys.executable).with_name("mlserver")
    os.execv(str(mlserver), [str(mlserver), "start", str(folder)])


if __name__ == "__main__":
    sys.exit(main())
