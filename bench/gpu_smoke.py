"""GPU smoke check for the TensorRT/CUDA path and the artifact cache. Run it on a GPU machine:

    pip install 'onnxruntime-gpu[cuda,cudnn]' tensorrt-cu13-libs==10.14.1.48.post1   # see FIELD-NOTES g.1/g.2
    LD_LIBRARY_PATH=<tensorrt_libs folder>:$LD_LIBRARY_PATH python bench/gpu_smoke.py [--fp16] [--cache_uri DIR]

It prints, and exits 1 when something is wrong:

1. what ONNX Runtime offers and what ``detect_gpu`` sees (GPU name, compute capability, CUDA, TensorRT);
2. a CUDA-only session: creation, first run and a warm run;
3. TensorRT through ``--cache_uri`` twice, as two starts of a server would: the first builds the engine
   (a miss, published after warmup), the second must be a hit whose engine load is much faster. For each,
   the providers really in use (``session.get_providers()``), the timings and the files in the entry.
   With ``--trt_ep_context`` the entry must hold ``model_ctx.onnx`` and the second start loads it.
4. ``--trt_build background`` without a cache: ready on CUDA (time to first answer), then ``upgrade()``
   builds TensorRT and swaps it in while the model keeps answering; the answers must agree.

``--providers cpu`` runs the same steps on the CPU (the CPU artifact instead of engines), to check the
script itself on a machine without a GPU. Models: ``image`` from ``bench/models.py`` (dynamic batch; a
TensorRT profile 1..8 is set so the engine is built at session creation).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from zeroserve.runtime.artifact_cache import ArtifactStore
from zeroserve.runtime.artifact_keys import detect_gpu
from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.settings import ProviderChoice, ProviderSettings

sys.path.insert(0, str(Path(__file__).parent))
import models  # bench/models.py, beside this file

PROFILE = {"min": "input:1x3x224x224", "opt": "input:1x3x224x224", "max": "input:8x3x224x224"}


def start(label: str, path: Path, settings: ProviderSettings, store: ArtifactStore | None) -> OnnxModel:
    """One server start as the loader does it: load, then warmup (which publishes a TensorRT build)."""
    model = OnnxModel("image", "1", path, settings, artifacts=store)
    t0 = time.perf_counter()
    model.load()
    t1 = time.perf_counter()
    model.warmup()
    t2 = time.perf_counter()
    feed = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    model.run(feed, None)
    t3 = time.perf_counter()
    model.run(feed, None)
    t4 = time.perf_counter()
    cache = model.session_artifacts
    lookup = cache.lookup if cache is not None else None
    source = "no cache" if store is None else (lookup.source if lookup is not None else "not applicable")
    print(
        f"{label}: providers {model.execution_providers}; cache {source}; create {t1 - t0:.3f} s, "
        f"warmup {t2 - t1:.3f} s, run {t3 - t2:.4f} s, warm run {t4 - t3:.4f} s"
    )
    if lookup is not None:
        print(f"  key {lookup.key[:16]} fields {dict(lookup.fields)}")
    return model


def background_build(path: Path, settings: ProviderSettings) -> list[str]:
    """``--trt_build background``: first answer on CUDA, then the switch to TensorRT; returns problems."""
    feed = {"input": np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    t0 = time.perf_counter()
    try:
        model = start("background build: interim session", path, settings, None)
    except Exception as exc:
        return [f"--trt_build background: interim session failed: {exc}"]
    on_cuda = model.run(feed, None)[0]
    print(f"  ready and answering on {model.execution_providers} after {time.perf_counter() - t0:.3f} s")
    if model.execution_providers[:1] != ["CUDAExecutionProvider"] or not model.upgrade_pending:
        return [f"--trt_build background: interim session runs on {model.execution_providers}"]
    try:
        seconds = model.upgrade()
    except Exception as exc:
        return [f"--trt_build background: upgrade failed: {exc}"]
    on_trt = model.run(feed, None)[0]
    print(f"  switched to {model.execution_providers} after {seconds:.3f} s of building")
    problems = []
    if model.execution_providers[:1] != ["TensorrtExecutionProvider"]:
        problems.append(f"--trt_build background: after upgrade on {model.execution_providers}")
    if not np.allclose(on_cuda, on_trt, rtol=1e-2, atol=1e-2):
        problems.append("--trt_build background: CUDA and TensorRT answers differ")
    return problems


def entry_files(store_dir: Path) -> list[str]:
    return sorted(
        f"{p.relative_to(store_dir)} ({p.stat().st_size:,} B)"
        for p in store_dir.rglob("*")
        if p.is_file() and "/files/" in p.as_posix() and "/.build-" not in p.as_posix()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", choices=["tensorrt", "cpu"], default="tensorrt")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--trt_ep_context", action="store_true", help="cache the EP-context model (step 3)")
    parser.add_argument("--cache_uri", help="artifact cache (default: a temporary folder)")
    parser.add_argument("--device_id", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    problems: list[str] = []

    print(f"onnxruntime {ort.__version__}, build offers {ort.get_available_providers()}")
    gpu = detect_gpu(args.device_id)
    print(f"detect_gpu({args.device_id}): {gpu}")
    if args.providers == "tensorrt" and gpu is None:
        problems.append("detect_gpu found no GPU/TensorRT: TensorRT engines will not be cached")

    with tempfile.TemporaryDirectory(prefix="zs-gpu-smoke-") as tmp:
        work = Path(tmp)
        path = models.write_models(work / "models", ["image"])["image"]
        store_dir = Path(args.cache_uri) if args.cache_uri else work / "store"
        choice: ProviderChoice = args.providers
        settings = ProviderSettings(
            choice=choice, device_id=args.device_id, trt_fp16=args.fp16,
            trt_profile_min_shapes=PROFILE["min"], trt_profile_opt_shapes=PROFILE["opt"],
            trt_profile_max_shapes=PROFILE["max"], trt_ep_context=args.trt_ep_context,
        )  # fmt: skip
        if args.providers == "tensorrt":
            try:
                start("CUDA only", path, ProviderSettings(choice="cuda", device_id=args.device_id), None)
            except Exception as exc:
                problems.append(f"CUDA session failed: {exc}")
        timings = []
        for label in ("first start (expect miss: engine build)", "second start (expect hit)"):
            store = ArtifactStore(str(store_dir), work / "cache")
            try:
                t0 = time.perf_counter()
                model = start(label, path, settings, store)
                timings.append(time.perf_counter() - t0)
            except Exception as exc:
                problems.append(f"{label} failed: {exc}")
                break
            wanted = "TensorrtExecutionProvider" if args.providers == "tensorrt" else "CPUExecutionProvider"
            if model.execution_providers[:1] != [wanted]:
                problems.append(f"{label}: running on {model.execution_providers}, not {wanted}")
            print("  entry files:", *entry_files(store_dir), sep="\n    ")
        if len(timings) == 2:
            hit = model.session_artifacts is not None and model.session_artifacts.lookup is not None
            if not hit or model.session_artifacts.lookup.source == "miss":  # type: ignore[union-attr]
                problems.append("the second start was not a cache hit")
            context_models = [name for name in entry_files(store_dir) if "_ctx.onnx" in name]
            if args.providers == "tensorrt" and args.trt_ep_context and not context_models:
                problems.append("--trt_ep_context: the entry holds no EP-context model")
            print(f"start to warm: first {timings[0]:.3f} s, second {timings[1]:.3f} s "
                  f"({timings[1] / timings[0]:.2f}x)")  # fmt: skip
        if args.providers == "tensorrt":
            problems += background_build(path, replace(settings, trt_build="background"))
    for problem in problems:
        print("PROBLEM:", problem)
    print("OK" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
