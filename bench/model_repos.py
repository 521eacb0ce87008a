"""The model repositories multi_model.py serves: N small MLPs (local, and uploaded to moto's S3), and the larger
models whose sessions are worth caching.

The MLPs are ``tests/models.py``'s ``mlp_model`` (input ``input`` FP32 [-1, 16] -> ``output`` [-1, 4], the shape
of bench's ``tiny``, so ``payloads.json_body("tiny")`` fits every one), seed i for ``mNNN``, about 5.5 KB each.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import payloads

BENCH = Path(__file__).resolve().parent
_TEST_MODELS = BENCH.parent / "tests" / "models.py"
# The reload section's models: (input shape of one request, how it is built).
RELOAD_INPUTS: dict[str, tuple[int, ...]] = {
    "primer": (1, 16),  # an MLP loaded first, so the first session of the process is not the one measured
    "conv": (1, 3, 32, 32),  # tests/models.py conv_model: 10 3x3 Conv+Relu, 64 wide
    "resnet18": (1, 3, 224, 224),  # bench/artifact_cache.py: Conv+BN folding and fusions, 47 MB
}


def _test_models() -> ModuleType:
    """``tests/models.py``, loaded by path (bench's own ``models`` module has that name)."""
    name = "_zeroserve_tests_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _TEST_MODELS)
        assert spec is not None and spec.loader is not None, _TEST_MODELS
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def mlp_name(index: int) -> str:
    return f"m{index:03d}"


def write_mlps(root: Path, count: int) -> list[str]:
    """``root/mNNN/1/model.onnx`` for NNN in 0..count-1, each with its own weights; returns the names."""
    mlp = _test_models().mlp_model
    names = [mlp_name(i) for i in range(count)]
    for i, name in enumerate(names):
        mlp(root / name / "1" / "model.onnx", seed=i)
    return names


def copy_models(root: Path, names: Sequence[str], target: Path) -> Path:
    """A repository of just ``names`` (copied from ``root``), for an eager server of those models."""
    for name in names:
        shutil.copytree(root / name, target / name)
    return target


def upload_tree(s3_server: Any, bucket: str, root: Path, threads: int = 8) -> int:
    """Put every file under ``root`` into ``bucket`` at its relative path; returns the number of objects."""
    s3_server.create_bucket(bucket)
    client = s3_server.client  # built once; boto3 clients are thread-safe
    files = sorted(path for path in root.rglob("*") if path.is_file())

    def put(path: Path) -> None:
        client.put_object(Bucket=bucket, Key=path.relative_to(root).as_posix(), Body=path.read_bytes())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, files))
    return len(files)


def write_reload_repo(root: Path) -> dict[str, Path]:
    """``root/NAME/1/model.onnx`` for the reload section's models (RELOAD_INPUTS)."""
    import artifact_cache  # bench/artifact_cache.py: imports onnxruntime and zeroserve.runtime, so only here
    import onnx

    tests = _test_models()
    paths = {name: root / name / "1" / "model.onnx" for name in RELOAD_INPUTS}
    tests.mlp_model(paths["primer"], seed=12345)
    tests.conv_model(paths["conv"], size=32, channels=64, layers=10, seed=1)
    paths["resnet18"].parent.mkdir(parents=True, exist_ok=True)
    onnx.save(artifact_cache.build_resnet18(), str(paths["resnet18"]))
    return paths


def tensor_body(shape: Sequence[int]) -> payloads.Body:
    """A V2 binary-extension request for an FP32 input called ``input`` of ``shape`` (fixed seed), binary answer."""
    raw = np.random.default_rng(payloads.INPUT_SEED).standard_normal(shape).astype(np.float32).tobytes()
    header = json.dumps({
        "inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }, separators=(",", ":")).encode()  # fmt: skip
    return payloads.Body(header + raw, "application/octet-stream", len(header))
