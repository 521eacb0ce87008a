"""One ONNX model on ONNX Runtime: its session, its V2 metadata, input checks and a blocking run().

Knows nothing of HTTP. Construction does no I/O; ``load()`` builds the session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from zeroserve.protocol import dtypes
from zeroserve.runtime.messages import InputTensor, TensorSpec
from zeroserve.runtime.providers import create_session, interim_providers
from zeroserve.runtime.run_stats import RunResult, RunStats
from zeroserve.runtime.server_errors import InferenceError, InvalidInput, ModelLoadError
from zeroserve.runtime.settings import ProviderSettings

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime

    from zeroserve.runtime.artifact_cache import ArtifactStore
    from zeroserve.runtime.session_artifacts import SessionArtifacts

logger = logging.getLogger("zeroserve.runtime")

ORT_TO_V2: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",  # listed so metadata is truthful; numpy cannot carry it
}

PLATFORM: Final = "onnxruntime_onnx"

# A second, single-thread session (cores.py) holds one more copy of the weights: only for models up to this size.
SINGLE_THREAD_SESSION_MAX_BYTES: Final = 256 * 1024 * 1024


# A session's run: (output names, feeds, run options) -> outputs.
SessionRun = Callable[[list[str], "dict[str, np.ndarray]", None], list[Any]]


def _session_run(session: onnxruntime.InferenceSession, providers: list[str]) -> SessionRun:
    """The run a request calls. On the CPU provider alone, ONNX Runtime's compiled session's own: its Python
    wrapper (``InferenceSession.run``) checks, on every run, what ``feeds`` has checked already (every input
    given), what cannot happen here (OrtValue feeds, WebGPU graph capture) and falls back to other providers on
    a provider's failure, which a CPU session has none of. Otherwise, or where the wrapper holds no ``_sess``,
    the wrapper's."""
    run: SessionRun = session.run
    compiled = getattr(session, "_sess", None)
    if providers == ["CPUExecutionProvider"] and compiled is not None and callable(getattr(compiled, "run", None)):
        run = compiled.run
    return run


def _spec(node: Any) -> TensorSpec:
    datatype = ORT_TO_V2.get(node.type, node.type)
    shape = [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape]
    return TensorSpec(node.name, datatype, shape)


class OnnxModel:
    def __init__(
        self,
        name: str,
        version: str,
        path: Path,
        settings: ProviderSettings,
        *,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.settings = settings
        self.artifacts = artifacts  # the --cache_uri store, if any
        # This model's use of it, after load(): ``session_artifacts.lookup.source`` says hit or miss.
        self.session_artifacts: SessionArtifacts | None = None
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.execution_providers: list[str] = []
        self._session: onnxruntime.InferenceSession | None = None
        self._run: SessionRun | None = None  # the session's run (_session_run)
        self._inputs_by_name: dict[str, TensorSpec] = {}
        self.output_names: list[str] = []  # in the session's order: the outputs a request gets when it names none
        self.output_datatypes: dict[str, str] = {}
        self.stats = RunStats()  # what the placement policy decides on (placement.py)
        # Serving on CUDA while TensorRT is still to be built (--trt_build background): upgrade() does it.
        self.upgrade_pending = False
        # For runs that share the CPU with others (cores.py): built in the background on first contention.
        self._single_thread_session: onnxruntime.InferenceSession | None = None
        self._single_thread_run: SessionRun | None = None
        self._single_thread_started = False
        self._warmup_shapes: Mapping[str, Sequence[int]] | None = None  # --warmup_shapes, for that session too

    def __repr__(self) -> str:
        return f"OnnxModel(name={self.name!r}, version={self.version!r}, path='{self.path}')"

    def load(self) -> None:
        import onnxruntime as ort

        interim = interim_providers(self.settings, ort.get_available_providers())
        if interim is not None:
            settings, available = interim
            logger.warning(
                "model '%s': serving on %s until TensorRT has built its engines (--trt_build background)",
                self.name, available[0],
            )  # fmt: skip
            session, providers = create_session(self.path, settings, available=available)
            self.upgrade_pending = True
        else:
            session, providers = create_session(self.path, self.settings, artifacts=self._artifacts_for_session())
        self._use(session, providers)

    def unload(self) -> None:
        """Drop the sessions (ONNX Runtime frees them with their last reference); ``load`` may follow again. The
        caller makes sure no run uses them (model_manager.py unloads only models with nothing in flight)."""
        self._session = self._run = None
        self._single_thread_session = self._single_thread_run = None
        self._single_thread_started = False
        self.execution_providers = []
        self.stats.reset()

    def upgrade(self, shapes: Mapping[str, Sequence[int]] | None = None) -> float:
        """Build the TensorRT session, warm it up (dynamic-shape engines are built on the first run), then
        swap it in; runs already under way finish on the session they started on. Returns seconds taken.
        Blocking and slow (minutes for a large model): call it from a thread of its own once serving.
        Raises ModelLoadError when TensorRT cannot be used; the model keeps serving as it was."""
        started = time.perf_counter()
        settings = replace(self.settings, choice="tensorrt", trt_build="blocking")
        # An explicit "tensorrt" makes create_session refuse any session that does not run on TensorRT.
        session, providers = create_session(self.path, settings, artifacts=self._artifacts_for_session())
        feeds = self._warmup_feeds(shapes)
        for _ in range(2):
            session.run(None, feeds)
        if self.session_artifacts is not None:
            self.session_artifacts.publish()
        self._use(session, providers)
        self.upgrade_pending = False
        self.stats.reset()  # measured again on the new session
        return time.perf_counter() - started

    def _artifacts_for_session(self) -> SessionArtifacts | None:
        if self.artifacts is None:
            return None
        from zeroserve.runtime.session_artifacts import SessionArtifacts

        self.session_artifacts = SessionArtifacts(
            self.artifacts, self.path, trt_ep_context=self.settings.trt_ep_context
        )
        return self.session_artifacts

    def _use(self, session: onnxruntime.InferenceSession, providers: list[str]) -> None:
        # On a swap (upgrade) the specs come out the same: it is the same graph.
        self.inputs = [_spec(node) for node in session.get_inputs()]
        self.outputs = [_spec(node) for node in session.get_outputs()]
        self._inputs_by_name = {spec.name: spec for spec in self.inputs}
        self.output_names = [spec.name for spec in self.outputs]
        self.output_datatypes = {spec.name: spec.datatype for spec in self.outputs}
        self._session = session
        self.execution_providers = providers
        # One reference assignment: a run reads it once, so a swap (upgrade) is safe.
        self._run = _session_run(session, providers)

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
        }

    def feeds(self, tensors: list[InputTensor]) -> dict[str, np.ndarray]:
        """Check decoded request tensors against the model's inputs; returns session.run feeds."""
        feeds: dict[str, np.ndarray] = {}
        for tensor in tensors:
            spec = self._inputs_by_name.get(tensor.name)
            if spec is None:
                expected = ", ".join(repr(name) for name in self._inputs_by_name)
                raise InvalidInput(
                    f"model '{self.name}' has no input named '{tensor.name}'; its inputs are {expected}"
                )
            if tensor.name in feeds:
                raise InvalidInput(f"input '{tensor.name}' appears more than once")
            if tensor.datatype != spec.datatype:
                raise InvalidInput(
                    f"input '{tensor.name}' has datatype {tensor.datatype} but model '{self.name}' "
                    f"expects {spec.datatype}"
                )
            if not _shape_matches(tensor.shape, spec.shape):
                raise InvalidInput(
                    f"input '{tensor.name}' has shape {tensor.shape} but model '{self.name}' "
                    f"expects {spec.shape} (-1 means any size)"
                )
            feeds[tensor.name] = tensor.array
        if len(feeds) != len(self._inputs_by_name):  # every name in feeds is an input's
            missing = [name for name in self._inputs_by_name if name not in feeds]
            raise InvalidInput(f"model '{self.name}' needs input(s) {', '.join(map(repr, missing))}")
        return feeds

    def check_outputs(self, names: list[str]) -> None:
        for name in names:
            if name not in self.output_datatypes:
                expected = ", ".join(repr(spec.name) for spec in self.outputs)
                raise InvalidInput(f"model '{self.name}' has no output named '{name}'; its outputs are {expected}")

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None) -> list[np.ndarray]:
        """Blocking inference on every intra-op thread (``timed_run`` without the times)."""
        return self.timed_run(feeds, output_names)[0]

    def timed_run(
        self,
        feeds: dict[str, np.ndarray],
        output_names: list[str] | None,
        *,
        on_loop: bool = False,
        single_thread: bool = False,
    ) -> RunResult:
        """Blocking inference, where the placement policy put it (placement.py), timed once: the outputs, the run's
        start and end (perf_counter) and its CPU time.

        On every intra-op thread, unless ``single_thread`` (beside other runs; needs ``single_thread_ready``).
        Only runs on every thread are recorded in ``stats``: those estimate the next lone request's.

        ``on_loop``: on the event loop's thread, where nothing else runs meanwhile, so the wall time is the CPU
        time; reading the thread's CPU clock (a system call, some microseconds when the machine is busy) would cost
        a short run more than the run itself."""
        run = self._single_thread_run if single_thread else self._run
        assert run is not None, "no single-thread session yet" if single_thread else "load() the model first"
        if on_loop:
            started = time.perf_counter()
            outputs = self._run_on(run, feeds, output_names)
            finished = time.perf_counter()
            cpu = finished - started
        else:
            started, cpu_started = time.perf_counter(), time.thread_time()
            outputs = self._run_on(run, feeds, output_names)
            finished = time.perf_counter()
            cpu = time.thread_time() - cpu_started
        if not single_thread:
            self.stats.record(finished - started, feeds)
        return outputs, started, finished, cpu

    @property
    def cpu_only(self) -> bool:
        """Whether the session runs on the CPU provider alone (no GPU, no engine to build for a new shape)."""
        return self.execution_providers == ["CPUExecutionProvider"]

    @property
    def single_thread_ready(self) -> bool:
        return self._single_thread_session is not None

    def prepare_single_thread_session(self) -> None:
        """Start building the single-thread session in a thread of its own, once, where it can help:
        CPU only, several intra-op threads to free, weights small enough to hold twice."""
        if self._single_thread_started:
            return
        self._single_thread_started = True
        if not self.cpu_only or self.upgrade_pending:
            return
        if self.settings.intra_op_threads == 1:
            return
        name = f"zeroserve-single-thread-{self.name}"
        threading.Thread(target=self._build_single_thread_session, name=name, daemon=True).start()

    def _build_single_thread_session(self) -> None:
        started = time.perf_counter()
        # The model's folder: its .onnx file and any external-data files beside it.
        weight_bytes = sum(entry.stat().st_size for entry in self.path.parent.iterdir() if entry.is_file())
        if weight_bytes > SINGLE_THREAD_SESSION_MAX_BYTES:
            logger.info(
                "model '%s': %d MiB of weights, too large to hold twice; concurrent runs share one session",
                self.name, weight_bytes >> 20,
            )  # fmt: skip
            return
        settings = replace(self.settings, choice="cpu", intra_op_threads=1, inter_op_threads=None)
        try:
            session, _ = create_session(self.path, settings, available=["CPUExecutionProvider"])
            feeds = self._warmup_feeds(self._warmup_shapes)
            for _ in range(2):  # the first run pays ORT's one-time costs, not a request
                session.run(None, feeds)
        except Exception as exc:  # the model keeps serving on its main session
            logger.warning("model '%s': no single-thread session for concurrent runs: %s", self.name, exc)
            return
        self._single_thread_session = session
        self._single_thread_run = _session_run(session, ["CPUExecutionProvider"])
        logger.info(
            "model '%s': concurrent requests now run side by side on one thread each (session built in %.0f ms)",
            self.name, (time.perf_counter() - started) * 1000,
        )  # fmt: skip

    def _run_on(
        self, run: SessionRun, feeds: dict[str, np.ndarray], output_names: list[str] | None
    ) -> list[np.ndarray]:
        try:
            # Named, not None: ORT would build the list of every output's name on each run.
            outputs: list[np.ndarray] = run(output_names or self.output_names, feeds, None)
        except Exception as exc:
            # ORT reports data-dependent failures (an index out of range, a reshape that does not fit)
            # as INVALID_ARGUMENT: those are the caller's to fix.
            if type(exc).__name__ == "InvalidArgument":
                raise InvalidInput(f"model '{self.name}' rejected the input: {exc}") from exc
            raise InferenceError(f"model '{self.name}' failed: {exc}") from exc
        return outputs

    def warmup(self, shapes: Mapping[str, Sequence[int]] | None = None) -> float:
        """Run inference on zeros shaped from the metadata; returns seconds.

        Dynamic dimensions come from ``shapes`` (the warmup profile, e.g. the batch size traffic will use)
        where it names the input, else 1. Twice: the first run pays ONNX Runtime's one-time costs, the
        second gives a fair run time."""
        feeds = self._warmup_feeds(shapes)
        self._warmup_shapes = shapes
        started = time.perf_counter()
        self.run(feeds, None)
        self.stats.restart_average()
        self.run(feeds, None)
        elapsed = time.perf_counter() - started
        if self.session_artifacts is not None:
            # TensorRT builds engines for dynamic shapes on the first run: store them only now.
            self.session_artifacts.publish()
        return elapsed

    def _warmup_feeds(self, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, np.ndarray]:
        import numpy as np

        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.datatype not in dtypes.DATATYPES:
                raise ModelLoadError(f"input '{spec.name}' has datatype {spec.datatype}, which cannot be served")
            shape = [dim if dim >= 0 else 1 for dim in spec.shape]
            if shapes and spec.name in shapes:
                shape = list(shapes[spec.name])
                if not _shape_matches(shape, spec.shape):
                    raise ModelLoadError(
                        f"warmup shape {shape} for input '{spec.name}' does not fit the model's {spec.shape}"
                    )
            if spec.datatype == "BYTES":
                feeds[spec.name] = np.full(shape, "", dtype=object)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=dtypes.to_numpy(spec.datatype))
        return feeds


def _shape_matches(shape: list[int], expected: list[int]) -> bool:
    if len(shape) != len(expected):
        return False
    for got, want in zip(shape, expected):
        if want >= 0 and got != want:
            return False
    return True
