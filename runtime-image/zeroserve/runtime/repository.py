"""The model registry: name -> versions -> state, with the reason when a model is not ready.

Every model the repository holds has an entry from the moment it is known: loaded at start (``eager``), or only
indexed and loaded later (``on_demand``, ``explicit``: model_manager.py). The states are Triton's, as the
repository extension's index reports them: READY, LOADING, UNLOADING, and UNAVAILABLE for a model not loaded
(``UNLOADED``) or whose load failed (``FAILED``, with the reason).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zeroserve.protocol.start import StartState
from zeroserve.runtime.coldstart import ColdStart, Phase
from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.server_errors import ModelLoadError, ModelNotFound, ModelNotReady


class State(enum.Enum):
    UNLOADED = "unloaded"  # indexed (or unloaded), not loaded
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"

    @property
    def index_state(self) -> str:
        """The state's name in the repository extension's index."""
        return {State.READY: "READY", State.LOADING: "LOADING", State.UNLOADING: "UNLOADING"}.get(self, "UNAVAILABLE")


@dataclass(slots=True)
class Entry:
    model: OnnxModel
    state: State = State.LOADING
    error: str | None = None
    since: float = field(default_factory=time.monotonic)
    # Where a model indexed from a remote repository is fetched from when it loads; None: ``model.path`` is local.
    remote: str | None = None
    size_bytes: int = 0  # the model's files
    cost_bytes: int = 0  # its memory when loaded, measured at its first load (model_manager.py); kept across unloads
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0  # requests using it now: it is never unloaded under them
    failures: int = 0  # loads failed in a row
    retry_at: float = 0.0  # after a failed load, when a request may try again
    phases: list[Phase] = field(default_factory=list)  # the last load's fetch, session and warmup
    load_span: Any = None  # the last load's span (an OpenTelemetry SpanContext), for the requests that waited

    @property
    def folder(self) -> Path:
        return self.model.path.parent


class ModelRepository:
    def __init__(self, *, on_demand: bool = False) -> None:
        self._models: dict[str, dict[str, Entry]] = {}
        self._newest: dict[str, Entry] = {}  # by name: the entry a request that names no version gets
        # Models indexed, loaded later: the server is ready once the index is built, not once models are loaded.
        self.on_demand = on_demand
        # True until the model folder has been fetched (or indexed) and read: names are not known yet,
        # so a request for any model is "not ready" rather than "not found".
        self.discovering = True
        self.discovery_error: str | None = None
        self.coldstart = ColdStart()

    def retry_after(self) -> float:
        """Seconds a client should wait before asking again while models load: half the time spent so far
        (a start that has taken long is likely to take a while more), between 1 and 30."""
        return min(30.0, max(1.0, self.coldstart.elapsed_seconds() / 2))

    def loading(self) -> StartState:
        """What a request for a model still loading is told: the phase the start is in and its time so far."""
        return self.coldstart.progress()

    def add(
        self, model: OnnxModel, state: State = State.LOADING, remote: str | None = None, size_bytes: int = 0
    ) -> Entry:
        entry = Entry(model, state, remote=remote, size_bytes=size_bytes)
        versions = self._models.setdefault(model.name, {})
        versions[model.version] = entry
        self._newest[model.name] = versions[max(versions, key=_version_key)]
        return entry

    def names(self) -> list[str]:
        return list(self._models)

    def versions(self, name: str) -> list[str]:
        return list(self._models.get(name, {}))

    def versions_of(self, name: str) -> list[Entry]:
        """Every version's entry of ``name``; ModelNotFound when the repository does not hold it."""
        self.find(name)
        return list(self._models[name].values())

    def entries(self) -> list[Entry]:
        return [entry for versions in self._models.values() for entry in versions.values()]

    def all_ready(self) -> bool:
        """Ready to serve: every model loaded and warmed up, or (on demand) the repository indexed, and the start
        recorded."""
        if self.discovering or self.discovery_error is not None or not self.coldstart.recorded:
            return False
        entries = self.entries()
        if self.on_demand:
            return bool(entries)
        return bool(entries) and all(e.state is State.READY for e in entries)

    def start_state(self) -> StartState | None:
        """Why the server is not ready: a model failed to start, or they are still loading; None when ready."""
        if self.discovery_error is not None:
            return StartState("failed", reason=self.discovery_error)
        if self.on_demand:
            return None if self.all_ready() else self.loading()
        for entry in self.entries():
            if entry.state is State.FAILED:
                return StartState("failed", reason=f"model '{entry.model.name}': {entry.error}")
        return None if self.all_ready() else self.loading()

    def model_start_state(self, name: str, version: str | None = None) -> StartState | None:
        """Why one model is not ready (failed, loading, or not loaded); None when it is. Raises ModelNotFound."""
        entry = self.find(name, version)
        if entry.state is State.UNLOADED:
            return StartState("unloaded")
        try:
            self.ready_model(name, version)
        except (ModelNotReady, ModelLoadError) as exc:
            return exc.start
        return None

    def find(self, name: str, version: str | None = None) -> Entry:
        """The entry for a model (its newest version when none is given), in whatever state."""
        versions = self._models.get(name)
        if versions is None:
            if self.discovering:
                raise ModelNotReady(
                    f"model '{name}' is not ready: the server is still loading its models",
                    self.retry_after(),
                    self.loading(),
                )
            if self.discovery_error is not None:
                raise ModelLoadError(
                    f"model '{name}' is not available: {self.discovery_error}",
                    StartState("failed", reason=self.discovery_error),
                )
            raise ModelNotFound(f"model '{name}' not found; models served here: {self._known()}")
        if version is None:
            return self._newest[name]
        entry = versions.get(version)
        if entry is None:
            raise ModelNotFound(
                f"model '{name}' has no version '{version}'; versions: {', '.join(versions)}"
            )
        return entry

    def ready_model(self, name: str, version: str | None = None) -> OnnxModel:
        """The loaded model, or the error that explains why it cannot serve."""
        entry = self.find(name, version)
        if entry.state is State.READY:
            return entry.model
        if entry.state is State.LOADING:
            raise ModelNotReady(f"model '{name}' is still loading", self.retry_after(), self.loading())
        if entry.state is State.FAILED:
            raise ModelLoadError(
                f"model '{name}' failed to load: {entry.error}", StartState("failed", reason=entry.error)
            )
        raise ModelNotReady(f"model '{name}' is not loaded", 1.0, StartState("unloaded"))

    def _known(self) -> str:
        names = list(self._models)
        if len(names) > 20:  # a large repository: name a few, and the index for the rest
            return ", ".join(repr(n) for n in names[:20]) + f" and {len(names) - 20} more (POST /v2/repository/index)"
        return ", ".join(repr(n) for n in names) or "none"


def _version_key(version: str) -> tuple[int, int | str]:
    return (1, int(version)) if version.isdigit() else (0, version)
