"""tritonclient.grpc in a child process, driven by the gRPC tests over JSON lines on stdin/stdout.

tritonclient's and kserve's generated modules both register ``inference.*`` messages in protobuf's
process-wide descriptor pool, so the two cannot be imported into one process, and the test session has
kserve loaded. ``TritonProcess`` starts this file as a child, sends one call per line and reads one
answer per line; tensors travel as base64 ``.npy`` bytes.

Usage (by the tests): python triton_grpc_process.py HOST:PORT
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from typing import Any

import numpy as np


def encode_array(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype == object)
    return base64.b64encode(buffer.getvalue()).decode()


def decode_array(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=True)  # our own child's bytes


class TritonProcess:
    """The test side: one child process running tritonclient.grpc against ``address``."""

    def __init__(self, address: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def call(self, op: str, **arguments: Any) -> dict[str, Any]:
        """Run one client call; returns {"ok": True, ...} or {"ok": False, "code": "NOT_FOUND", "message": ...}."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"tritonclient child exited with {self.process.wait(10)}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def infer(self, model: str, inputs: dict[str, np.ndarray], **options: Any) -> dict[str, Any]:
        """``inputs``: name -> array (datatype from the array). Outputs come back decoded."""
        answer = self.call("infer", model=model, inputs={k: encode_array(v) for k, v in inputs.items()}, **options)
        if answer["ok"]:
            answer["outputs"] = {name: decode_array(data) for name, data in answer["outputs"].items()}
        return answer

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()  # the child's loop ends at end of input
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process.stdout.close()


def _serve(address: str) -> None:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    client = triton.InferenceServerClient(address)

    def infer(request: dict[str, Any]) -> dict[str, Any]:
        inputs = []
        for name, data in request["inputs"].items():
            array = decode_array(data)
            tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        wanted = request.get("outputs")
        outputs = [triton.InferRequestedOutput(name) for name in wanted] if wanted is not None else None
        result = client.infer(
            request["model"],
            inputs,
            model_version=request.get("version", ""),
            outputs=outputs,
            request_id=request.get("request_id", ""),
            parameters=request.get("parameters"),
        )
        response = result.get_response()
        return {
            "id": response.id,
            "model_version": response.model_version,
            "outputs": {output.name: encode_array(result.as_numpy(output.name)) for output in response.outputs},
        }

    ops = {
        "infer": infer,
        "live": lambda request: {"value": client.is_server_live()},
        "ready": lambda request: {"value": client.is_server_ready()},
        "model_ready": lambda request: {"value": client.is_model_ready(request["model"], request.get("version", ""))},
        "server_metadata": lambda request: {"value": client.get_server_metadata(as_json=True)},
        "model_metadata": lambda request: {
            "value": client.get_model_metadata(request["model"], request.get("version", ""), as_json=True)
        },
        "repository_index": lambda request: {
            "value": client.get_model_repository_index(as_json=True).get("models", [])
        },
        "load_model": lambda request: {"value": client.load_model(request["model"])},
        "unload_model": lambda request: {"value": client.unload_model(request["model"])},
    }
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = {"ok": True, **ops[request["op"]](request)}
        except InferenceServerException as exc:
            answer = {"ok": False, "code": str(exc.status()).removeprefix("StatusCode."), "message": exc.message()}
        print(json.dumps(answer), flush=True)
    client.close()


if __name__ == "__main__":
    _serve(sys.argv[1])
