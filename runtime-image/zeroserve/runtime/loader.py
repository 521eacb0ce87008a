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
from typing import TYPE_CHECKING

import anyio.to_thread

from zeroserve.runtime import layout, memory, storage
from zeroserve.runtime.coldstart import ColdStart, PhaseLog
from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.repository import Entry, ModelRepository, State
from zeroserve.runtime.server_errors import InvalidInput, ServerError
from zeroserve.runtime.telemetry import Telemetry

if TYPE_CHECKING:
    from zeroserve.runtime.artifact_cache import ArtifactStore

logger = logging.getLogger("zeroserve.runtime")


async def index_models(config: RuntimeConfig, repository: ModelRepository) -> None:
    """On demand: find every model of the repository at ``--model_dir`` and add it unloaded; nothing is fetched
    but the listing of a remote repository. Raises the ServerError after recording it, so callers may exit."""
    started = time.perf_counter()
    coldstart = repository.coldstart
    artifacts = _artifact_store(config)
    try:
        phase = coldstart.begin("index", **{"url.full": config.model_dir})
        if storage.is_remote(config.model_dir):
            listing = await anyio.to_thread.run_sync(lambda: storage.list_files(config.model_dir))
            base = config.model_dir.rstrip("/")
            for found in layout.discover_listing(listing):
                # Where the fetched folder will be, until it is: the file's name in it is all that matters.
                placeholder = config.cache_dir / "on-demand" / found.folder / found.file
                model = OnnxModel(found.name, found.version, placeholder, config.providers, artifacts=artifacts)
                repository.add(model, State.UNLOADED, remote=f"{base}/{found.folder}/", size_bytes=found.size_bytes)
        else:
            local = await anyio.to_thread.run_sync(lambda: storage.fetch(config.model_dir, config.cache_dir))
            for source in layout.discover(Path(local.path), config.model_name):
                size = sum(f.stat().st_size for f in source.path.parent.iterdir() if f.is_file())
                model = OnnxModel(source.name, source.version, source.path, config.providers, artifacts=artifacts)
                repository.add(model, State.UNLOADED, size_bytes=size)
        coldstart.end(phase, **{"zeroserve.index.models": len(repository.entries())})
    except ServerError as exc:
        repository.discovery_error = exc.message
        raise
    finally:
        repository.discovering = False
    coldstart.ready_ns = time.time_ns()
    logger.info("%d model(s) indexed in %.3f s, loaded on demand (%.3f s after the process started)",
                len(repository.entries()), time.perf_counter() - started, coldstart.init_seconds)


def _artifact_store(config: RuntimeConfig) -> ArtifactStore | None:
    if not config.cache_uri:
        return None
    from zeroserve.runtime.artifact_cache import ArtifactStore  # imported only when used

    return ArtifactStore(config.cache_uri, config.cache_dir)


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
    artifacts = _artifact_store(config)
    entries = [
        repository.add(OnnxModel(source.name, source.version, source.path, config.providers, artifacts=artifacts))
        for source in sources
    ]
    repository.discovering = False
    failure: ServerError | None = None
    for entry in entries:
        try:
            await anyio.to_thread.run_sync(load_entry, entry, config, coldstart)
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
    """``load_models`` (or, on demand, ``index_models``) as a background task: a failure is logged and handed
    to ``on_failure``, never raised. The cold start is then recorded in ``telemetry`` (its init spans and
    metrics), however it ended."""
    on_demand = config.loading.on_demand
    if not on_demand:
        memory.resume_gc()  # the server stack is imported; sessions are built next
    failure: ServerError | None = None
    reporter = asyncio.create_task(_report_progress(repository.coldstart, config.progress_interval))
    try:
        await (index_models(config, repository) if on_demand else load_models(config, repository))
    except ServerError as exc:
        logger.error("model loading failed: %s", exc.message)
        failure = exc
    except Exception as exc:
        logger.exception("model loading crashed")
        repository.discovering = False
        failure = ServerError(f"model loading crashed: {exc}")
    finally:
        reporter.cancel()
        # An index is thousands of small objects that live as long as the server, with no cycles to collect:
        # collecting while it is built only delays readiness. They are frozen with the rest of start-up.
        memory.resume_gc()
    # Recorded before on_failure, which may stop the server: a failed start is in the trace too.
    if telemetry is not None:
        telemetry.record_init(repository.coldstart, failure.message if failure is not None else None)
    repository.coldstart.recorded = True  # readiness turns true only now: see ColdStart
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


def load_entry(entry: Entry, config: RuntimeConfig, log: PhaseLog) -> None:
    """Build one model's session and warm it up, the phases recorded in ``log``; blocking (run it in a thread).
    A model indexed from a remote repository is fetched first. Raises ServerError; the caller sets the state."""
    model = entry.model
    labels = {"zeroserve.model.name": model.name, "zeroserve.model.version": model.version}
    if entry.remote is not None:
        phase = log.begin("fetch", **{"url.full": entry.remote, **labels})
        fetched = storage.fetch(entry.remote, config.cache_dir, progress=log.bytes)
        log.end(phase, **{
            "zeroserve.fetch.bytes": fetched.bytes_fetched, "zeroserve.fetch.cache_hit": fetched.cache_hit,
        })
        model.path = Path(fetched.path) / model.path.name
    started = time.perf_counter()
    phase = log.begin("session", **labels)
    model.load()
    log.end(phase, **{"zeroserve.execution_providers": model.execution_providers})
    loaded = time.perf_counter()
    if config.warmup:
        phase = log.begin("warmup", **labels)
        try:
            model.warmup(dict(config.warmup_shapes))
        except InvalidInput as exc:
            # Zeros are not valid input for every model (a shape tensor, an index); serving still works.
            logger.warning("model '%s': warmup on zeros was rejected, serving without it: %s", model.name, exc)
        finally:
            log.end(phase)
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
