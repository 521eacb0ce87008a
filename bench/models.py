"""Deterministic synthetic ONNX models for the benchmarks.

Usage: python bench/models.py OUT_DIR [--only tiny,image,large]

Writes ``OUT_DIR/<name>/model.onnx`` (the KServe model-folder layout). Weights come from a
fixed-seed generator, so the same command always writes byte-identical files.

- ``tiny``: input ``input`` FP32 [-1, 16] -> Gemm(16->64) -> Relu -> Gemm(64->4) -> ``output`` [-1, 4].
  It measures the server's own per-request cost: its compute is a few microseconds.
- ``image``: input ``input`` FP32 [-1, 3, 224, 224] -> a small strided Conv+Relu stack, one max pool,
  global average pool, Gemm(->1000) -> ``logits`` [-1, 1000]. Sized for roughly 5-10 ms per image
  on a 2-core CPU, which is the regime where a server should add little over raw session.run.
- ``large``: input ``input`` FP32 [-1, 65536] -> Mul, Add, Tanh (elementwise) -> ``output``, same shape.
  256 KiB of tensor each way per request (JSON: up to about 1.3 MB each way) and next to no compute, so it measures
  what moving a large payload costs a server (parsing, copying, encoding), in both directions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# IR 8 pairs with opset 17 and loads in every onnxruntime the project supports (>= 1.20).
IR_VERSION = 8
SEED = 20240601

# (out_channels, stride) for each 3x3 Conv+Relu of the image model, after the 7x7 stem.
IMAGE_STAGES: tuple[tuple[int, int], ...] = (
    (48, 1),
    (96, 2),
    (96, 1),
    (192, 2),
    (384, 2),
)
IMAGE_STEM_CHANNELS = 32
IMAGE_CLASSES = 1000
# 2**16 FP32 values, 256 KiB each way (payloads.MODELS repeats it). Measured with 2**18 (1 MiB): KServe took
# 1.5 s per JSON request, so a 64-connection run left over a minute of queued work; 2**16 keeps it ~0.4 s.
LARGE_ELEMENTS = 65_536


def _weight(rng: np.random.Generator, name: str, shape: Sequence[int], fan_in: int) -> TensorProto:
    # He-style scaling keeps activations in a sane range through the Relu stack, so outputs
    # are finite and comparable across servers with a plain tolerance.
    values = rng.standard_normal(shape).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    return numpy_helper.from_array(values, name)


def _bias(rng: np.random.Generator, name: str, size: int) -> TensorProto:
    return numpy_helper.from_array((rng.standard_normal(size) * 0.01).astype(np.float32), name)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="zeroserve-bench",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build_tiny() -> onnx.ModelProto:
    """The MLP: 16 -> 64 -> Relu -> 4, dynamic batch."""
    rng = np.random.default_rng(SEED)
    inits = [
        _weight(rng, "w1", (16, 64), 16),
        _bias(rng, "b1", 64),
        _weight(rng, "w2", (64, 4), 64),
        _bias(rng, "b2", 4),
    ]
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["output"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [-1, 4])],
        initializer=inits,
    )
    return _finish(graph)


def build_image() -> onnx.ModelProto:
    """The CNN: 7x7/2 stem, 3x3/2 max pool, six 3x3 Conv+Relu, global average pool, Gemm."""
    rng = np.random.default_rng(SEED + 1)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(src: str, c_in: int, c_out: int, kernel: int, stride: int, tag: str) -> str:
        inits.append(_weight(rng, f"{tag}_w", (c_out, c_in, kernel, kernel), c_in * kernel * kernel))
        inits.append(_bias(rng, f"{tag}_b", c_out))
        pad = kernel // 2
        nodes.append(
            helper.make_node(
                "Conv",
                [src, f"{tag}_w", f"{tag}_b"],
                [f"{tag}_conv"],
                name=tag,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
            )
        )
        nodes.append(helper.make_node("Relu", [f"{tag}_conv"], [f"{tag}_out"], name=f"{tag}_relu"))
        return f"{tag}_out"

    x = conv("input", 3, IMAGE_STEM_CHANNELS, 7, 2, "stem")  # 112x112
    nodes.append(
        helper.make_node(
            "MaxPool", [x], ["pool1"], name="pool1", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        )
    )  # 56x56
    x, channels = "pool1", IMAGE_STEM_CHANNELS
    for i, (c_out, stride) in enumerate(IMAGE_STAGES):
        x = conv(x, channels, c_out, 3, stride, f"block{i}")
        channels = c_out
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], name="flatten", axis=1))
    inits.append(_weight(rng, "fc_w", (channels, IMAGE_CLASSES), channels))
    inits.append(_bias(rng, "fc_b", IMAGE_CLASSES))
    nodes.append(helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"], name="fc"))
    graph = helper.make_graph(
        nodes,
        "image",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [-1, IMAGE_CLASSES])],
        initializer=inits,
    )
    return _finish(graph)


def build_large() -> onnx.ModelProto:
    """The large-payload model: y = tanh(x * scale + shift), elementwise over LARGE_ELEMENTS values, dynamic batch."""
    rng = np.random.default_rng(SEED + 2)
    inits = [
        numpy_helper.from_array((rng.uniform(0.5, 1.5, LARGE_ELEMENTS)).astype(np.float32), "scale"),
        numpy_helper.from_array((rng.standard_normal(LARGE_ELEMENTS) * 0.1).astype(np.float32), "shift"),
    ]
    nodes = [
        helper.make_node("Mul", ["input", "scale"], ["scaled"], name="mul"),
        helper.make_node("Add", ["scaled", "shift"], ["shifted"], name="add"),
        helper.make_node("Tanh", ["shifted"], ["output"], name="tanh"),
    ]
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, LARGE_ELEMENTS])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [-1, LARGE_ELEMENTS])],
        initializer=inits,
    )
    return _finish(graph)


BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {"tiny": build_tiny, "image": build_image, "large": build_large}


def write_models(out_dir: Path, names: Sequence[str] = tuple(BUILDERS)) -> dict[str, Path]:
    """Write each named model to ``out_dir/<name>/model.onnx`` and return the file paths."""
    paths: dict[str, Path] = {}
    for name in names:
        path = out_dir / name / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = BUILDERS[name]().SerializeToString()
        # Rewrite only on change, so repeated runs keep the file's mtime and page cache.
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        paths[name] = path
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--only", default=",".join(BUILDERS), help="comma-separated model names")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(BUILDERS)}")
    for name, path in write_models(args.out_dir, names).items():
        print(f"{name}: {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
