"""Session creation with and without the CPU artifact cache (``--cache_uri``), in one run.

Run: ``.venv/bin/python bench/artifact_cache.py [--rounds 7] [--runs 20] [--json out.json]``

Models: ``image`` from ``bench/models.py`` (7x7 stem + five 3x3 Conv+Relu, 5 MB), and ``resnet18``, a
ResNet-18 layout built here with BatchNormalization after every Conv and residual Adds (47 MB), which
gives ONNX Runtime real graph work: Conv+BN folding, Conv+Add+Relu fusion, NCHWc layout rewrites.

For each model and round, interleaved, ``create_session`` as the server calls it:

  plain          no cache: ORT_ENABLE_ALL on the original model (the server's default)
  ALL hit        warm local cache, level ALL (the default): model sha256 and entry check from the digest
                 memo, session from the saved graph with optimizations off
  ALL, new pod   the same with nothing remembered: both files hashed in full, as after a download
  EXTENDED hit   the portable level: no NCHWc rewrites in the saved graph

and the median ``session.run`` of one image on each session: the EXTENDED graph lacks the NCHWc layout
rewrites that ALL adds, which on a CNN shows at inference time. Download time from a remote store is not
included (see bench/storage_fetch.py for what a fetch costs).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from zeroserve.runtime.artifact_cache import ArtifactStore
from zeroserve.runtime.artifact_keys import CpuLevel, model_digest
from zeroserve.runtime.digests import DigestMemo
from zeroserve.runtime.providers import create_session
from zeroserve.runtime.session_artifacts import SessionArtifacts
from zeroserve.runtime.settings import ProviderSettings

sys.path.insert(0, str(Path(__file__).parent))
import models  # bench/models.py, beside this file

LEVELS: tuple[CpuLevel, ...] = ("ALL", "EXTENDED")
VARIANTS = ("plain", "ALL", "ALL_full_hash", "EXTENDED")


def build_resnet18(seed: int = 7) -> onnx.ModelProto:
    """ResNet-18's layout (2-2-2-2 basic blocks, 64..512 wide), Conv+BN(+Relu), residual Adds, 1000 classes."""
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    count = 0

    def tensor(name: str, values: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def conv_bn(x: str, c_in: int, c_out: int, kernel: int, stride: int, relu: bool = True) -> str:
        nonlocal count
        count += 1
        tag = f"c{count}"
        w = tensor(f"{tag}_w", rng.standard_normal((c_out, c_in, kernel, kernel)) * np.sqrt(2 / (c_in * kernel**2)))
        pads = [kernel // 2] * 4
        conv = helper.make_node("Conv", [x, w], [f"{tag}_y"], kernel_shape=[kernel] * 2, strides=[stride] * 2)
        conv.attribute.append(helper.make_attribute("pads", pads))
        nodes.append(conv)
        stats = [
            tensor(f"{tag}_scale", np.ones(c_out)), tensor(f"{tag}_bias", rng.standard_normal(c_out) * 0.01),
            tensor(f"{tag}_mean", rng.standard_normal(c_out) * 0.01), tensor(f"{tag}_var", np.ones(c_out)),
        ]  # fmt: skip
        nodes.append(helper.make_node("BatchNormalization", [f"{tag}_y", *stats], [f"{tag}_bn"]))
        if not relu:
            return f"{tag}_bn"
        nodes.append(helper.make_node("Relu", [f"{tag}_bn"], [f"{tag}_r"]))
        return f"{tag}_r"

    x = conv_bn("input", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, c_in = "pool", 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if block == 0 and stage > 0 else 1
            y = conv_bn(conv_bn(x, c_in, width, 3, stride), width, width, 3, 1, relu=False)
            shortcut = conv_bn(x, c_in, width, 1, stride, relu=False) if stride != 1 or c_in != width else x
            count += 1
            nodes.append(helper.make_node("Add", [y, shortcut], [f"add{count}"]))
            nodes.append(helper.make_node("Relu", [f"add{count}"], [f"out{count}"]))
            x, c_in = f"out{count}", width
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"]))
    fc_w = tensor("fc_w", rng.standard_normal((c_in, 1000)) * np.sqrt(2 / c_in))
    nodes.append(helper.make_node("Gemm", ["features", fc_w, tensor("fc_b", np.zeros(1000))], ["logits"]))
    graph = helper.make_graph(
        nodes, "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    return model


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def run_median(session: Any, feed: dict[str, np.ndarray], runs: int) -> float:
    session.run(None, feed)
    times = [timed(lambda: session.run(None, feed))[0] for _ in range(runs)]
    return statistics.median(times)


def measure(name: str, path: Path, work: Path, rounds: int, runs: int) -> dict[str, Any]:
    settings = ProviderSettings(choice="cpu")
    store = ArtifactStore(str(work / "store"), work / "cache")
    for level in LEVELS:
        first = SessionArtifacts(store, path, cpu_level=level)
        create_session(path, settings, artifacts=first)  # the miss that fills the cache
        assert first.lookup is not None and first.published
    time.sleep(2.1)  # past the digest memo's "racy" window (digests.py), as on any later start
    for level in LEVELS:  # the first hit hashes in full and remembers the digests
        create_session(path, settings, artifacts=SessionArtifacts(store, path, cpu_level=level))
    remembered = store.memo

    feed = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    create: dict[str, list[float]] = {k: [] for k in (*VARIANTS, "digest_full")}
    run_s: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for i in range(rounds):
        seconds, (session, _) = timed(lambda: create_session(path, settings))
        create["plain"].append(seconds)
        run_s["plain"].append(run_median(session, feed, runs))
        variants: tuple[tuple[str, CpuLevel, DigestMemo], ...] = (
            ("ALL", "ALL", remembered),
            ("ALL_full_hash", "ALL", DigestMemo(work / f"memo-{i}")),  # a new pod: nothing remembered
            ("EXTENDED", "EXTENDED", remembered),
        )
        for variant, level, memo in variants:
            store.memo = memo
            cache = SessionArtifacts(store, path, cpu_level=level)
            seconds, (session, _) = timed(lambda: create_session(path, settings, artifacts=cache))  # noqa: B023
            assert cache.lookup is not None and cache.lookup.source == "local"
            create[variant].append(seconds)
            run_s[variant].append(run_median(session, feed, runs))
        create["digest_full"].append(timed(lambda: model_digest(path))[0])

    med = {k: statistics.median(v) * 1000 for k, v in create.items()}
    runs_ms = {k: statistics.median(v) * 1000 for k, v in run_s.items()}
    return {
        "model": name,
        "model_mb": round(path.stat().st_size / 1e6, 1),
        "create_ms": {k: round(v, 2) for k, v in med.items()},
        "run_ms": {k: round(v, 2) for k, v in runs_ms.items()},
        "create_ratio": {k: round(med[k] / med["plain"], 3) for k in VARIANTS},
        "run_ratio": {k: round(runs_ms[k] / runs_ms["plain"], 3) for k in VARIANTS},
        "samples_ms": {k: [round(x * 1000, 2) for x in v] for k, v in create.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians are reported")
    parser.add_argument("--runs", type=int, default=20, help="session.run calls per session")
    parser.add_argument("--only", default="image,resnet18")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the cache logs each hit at INFO
    ort.set_default_logger_severity(3)  # ref_all's "hardware specific" warning, once per round
    results = []
    with tempfile.TemporaryDirectory(prefix="zs-artifacts-") as tmp:
        work = Path(tmp)
        paths = models.write_models(work / "models", ["image"])
        resnet = work / "models" / "resnet18" / "model.onnx"
        resnet.parent.mkdir(parents=True)
        onnx.save(build_resnet18(), str(resnet))
        paths["resnet18"] = resnet
        for name in args.only.split(","):
            results.append(measure(name, paths[name], work / name, args.rounds, args.runs))
    print(f"onnxruntime {ort.__version__}, {platform.machine()}, rounds {args.rounds}, medians in ms\n")
    print("session creation (ratio to plain) | one session.run (ratio to plain)\n")
    print("| model | MB | plain | ALL hit | ALL hit, new pod | EXTENDED hit | model sha256 |", end="")
    print(" run plain | run ALL | run EXTENDED |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c, t, cr, rr = r["create_ms"], r["run_ms"], r["create_ratio"], r["run_ratio"]
        cells = [r["model"], r["model_mb"], f"{c['plain']:.1f}"]
        cells += [f"{c[k]:.1f} ({cr[k]:.2f}x)" for k in ("ALL", "ALL_full_hash", "EXTENDED")]
        cells += [f"{c['digest_full']:.1f}", f"{t['plain']:.2f}"]
        cells += [f"{t[k]:.2f} ({rr[k]:.2f}x)" for k in ("ALL", "EXTENDED")]
        print("| " + " | ".join(map(str, cells)) + " |")
    if args.json:
        args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
