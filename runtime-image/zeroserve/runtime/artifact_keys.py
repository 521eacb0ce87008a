"""What makes a built session artifact valid, as a content-addressed key. Pure, except ``detect_gpu``.

Two kinds of artifact:

- ``ort-optimized`` (CPU): the graph ONNX Runtime optimized, saved with ``optimized_model_filepath`` and
  later loaded with optimizations off. At ``ALL`` the graph holds NCHWc layout rewrites sized for this
  CPU's vector unit (ORT warns that such a file suits only the machine that wrote it), so that level is
  keyed on the CPU features ONNX Runtime's kernels dispatch on; an ``EXTENDED`` graph holds across CPUs
  of one architecture but runs a CNN ~1.4x slower (no NCHWc), see ``bench/artifact_cache.py``.
- ``tensorrt`` (GPU): the TensorRT EP's engine and timing cache folder. ORT names engines by the model's
  *file name* and graph, not its weights, GPU model or builder options, so its own cache can serve a
  stale engine; the key here covers all of them, and the file name too (it changes ORT's engine name).
  With ``--trt_ep_context`` the folder also holds the EP-context model (``<model>_ctx.onnx``, a one-node
  graph naming the engine), keyed apart (``artifact: ep-context``) since its entries hold other files.

The CUDA EP has no artifact to keep: its first-run costs are autotuning, which warmup pays.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from zeroserve.runtime.digests import DigestMemo, sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "ArtifactKind", "CudaDevice", "GpuFacts", "artifact_key", "cpu_features", "cuda_device", "detect_gpu", "key_fields",
    "model_digest",
]  # fmt: skip

ArtifactKind = Literal["ort-optimized", "tensorrt"]
KEY_FORMAT = 1  # bump when the fields or their meaning change: every old entry then misses
CpuLevel = Literal["ALL", "EXTENDED"]
# The ORT optimization level of a saved CPU graph; see the module docstring and docs/artifact-cache.md.
CPU_LEVEL: CpuLevel = "ALL"
# CPU flags that decide which MLAS kernels run and how wide NCHWc blocks are (x86 /proc/cpuinfo "flags",
# Arm "Features"). Two CPUs with the same subset run a saved ALL graph the same way.
_CPU_FLAGS = frozenset({
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
    "amx_tile", "amx_bf16", "amx_int8",
    "asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2", "sme",
})  # fmt: skip

_TRT, _CPU = "TensorrtExecutionProvider", "CPUExecutionProvider"
# TensorRT options that say where files go, or which GPU of this machine runs them: they do not change
# what is built. Everything else (precision, workspace, builder level, profiles, tactics...) is keyed.
_TRT_PLACEMENT = frozenset({
    "device_id", "user_compute_stream", "has_user_compute_stream",
    "trt_engine_cache_enable", "trt_engine_cache_path", "trt_engine_cache_prefix",
    "trt_timing_cache_enable", "trt_timing_cache_path",
    "trt_dump_ep_context_model", "trt_ep_context_file_path",
    "trt_detailed_build_log", "trt_dump_subgraphs",
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class GpuFacts:
    """What TensorRT's output depends on about the GPU and its libraries."""

    name: str  # e.g. "NVIDIA H100 80GB HBM3": also tells a smaller card of the same CC apart
    compute_capability: str  # "9.0"
    cuda_runtime: str  # "13.0"
    tensorrt: str  # "10.14.1"; plans need the exact TensorRT version


def model_digest(model_path: Path, memo: DigestMemo | None = None) -> str:
    """sha256 over the model file and the files beside it (external weights are saved there).

    Other ``.onnx`` files and hidden files in the folder are left out: they are other models or caches.
    ``memo`` remembers the result while none of the files changes.
    """
    siblings = sorted(
        p for p in model_path.parent.iterdir()
        if p.is_file() and p != model_path and p.suffix != ".onnx" and not p.name.startswith(".")
    )  # fmt: skip
    files = [model_path, *siblings]

    def compute() -> str:
        h = hashlib.sha256()
        for path in files:
            h.update(f"\0{path.name if path != model_path else ''}\0{sha256_file(path)}".encode())
        return h.hexdigest()

    return compute() if memo is None else memo.combined(files, compute, "model")


def key_fields(
    provider: str,
    options: Mapping[str, str],
    *,
    model_sha256: str,
    model_file: str,
    ort_version: str,
    machine: str | None = None,
    gpu: GpuFacts | None = None,
    cpu_level: CpuLevel = CPU_LEVEL,
    cpu_flags: list[str] | None = None,
    trt_ep_context: bool = False,
) -> dict[str, Any] | None:
    """The fields an artifact for ``provider`` with ``options`` is keyed on; None when nothing is cached.

    A TensorRT artifact needs ``gpu``: without the GPU and library versions nothing safe can be keyed.
    ``machine`` defaults to this CPU architecture (``platform.machine()``), ``cpu_flags`` (keyed at level
    ``ALL`` only) to this CPU's (``cpu_features()``).
    """
    base: dict[str, Any] = {"format": KEY_FORMAT, "model_sha256": model_sha256, "onnxruntime": ort_version}
    if provider == _CPU:
        fields = base | {
            "kind": "ort-optimized",
            "provider": provider,
            "machine": machine or platform.machine(),
            "optimization_level": cpu_level,
        }
        if cpu_level == "ALL":
            fields["cpu_flags"] = cpu_features() if cpu_flags is None else sorted(cpu_flags)
        return fields
    if provider == _TRT and gpu is not None:
        kept = {k: str(v) for k, v in sorted(options.items()) if k not in _TRT_PLACEMENT}
        # Only added when set, so the keys of engine-cache entries stay what they were.
        extra = {"artifact": "ep-context"} if trt_ep_context else {}
        return base | extra | {
            "kind": "tensorrt",
            "provider": provider,
            "options": kept,
            "precision": _precision(kept),
            "profile_shapes": [kept.get(f"trt_profile_{k}_shapes", "") for k in ("min", "opt", "max")],
            "optimization_level": kept.get("trt_builder_optimization_level", "3"),  # ORT's default
            "model_file": model_file,
            "machine": machine or platform.machine(),
            "gpu": asdict(gpu),
        }
    return None


def cpu_features(cpuinfo: str | None = None) -> list[str]:
    """The kernel-relevant flags of this CPU (or of ``cpuinfo``, the text of /proc/cpuinfo), sorted."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:  # not Linux: the machine name must do
            return []
    for line in cpuinfo.splitlines():
        label, _, value = line.partition(":")
        if label.strip() in ("flags", "Features"):
            return sorted(_CPU_FLAGS.intersection(value.split()))
    return []


def _precision(options: Mapping[str, str]) -> str:
    enabled = [p for p in ("int8", "fp16", "bf16") if options.get(f"trt_{p}_enable", "").lower() in ("true", "1")]
    return "+".join(enabled) or "fp32"


def artifact_key(fields: Mapping[str, Any]) -> str:
    """sha256 of the fields as canonical JSON: equal fields, equal key; any change, another entry."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# CUDA driver API attribute numbers (cuda.h: CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR).
_CC_MAJOR, _CC_MINOR = 75, 76


def detect_gpu(device_id: int) -> GpuFacts | None:
    """Ask the CUDA driver and TensorRT about GPU ``device_id``; None where either cannot be loaded.

    Uses the libraries the TensorRT EP itself loads (``libcuda.so.1``, ``libcudart.so``,
    ``libnvinfer.so.10``), through ctypes, so no CUDA Python package is needed.
    """
    device = cuda_device(device_id)
    if device is None:
        return None
    try:
        nvinfer = ctypes.CDLL("libnvinfer.so.10")
        trt = int(nvinfer.getInferLibVersion())  # TensorRT 10: major * 10000 + minor * 100 + patch
    except (OSError, AttributeError) as exc:
        logger.info("no GPU facts for the artifact cache: %s", exc)
        return None
    return GpuFacts(
        name=device.name,
        compute_capability=device.compute_capability,
        cuda_runtime=device.cuda_runtime,
        tensorrt=f"{trt // 10000}.{trt // 100 % 100}.{trt % 100}",
    )


@dataclass(frozen=True, slots=True)
class CudaDevice:
    """One GPU as the CUDA driver describes it."""

    name: str
    compute_capability: str  # "9.0"
    cuda_runtime: str  # "13.0": the CUDA runtime library's version, else "driver 13.0" (what the driver supports)


def cuda_device(device_id: int) -> CudaDevice | None:
    """GPU ``device_id`` through the CUDA driver (``libcuda.so.1``, by ctypes); None where there is none."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        logger.info("no CUDA driver: %s", exc)
        return None
    dev, major, minor, driver = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    # Each call returns a CUresult; the first non-zero one stops the chain.
    status = (
        cuda.cuInit(0)
        or cuda.cuDeviceGet(ctypes.byref(dev), device_id)
        or cuda.cuDeviceGetName(name, len(name), dev)
        or cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
        or cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
        or cuda.cuDriverGetVersion(ctypes.byref(driver))
    )
    if status != 0:
        logger.warning("no GPU %d: CUDA driver call failed with CUresult %s", device_id, status)
        return None
    runtime = _cuda_runtime_version() or f"driver {driver.value // 1000}.{driver.value % 1000 // 10}"
    return CudaDevice(name.value.decode(errors="replace"), f"{major.value}.{minor.value}", runtime)


def _cuda_runtime_version() -> str | None:
    for soname in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            cudart = ctypes.CDLL(soname)
        except OSError:
            continue
        version = ctypes.c_int()
        if cudart.cudaRuntimeGetVersion(ctypes.byref(version)) == 0:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
    return None
