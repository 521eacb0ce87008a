"""Client-side V2 bodies: what encode_request writes and what decode_response accepts or refuses."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from zeroserve.protocol.client_codec import decode_response, encode_request, input_datatypes, to_json_outputs


def split(body: bytes, headers: dict[str, str]) -> tuple[dict, bytes]:  # type: ignore[type-arg]
    length = int(headers["inference-header-content-length"])
    return json.loads(body[:length]), body[length:]


def test_binary_request_puts_tensor_bytes_after_the_header_and_asks_for_binary_outputs() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    body, headers = encode_request({"a": a, "flag": np.array([True, False])}, request_id="r1")
    assert headers["content-type"] == "application/octet-stream"
    header, raw = split(body, headers)
    assert header == {
        "id": "r1",
        "inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}},
            {"name": "flag", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}},
        ],
        "parameters": {"binary_data_output": True},
    }
    assert raw == a.tobytes() + b"\x01\x00"


def test_big_endian_and_non_contiguous_arrays_go_out_little_endian_and_packed() -> None:
    array = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]
    body, headers = encode_request({"x": array})
    _, raw = split(body, headers)
    assert raw == np.ascontiguousarray(array, dtype="<i4").tobytes()


def test_lists_take_the_models_datatype_and_bytes_are_length_prefixed() -> None:
    body, headers = encode_request({"x": [[1, 2]], "s": ["hé", b"\x00"]}, datatypes={"x": "FP16", "s": "BYTES"})
    header, raw = split(body, headers)
    assert [t["datatype"] for t in header["inputs"]] == ["FP16", "BYTES"]
    assert raw[:4] == np.array([1, 2], "<f2").tobytes()
    assert raw[4:] == struct.pack("<I", 3) + "hé".encode() + struct.pack("<I", 1) + b"\x00"


def test_lists_without_metadata_keep_numpys_reading() -> None:
    body, headers = encode_request({"x": [1.5], "n": 3, "t": [["a"]]}, binary_data=False)
    assert headers == {"content-type": "application/json"}
    assert json.loads(body)["inputs"] == [
        {"name": "x", "shape": [1], "datatype": "FP64", "data": [1.5]},
        {"name": "n", "shape": [], "datatype": "INT64", "data": [3]},
        {"name": "t", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]},
    ]


def test_selected_outputs_ask_for_binary_each() -> None:
    body, headers = encode_request({"x": np.zeros(1, np.int8)}, outputs=["y"], parameters={"p": 1})
    header, _ = split(body, headers)
    assert header["outputs"] == [{"name": "y", "parameters": {"binary_data": True}}]
    assert header["parameters"] == {"p": 1}


def test_bad_inputs_are_value_errors() -> None:
    with pytest.raises(ValueError, match="at least one input"):
        encode_request({})
    with pytest.raises(ValueError, match="cannot be read as INT32"):
        encode_request({"x": [["a"]]}, datatypes={"x": "INT32"})
    with pytest.raises(ValueError, match="not UTF-8"):
        encode_request({"x": np.array([b"\xff"], dtype=object)}, binary_data=False)


def binary_response(outputs: list[tuple[str, str, list[int], bytes]]) -> tuple[bytes, str]:
    header = json.dumps({
        "model_name": "m", "model_version": "1",
        "outputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                    for n, d, s, b in outputs],
    }).encode()
    return header + b"".join(b for *_, b in outputs), str(len(header))


def test_binary_outputs_decode_to_writable_arrays() -> None:
    values = np.arange(4, dtype=np.float32)
    strings = struct.pack("<I", 2) + b"ok" + struct.pack("<I", 0)
    body, length = binary_response([("y", "FP32", [2, 2], values.tobytes()), ("s", "BYTES", [2], strings)])
    decoded = decode_response(body, length)
    assert decoded.model_name == "m" and decoded.model_version == "1"
    np.testing.assert_array_equal(decoded.outputs["y"], values.reshape(2, 2))
    decoded.outputs["y"][0, 0] = 9  # writable
    assert decoded.outputs["s"].tolist() == [b"ok", b""]


def test_json_outputs_decode_with_their_datatype() -> None:
    body = json.dumps({"model_name": "m", "outputs": [
        {"name": "y", "datatype": "UINT8", "shape": [1, 2], "data": [1, 255]},
        {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["é"]},
    ]}).encode()
    decoded = decode_response(body, None)
    assert decoded.outputs["y"].dtype == np.uint8 and decoded.outputs["y"].tolist() == [[1, 255]]
    assert decoded.outputs["s"].tolist() == ["é".encode()]
    assert to_json_outputs(decoded.outputs) == {"y": [[1, 255]], "s": ["é"]}


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b"not json", None, "not valid JSON"),
        (b'{"outputs": 3}', None, "no 'outputs' list"),
        (b'{"outputs": [{"name": "y", "datatype": "FP8", "shape": [1], "data": [1]}]}', None, "unknown datatype"),
        (b'{"outputs": [{"name": "y", "datatype": "FP32", "shape": [2], "data": [1]}]}', None, "needs 2"),
        (b'{"outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}]}', None, "neither data"),
    ],
)
def test_malformed_responses_are_value_errors(body: bytes, length: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_response(body, length)


def test_binary_sizes_must_add_up() -> None:
    body, length = binary_response([("y", "FP32", [2], b"\x00" * 8)])
    with pytest.raises(ValueError, match="follow the last binary output"):
        decode_response(body + b"extra", length)
    with pytest.raises(ValueError, match="needs 4"):
        decode_response(*binary_response([("y", "FP32", [1], b"\x00" * 8)]))


def test_input_datatypes_from_metadata() -> None:
    metadata = {"inputs": [{"name": "a", "datatype": "FP32", "shape": [-1]}, {"name": 3}, "junk"]}
    assert input_datatypes(metadata) == {"a": "FP32"}
