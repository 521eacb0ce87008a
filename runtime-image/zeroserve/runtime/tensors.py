"""Tensor checks and conversions shared by the REST and gRPC codecs: one validation path whatever the protocol.

Every size is checked against the request's own claims and the server's limits before numpy allocates
anything: shape x datatype size must equal the bytes sent.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from zeroserve.protocol import binary, dtypes
from zeroserve.runtime.messages import InferResult
from zeroserve.runtime.server_errors import InvalidInput, PayloadTooLarge
from zeroserve.runtime.settings import Limits


def check_datatype(datatype: str, name: str) -> None:
    if datatype not in dtypes.DATATYPES:
        raise InvalidInput(
            f"input '{name}' has unknown datatype {datatype!r}; one of {', '.join(sorted(dtypes.DATATYPES))}"
        )


def check_shape(value: Any, name: str, limits: Limits) -> list[int]:
    """``value`` as a shape: a list of at most ``max_dims`` dimensions, none negative. Whether the tensor is too
    large is asked once its data is known to match the shape (``check_size``): a shape its data contradicts is a
    mistake (400), not a large payload (413). A shape without elements has no data to contradict it, so its
    dimensions are bounded here (numpy cannot even describe some)."""
    if not isinstance(value, list):
        raise InvalidInput(f"input '{name}' needs 'shape' as a list of integers")
    negative = False
    for dim in value:  # one loop, not a generator per check: every input of every request is checked
        if type(dim) is not int:  # a bool is not a dimension
            raise InvalidInput(f"input '{name}' needs 'shape' as a list of integers")
        if dim < 0:
            negative = True
    if len(value) > limits.max_dims:
        raise InvalidInput(f"input '{name}' has {len(value)} dimensions; at most {limits.max_dims} are accepted")
    if negative:
        raise InvalidInput(f"input '{name}' has a negative dimension in shape {value}")
    if 0 in value and any(dim > limits.max_tensor_elements for dim in value):
        raise InvalidInput(
            f"input '{name}' has shape {value}: no elements, and a dimension larger than the largest tensor "
            f"accepted ({limits.max_tensor_elements} elements)"
        )
    return value


def check_size(name: str, datatype: str, shape: list[int], count: int, limits: Limits) -> None:
    """413 for a tensor whose data matches its shape but which is larger than the server accepts. BYTES elements
    have a limit of their own: each costs far more than its bytes (a Python string, and a ``std::string`` in ONNX
    Runtime), so a small body of many short elements can cost gigabytes."""
    if datatype == "BYTES" and count > limits.max_bytes_elements:
        raise PayloadTooLarge(
            f"input '{name}' with shape {shape} has {count} BYTES elements; at most {limits.max_bytes_elements} "
            "are accepted (--max_bytes_elements)"
        )
    if count > limits.max_tensor_elements:
        raise PayloadTooLarge(
            f"input '{name}' with shape {shape} has {count} elements; "
            f"at most {limits.max_tensor_elements} are accepted (--max_tensor_elements)"
        )


def array_from_raw(
    raw: memoryview | bytes, datatype: str, shape: list[int], count: int, name: str, limits: Limits
) -> np.ndarray:
    """A tensor from its raw little-endian bytes (BYTES: length-prefixed elements), which must fill ``raw``."""
    if datatype == "BYTES":
        if 4 * count > len(raw):
            raise InvalidInput(
                f"input '{name}' has {len(raw)} bytes of data, too few for the {count} BYTES elements of shape "
                f"{shape} (each takes a 4-byte length at least)"
            )
        check_size(name, datatype, shape, count, limits)
        try:
            return _bytes_array(memoryview(raw), count).reshape(shape)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError
            raise InvalidInput(f"input '{name}': {exc}") from None
    expected = count * dtypes.ELEMENT_SIZE[datatype]
    if len(raw) != expected:
        raise InvalidInput(
            f"input '{name}' has {len(raw)} bytes of data but shape {shape} of {datatype} needs {expected}"
        )
    check_size(name, datatype, shape, count, limits)
    # A view over the request body: no copy, where the tensor starts at a multiple of its element size.
    array = np.frombuffer(raw, dtype=dtypes.to_numpy(datatype), count=count)
    if not array.flags.aligned:
        # Where it starts depends on what precedes it (a REST JSON header's length, a gRPC message's other fields).
        # ONNX Runtime converts a misaligned array element by element, several times slower than one memcpy
        # (bench/README.md, "Where a request runs").
        array = array.copy()
    return array.reshape(shape)


def _bytes_array(view: memoryview, count: int) -> np.ndarray:
    """BYTES elements as a flat object array of str. Elements of one length (the common case: padded tokens,
    fixed-width codes, empty strings) are checked and decoded by numpy without a Python loop per element; others
    go element by element, which ``max_bytes_elements`` bounds."""
    if count == 0:
        if len(view):
            raise ValueError(f"BYTES data has {len(view)} bytes left over after 0 elements")
        return np.empty(0, dtype=object)
    (first,) = struct.unpack_from("<I", view, 0)
    stride = 4 + first
    if len(view) == count * stride:
        rows = np.frombuffer(view, dtype=np.uint8).reshape(count, stride)
        lengths = np.ascontiguousarray(rows[:, :4]).view("<u4").ravel()
        if (lengths == first).all():
            if first == 0:
                return np.full(count, "", dtype=object)
            payload = rows[:, 4:]
            # numpy's fixed-width bytes drop trailing NUL bytes: elements ending in one take the general path.
            if payload[:, -1].all():
                fixed = np.ascontiguousarray(payload).view(f"S{first}").ravel()
                return np.char.decode(fixed, "utf-8").astype(object)
    elements = binary.decode_bytes_elements(view, count)
    return np.array([element.decode("utf-8") for element in elements], dtype=object)


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


# Encoding this much on the event loop would hold every other connection meanwhile: it runs in a thread.
HEAVY_RAW_BYTES = 1024 * 1024
HEAVY_BYTES_ELEMENTS = 64 * 1024


def encode_is_heavy(result: InferResult) -> bool:
    """Whether encoding ``result`` (REST or gRPC) is worth a thread: many BYTES elements, or large outputs."""
    for output in result.outputs:
        if output.datatype == "BYTES" and output.array.size > HEAVY_BYTES_ELEMENTS:
            return True
        if output.array.nbytes > HEAVY_RAW_BYTES:
            return True
    return False
