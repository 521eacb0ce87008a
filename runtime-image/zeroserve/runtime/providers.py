"""Execution-provider choice (TensorRT -> CUDA -> CPU), their options, and the session that uses them.

``get_available_providers()`` describes the ONNX Runtime *build*: onnxruntime-gpu lists TensorRT and CUDA
on a machine without a GPU. Only ``session.get_providers()`` says what a session really uses, so
``create_session`` checks it and refuses a silent CPU fallback when a GPU provider was asked for by name.
ONNX Runtime itself is imported only when a session is built.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from zeroserve.runtime.errors import ModelLoadError

if TYPE_CHECKING:
    import onnxruntime

    from zeroserve.runtime.session_artifacts import SessionArtifacts

logger = logging.getLogger(__name__)

ProviderChoice = Literal["auto", "tensorrt", "cuda", "cpu"]
ConvAlgoSearch = Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]
TrtBuild = Literal["blocking", "background"]

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
_CHOICES: tuple[ProviderChoice, ...] = ("auto", "tensorrt", "cuda", "cpu")
_CONV_SEARCH: tuple[ConvAlgoSearch, ...] = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
_TRT_BUILDS: tuple[TrtBuild, ...] = ("blocking", "background")
_EXPLICIT = {"tensorrt": (TRT, CUDA), "cuda": (CUDA,), "cpu": ()}  # GPU providers before the CPU
_TRT_PLAIN = (
    "trt_max_workspace_size",
    "trt_builder_optimization_level",
    "trt_profile_min_shapes",
    "trt_profile_opt_shapes",
    "trt_profile_max_shapes",
)
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : ")


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """How models run: which execution provider, its options, and CPU threads. Validated on creation."""

    choice: ProviderChoice = "auto"
    device_id: int = 0
    trt_fp16: bool = False
    trt_engine_cache_path: str | None = None  # enables the engine cache when set
    trt_timing_cache_path: str | None = None  # enables the timing cache when set
    trt_max_workspace_size: int | None = None  # bytes
    trt_builder_optimization_level: int | None = None  # 0..5, ORT's default 3
    trt_profile_min_shapes: str | None = None  # "in:1x3x224x224,in2:..."; all three or none
    trt_profile_opt_shapes: str | None = None
    trt_profile_max_shapes: str | None = None
    # background: serve on CUDA at once and switch to TensorRT once its engines are built (see interim_providers).
    trt_build: TrtBuild = "blocking"
    # With --cache_uri: cache TensorRT's EP-context model, which loads without TensorRT's parser and builder.
    trt_ep_context: bool = False
    cuda_mem_limit: int | None = None  # bytes, caps the CUDA arena only
    # ORT's default EXHAUSTIVE benchmarks every new input shape, which makes first requests slow.
    cudnn_conv_algo_search: ConvAlgoSearch = "HEURISTIC"
    intra_op_threads: int | None = None  # None: the container's CPU quota
    inter_op_threads: int | None = None

    def __post_init__(self) -> None:
        if self.choice not in _CHOICES:
            raise ValueError(f"--providers must be one of {', '.join(_CHOICES)}, got {self.choice!r}")
        if self.device_id < 0:
            raise ValueError(f"--device_id must be 0 or more, got {self.device_id}")
        level = self.trt_builder_optimization_level
        if level is not None and not 0 <= level <= 5:
            raise ValueError(f"--trt_builder_optimization_level must be 0..5, got {level}")
        for flag, value in (
            ("--trt_max_workspace_size", self.trt_max_workspace_size),
            ("--cuda_mem_limit", self.cuda_mem_limit),
            ("--intra_op_threads", self.intra_op_threads),
            ("--inter_op_threads", self.inter_op_threads),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if self.trt_build not in _TRT_BUILDS:
            raise ValueError(f"--trt_build must be one of {', '.join(_TRT_BUILDS)}, got {self.trt_build!r}")
        if self.cudnn_conv_algo_search not in _CONV_SEARCH:
            raise ValueError(f"--cudnn_conv_algo_search must be one of {', '.join(_CONV_SEARCH)}")
        _check_profiles(self.trt_profile_min_shapes, self.trt_profile_opt_shapes, self.trt_profile_max_shapes)


def parse_shapes(flag: str, text: str) -> list[tuple[str, tuple[int, ...]]]:
    # Parsed the way ORT's TensorRT EP does: split at ',', then at the *first* ':', then at 'x'.
    # A name may repeat: its second shape belongs to a second optimization profile.
    shapes = []
    for item in text.split(","):
        name, _, dims = item.partition(":")
        try:
            shape = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            shape = ()
        if not name or not shape or min(shape) < 0:
            hint = " (ORT cuts the input name at the first ':')" if dims.count(":") else ""
            raise ValueError(f"{flag}: {item!r} is not NAME:DIMxDIM..., e.g. 'input:1x3x224x224'{hint}")
        shapes.append((name, shape))
    return shapes


def _check_profiles(low: str | None, opt: str | None, high: str | None) -> None:
    given = [v is not None for v in (low, opt, high)]
    if not any(given):
        return
    if not all(given):
        raise ValueError(
            "--trt_profile_min_shapes, --trt_profile_opt_shapes and --trt_profile_max_shapes "
            "go together: give all three or none"
        )
    assert low is not None and opt is not None and high is not None
    mins, opts, maxs = (
        parse_shapes(f"--trt_profile_{k}_shapes", t) for k, t in (("min", low), ("opt", opt), ("max", high))
    )
    if not [n for n, _ in mins] == [n for n, _ in opts] == [n for n, _ in maxs]:
        raise ValueError("the TensorRT profile flags must list the same inputs in the same order")
    for (name, a), (_, b), (_, c) in zip(mins, opts, maxs):
        if not len(a) == len(b) == len(c) or not all(x <= y <= z for x, y, z in zip(a, b, c)):
            raise ValueError(
                f"TensorRT profile for {name!r}: need min <= opt <= max in every dimension "
                f"and the same rank, got {_dims(a)}, {_dims(b)}, {_dims(c)}"
            )


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the execution-provider flags, in a group of their own."""
    group = parser.add_argument_group("execution providers")
    add = group.add_argument
    auto = "auto: TensorRT, CUDA, CPU as installed; a named GPU provider fails rather than fall back"
    add("--providers", choices=_CHOICES, help=f"{auto} (env ZEROSERVE_PROVIDERS; default auto)")
    add("--device_id", type=int, default=0, help="GPU ordinal (default 0)")
    add("--trt_fp16", action="store_true", help="let TensorRT build FP16 kernels")
    add("--trt_engine_cache_path", help="folder keeping TensorRT engines across starts")
    add("--trt_timing_cache_path", help="folder keeping TensorRT tactic timings across starts")
    add("--trt_max_workspace_size", type=int, help="TensorRT builder workspace, bytes")
    add("--trt_builder_optimization_level", type=int, help="0..5: lower builds faster (ORT default 3)")
    for kind in ("min", "opt", "max"):
        add(f"--trt_profile_{kind}_shapes", help=f"{kind} input shapes, 'in:1x3x224x224,in2:...' (all three)")
    add(
        "--trt_ep_context", action="store_true",
        help="with --cache_uri, cache TensorRT's EP-context model (the engine in a one-node ONNX graph): "
        "a hit loads it without TensorRT's parser and builder",
    )  # fmt: skip
    add(
        "--trt_build", choices=_TRT_BUILDS, default="blocking",
        help="background: become ready on CUDA at once and switch to TensorRT when its engines are built "
        "(both sessions hold GPU memory until then); blocking (default): ready once TensorRT is",
    )  # fmt: skip
    add("--cuda_mem_limit", type=int, help="cap on the CUDA memory arena, bytes")
    add("--cudnn_conv_algo_search", choices=_CONV_SEARCH, default="HEURISTIC", help="(default HEURISTIC)")
    add("--intra_op_threads", type=int, help="threads inside one operator (default: the CPU quota)")
    add("--inter_op_threads", type=int, help="threads across operators; above 1 runs the graph in parallel")


def settings_from_args(ns: argparse.Namespace, environ: Mapping[str, str]) -> ProviderSettings:
    """Build settings from parsed flags, with ``ZEROSERVE_PROVIDERS`` when ``--providers`` is absent.

    Raises ValueError with the offending flag named.
    """
    choice = ns.providers
    if choice is None:
        raw = environ.get("ZEROSERVE_PROVIDERS", "")
        choice = raw.strip().lower() or "auto"
        if choice not in _CHOICES:
            raise ValueError(f"ZEROSERVE_PROVIDERS={raw!r} is not one of {', '.join(_CHOICES)}")
    # Every other flag's dest is the field's own name.
    given = {f.name: getattr(ns, f.name) for f in fields(ProviderSettings) if f.name != "choice"}
    return ProviderSettings(choice=cast(ProviderChoice, choice), **given)


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


def cpu_quota(
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    *,
    host_cpus: int | None = None,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> int:
    """The CPUs this process may use: its cgroup CPU quota (v2 or v1, rounded up), capped by the CPUs it
    may run on (``host_cpus``, by default its affinity mask), and never below 1."""
    if host_cpus is None:
        try:
            host_cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            host_cpus = os.cpu_count() or 1
    limit = _cgroup_limit(cgroup_root, proc_cgroup)
    return max(1, host_cpus if limit is None else min(host_cpus, math.ceil(limit)))


def _cgroup_limit(root: Path, proc_cgroup: Path) -> float | None:
    v2 = (root / "cgroup.controllers").exists()
    if v2:
        base: Path | None = root
    else:  # v1 mounts the controller as cpu or cpu,cpuacct (often one a link to the other)
        base = next((root / d for d in ("cpu", "cpu,cpuacct") if (root / d).is_dir()), None)
    if base is None:
        return None
    limits = [q for d in _own_dirs(base, proc_cgroup, v2) if (q := _read_limit(d, v2)) is not None]
    return min(limits, default=None)


def _own_dirs(base: Path, proc_cgroup: Path, v2: bool) -> Iterator[Path]:
    # The process's own cgroup and its ancestors: a limit on any of them applies. Inside a cgroup
    # namespace (or a v1 container) the mount root already is the own cgroup and the path does not exist.
    rel = ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (v2 and controllers == "") or (not v2 and "cpu" in controllers.split(",")):
                rel = path.strip("/")
    except (OSError, ValueError):
        pass
    here = base / rel
    if not rel or ".." in Path(rel).parts or not here.is_dir():
        here = base
    yield here
    while here != base:
        here = here.parent
        yield here


def _read_limit(folder: Path, v2: bool) -> float | None:
    try:
        if v2:  # cpu.max: "max 100000" or "150000 100000"
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1_quota = int((folder / "cpu.cfs_quota_us").read_text())  # -1 means no limit
        return v1_quota / int((folder / "cpu.cfs_period_us").read_text()) if v1_quota > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None


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
        # after it, on cores the event loop and gRPC need to answer it and read the next request. Measured on
        # 2 cores, 224x224 CNN over gRPC, one call in flight, 8 rounds: p99 22.9 -> 18.2 ms, 92 -> 98 calls/s
        # (allow_spinning=0, no spinning at all: p99 17.6-18.7 ms, runs slower to start).
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
