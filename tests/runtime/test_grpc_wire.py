"""grpc_wire against protobuf's own parser and serializer: what it splits out and writes must be exactly what
protobuf reads, for messages protobuf wrote and for legal encodings protobuf would not write itself."""

from __future__ import annotations

import numpy as np
import pytest

from zeroserve.runtime import grpc_wire
from zeroserve.runtime._proto import open_inference_grpc_pb2 as pb


def request_with(raw: list[bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", model_version="2", id="request-7")
    request.parameters["binary_data_output"].bool_param = True
    for index in range(len(raw)):
        request.inputs.add(name=f"in{index}", datatype="UINT8", shape=[len(raw[index])])
    request.outputs.add(name="out")
    request.raw_input_contents.extend(raw)
    return request


@pytest.mark.parametrize("raw", [[], [b""], [b"\x01" * 3, b"", bytes(range(256)) * 700], [b"x" * 200_000]])
def test_split_gives_protobufs_own_reading(raw: list[bytes]) -> None:
    request = request_with(raw)
    data = request.SerializeToString()
    rest, contents = grpc_wire.split_raw_input_contents(data)
    assert [bytes(view) for view in contents] == raw
    without = pb.ModelInferRequest.FromString(rest)
    request.ClearField("raw_input_contents")
    assert without == request


def test_contents_are_views_over_the_received_bytes() -> None:
    data = request_with([b"\x00" * 1024]).SerializeToString()
    _, [view] = grpc_wire.split_raw_input_contents(data)
    assert view.obj is data  # no copy: numpy's frombuffer over it reads the message itself


def test_fields_in_any_order_and_a_long_key() -> None:
    """Raw tensors first, then the rest; one tensor's key as a two-byte varint (0xba 0x00 = 0x3a): both legal."""
    head = pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(name="a")])
    data = b"\x3a\x02hi" + head.SerializeToString() + b"\xba\x00\x03abc"
    rest, contents = grpc_wire.split_raw_input_contents(data)
    assert [bytes(view) for view in contents] == [b"hi", b"abc"]
    assert pb.ModelInferRequest.FromString(rest) == head
    assert list(pb.ModelInferRequest.FromString(data).raw_input_contents) == [b"hi", b"abc"]


def test_fixed_width_and_unknown_fields_are_kept_for_protobuf() -> None:
    unknown = b"\x79" + b"\x00" * 8 + b"\x7d" + b"\x00" * 4 + b"\x78\x96\x01"  # fields 15: 64-bit, 32-bit, varint
    data = pb.ModelInferRequest(model_name="m").SerializeToString() + unknown + b"\x3a\x01z"
    rest, contents = grpc_wire.split_raw_input_contents(data)
    assert rest.endswith(unknown) and [bytes(view) for view in contents] == [b"z"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x3a\x05abc", "runs past the end"),
        (b"\x3a", "varint is truncated"),
        (b"\x08" + b"\xff" * 11, "varint is truncated or longer than 10 bytes"),
        (b"\x79\x00\x00", "runs past the end"),
        (b"\x0b", "wire type 3"),
        (b"\x0e", "wire type 6"),
        (b"\x78\x00" * (grpc_wire.MAX_TOP_LEVEL_FIELDS + 1), "more than 16384 top-level fields"),
    ],
)
def test_malformed_encodings(data: bytes, message: str) -> None:
    with pytest.raises(grpc_wire.WireError, match=message):
        grpc_wire.split_raw_input_contents(data)


def test_appended_outputs_parse_as_raw_output_contents() -> None:
    response = pb.ModelInferResponse(model_name="m", id="request-7")
    response.outputs.add(name="a", datatype="FP32", shape=[2, 3])
    response.outputs.add(name="b", datatype="UINT8", shape=[0])
    floats = np.arange(6, dtype="<f4").reshape(2, 3)
    big = bytes(range(200)) * 1000  # a length that needs a 3-byte varint
    data = grpc_wire.append_raw_output_contents(
        response.SerializeToString(), [memoryview(floats.reshape(-1)).cast("B"), b"", big]
    )
    parsed = pb.ModelInferResponse.FromString(data)
    assert list(parsed.raw_output_contents) == [floats.tobytes(), b"", big]
    assert parsed.outputs == response.outputs and parsed.id == "request-7"


def test_nothing_to_append() -> None:
    message = pb.ModelInferResponse(model_name="m").SerializeToString()
    assert grpc_wire.append_raw_output_contents(message, []) is message
