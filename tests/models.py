"""Tiny synthetic ONNX graphs for the tests, built with onnx.helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9  # readable by every onnxruntime we support

V2_TO_ONNX = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def add_model(path: Path, op: str = "Add") -> Path:
    """``sum = a <op> b`` on FP32 tensors shaped [-1, 4]."""
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["sum"])],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 4])],
    )
    return _save(graph, path)


def identity_model(path: Path, datatype: str) -> Path:
    """``output = input`` and ``copy = input`` for one V2 datatype, shape [-1, -1]."""
    elem = V2_TO_ONNX[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"]), helper.make_node("Identity", ["input"], ["copy"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("input", elem, ["n", "m"])],
        [
            helper.make_tensor_value_info("output", elem, ["n", "m"]),
            helper.make_tensor_value_info("copy", elem, ["n", "m"]),
        ],
    )
    return _save(graph, path)


def mlp_model(path: Path, features: int = 16, hidden: int = 64, classes: int = 4, seed: int = 0) -> Path:
    """A small dense classifier: input [-1, features] FP32 -> output [-1, classes]."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((features, hidden)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(np.zeros(hidden, np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, classes)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(np.zeros(classes, np.float32), "b2")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["output"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", classes])],
        initializer=[w1, b1, w2, b2],
    )
    return _save(graph, path)


def gather_model(path: Path) -> Path:
    """``picked = table[index]``: an index out of range fails inside ONNX Runtime, not in validation."""
    table = numpy_helper.from_array(np.arange(8, dtype=np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["picked"])],
        "gather",
        [helper.make_tensor_value_info("index", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("picked", TensorProto.FLOAT, [1])],
        initializer=[table],
    )
    return _save(graph, path)


def lookup_model(path: Path) -> Path:
    """``picked = table[index]`` over a dynamic batch of indices: batchable, and an index out of range fails
    inside ONNX Runtime (so a merged run fails and must be split back to find the culprit)."""
    table = numpy_helper.from_array(np.arange(8, dtype=np.float32) * 10, "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["picked"])],
        "lookup",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("picked", TensorProto.FLOAT, ["batch"])],
        initializer=[table],
    )
    return _save(graph, path)


def conv_model(path: Path, size: int = 64, channels: int = 32, layers: int = 3, seed: int = 0) -> Path:
    """A small CNN whose runs take milliseconds: input [-1, 3, size, size] FP32, ``layers`` 3x3 convolutions
    with Relu, global average pool, output [-1, channels]."""
    rng = np.random.default_rng(seed)
    nodes, initializers, previous, width = [], [], "input", 3
    for layer in range(layers):
        weight = rng.standard_normal((channels, width, 3, 3)).astype(np.float32) * 0.1
        initializers.append(numpy_helper.from_array(weight, f"w{layer}"))
        nodes.append(helper.make_node("Conv", [previous, f"w{layer}"], [f"c{layer}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{layer}"], [f"r{layer}"]))
        previous, width = f"r{layer}", channels
    nodes.append(helper.make_node("GlobalAveragePool", [previous], ["pooled"]))
    shape = numpy_helper.from_array(np.array([0, channels], dtype=np.int64), "shape")
    nodes.append(helper.make_node("Reshape", ["pooled", "shape"], ["output"]))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", channels])],
        initializer=[*initializers, shape],
    )
    return _save(graph, path)
