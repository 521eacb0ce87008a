"""The zeroserve model server: ONNX models over the Open Inference Protocol (KServe V2).

``python -m zeroserve.runtime --model_name NAME --model_dir URI`` runs it. Importing this package is
cheap: the web stack, numpy and ONNX Runtime load with ``create_app``/``serve``, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zeroserve.runtime.app import create_app
    from zeroserve.runtime.config import RuntimeConfig
    from zeroserve.runtime.serve import serve

__all__ = ["RuntimeConfig", "create_app", "serve", "version"]

_LAZY = {
    "create_app": "zeroserve.runtime.app",
    "RuntimeConfig": "zeroserve.runtime.config",
    "serve": "zeroserve.runtime.serve",
}


def version() -> str:
    """The installed package's version (``zeroserve._version``, the leaf every module uses)."""
    from zeroserve._version import version as package_version

    return package_version()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zeroserve.runtime' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
