"""tensors.array_from_raw: a view over the request where the tensor is aligned, one aligned copy where not; BYTES
elements decoded alike by the vectorized path and the element-by-element one."""

from __future__ import annotations

import numpy as np
import pytest

from zeroserve.protocol import dtypes
from zeroserve.runtime import tensors
from zeroserve.runtime.server_errors import InvalidInput
from zeroserve.runtime.settings import Limits

VALUES = np.arange(24, dtype="<f4").reshape(2, 3, 4)
LIMITS = Limits()


@pytest.mark.parametrize("offset", [0, 4, 16])
def test_an_aligned_tensor_is_a_view_over_the_request(offset: int) -> None:
    body = bytearray(offset) + VALUES.tobytes()
    raw = memoryview(body)[offset:]
    array = tensors.array_from_raw(raw, "FP32", [2, 3, 4], 24, "x", LIMITS)
    np.testing.assert_array_equal(array, VALUES)
    assert np.shares_memory(array, np.frombuffer(body, np.uint8))


@pytest.mark.parametrize(("offset", "datatype"), [(1, "FP32"), (2, "FP32"), (3, "INT64"), (4, "FP64"), (1, "FP16")])
def test_a_misaligned_tensor_is_copied_once_into_aligned_memory(offset: int, datatype: str) -> None:
    # ONNX Runtime would convert it element by element (rest_codec.py says what that costs).
    values = VALUES.astype(dtypes.to_numpy(datatype))
    body = bytes(offset) + values.tobytes()
    array = tensors.array_from_raw(memoryview(body)[offset:], datatype, [2, 3, 4], 24, "x", LIMITS)
    np.testing.assert_array_equal(array, values)
    assert array.flags.aligned
    assert not np.shares_memory(array, np.frombuffer(body, np.uint8))


def encoded(elements: list[bytes]) -> bytes:
    return b"".join(len(element).to_bytes(4, "little") + element for element in elements)


@pytest.mark.parametrize(
    "elements",
    [
        [b""] * 5,  # empty: one shared ""
        [b"abc", b"def", b"ghi", b"xyz"],  # one length: numpy decodes them
        ["né".encode(), "ça".encode()],  # one length in bytes, UTF-8
        [b"ab\0", b"cd\0"],  # one length, ending in NUL: numpy's fixed width would drop it
        [b"a", b"bcd", b"", b"\0x"],  # lengths differ: element by element
    ],
)
def test_bytes_elements_decode_the_same_on_every_path(elements: list[bytes]) -> None:
    array = tensors.array_from_raw(encoded(elements), "BYTES", [len(elements)], len(elements), "x", LIMITS)
    assert array.dtype == object and list(array) == [element.decode() for element in elements]


def test_bytes_elements_that_do_not_fill_their_data_are_refused() -> None:
    with pytest.raises(InvalidInput, match="left over"):
        tensors.array_from_raw(encoded([b"ab", b"cd"]) + b"zz", "BYTES", [2], 2, "x", LIMITS)
    with pytest.raises(InvalidInput, match="utf-8"):
        tensors.array_from_raw(encoded([b"\xff\xfe", b"ok"]), "BYTES", [2], 2, "x", LIMITS)
