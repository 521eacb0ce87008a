"""The soak's models and valid requests: each request prebuilt in every encoding the soak sends (REST JSON,
REST binary, gRPC) with the output it must produce, computed by raw onnxruntime (or, for the identity models,
the input itself); and the decoding and comparison of answers.

The models come from ``tests/models.py``: a small MLP, identity models for BYTES and FP32, a small CNN.
"""

from __future__ import annotations

import gzip
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from soak_http import Answer, request_bytes

import models as test_models

MODELS = ("mlp", "conv", "identity_fp32", "identity_bytes")
SAMPLES_PER_MODEL = 6
SEED = 17
Expected = np.ndarray | list[bytes]


def write_models(repository: Path) -> None:
    """The soak's model repository: ``<repository>/<model>/1/model.onnx``."""
    test_models.mlp_model(repository / "mlp" / "1" / "model.onnx")
    test_models.conv_model(repository / "conv" / "1" / "model.onnx")
    test_models.identity_model(repository / "identity_fp32" / "1" / "model.onnx", "FP32")
    test_models.identity_model(repository / "identity_bytes" / "1" / "model.onnx", "BYTES")


@dataclass(frozen=True, slots=True)
class Sample:
    """One valid request to ``model`` in each encoding, and the ``output`` tensor it must produce."""

    model: str
    json_request: bytes  # whole HTTP requests, ready for the wire
    binary_request: bytes
    gzip_request: bytes
    grpc_request: bytes  # a serialized ModelInferRequest
    expected: Expected


def _draw(model: str, rng: np.random.Generator) -> np.ndarray | list[bytes]:
    if model == "mlp":
        return rng.standard_normal((int(rng.integers(1, 5)), 16)).astype(np.float32)
    if model == "conv":
        return rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    if model == "identity_fp32":
        return rng.standard_normal((int(rng.integers(1, 4)), int(rng.integers(1, 33)))).astype(np.float32)
    alphabet = "abcxyz é😀"
    count = int(rng.integers(1, 9))
    return ["".join(rng.choice(list(alphabet), int(rng.integers(0, 6)))).encode() for _ in range(count)]


def _expected(repository: Path, model: str, values: list[np.ndarray | list[bytes]]) -> list[Expected]:
    """What each input must produce: the input itself for an identity model, raw onnxruntime's output else."""
    if model.startswith("identity"):
        return values
    import onnxruntime as ort

    session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return [session.run(["output"], {"input": value})[0] for value in values]


def _shape(value: np.ndarray | list[bytes]) -> list[int]:
    return list(value.shape) if isinstance(value, np.ndarray) else [1, len(value)]


def _datatype(value: np.ndarray | list[bytes]) -> str:
    return "FP32" if isinstance(value, np.ndarray) else "BYTES"


def _raw(value: np.ndarray | list[bytes]) -> bytes:
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value, "<f4").tobytes()
    return b"".join(struct.pack("<I", len(item)) + item for item in value)


def _json_data(value: np.ndarray | list[bytes]) -> list[Any]:
    return value.ravel().tolist() if isinstance(value, np.ndarray) else [item.decode() for item in value]


def json_body(value: np.ndarray | list[bytes]) -> bytes:
    tensor = {"name": "input", "shape": _shape(value), "datatype": _datatype(value), "data": _json_data(value)}
    return json.dumps({"inputs": [tensor], "outputs": [{"name": "output"}]}).encode()


def binary_body(value: np.ndarray | list[bytes]) -> tuple[bytes, int]:
    """A binary-extension body (JSON header, then the raw tensor) asking for binary outputs; and the header's
    length."""
    raw = _raw(value)
    tensor = {"name": "input", "shape": _shape(value), "datatype": _datatype(value),
              "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
    header = json.dumps({"inputs": [tensor], "outputs": [{"name": "output", "parameters": {"binary_data": True}}]})
    return header.encode() + raw, len(header.encode())


def grpc_body(model: str, value: np.ndarray | list[bytes]) -> bytes:
    """FP32 in ``raw_input_contents`` (what tritonclient sends), BYTES in the typed ``bytes_contents``."""
    from zeroserve.runtime._proto import open_inference_grpc_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input", datatype=_datatype(value), shape=_shape(value))
    if isinstance(value, np.ndarray):
        request.raw_input_contents.append(_raw(value))
    else:
        tensor.contents.bytes_contents.extend(value)
    request.outputs.add(name="output")
    return bytes(request.SerializeToString())


def infer_path(model: str) -> str:
    return f"/v2/models/{model}/infer"


def build_samples(repository: Path) -> dict[str, list[Sample]]:
    rng = np.random.default_rng(SEED)
    samples: dict[str, list[Sample]] = {}
    for model in MODELS:
        values = [_draw(model, rng) for _ in range(SAMPLES_PER_MODEL)]
        samples[model] = []
        for value, expected in zip(values, _expected(repository, model, values)):
            body = json_body(value)
            binary, header_length = binary_body(value)
            json_headers = {"Content-Type": "application/json"}
            samples[model].append(Sample(
                model,
                request_bytes("POST", infer_path(model), body, json_headers),
                request_bytes("POST", infer_path(model), binary, {
                    "Content-Type": "application/octet-stream",
                    "Inference-Header-Content-Length": str(header_length)}),
                request_bytes("POST", infer_path(model), gzip.compress(body),
                              {**json_headers, "Content-Encoding": "gzip"}),
                grpc_body(model, value),
                expected,
            ))  # fmt: skip
    return samples


def heavy_sample(repository: Path, batch: int = 8) -> Sample:
    """A CNN request of ``batch`` images (binary), long enough to run that it is still in the server when the
    SIGTERM arrives."""
    value = np.random.default_rng(SEED + 1).standard_normal((batch, 3, 64, 64)).astype(np.float32)
    binary, header_length = binary_body(value)
    request = request_bytes("POST", infer_path("conv"), binary, {
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)})  # fmt: skip
    return Sample("conv", b"", request, b"", b"", _expected(repository, "conv", [value])[0])


def _unpack_bytes(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items


def rest_output(answer: Answer) -> tuple[list[int], Any]:
    """The ``output`` tensor of a V2 REST answer (JSON, or JSON header and binary outputs): shape and values."""
    length = answer.headers.get("inference-header-content-length")
    end = int(length) if length is not None else len(answer.body)
    offset = end
    for output in json.loads(answer.body[:end])["outputs"]:
        size = (output.get("parameters") or {}).get("binary_data_size")
        raw = answer.body[offset : offset + size] if size is not None else None
        offset += size or 0
        if output["name"] != "output":
            continue
        if raw is None:
            data = output["data"]
            values = [item.encode() for item in data] if output["datatype"] == "BYTES" else np.asarray(data)
        else:
            values = _unpack_bytes(raw) if output["datatype"] == "BYTES" else np.frombuffer(raw, "<f4")
        return output["shape"], values
    raise ValueError("the answer has no output named 'output'")


def grpc_output(data: bytes) -> tuple[list[int], Any]:
    from zeroserve.runtime._proto import open_inference_grpc_pb2 as pb

    response = pb.ModelInferResponse.FromString(data)
    for index, output in enumerate(response.outputs):
        if output.name != "output":
            continue
        raw = response.raw_output_contents[index] if index < len(response.raw_output_contents) else None
        if output.datatype == "BYTES":
            return list(output.shape), _unpack_bytes(raw) if raw is not None else list(output.contents.bytes_contents)
        values = np.frombuffer(raw, "<f4") if raw is not None else np.asarray(output.contents.fp32_contents)
        return list(output.shape), values
    raise ValueError("the answer has no output named 'output'")


def mismatch(shape: list[int], values: Any, expected: Expected) -> str | None:
    """Why an answer's ``output`` differs from the expected one; None when it matches."""
    if isinstance(expected, list):
        if shape != [1, len(expected)] or list(values) != expected:
            return f"BYTES output {shape} {list(values)[:4]!r} != expected {expected[:4]!r}"
        return None
    if shape != list(expected.shape):
        return f"output shape {shape} != expected {list(expected.shape)}"
    got = np.asarray(values, dtype=np.float64).reshape(expected.shape)
    # Other thread counts sum a Conv in another order: allow float noise, relative to the output's scale.
    scale = float(np.abs(expected).max()) or 1.0
    error = float(np.abs(got - expected).max())
    return f"output differs from raw onnxruntime by {error:.3g} (scale {scale:.3g})" if error > 1e-4 * scale else None
