"""One model's use of the artifact cache while its session is created: look up, point ORT at it, publish.

``create_session`` asks ``prepare`` for each provider list it tries; the first list that has an artifact
kind (only the CPU, or TensorRT first) gets one lookup. On a hit ORT loads the cached optimized graph with
optimizations off, or finds its engines in the cached folder; on a miss ORT writes them into a private
build folder, which ``publish`` turns into the entry. CPU graphs are complete once the session exists;
TensorRT may build engines on the first run, so its entry is published after warmup.

With ``trt_ep_context`` a TensorRT miss also asks the EP to write its EP-context model into the build folder
(embed mode 0: a one-node graph naming the engine file beside it), and a hit loads that model with graph
optimizations off, which skips TensorRT's ONNX parser and builder (ORT's fastest load). An entry without
the context model (TensorRT did not write one) still serves as an engine cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zeroserve.runtime.artifact_cache import ArtifactStore, Lookup
from zeroserve.runtime.artifact_keys import CPU_LEVEL, CpuLevel, GpuFacts, detect_gpu, key_fields, model_digest

if TYPE_CHECKING:
    import onnxruntime

logger = logging.getLogger(__name__)

__all__ = ["SessionArtifacts"]

_TRT, _CPU = "TensorrtExecutionProvider", "CPUExecutionProvider"
OPTIMIZED_NAME = "model.opt.onnx"


@dataclass(frozen=True, slots=True)
class Prepared:
    """What ``create_session`` changes for one attempt."""

    model_path: Path
    options: dict[str, str]  # the first provider's options
    session_options: onnxruntime.SessionOptions


class SessionArtifacts:
    """The artifact cache as seen by one model; ``gpu`` overrides detection (tests, benchmarks)."""

    def __init__(
        self,
        store: ArtifactStore,
        model_path: Path,
        *,
        gpu: GpuFacts | None = None,
        cpu_level: CpuLevel = CPU_LEVEL,
        trt_ep_context: bool = False,
    ) -> None:
        self.store = store
        self.model_path = model_path
        self._gpu = gpu
        self.cpu_level = cpu_level
        self.trt_ep_context = trt_ep_context
        self.lookup: Lookup | None = None  # set by prepare()
        self.in_use = False  # the session runs on the provider the lookup was for
        self.published = False
        self._failed = False

    def prepare(
        self, providers: Sequence[str], options: dict[str, str], so: onnxruntime.SessionOptions
    ) -> Prepared | None:
        """Look the artifact for this provider list up; None when it has no artifact or one was looked up."""
        if self.lookup is not None or not providers:
            return None
        first = providers[0]
        if first == _CPU and len(providers) > 1 or first not in (_CPU, _TRT):
            return None  # an optimized graph is only valid for the providers it was made with
        import onnxruntime as ort

        gpu = self._gpu
        if first == _TRT and gpu is None:
            gpu = detect_gpu(int(options.get("device_id", "0")))
        try:
            digest = model_digest(self.model_path, self.store.memo)
        except OSError as exc:  # a cache problem never fails a load
            logger.warning("artifact cache: cannot hash %s, not using the cache: %s", self.model_path, exc)
            return None
        fields = key_fields(
            first, options, model_sha256=digest, model_file=self.model_path.name,
            ort_version=ort.__version__, gpu=gpu, cpu_level=self.cpu_level, trt_ep_context=self.trt_ep_context,
        )  # fmt: skip
        if fields is None:
            logger.warning("artifact cache: no GPU facts, so TensorRT engines are not cached")
            return None
        self.lookup = found = self.store.lookup(fields)
        logger.info(
            "artifact cache %s for %s (%s, key %s)",
            "hit" if found.hit else "miss", self.model_path, found.source, found.key[:12],
        )  # fmt: skip
        Level = ort.GraphOptimizationLevel
        if first == _CPU:
            if found.hit:
                so.graph_optimization_level = Level.ORT_DISABLE_ALL
                return Prepared(found.files / OPTIMIZED_NAME, options, so)
            so.graph_optimization_level = getattr(Level, f"ORT_ENABLE_{found.fields['optimization_level']}")
            so.optimized_model_filepath = str(found.files / OPTIMIZED_NAME)
            return Prepared(self.model_path, options, so)
        folder = str(found.files)
        cached = {
            "trt_engine_cache_enable": "True", "trt_engine_cache_path": folder,
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": folder,
        }  # fmt: skip
        if options.get("trt_engine_cache_path") not in (None, folder):
            logger.info("--cache_uri is set: TensorRT engines go to %s, not --trt_engine_cache_path", folder)
        if self.trt_ep_context:
            context_model = self.context_model_path(found.files)
            if found.hit and context_model.is_file():
                so.graph_optimization_level = Level.ORT_DISABLE_ALL
                return Prepared(context_model, options | cached, so)
            if not found.hit:
                cached |= {
                    "trt_dump_ep_context_model": "True", "trt_ep_context_file_path": folder,
                    "trt_ep_context_embed_mode": "0",
                }  # fmt: skip
        return Prepared(self.model_path, options | cached, so)

    def context_model_path(self, folder: Path) -> Path:
        """Where the TensorRT EP writes the EP-context model when given a folder: ``<model stem>_ctx.onnx``."""
        return folder / f"{self.model_path.stem}_ctx.onnx"

    def discard(self) -> None:
        """The session could not be built with the artifact: use and publish nothing."""
        self._failed = True

    def created(self, in_use: Sequence[str]) -> None:
        """Record which providers the session got; a CPU graph is published now, as it is complete."""
        lookup = self.lookup
        self.in_use = not self._failed and lookup is not None and in_use[:1] == [lookup.fields["provider"]]
        if lookup is not None and lookup.fields["kind"] == "ort-optimized":
            self.publish()

    def publish(self) -> None:
        """Store what a miss built (once; a hit or an unused lookup publishes nothing)."""
        if self.lookup is None or self.lookup.hit or self.published or not self.in_use:
            return
        self.published = True
        if self.trt_ep_context and not self.context_model_path(self.lookup.files).is_file():
            logger.warning(
                "artifact cache: TensorRT wrote no EP-context model for %s; the entry keeps only its engines",
                self.model_path,
            )
        self.store.publish(self.lookup, keep_build=self.lookup.fields["kind"] == "tensorrt")
