"""zeroserve: serverless ONNX inference.

The root namespace is the light client core; the server lives in ``zeroserve.runtime``
(extra ``runtime``) and never loads from here.

    from zeroserve import RemoteModel

    model = RemoteModel("https://mlp.default.example.com", model="mlp")
    outputs = model.infer({"input": [[0.5] * 16]})   # {"output": numpy array}

Framework adapters live in ``zeroserve.starlette`` (Starlette, FastAPI) and ``zeroserve.flask``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing would triple this module's import time


def _extend_path(path: list[str]) -> list[str]:
    """In the wheel both halves share one folder; in an editable install this lets ``zeroserve.runtime``
    be found under runtime-image/ too. (pkgutil.extend_path does the same but costs ~20 ms to import.)"""
    import os
    import sys

    found = list(path)
    for entry in sys.path:
        candidate = os.path.join(entry or ".", "zeroserve")
        if candidate not in found and os.path.isdir(candidate):
            found.append(candidate)
    return found


__path__ = _extend_path(__path__)

from zeroserve.errors import (  # noqa: E402  (after __path__ is set)
    CircuitOpen,
    ColdStartFailed,
    ColdStartTimeout,
    DeadlineExceeded,
    OutcomeUnknown,
    ProtocolError,
    RemoteModelError,
    RequestRejected,
    Unavailable,
    Unreachable,
    ZeroServeError,
)

if TYPE_CHECKING:
    from typing import Any

    from zeroserve.client import AsyncRemoteModel, RemoteModel
    from zeroserve.policy import CircuitPolicy, ColdStartPolicy, RetryPolicy

__all__ = [
    "AsyncRemoteModel",
    "CircuitOpen",
    "CircuitPolicy",
    "ColdStartFailed",
    "ColdStartPolicy",
    "ColdStartTimeout",
    "DeadlineExceeded",
    "OutcomeUnknown",
    "ProtocolError",
    "RemoteModel",
    "RemoteModelError",
    "RequestRejected",
    "RetryPolicy",
    "Unavailable",
    "Unreachable",
    "ZeroServeError",
    "__version__",
]

# The client loads httpx (~200 ms of imports): only when it is first used, not with `import zeroserve`.
_LAZY = {
    "RemoteModel": "zeroserve.client",
    "AsyncRemoteModel": "zeroserve.client",
    "RetryPolicy": "zeroserve.policy",
    "ColdStartPolicy": "zeroserve.policy",
    "CircuitPolicy": "zeroserve.policy",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    if name == "__version__":
        from importlib.metadata import version

        return version("zeroserve")
    raise AttributeError(f"module 'zeroserve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
