"""zeroserve: serverless ONNX inference.

The root namespace is the light client core; the server lives in ``zeroserve.runtime``
(extra ``runtime``) and never loads from here.
"""



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

from zeroserve.errors import ZeroServeError  # noqa: E402  (after __path__ is set)

__all__ = ["ZeroServeError", "__version__"]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import version

        return version("zeroserve")
    raise AttributeError(f"module 'zeroserve' has no attribute {name!r}")
