"""The tensor bytes of ``ModelInfer`` messages, read and written in protobuf's wire format without copies.

A parsed protobuf message owns copies of its ``bytes`` fields: reading ``raw_input_contents`` copies each
tensor out of the received message, and building a response copies each output into the message and once
more when it is serialized. For a 600 KB image that is a few hundred microseconds of memory traffic per call.
Here the request's ``raw_input_contents`` (field 7) become views over the received bytes, and only the rest of
the message (names, shapes, parameters: a few hundred bytes) goes through protobuf; a response is serialized
without its ``raw_output_contents`` (field 6), which are then written after it straight from the output arrays.
Both are valid encodings of the same message: protobuf allows a message's fields in any order, and a
repeated field's elements keep theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

# A field's key is (field number << 3) | wire type; wire type 2 is "length-delimited" (bytes, messages).
_LENGTH_DELIMITED: Final = 2
RAW_INPUT_CONTENTS_KEY: Final = (7 << 3) | _LENGTH_DELIMITED  # ModelInferRequest.raw_input_contents
RAW_OUTPUT_CONTENTS_KEY: Final = (6 << 3) | _LENGTH_DELIMITED  # ModelInferResponse.raw_output_contents
_MAX_VARINT_BYTES: Final = 10
# Top-level fields walked at most: a request has a few plus one per input, output and parameter. The walk is
# Python, on the event loop (~2.4 us a field), so a message of millions of empty fields must not hold it.
MAX_TOP_LEVEL_FIELDS: Final = 16_384


class WireError(ValueError):
    """The bytes are not a protobuf message (a field runs past the end, or a varint never ends)."""


def _varint(data: bytes, position: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it."""
    value = shift = 0
    end = min(len(data), position + _MAX_VARINT_BYTES)
    while position < end:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise WireError("a varint is truncated or longer than 10 bytes")


def split_raw_input_contents(data: bytes) -> tuple[bytes, list[memoryview]]:
    """A serialized ModelInferRequest without its ``raw_input_contents``, and those contents in order as
    views over ``data``. Only the top level is walked; the kept bytes still go through protobuf's parser,
    which checks them as it would the whole message. Wire types 3 and 4 (groups, which the message never
    has) raise ``WireError`` like any other malformed encoding, and so do more than ``MAX_TOP_LEVEL_FIELDS``
    fields."""
    view = memoryview(data)
    kept: list[memoryview] = []
    contents: list[memoryview] = []
    kept_from = position = 0
    end = len(data)
    fields = 0
    while position < end:
        fields += 1
        if fields > MAX_TOP_LEVEL_FIELDS:
            raise WireError(f"more than {MAX_TOP_LEVEL_FIELDS} top-level fields; no inference request has that many")
        field_start = position
        key, position = _varint(data, position)
        wire_type = key & 7
        if wire_type == _LENGTH_DELIMITED:
            length, position = _varint(data, position)
            value_end = position + length
            if value_end > end:
                raise WireError(f"a field of {length} bytes runs past the end of the {end}-byte message")
            if key == RAW_INPUT_CONTENTS_KEY:
                kept.append(view[kept_from:field_start])
                contents.append(view[position:value_end])
                kept_from = value_end
            position = value_end
        elif wire_type == 0:  # varint
            _, position = _varint(data, position)
        elif wire_type == 1:  # 64-bit
            position += 8
        elif wire_type == 5:  # 32-bit
            position += 4
        else:
            raise WireError(f"wire type {wire_type} at byte {field_start} is not used by ModelInferRequest")
    if position != end:
        raise WireError("the last field runs past the end of the message")
    if not contents:
        return data, contents
    kept.append(view[kept_from:end])
    return b"".join(kept), contents


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def append_raw_output_contents(message: bytes, contents: Sequence[bytes | memoryview]) -> bytes:
    """A serialized ModelInferResponse (without raw outputs) followed by ``contents`` as its
    ``raw_output_contents``: one copy of each output, into the answer's bytes."""
    if not contents:
        return message
    parts: list[bytes | memoryview] = [message]
    key = _encode_varint(RAW_OUTPUT_CONTENTS_KEY)
    for content in contents:
        parts += (key, _encode_varint(memoryview(content).nbytes), content)
    return b"".join(parts)
