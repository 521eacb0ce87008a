"""V2 request bodies for the benchmark models, and decoding of V2 responses to check them.

The inputs come from a fixed seed, so the raw onnxruntime baseline (``baseline.py``) computes the
expected outputs for exactly the tensors every server receives.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

INPUT_SEED = 7
HEADER_LENGTH = "Inference-Header-Content-Length"

# name -> (input name, shape of one request's tensor, output name)
MODELS: dict[str, tuple[str, tuple[int, ...], str]] = {
    "tiny": ("input", (1, 16), "output"),
    "image": ("input", (1, 3, 224, 224), "logits"),
    "large": ("input", (1, 65_536), "output"),  # models.LARGE_ELEMENTS
}


@dataclass(frozen=True, slots=True)
class Body:
    """One request body with the headers it needs."""

    data: bytes
    content_type: str
    header_length: int | None = None  # JSON header length, for the binary extension

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.content_type}
        if self.header_length is not None:
            headers[HEADER_LENGTH] = str(self.header_length)
        return headers


def model_input(model: str) -> np.ndarray:
    """The request tensor sent to ``model`` (FP32, fixed seed)."""
    _, shape, _ = MODELS[model]
    return np.random.default_rng(INPUT_SEED).standard_normal(shape).astype(np.float32)


def json_body(model: str, *, binary_output: bool = False) -> Body:
    """A V2 JSON request: the tensor as a flat ``data`` list."""
    input_name, _, _ = MODELS[model]
    array = model_input(model)
    request: dict[str, object] = {
        "inputs": [
            {
                "name": input_name,
                "shape": list(array.shape),
                "datatype": "FP32",
                # float32 -> Python float is exact, so servers parse back the very same tensor.
                "data": array.ravel().tolist(),
            }
        ]
    }
    if binary_output:
        request["parameters"] = {"binary_data_output": True}
    return Body(json.dumps(request, separators=(",", ":")).encode(), "application/json")


def binary_body(model: str, *, binary_output: bool = True) -> Body:
    """A V2 binary-extension request: JSON header with ``binary_data_size``, then raw FP32 bytes."""
    input_name, _, _ = MODELS[model]
    array = model_input(model)
    raw = array.tobytes(order="C")
    request: dict[str, object] = {
        "inputs": [
            {
                "name": input_name,
                "shape": list(array.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    if binary_output:
        request["parameters"] = {"binary_data_output": True}
    header = json.dumps(request, separators=(",", ":")).encode()
    return Body(header + raw, "application/octet-stream", len(header))


_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "FP16": np.float16}


def decode_response(body: bytes, headers: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Decode a V2 infer response (JSON, or JSON header plus binary outputs) into arrays by name."""
    lowered = {k.lower(): v for k, v in headers.items()}
    length = lowered.get(HEADER_LENGTH.lower())
    header_end = int(length) if length is not None else len(body)
    response = json.loads(body[:header_end])
    offset = header_end
    arrays: dict[str, np.ndarray] = {}
    for output in response["outputs"]:
        dtype = _DTYPES[output["datatype"]]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            flat = np.frombuffer(body[offset : offset + size], dtype=dtype)
            offset += size
        else:
            flat = np.asarray(output["data"], dtype=dtype)
        arrays[output["name"]] = flat.reshape(output["shape"])
    if offset != len(body):
        raise ValueError(f"response has {len(body) - offset} bytes after its declared outputs")
    return arrays


def check_outputs(model: str, got: Mapping[str, np.ndarray], expected: np.ndarray) -> str | None:
    """Return why ``got`` differs from the raw-onnxruntime ``expected`` output, or None if it matches."""
    _, _, output_name = MODELS[model]
    if output_name not in got:
        return f"no output {output_name!r} (got {sorted(got)})"
    value = got[output_name]
    if value.shape != expected.shape:
        return f"output shape {list(value.shape)} != expected {list(expected.shape)}"
    # Servers may pick other thread counts, and Conv sums in another order then; allow float noise.
    scale = float(np.abs(expected).max()) or 1.0
    err = float(np.abs(value.astype(np.float64) - expected).max())
    if err > 1e-4 * scale:
        return f"output differs from raw onnxruntime by {err:.3g} (scale {scale:.3g})"
    return None
