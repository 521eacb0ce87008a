"""Tensor checks and conversions shared by the REST and gRPC codecs: one validation path whatever the protocol.

Every size is checked against the request's own claims and the server's limits before numpy allocates
anything: shape x datatype size must equal the bytes sent.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from zeroserve.protocol import binary, dtypes
from zeroserve.runtime.server_errors import InvalidInput, PayloadTooLarge
from zeroserve.runtime.settings import Limits


def check_datatype(datatype: str, name: str) -> None:
    if datatype not in dtypes.DATATYPES:
        raise InvalidInput(
            f"input '{name}' has unknown datatype {datatype!r}; one of {', '.join(sorted(dtypes.DATATYPES))}"
        )


def check_shape(value: Any, name: str, limits: Limits) -> list[int]:
    """``value`` as a shape within the limits, checked before anything is allocated for it."""
    if not isinstance(value, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) for dim in value
    ):
        raise InvalidInput(f"input '{name}' needs 'shape' as a list of integers")
    if len(value) > limits.max_dims:
        raise InvalidInput(f"input '{name}' has {len(value)} dimensions; at most {limits.max_dims} are accepted")
    if any(dim < 0 for dim in value):
        raise InvalidInput(f"input '{name}' has a negative dimension in shape {value}")
    count = math.prod(value)
    if count > limits.max_tensor_elements:
        raise PayloadTooLarge(
            f"input '{name}' with shape {value} has {count} elements; "
            f"at most {limits.max_tensor_elements} are accepted"
        )
    return value


def array_from_raw(raw: memoryview | bytes, datatype: str, shape: list[int], count: int, name: str) -> np.ndarray:
    """A tensor from its raw little-endian bytes (BYTES: length-prefixed elements), which must fill ``raw``."""
    if datatype == "BYTES":
        try:
            elements = binary.decode_bytes_elements(raw, count)
            text = [element.decode("utf-8") for element in elements]
        except ValueError as exc:  # UnicodeDecodeError is a ValueError
            raise InvalidInput(f"input '{name}': {exc}") from None
        return np.array(text, dtype=object).reshape(shape)
    expected = count * dtypes.ELEMENT_SIZE[datatype]
    if len(raw) != expected:
        raise InvalidInput(
            f"input '{name}' has {len(raw)} bytes of data but shape {shape} of {datatype} needs {expected}"
        )
    # A view over the request body: no copy, where the tensor starts at a multiple of its element size.
    array = np.frombuffer(raw, dtype=dtypes.to_numpy(datatype), count=count)
    if not array.flags.aligned:
        # Where it starts depends on what precedes it (a REST JSON header's length, a gRPC message's other fields).
        # ONNX Runtime converts a misaligned array element by element: 210 µs for 600 KB of FP32, against 30 µs
        # for this one memcpy and 50 µs for the whole run of a model that reads it once.
        array = array.copy()
    return array.reshape(shape)


def count_error(name: str, got: int, shape: list[int], count: int) -> InvalidInput:
    return InvalidInput(f"input '{name}' has {got} data elements but shape {shape} needs {count}")


def raw_from_array(array: np.ndarray, datatype: str) -> bytes | memoryview:
    """A tensor's raw little-endian bytes (BYTES: each element length-prefixed): a byte view over the array
    itself when it already is contiguous data of that type, so the answer's one copy is the final join."""
    if datatype == "BYTES":
        return binary.encode_bytes_elements(as_bytes(element) for element in array.reshape(-1))
    target = dtypes.to_numpy(datatype)
    if array.dtype == target and array.flags.c_contiguous:
        return memoryview(array.reshape(-1)).cast("B")  # type: ignore[arg-type]
    return np.ascontiguousarray(array, dtype=target).tobytes()


def as_bytes(element: Any) -> bytes:
    return element if isinstance(element, bytes) else str(element).encode("utf-8")
