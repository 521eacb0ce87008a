"""zeroserve: serverless ONNX inference.

The root namespace is the light client core; the server lives in ``zeroserve.runtime``
(extra ``runtime``) and never loads from here.
"""

# In the wheel both halves share one folder; in an editable install this lets
# ``zeroserve.runtime`` be found under runtime-image/ as well.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)

from zeroserve.errors import ZeroServeError

__all__ = ["ZeroServeError", "__version__"]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import version

        return version("zeroserve")
    raise AttributeError(f"module 'zeroserve' has no attribute {name!r}")
