"""The binary tensor data extension of the V2 REST protocol.

A request or response body is a JSON header followed by raw tensor bytes. The header's length is
sent in ``Inference-Header-Content-Length``; each tensor whose bytes follow the header says how many
in its ``parameters.binary_data_size``, in the order the tensors appear in the header. BYTES
tensors are serialized element by element: a 4-byte little-endian length, then the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

HEADER_LENGTH: Final = "inference-header-content-length"

_LENGTH = struct.Struct("<I")


def split_body(body: bytes, header_length_text: str) -> tuple[bytes, memoryview]:
    """Split a binary-extension body into its JSON header and the raw bytes after it."""
    try:
        header_length = int(header_length_text)
    except ValueError:
        raise ValueError(
            f"Inference-Header-Content-Length must be an integer, got {header_length_text!r}"
        ) from None
    if not 0 < header_length <= len(body):
        raise ValueError(
            f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes"
        )
    view = memoryview(body)
    return bytes(view[:header_length]), view[header_length:]


def encode_bytes_elements(elements: Iterable[bytes]) -> bytes:
    """Serialize BYTES elements: each one length-prefixed (uint32, little-endian)."""
    parts: list[bytes] = []
    for element in elements:
        parts.append(_LENGTH.pack(len(element)))
        parts.append(element)
    return b"".join(parts)


def decode_bytes_elements(buffer: memoryview | bytes, count: int) -> list[bytes]:
    """Parse exactly ``count`` length-prefixed elements filling ``buffer`` exactly."""
    view = memoryview(buffer)
    elements: list[bytes] = []
    offset = 0
    for index in range(count):
        if offset + 4 > len(view):
            raise ValueError(f"BYTES data ends before element {index} of {count}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise ValueError(
                f"BYTES element {index} claims {length} bytes but only {len(view) - offset} remain"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise ValueError(f"BYTES data has {len(view) - offset} bytes left over after {count} elements")
    return elements
