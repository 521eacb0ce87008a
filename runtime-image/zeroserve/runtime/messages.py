"""Transport-neutral inference messages: what the REST and gRPC codecs decode into and encode from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from zeroserve.runtime.coldstart import PhaseLog


@dataclass(slots=True)
class TensorSpec:
    """A model input or output as the V2 metadata describes it (-1 for a dynamic dimension)."""

    name: str
    datatype: str
    shape: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


@dataclass(slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: follow the request-wide default


@dataclass(slots=True)
class InferRequest:
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None  # None: every output of the model
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray


@dataclass(slots=True)
class InferResult:
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | None = None
    queue_seconds: float = 0.0  # waiting for an inference thread
    compute_seconds: float = 0.0  # session.run
    cpu_seconds: float = 0.0  # the CPU time of the thread that ran it (its share of a batch's)
    load: PhaseLog | None = None  # the load of its model it waited for (model_manager.py), if any
    load_span: Any = None  # that load's span (an OpenTelemetry SpanContext)

    def server_timing(self) -> str:
        """The Server-Timing entries for this inference (milliseconds)."""
        return f"queue;dur={self.queue_seconds * 1000:.3f}, infer;dur={self.compute_seconds * 1000:.3f}"
