"""One test per malformed input. Each gets the protocol's error status and a message a person can act on,
and afterwards the same server process still answers a good request."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from conftest import ServerProcess

GOOD = {
    "inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
        {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]},
    ]
}


@pytest.fixture
def url(server: ServerProcess) -> Iterator[str]:
    """The add model's v1 infer URL; after the test, proves the server still serves a good request."""
    infer_url = f"{server.url}/v2/models/add/versions/1/infer"
    yield infer_url
    response = httpx.post(infer_url, json=GOOD, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [2, 3, 4, 5]
    assert server.process.poll() is None


def with_inputs(**changes: object) -> dict[str, object]:
    body = json.loads(json.dumps(GOOD))
    body["inputs"][0].update(changes)
    return body


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message, message


def binary_request(url: str, header: dict[str, object], raw: bytes, header_length: int | None = None) -> httpx.Response:
    head = json.dumps(header).encode()
    length = len(head) if header_length is None else header_length
    return httpx.post(
        url,
        content=head + raw,
        headers={"inference-header-content-length": str(length), "content-type": "application/octet-stream"},
    )


def binary_add_header(size: int = 16) -> dict[str, object]:
    return {
        "inputs": [
            {"name": "a", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": size}},
            {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]},
        ]
    }


def test_broken_json(url: str) -> None:
    assert_error(httpx.post(url, content=b'{"inputs": [', headers={"content-type": "application/json"}),
                 400, "not valid JSON")


def test_json_that_is_not_an_object(url: str) -> None:
    assert_error(httpx.post(url, json=[1, 2, 3]), 400, "JSON object")


def test_missing_inputs(url: str) -> None:
    assert_error(httpx.post(url, json={"id": "x"}), 400, "'inputs'")


def test_input_without_data(url: str) -> None:
    body = with_inputs()
    del body["inputs"][0]["data"]  # type: ignore[index]
    assert_error(httpx.post(url, json=body), 400, "neither 'data' nor")


def test_wrong_shape_rank(url: str) -> None:
    assert_error(httpx.post(url, json=with_inputs(shape=[4])), 400, "shape [4]", "expects [-1, 4]")


def test_wrong_fixed_dimension(url: str) -> None:
    body = with_inputs(shape=[2, 2])
    assert_error(httpx.post(url, json=body), 400, "shape [2, 2]", "expects [-1, 4]")


def test_data_length_does_not_match_shape(url: str) -> None:
    assert_error(httpx.post(url, json=with_inputs(data=[1, 2, 3])), 400, "3 data elements", "needs 4")


def test_wrong_datatype(url: str) -> None:
    assert_error(httpx.post(url, json=with_inputs(datatype="FP64")), 400, "FP64", "expects FP32")


def test_unknown_datatype(url: str) -> None:
    assert_error(httpx.post(url, json=with_inputs(datatype="FP128")), 400, "unknown datatype 'FP128'")


def test_strings_where_numbers_belong(url: str) -> None:
    assert_error(httpx.post(url, json=with_inputs(data=["a", "b", "c", "d"])), 400, "string values", "FP32")


def test_ragged_nested_data(url: str) -> None:
    assert_error(httpx.post(url, json=with_inputs(data=[[1, 2], [3]])), 400, "rectangular")


def test_integer_out_of_range(server: ServerProcess, url: str) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 1], "datatype": "INT8", "data": [300]}]}
    assert_error(httpx.post(f"{server.url}/v2/models/identity_int8/infer", json=body), 400, "out of range for INT8")


def test_fractions_for_an_integer_tensor(server: ServerProcess, url: str) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "INT32", "data": [1.5, 2]}]}
    assert_error(httpx.post(f"{server.url}/v2/models/identity_int32/infer", json=body), 400,
                 "floating-point values, not INT32")


def test_negative_dimension(url: str) -> None:
    assert_error(httpx.post(url, json=with_inputs(shape=[-1, 4])), 400, "negative dimension")


def test_absurd_shape_is_refused_before_allocation(url: str) -> None:
    body = with_inputs(shape=[10**12, 10**12])
    assert_error(httpx.post(url, json=body), 400, "4 data elements", f"needs {10**24}")


def test_absurd_binary_shape_is_refused_before_allocation(url: str) -> None:
    header = binary_add_header(size=2**62)
    header["inputs"][0]["shape"] = [2**31, 2**31]  # type: ignore[index]
    assert_error(binary_request(url, header, b"\0" * 16), 400, f"claims {2**62} binary bytes", "only 16 remain")


def test_zero_elements_beside_a_huge_dimension(url: str) -> None:
    # No elements at all, but a dimension no tensor could have: a mistake, answered once, without a traceback.
    body = with_inputs(shape=[0, 2**62], data=[])
    assert_error(httpx.post(url, json=body), 400, "no elements, and a dimension larger")


def test_a_shape_its_data_contradicts_is_a_mistake_not_a_large_payload(url: str) -> None:
    assert_error(httpx.post(url, json=with_inputs(shape=[100_000, 32], data=[1])), 400,
                 "1 data elements", "needs 3200000")
    header = binary_add_header(size=16)
    header["inputs"][0]["shape"] = [100_000, 4]  # type: ignore[index]
    assert_error(binary_request(url, header, b"\0" * 16), 400, "16 bytes of data", "needs 1600000")
    bytes_header = {"inputs": [{"name": "a", "shape": [1_000_000], "datatype": "BYTES",
                                "parameters": {"binary_data_size": 8}}]}
    assert_error(binary_request(url, bytes_header, b"\0" * 8), 400, "too few for the 1000000 BYTES elements")


def test_too_many_dimensions(url: str) -> None:
    assert_error(httpx.post(url, json=with_inputs(shape=[1] * 40)), 400, "dimensions")


def test_unknown_input_name(url: str) -> None:
    assert_error(httpx.post(url, json=with_inputs(name="c")), 400, "no input named 'c'", "'a', 'b'")


def test_missing_input(url: str) -> None:
    body = {"inputs": GOOD["inputs"][:1]}
    assert_error(httpx.post(url, json=body), 400, "needs input(s) 'b'")


def test_duplicate_input(url: str) -> None:
    body = {"inputs": [GOOD["inputs"][0], GOOD["inputs"][0]]}
    assert_error(httpx.post(url, json=body), 400, "more than once")


def test_unknown_output(url: str) -> None:
    body = {**GOOD, "outputs": [{"name": "product"}]}
    assert_error(httpx.post(url, json=body), 400, "no output named 'product'", "'sum'")


def test_binary_data_size_does_not_match_shape(url: str) -> None:
    assert_error(binary_request(url, binary_add_header(size=12), b"\0" * 12), 400, "12 bytes", "needs 16")


def test_truncated_binary_body(url: str) -> None:
    assert_error(binary_request(url, binary_add_header(size=16), b"\0" * 8), 400, "only 8 remain", "truncated")


def test_extra_bytes_after_binary_inputs(url: str) -> None:
    assert_error(binary_request(url, binary_add_header(size=16), b"\0" * 20), 400, "4 bytes follow")


def test_header_length_longer_than_body(url: str) -> None:
    assert_error(binary_request(url, binary_add_header(), b"\0" * 16, header_length=10**6), 400,
                 "Inference-Header-Content-Length is 1000000")


def test_header_length_cutting_the_json(url: str) -> None:
    assert_error(binary_request(url, binary_add_header(), b"\0" * 16, header_length=20), 400, "not valid JSON")


def test_header_length_not_a_number(url: str) -> None:
    response = httpx.post(url, content=b"{}", headers={"inference-header-content-length": "ten"})
    assert_error(response, 400, "must be an integer")


def test_malformed_binary_bytes_element(server: ServerProcess, url: str) -> None:
    header = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "BYTES",
                          "parameters": {"binary_data_size": 9}}]}
    raw = (3).to_bytes(4, "little") + b"abc" + (50).to_bytes(4, "little")[:2]
    assert_error(binary_request(f"{server.url}/v2/models/identity_bytes/infer", header, raw), 400, "BYTES")


def test_bytes_that_are_not_utf8(server: ServerProcess, url: str) -> None:
    header = {"inputs": [{"name": "input", "shape": [1, 1], "datatype": "BYTES",
                          "parameters": {"binary_data_size": 6}}]}
    raw = (2).to_bytes(4, "little") + b"\xff\xfe"
    assert_error(binary_request(f"{server.url}/v2/models/identity_bytes/infer", header, raw), 400, "utf-8")


def test_unsupported_content_encoding(url: str) -> None:
    response = httpx.post(url, json=GOOD, headers={"content-encoding": "br"})
    assert_error(response, 400, "Content-Encoding 'br'")


def test_corrupt_gzip_body(url: str) -> None:
    response = httpx.post(url, content=b"\x1f\x8b not gzip", headers={"content-encoding": "gzip"})
    assert_error(response, 400, "not valid gzip")


def test_unknown_model(server: ServerProcess, url: str) -> None:
    assert_error(httpx.post(f"{server.url}/v2/models/nope/infer", json=GOOD), 404, "model 'nope' not found")
    assert_error(httpx.get(f"{server.url}/v2/models/nope"), 404, "'add'")
    assert_error(httpx.get(f"{server.url}/v2/models/nope/ready"), 404, "not found")


def test_unknown_version(server: ServerProcess, url: str) -> None:
    response = httpx.post(f"{server.url}/v2/models/add/versions/7/infer", json=GOOD)
    assert_error(response, 404, "no version '7'", "1, 2")


def test_data_dependent_failure_inside_onnxruntime(server: ServerProcess, url: str) -> None:
    body = {"inputs": [{"name": "index", "shape": [1], "datatype": "INT64", "data": [99]}]}
    assert_error(httpx.post(f"{server.url}/v2/models/gather/infer", json=body), 400, "rejected the input")


def test_wrong_method_and_unknown_route(server: ServerProcess, url: str) -> None:
    assert_error(httpx.get(url), 405, "not allowed")
    assert_error(httpx.get(f"{server.url}/v3/whatever"), 404, "no such endpoint")


def test_client_hangs_up_mid_body(server: ServerProcess, url: str) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v2/models/add/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{\"inputs\": ["
        )


def test_body_over_the_limit(tmp_path, model_repository) -> None:  # type: ignore[no-untyped-def]
    from conftest import start_server

    small = start_server(["--model_dir", str(model_repository), "--max_request_mib", "1"], tmp_path / "log")
    try:
        url = f"{small.url}/v2/models/add/versions/1/infer"
        big = np.zeros(300_000, np.float32).tobytes()
        declared = httpx.post(url, content=big * 4, headers={"content-type": "application/octet-stream"})
        assert_error(declared, 413, "over the limit")

        def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
            for _ in range(4):
                yield big

        streamed = httpx.post(url, content=chunks())
        assert_error(streamed, 413, "over the limit")
        assert httpx.post(url, json=GOOD).status_code == 200
    finally:
        small.stop()


def test_tensors_that_really_exceed_the_limits_are_413(tmp_path, model_repository) -> None:  # type: ignore[no-untyped-def]
    from conftest import start_server

    args = ["--model_dir", str(model_repository), "--max_tensor_elements", "3", "--max_bytes_elements", "2"]
    small = start_server(args, tmp_path / "log")
    try:
        url = f"{small.url}/v2/models/add/versions/1/infer"
        assert_error(httpx.post(url, json=GOOD), 413, "4 elements", "at most 3", "--max_tensor_elements")
        strings = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "BYTES", "data": ["a", "b", "c"]}]}
        bytes_url = f"{small.url}/v2/models/identity_bytes/infer"
        assert_error(httpx.post(bytes_url, json=strings), 413, "3 BYTES elements", "--max_bytes_elements")
        raw = b"".join((1).to_bytes(4, "little") + letter for letter in (b"a", b"b", b"c"))
        header = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "BYTES",
                              "parameters": {"binary_data_size": len(raw)}}]}
        assert_error(binary_request(bytes_url, header, raw), 413, "3 BYTES elements")
        two = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]}
        assert httpx.post(bytes_url, json=two).json()["outputs"][0]["data"] == ["a", "b"]
    finally:
        small.stop()
