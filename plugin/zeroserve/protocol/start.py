"""How an answer says that a model service is still starting, or failed to start.

A scale-to-zero service answers 503 both while its model loads and when it can never load; a caller must be
able to tell the two apart without reading prose. Every such 503 from zeroserve (the model server while it
loads, or after a model failed to load under ``--no-exit_on_error``; ``zeroserve dev`` while a server process
starts, or after one failed to start) carries:

- the header ``Zeroserve-Start: loading`` or ``Zeroserve-Start: failed`` (gRPC: trailing metadata
  ``zeroserve-start``), the marker;
- the V2 error body with one more key, ``start``, the details:

  ``{"error": "model 'mlp' is still loading", "start": {"state": "loading", "phase": "fetch",
  "elapsed_s": 4.2, "done_bytes": 52428800, "total_bytes": 209715200, "bytes_per_s": 12500000.0,
  "eta_s": 12.6}}``

  ``{"error": "model 'mlp' failed to start: ...", "start": {"state": "failed", "reason": "[ONNXRuntimeError]
  : 7 : INVALID_PROTOBUF ...", "exit_status": 1, "starts": 3, "retry_after_s": 20.0}}``

  and a ``Retry-After`` header: when trying again makes sense (the next start, after a failure).

A server that loads its models on demand answers a readiness probe for a model it has not loaded with
``Zeroserve-Start: unloaded`` (``{"ready": false, "start": {"state": "unloaded"}}``): the model is not ready, and
the request that needs it will load it, so there is nothing to wait for.

Every key of ``start`` but ``state`` may be absent. V2 clients that read only ``error`` are unaffected.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

START_HEADER: Final = "zeroserve-start"
# On the answers a server process gives while its cold start is news (the first ones), when it traces: the
# W3C traceparent of its ``zeroserve.init`` span, so a caller in another trace can link its span to it.
INIT_SPAN_HEADER: Final = "zeroserve-init-traceparent"
# A Server-Timing metric an activator adds to an answer it held while a process started (``zeroserve dev``): the
# request met a cold start, however quick. Its ``dur`` is the wait, in milliseconds.
ACTIVATOR_START_TIMING: Final = "activator.start"
LOADING: Final = "loading"
FAILED: Final = "failed"
# A server that loads its models on demand (--model_loading on_demand) answers a readiness probe for a model it
# has not loaded with this: not ready, and a request for it will load it. Waiting for readiness would wait forever.
UNLOADED: Final = "unloaded"

StartStateName = Literal["loading", "failed", "unloaded"]


@dataclass(frozen=True, slots=True)
class StartState:
    """The ``start`` object of a 503 answer.

    Args:
        state: ``loading`` (wait and ask again), ``failed`` (the start failed; waiting will not help until the
            service is fixed or its next start succeeds) or ``unloaded`` (not loaded; a request loads it).
        phase: loading: what the start is doing now (``process``, ``fetch``, ``session``, ``warmup``,
            ``tensorrt``).
        elapsed_s: loading: seconds since the start began.
        done_bytes, total_bytes, bytes_per_s, eta_s: loading, while fetching: bytes fetched so far and in all,
            the throughput, and the seconds left at that throughput.
        reason: failed: the server's own error message.
        exit_status: failed: the exit status of the server process, when it exited.
        starts: failed: how many starts were tried.
        retry_after_s: failed: seconds until the next start may be tried.
    """

    state: StartStateName
    phase: str | None = None
    elapsed_s: float | None = None
    done_bytes: int | None = None
    total_bytes: int | None = None
    bytes_per_s: float | None = None
    eta_s: float | None = None
    reason: str | None = None
    exit_status: int | None = None
    starts: int | None = None
    retry_after_s: float | None = None

    @property
    def failed(self) -> bool:
        return self.state == FAILED

    def to_json(self) -> dict[str, Any]:
        """The ``start`` object, without the keys that are not known."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, value: Any) -> StartState | None:
        """Read a ``start`` object; None when it is not one (keys of the wrong type are dropped)."""
        if not isinstance(value, dict) or value.get("state") not in (LOADING, FAILED, UNLOADED):
            return None
        fields: dict[str, Any] = {"state": value["state"]}
        for key, kind in _TYPES.items():
            item = value.get(key)
            if isinstance(item, bool):
                continue
            if kind is float and isinstance(item, (int, float)) and math.isfinite(item):
                fields[key] = float(item)
            elif kind is int and isinstance(item, int):
                fields[key] = item
            elif kind is str and isinstance(item, str):
                fields[key] = item
        return cls(**fields)

    def describe(self) -> str:
        """One line for people: the phase and its progress, or the failure's reason."""
        if self.state == UNLOADED:
            return "not loaded; a request for it loads it"
        if self.failed:
            parts = [self.reason or "the start failed"]
            if self.exit_status is not None:
                parts.append(f"exit status {self.exit_status}")
            if self.starts is not None:
                parts.append(f"{self.starts} start{'' if self.starts == 1 else 's'}")
            return "; ".join(parts)
        parts = [self.phase or "starting"]
        if self.done_bytes is not None:
            total = f" of {_mib(self.total_bytes)}" if self.total_bytes else ""
            parts.append(f"{_mib(self.done_bytes)}{total}")
        if self.bytes_per_s:
            parts.append(f"{self.bytes_per_s / 2**20:.1f} MiB/s")
        if self.eta_s is not None:
            parts.append(f"about {self.eta_s:.0f} s left")
        if self.elapsed_s is not None:
            parts.append(f"{self.elapsed_s:.1f} s so far")
        return ", ".join(parts)


_TYPES: Final[dict[str, type]] = {
    "phase": str, "elapsed_s": float, "done_bytes": int, "total_bytes": int, "bytes_per_s": float,
    "eta_s": float, "reason": str, "exit_status": int, "starts": int, "retry_after_s": float,
}


def _mib(count: int | None) -> str:
    return f"{(count or 0) / 2**20:.1f} MiB"


def retry_after_value(seconds: float) -> str:
    """A ``Retry-After`` header value: whole seconds, at least 1 (0 would invite an immediate retry)."""
    if not math.isfinite(seconds):
        return "1"
    return str(max(1, math.ceil(seconds)))
