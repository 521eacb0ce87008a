"""The model registry: name -> versions -> load state, with the reason when loading failed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from zeroserve.protocol.start import StartState
from zeroserve.runtime.coldstart import ColdStart
from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.server_errors import ModelLoadError, ModelNotFound, ModelNotReady


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(slots=True)
class Entry:
    model: OnnxModel
    state: State = State.LOADING
    error: str | None = None
    since: float = field(default_factory=time.monotonic)


class ModelRepository:
    def __init__(self) -> None:
        self._models: dict[str, dict[str, Entry]] = {}
        # True until the model folder has been fetched and read: names are not known yet,
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

    def add(self, model: OnnxModel) -> Entry:
        entry = Entry(model)
        self._models.setdefault(model.name, {})[model.version] = entry
        return entry

    def names(self) -> list[str]:
        return list(self._models)

    def versions(self, name: str) -> list[str]:
        return list(self._models.get(name, {}))

    def entries(self) -> list[Entry]:
        return [entry for versions in self._models.values() for entry in versions.values()]

    def all_ready(self) -> bool:
        entries = self.entries()
        return not self.discovering and bool(entries) and all(e.state is State.READY for e in entries)

    def start_state(self) -> StartState | None:
        """Why the server is not ready: a model failed to start, or they are still loading; None when ready."""
        if self.discovery_error is not None:
            return StartState("failed", reason=self.discovery_error)
        for entry in self.entries():
            if entry.state is State.FAILED:
                return StartState("failed", reason=f"model '{entry.model.name}': {entry.error}")
        return None if self.all_ready() else self.loading()

    def model_start_state(self, name: str, version: str | None = None) -> StartState | None:
        """Why one model is not ready (failed or loading); None when it is. Raises ModelNotFound."""
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
            known = ", ".join(repr(n) for n in self._models) or "none"
            raise ModelNotFound(f"model '{name}' not found; models served here: {known}")
        if version is None:
            return versions[max(versions, key=_version_key)]
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
        raise ModelLoadError(
            f"model '{name}' failed to load: {entry.error}", StartState("failed", reason=entry.error)
        )


def _version_key(version: str) -> tuple[int, int | str]:
    return (1, int(version)) if version.isdigit() else (0, version)
