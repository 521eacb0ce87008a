"""Load the configured models into the repository: fetch, discover, create sessions, warm up.

Runs as a background task after the listener is up, so liveness answers while readiness waits (one process;
each worker of ``--workers N`` waits for its models before it accepts connections, see ``app.create_app``).
Blocking steps run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio.to_thread

from zeroserve.runtime import layout, memory, storage
from zeroserve.runtime.coldstart import ColdStart
from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.repository import Entry, ModelRepository, State
from zeroserve.runtime.server_errors import InvalidInput, ServerError
from zeroserve.runtime.telemetry import Telemetry

logger = logging.getLogger("zeroserve.runtime")


async def load_models(config: RuntimeConfig, repository: ModelRepository) -> None:
    """Fill ``repository``; raises the first ServerError after recording it, so callers may exit."""
    started = time.perf_counter()
    coldstart = repository.coldstart
    try:
        phase = coldstart.begin("fetch", **{"url.full": config.model_dir})
        fetched = await anyio.to_thread.run_sync(
            lambda: storage.fetch(config.model_dir, config.cache_dir, progress=coldstart.bytes)
        )
        coldstart.end(phase, **{"zeroserve.fetch.bytes": fetched.bytes_fetched,
                                "zeroserve.fetch.cache_hit": fetched.cache_hit})
        if fetched.path != Path(config.model_dir):  # remote: say what the cache saved
            logger.info(
                "model %s at %s (%s, %d bytes fetched in %.3f s)",
                config.model_dir, fetched.path, "cache hit" if fetched.cache_hit else "downloaded",
                fetched.bytes_fetched, fetched.seconds,
            )
        sources = layout.discover(Path(fetched.path), config.model_name)
    except ServerError as exc:
        repository.discovery_error = exc.message
        repository.discovering = False
        raise
    artifacts = None
    if config.cache_uri:  # imported only when used
        from zeroserve.runtime.artifact_cache import ArtifactStore

        artifacts = ArtifactStore(config.cache_uri, config.cache_dir)
    entries = [
        repository.add(OnnxModel(source.name, source.version, source.path, config.providers, artifacts=artifacts))
        for source in sources
    ]
    repository.discovering = False
    failure: ServerError | None = None
    for entry in entries:
        try:
            await anyio.to_thread.run_sync(_load_one, entry, config, coldstart)
        except ServerError as exc:
            entry.state, entry.error = State.FAILED, exc.message
            logger.error("model '%s' version %s failed to load: %s", entry.model.name, entry.model.version, exc.message)
            failure = failure or exc
    if failure is not None:
        raise failure
    coldstart.ready_ns = time.time_ns()
    logger.info("all models ready in %.3f s (%.3f s after the process started)", time.perf_counter() - started,
                coldstart.init_seconds)


async def load_in_background(
    config: RuntimeConfig,
    repository: ModelRepository,
    on_failure: Callable[[ServerError], None] | None,
    telemetry: Telemetry | None = None,
) -> None:
    """``load_models`` as a background task: a failure is logged and handed to ``on_failure``, never raised.
    The cold start is then recorded in ``telemetry`` (its init spans and metrics), however loading ended."""
    memory.resume_gc()  # the server stack is imported
    failure: ServerError | None = None
    reporter = asyncio.create_task(_report_progress(repository.coldstart, config.progress_interval))
    try:
        await load_models(config, repository)
    except ServerError as exc:
        logger.error("model loading failed: %s", exc.message)
        failure = exc
    except Exception as exc:
        logger.exception("model loading crashed")
        repository.discovering = False
        failure = ServerError(f"model loading crashed: {exc}")
    finally:
        reporter.cancel()
    # Recorded before on_failure, which may stop the server: a failed start is in the trace too.
    if telemetry is not None:
        telemetry.record_init(repository.coldstart, failure.message if failure is not None else None)
    if failure is not None and on_failure is not None:
        on_failure(failure)


async def _report_progress(coldstart: ColdStart, interval: float) -> None:
    """Say how a long start is going, every ``interval`` seconds until it ends: a multi-gigabyte fetch or a
    TensorRT build otherwise passes in silence."""
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        logger.info("still starting: %s", coldstart.progress().describe())


def _load_one(entry: Entry, config: RuntimeConfig, coldstart: ColdStart) -> None:
    model = entry.model
    labels = {"zeroserve.model.name": model.name, "zeroserve.model.version": model.version}
    started = time.perf_counter()
    phase = coldstart.begin("session", **labels)
    model.load()
    coldstart.end(phase, **{"zeroserve.execution_providers": model.execution_providers})
    loaded = time.perf_counter()
    if config.warmup:
        phase = coldstart.begin("warmup", **labels)
        try:
            model.warmup(dict(config.warmup_shapes))
        except InvalidInput as exc:
            # Zeros are not valid input for every model (a shape tensor, an index); serving still works.
            logger.warning("model '%s': warmup on zeros was rejected, serving without it: %s", model.name, exc)
        finally:
            coldstart.end(phase)
    entry.state, entry.since = State.READY, time.monotonic()
    logger.info(
        "model '%s' version %s ready on %s (session %.3f s, warmup %.3f s)",
        model.name, model.version, ",".join(model.execution_providers),
        loaded - started, time.perf_counter() - loaded,
    )
    if model.upgrade_pending:
        name = f"zeroserve-tensorrt-{model.name}"
        threading.Thread(target=_upgrade, args=(model, dict(config.warmup_shapes)), name=name, daemon=True).start()


def _upgrade(model: OnnxModel, shapes: dict[str, tuple[int, ...]]) -> None:
    """Build TensorRT's engines while the model serves on CUDA, then switch (``--trt_build background``)."""
    logger.warning("model '%s' version %s: building TensorRT engines in the background", model.name, model.version)
    try:
        seconds = model.upgrade(shapes)
    except ServerError as exc:
        logger.error("model '%s': TensorRT build failed, staying on %s: %s",
                     model.name, ",".join(model.execution_providers), exc.message)
    except Exception:
        logger.exception("model '%s': TensorRT build crashed, staying on %s",
                         model.name, ",".join(model.execution_providers))
    else:
        logger.warning("model '%s' version %s switched to %s after %.1f s of engine building",
                       model.name, model.version, ",".join(model.execution_providers), seconds)
