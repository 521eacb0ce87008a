"""Execution-provider choice (TensorRT -> CUDA -> CPU), their options, and the session that uses them.

``get_available_providers()`` describes the ONNX Runtime *build*: onnxruntime-gpu lists TensorRT and CUDA
on a machine without a GPU. Only ``session.get_providers()`` says what a session really uses, so
``create_session`` checks it and refuses a silent CPU fallback when a GPU provider was asked for by name.
ONNX Runtime itself is imported only when a session is built.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zeroserve.runtime.cgroup import cpu_quota
from zeroserve.runtime.server_errors import ModelLoadError
from zeroserve.runtime.settings import ProviderSettings

if TYPE_CHECKING:
    import onnxruntime

    from zeroserve.runtime.session_artifacts import SessionArtifacts

logger = logging.getLogger(__name__)

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
_EXPLICIT = {"tensorrt": (TRT, CUDA), "cuda": (CUDA,), "cpu": ()}  # GPU providers before the CPU
_TRT_PLAIN = (
    "trt_max_workspace_size",
    "trt_builder_optimization_level",
    "trt_profile_min_shapes",
    "trt_profile_opt_shapes",
    "trt_profile_max_shapes",
)
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : ")


def select_providers(
    settings: ProviderSettings, available: Sequence[str]
) -> list[tuple[str, dict[str, str]]]:
    """Providers with their options, best first, CPU last, from what the ONNX Runtime build offers.

    Raises ModelLoadError when a provider named explicitly is not in ``available``.
    """
    if settings.choice == "auto":
        gpu = [name for name in (TRT, CUDA) if name in available]
    else:
        wanted = _EXPLICIT[settings.choice]
        if wanted and wanted[0] not in available:
            raise ModelLoadError(
                f"--providers {settings.choice} needs {wanted[0]}, but this ONNX Runtime build offers only "
                f"{', '.join(available) or 'nothing'}; install 'zeroserve[gpu]' (onnxruntime-gpu, in place "
                f"of onnxruntime) or use --providers auto"
            )
        gpu = [name for name in wanted if name in available]
    return [(name, _options(name, settings)) for name in [*gpu, CPU]]


def interim_providers(
    settings: ProviderSettings, available: Sequence[str]
) -> tuple[ProviderSettings, list[str]] | None:
    """With ``--trt_build background``, what to serve on while TensorRT builds its engines: the settings and
    the ORT build's providers without TensorRT (so CUDA first). None when TensorRT would not come first
    anyway, or when there is no CUDA to serve on meanwhile.

    Building a TensorRT engine takes seconds to many minutes; a scale-from-zero request should not wait
    for it when CUDA can answer now. ``OnnxModel.upgrade`` later builds the TensorRT session and swaps it in.
    """
    if settings.trt_build != "background" or settings.choice not in ("auto", "tensorrt") or TRT not in available:
        return None
    rest = [name for name in available if name != TRT]
    if CUDA not in rest:
        return None
    # An explicit --providers tensorrt must not end on the CPU: the interim session is CUDA or nothing.
    return replace(settings, choice="cuda" if settings.choice == "tensorrt" else "auto"), rest


def _options(name: str, s: ProviderSettings) -> dict[str, str]:
    if name == TRT:
        opts = {"device_id": str(s.device_id)}
        if s.trt_fp16:
            opts["trt_fp16_enable"] = "True"
        for cache, path in (("engine", s.trt_engine_cache_path), ("timing", s.trt_timing_cache_path)):
            if path is not None:
                opts |= {f"trt_{cache}_cache_enable": "True", f"trt_{cache}_cache_path": path}
        for key in _TRT_PLAIN:  # settings named as ORT's keys
            if (value := getattr(s, key)) is not None:
                opts[key] = str(value)
        return opts
    if name == CUDA:
        opts = {
            "device_id": str(s.device_id),
            "cudnn_conv_algo_search": s.cudnn_conv_algo_search,
            # The default kNextPowerOfTwo doubles each arena extension, so one large request can hold up to
            # twice the memory it needs for the life of the process; grow by what is asked instead.
            "arena_extend_strategy": "kSameAsRequested",
            # ORT's default, pinned: copying on other streams can race with compute (ORT issue #4829).
            "do_copy_in_default_stream": "True",
        }
        if s.cuda_mem_limit is not None:
            opts["gpu_mem_limit"] = str(s.cuda_mem_limit)
        return opts
    return {}


def session_options(
    settings: ProviderSettings, *, cgroup_root: Path = Path("/sys/fs/cgroup")
) -> onnxruntime.SessionOptions:
    """Session options: intra-op threads from the settings or the CPU quota, full graph optimization.

    ``inter_op_threads`` above 1 selects ORT's parallel execution mode, the only one that uses them.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = settings.intra_op_threads or cpu_quota(cgroup_root)
    if so.intra_op_num_threads != 1:
        # Intra-op threads spin between a run's operators, which keeps a run fast, and by default go on spinning
        # after it, on cores the event loop and gRPC need to answer it and read the next request. Stopping the
        # spin at the end of a run keeps both (bench/README.md, "Where a request runs").
        so.add_session_config_entry("session.force_spinning_stop", "1")
    if settings.inter_op_threads is not None:
        so.inter_op_num_threads = settings.inter_op_threads
        if settings.inter_op_threads > 1:
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    return so


def create_session(
    model_path: Path,
    settings: ProviderSettings,
    *,
    available: Sequence[str] | None = None,
    artifacts: SessionArtifacts | None = None,
) -> tuple[onnxruntime.InferenceSession, list[str]]:
    """Build the inference session and return it with the providers it really uses.

    With ``auto``, a provider that fails to start is logged and the next one tried. A provider named
    explicitly must be in use, or ModelLoadError is raised; so are ORT's own load errors.
    ``available`` (default ``onnxruntime.get_available_providers()``) is what the build is taken to offer.
    ``artifacts`` (the artifact cache) may supply a cached optimized graph or TensorRT engine folder;
    a session that fails with it is retried without it.
    """
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    chosen = select_providers(settings, ort.get_available_providers() if available is None else available)
    asked = [name for name, _ in chosen]
    # auto tries [TRT, CUDA, CPU], then [CUDA, CPU], then [CPU]. ORT's own constructor fallback is off:
    # it retries without any provider options (losing device_id) and prints to stdout.
    attempts = [chosen[i:] for i in range(len(chosen))] if settings.choice == "auto" else [chosen]
    model_errors = (C.InvalidProtobuf, C.NoSuchFile, C.NoModel, C.InvalidGraph)
    so = session_options(settings)
    for i, attempt in enumerate(attempts, 1):
        names = [name for name, _ in attempt]
        try:
            options = [opts for _, opts in attempt]
            session = _cached_session(ort, model_path, names, options, settings, artifacts) or ort.InferenceSession(
                str(model_path), so, names, options, enable_fallback=0
            )
            break
        except Exception as exc:
            if isinstance(exc, model_errors):
                raise ModelLoadError(f"cannot load model {model_path}: {_reason(exc)}") from exc
            missing = _missing_library(ort, names[0])
            if i == len(attempts):
                hint = _LIBRARY_HINT if names[0] != CPU else ""
                raise ModelLoadError(f"cannot load {model_path} on {names[0]}: {missing}{_reason(exc)}{hint}") from exc
            logger.warning(
                "%s failed for %s (%s%s); trying %s", names[0], model_path, missing, _reason(exc), attempts[i][0][0]
            )
    in_use: list[str] = session.get_providers()
    if settings.choice in ("tensorrt", "cuda") and asked[0] not in in_use:
        # CUDA's libraries failing to load is only a warning in ORT; the session then runs on the CPU.
        missing = _missing_library(ort, asked[0]) or "its warning above gives the reason"
        raise ModelLoadError(
            f"--providers {settings.choice}: ONNX Runtime could not start {asked[0]} and fell back to "
            f"{', '.join(in_use)}; {missing.rstrip('; ')}{_LIBRARY_HINT}"
        )
    if any(name not in in_use for name in asked):
        logger.warning("%s: asked for %s, running on %s", model_path, ", ".join(asked), ", ".join(in_use))
    if TRT in in_use and settings.trt_engine_cache_path is None:
        logger.warning(
            "TensorRT rebuilds its engines on every start; set --trt_engine_cache_path "
            "to a persistent folder to keep them"
        )
    logger.info("model %s runs on %s", model_path, ", ".join(in_use))
    if artifacts is not None:
        artifacts.created(in_use)
    return session, in_use


def _cached_session(
    ort: Any,
    model_path: Path,
    names: list[str],
    options: list[dict[str, str]],
    settings: ProviderSettings,
    artifacts: SessionArtifacts | None,
) -> onnxruntime.InferenceSession | None:
    """The session built with the artifact cache, or None when it does not apply or failed (logged)."""
    if artifacts is None:
        return None
    prepared = artifacts.prepare(names, options[0], session_options(settings))
    if prepared is None:
        return None
    try:
        return ort.InferenceSession(
            str(prepared.model_path), prepared.session_options, names, [prepared.options, *options[1:]],
            enable_fallback=0,
        )  # fmt: skip
    except Exception as exc:
        # The model's own faults surface again below, without the cache, with the usual message.
        logger.warning("artifact cache: session for %s failed, building without it: %s", model_path, _reason(exc))
        artifacts.discard()
        return None


_LIBRARY_HINT = (
    " (check that the CUDA, cuDNN and, for TensorRT, libnvinfer libraries and the NVIDIA driver "
    "are visible to the process, e.g. on LD_LIBRARY_PATH)"
)


_PROVIDER_LIBRARIES = {TRT: "libonnxruntime_providers_tensorrt.so", CUDA: "libonnxruntime_providers_cuda.so"}


def _missing_library(ort: Any, provider: str) -> str:
    """The library a GPU provider lacks, as the dynamic loader names it ("libnvinfer.so.10: cannot open shared
    object file ...; "), or "" when that is not why it failed.

    ORT's own exception for TensorRT only says to install TensorRT, and for CUDA the session silently falls
    back; the library it could not load goes to ORT's log alone. Loading the provider's library again here
    (it is already in memory when it loaded fine) makes the loader name the first dependency it cannot find.
    """
    name = _PROVIDER_LIBRARIES.get(provider)
    if name is None:
        return ""
    path = Path(ort.__file__).parent / "capi" / name
    if not path.exists():
        return ""
    import ctypes

    try:
        ctypes.CDLL(str(path))
    except OSError as exc:
        text = str(exc)
        if "cannot open shared object file" in text:
            return f"{text.removeprefix(str(path) + ': ')}; "
    return ""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    match = _ORT_PREFIX.match(text)
    return f"{match.group(1)}: {text[match.end() :]}" if match else f"{type(exc).__name__}: {text}"
