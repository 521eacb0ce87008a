"""Load the configured models into the repository: fetch, discover, create sessions, warm up.

Runs as a background task after the listener is up, so liveness answers while readiness waits.
Blocking steps run in worker threads, never on the event loop.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio.to_thread

from zeroserve.runtime import layout, storage
from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.errors import InvalidInput, ServerError
from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.repository import Entry, ModelRepository, State

logger = logging.getLogger("zeroserve.runtime")


async def load_models(config: RuntimeConfig, repository: ModelRepository) -> None:
    """Fill ``repository``; raises the first ServerError after recording it, so callers may exit."""
    started = time.perf_counter()
    try:
        fetched = await anyio.to_thread.run_sync(
            lambda: storage.fetch(config.model_dir, config.cache_dir)
        )
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
    entries = [
        repository.add(OnnxModel(source.name, source.version, source.path, config.providers))
        for source in sources
    ]
    repository.discovering = False
    failure: ServerError | None = None
    for entry in entries:
        try:
            await anyio.to_thread.run_sync(_load_one, entry, config.warmup)
        except ServerError as exc:
            entry.state, entry.error = State.FAILED, exc.message
            logger.error("model '%s' version %s failed to load: %s", entry.model.name, entry.model.version, exc.message)
            failure = failure or exc
    if failure is not None:
        raise failure
    logger.info("all models ready in %.3f s", time.perf_counter() - started)


def _load_one(entry: Entry, warmup: bool) -> None:
    model = entry.model
    started = time.perf_counter()
    model.load()
    loaded = time.perf_counter()
    if warmup:
        try:
            model.warmup()
        except InvalidInput as exc:
            # Zeros are not valid input for every model (a shape tensor, an index); serving still works.
            logger.warning("model '%s': warmup on zeros was rejected, serving without it: %s", model.name, exc)
    entry.state, entry.since = State.READY, time.monotonic()
    logger.info(
        "model '%s' version %s ready on %s (session %.3f s, warmup %.3f s)",
        model.name, model.version, ",".join(model.execution_providers),
        loaded - started, time.perf_counter() - loaded,
    )
