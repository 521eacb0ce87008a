"""V2 datatype names, their numpy dtypes and element sizes."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import numpy as np

# Fixed-size datatypes -> bytes per element. BYTES is variable-length (4-byte length prefix per element).
ELEMENT_SIZE: Final[dict[str, int]] = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
}

# numpy's dtype names, little-endian as the binary extension requires.
_NUMPY_NAME: Final[dict[str, str]] = {
    "BOOL": "bool",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
    "BYTES": "object",
}

_FROM_NUMPY_KIND: Final[dict[tuple[str, int], str]] = {
    ("b", 1): "BOOL",
    ("u", 1): "UINT8",
    ("u", 2): "UINT16",
    ("u", 4): "UINT32",
    ("u", 8): "UINT64",
    ("i", 1): "INT8",
    ("i", 2): "INT16",
    ("i", 4): "INT32",
    ("i", 8): "INT64",
    ("f", 2): "FP16",
    ("f", 4): "FP32",
    ("f", 8): "FP64",
}

DATATYPES: Final[frozenset[str]] = frozenset(_NUMPY_NAME)


@functools.cache  # on every tensor of every request: a dict lookup, not a dtype parse
def to_numpy(datatype: str) -> np.dtype:
    """The numpy dtype for a V2 datatype name; KeyError for names the protocol does not define here."""
    import numpy as np

    return np.dtype(_NUMPY_NAME[datatype])


def from_numpy(dtype: np.dtype) -> str:
    """The V2 datatype name for a numpy dtype (object, str and bytes arrays map to BYTES)."""
    if dtype.kind in ("O", "U", "S"):
        return "BYTES"
    try:
        return _FROM_NUMPY_KIND[(dtype.kind, dtype.itemsize)]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no V2 datatype") from None
