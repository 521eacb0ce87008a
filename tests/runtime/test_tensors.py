"""tensors.array_from_raw: a view over the request where the tensor is aligned, one aligned copy where not."""

from __future__ import annotations

import numpy as np
import pytest

from zeroserve.protocol import dtypes
from zeroserve.runtime import tensors

VALUES = np.arange(24, dtype="<f4").reshape(2, 3, 4)


@pytest.mark.parametrize("offset", [0, 4, 16])
def test_an_aligned_tensor_is_a_view_over_the_request(offset: int) -> None:
    body = bytearray(offset) + VALUES.tobytes()
    raw = memoryview(body)[offset:]
    array = tensors.array_from_raw(raw, "FP32", [2, 3, 4], 24, "x")
    np.testing.assert_array_equal(array, VALUES)
    assert np.shares_memory(array, np.frombuffer(body, np.uint8))


@pytest.mark.parametrize(("offset", "datatype"), [(1, "FP32"), (2, "FP32"), (3, "INT64"), (4, "FP64"), (1, "FP16")])
def test_a_misaligned_tensor_is_copied_once_into_aligned_memory(offset: int, datatype: str) -> None:
    # ONNX Runtime would convert it element by element (rest_codec.py says what that costs).
    values = VALUES.astype(dtypes.to_numpy(datatype))
    body = bytes(offset) + values.tobytes()
    array = tensors.array_from_raw(memoryview(body)[offset:], datatype, [2, 3, 4], 24, "x")
    np.testing.assert_array_equal(array, values)
    assert array.flags.aligned
    assert not np.shares_memory(array, np.frombuffer(body, np.uint8))
