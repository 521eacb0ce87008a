"""The gRPC surface of a real server process (inference.GRPCInferenceService and grpc.health.v1.Health),
spoken to by clients nobody here wrote: tritonclient.grpc (in a child process, see triton_grpc_process.py),
kserve's InferenceGRPCClient, kserve's generated stubs for hand-built and malformed requests, and
grpcio-health-checking's stub."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from kserve.protocol.infer_type import RequestedOutput
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families
from triton_grpc_process import TritonProcess

from zeroserve.runtime.config import RuntimeConfig

import models as test_models
from conftest import V2_DATATYPES, ServerProcess, start_server, unused_port

_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """Values at each datatype's edges: integer extremes, fractions, non-ASCII text."""
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([f"zeroserve-{i}-é" for i in range(count)], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return (np.arange(count) % 2 == 0).reshape(shape)
    dtype = _NUMPY[datatype]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.resize(np.array([info.min, info.max, 0, 1, info.max // 3], dtype=dtype), count).reshape(shape)
    return np.linspace(-2.5, 3.75, count).astype(dtype).reshape(shape)


def assert_same(actual: np.ndarray, expected: np.ndarray, datatype: str) -> None:
    assert actual.shape == expected.shape
    if datatype == "BYTES":
        text = [v.decode() if isinstance(v, bytes) else v for v in actual.reshape(-1)]
        assert text == expected.reshape(-1).tolist()
    else:
        assert actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual, expected)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def health_status(address: str, service: str = "") -> int | None:
    """The health service's answer, or None while nothing answers."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise


@pytest.fixture(scope="module")
def grpc_server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, str]]:
    """REST and gRPC from one process (``--grpc_port`` turns gRPC on); yields it and the gRPC address."""
    port = unused_port()
    log = tmp_path_factory.mktemp("grpc") / "server.log"
    server = start_server(["--model_dir", str(model_repository), "--grpc_port", str(port)], log)
    yield server, f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def triton(grpc_server: tuple[ServerProcess, str]) -> Iterator[TritonProcess]:
    client = TritonProcess(grpc_server[1])
    yield client
    client.close()


def kserve_call(address: str, call: Callable[[InferenceGRPCClient], object]) -> object:
    async def run() -> object:
        client = InferenceGRPCClient(address, timeout=30)
        try:
            return await call(client)  # type: ignore[misc]
        finally:
            await client.close()

    return asyncio.run(run())


# -- flags ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "environ", "protocol", "http_port", "grpc_port"),
    [
        ([], {}, "rest", 8080, 8081),  # off by default: grpc is never imported
        (["--grpc_port", "9001"], {}, "both", 8080, 9001),  # a port asked for is a port served
        (["--enable_grpc"], {"PORT": "7000"}, "both", 7000, 8081),
        (["--enable_grpc=false", "--grpc_port", "9001"], {}, "rest", 8080, 9001),
        (["--no-enable_grpc"], {}, "rest", 8080, 8081),
        (["--protocol", "grpc"], {"PORT": "8080"}, "grpc", 8080, 8080),  # Knative's one h2c port
        (["--protocol", "grpc"], {}, "grpc", 8080, 8081),
        (["--protocol", "grpc", "--grpc_port", "9001"], {"PORT": "8080"}, "grpc", 8080, 9001),
        (["--protocol", "both", "--enable_grpc=true"], {}, "both", 8080, 8081),
        (["--protocol", "grpc-v2"], {}, "rest", 8080, 8081),  # KServe's predictor protocol: ignored
    ],
)
def test_protocol_flags(
    argv: list[str], environ: dict[str, str], protocol: str, http_port: int, grpc_port: int
) -> None:
    config = RuntimeConfig.from_args(argv, environ)
    assert (config.protocol, config.http_port, config.grpc_port) == (protocol, http_port, grpc_port)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--protocol", "grpc", "--enable_grpc=false"], "contradicts --protocol grpc"),
        (["--protocol", "rest", "--enable_grpc"], "contradicts --protocol rest"),
        (["--protocol", "http3"], "--protocol must be one of rest, grpc, both"),
        (["--grpc_port", "8080"], "cannot share port 8080"),
        (["--protocol", "grpc", "--workers", "2"], "--workers applies to the REST server"),
        (["--enable_grpc", "--grpc_max_receive_message_length", str(2**31)], "between 1 and 2147483647"),
        (["--enable_grpc=maybe"], "expected true or false"),
    ],
)
def test_protocol_flag_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        RuntimeConfig.from_args(argv, {})
    assert message in capsys.readouterr().err


def test_metrics_port_is_for_grpc_only(caplog: pytest.LogCaptureFixture) -> None:
    assert RuntimeConfig.from_args(["--protocol", "grpc", "--metrics_port", "9100"], {}).metrics_port == 9100
    assert RuntimeConfig.from_args(["--protocol", "grpc"], {}).metrics_port is None  # off by default
    assert RuntimeConfig.from_args(["--metrics_port", "9100"], {}).metrics_port is None  # REST has /metrics
    assert "ignoring --metrics_port" in caplog.text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--protocol", "grpc", "--grpc_port", "9100", "--metrics_port", "9100"], "cannot share port 9100"),
        (["--protocol", "grpc", "--metrics_port", "70000"], "--metrics_port must be a port number"),
    ],
)
def test_metrics_port_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        RuntimeConfig.from_args(argv, {})
    assert message in capsys.readouterr().err


def test_message_limits_follow_the_request_limit() -> None:
    config = RuntimeConfig.from_args(["--enable_grpc", "--max_request_mib", "64"], {})
    assert config.grpc_max_receive_message_length == config.grpc_max_send_message_length == 64 * 2**20
    config = RuntimeConfig.from_args(["--enable_grpc", "--grpc_max_send_message_length", "1000"], {})
    assert config.grpc_max_send_message_length == 1000 and config.grpc_max_receive_message_length == 256 * 2**20


# -- health, metadata, readiness --------------------------------------------------------------------------


def test_server_health_and_metadata(grpc_server: tuple[ServerProcess, str], triton: TritonProcess) -> None:
    assert triton.call("live")["value"] is True
    assert triton.call("ready")["value"] is True
    metadata = triton.call("server_metadata")["value"]
    assert metadata["name"] == "zeroserve" and "binary_tensor_data" in metadata["extensions"]
    address = grpc_server[1]
    assert kserve_call(address, lambda c: c.is_server_live()) is True
    assert kserve_call(address, lambda c: c.is_server_ready()) is True
    assert kserve_call(address, lambda c: c.is_model_ready("mlp")) is True


def test_model_metadata_and_readiness(triton: TritonProcess) -> None:
    metadata = triton.call("model_metadata", model="add")["value"]
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == ("add", ["1", "2"], "onnxruntime_onnx")
    assert metadata["inputs"] == [
        {"name": "a", "datatype": "FP32", "shape": ["-1", "4"]},  # int64 shapes arrive as JSON strings
        {"name": "b", "datatype": "FP32", "shape": ["-1", "4"]},
    ]
    assert metadata["outputs"] == [{"name": "sum", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert triton.call("model_ready", model="add", version="1")["value"] is True
    missing = triton.call("model_ready", model="nope")
    assert (missing["ok"], missing["code"]) == (False, "NOT_FOUND")
    unknown = triton.call("model_metadata", model="add", version="7")
    assert unknown["code"] == "NOT_FOUND"


def test_health_service_reflects_readiness(grpc_server: tuple[ServerProcess, str]) -> None:
    address = grpc_server[1]
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health_status(address) == serving
    assert health_status(address, "inference.GRPCInferenceService") == serving
    with pytest.raises(grpc.RpcError) as info:
        health_status(address, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# -- inference with real clients ---------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", V2_DATATYPES)
def test_tritonclient_round_trips_every_datatype(triton: TritonProcess, datatype: str) -> None:
    data = sample(datatype)
    answer = triton.infer(
        f"identity_{datatype.lower()}", {"input": data}, outputs=["output"], request_id=f"req-{datatype}",
        parameters={"note": "zeroserve", "attempt": 1, "trace": True},
    )
    assert answer["ok"], answer
    assert_same(answer["outputs"]["output"], data, datatype)
    assert list(answer["outputs"]) == ["output"]  # only what was asked for
    assert answer["id"] == f"req-{datatype}"


def test_versions_reach_each_version(triton: TritonProcess) -> None:
    a, b = np.full((1, 4), 3.0, np.float32), np.full((1, 4), 2.0, np.float32)
    results = {version: triton.infer("add", {"a": a, "b": b}, version=version) for version in ("1", "2", "")}
    np.testing.assert_array_equal(results["1"]["outputs"]["sum"], a + b)
    np.testing.assert_array_equal(results["2"]["outputs"]["sum"], a * b)
    assert results[""]["model_version"] == "2"  # no version: the newest


KSERVE_CASES = [
    pytest.param(
        datatype,
        raw,
        id=f"{datatype}-{'raw' if raw else 'typed'}",
        marks=[pytest.mark.skip(reason="kserve's client has no typed field for FP16; it must go raw")]
        if (datatype, raw) == ("FP16", False)
        else [],
    )
    for datatype in V2_DATATYPES
    for raw in (True, False)
]


@pytest.mark.parametrize(("datatype", "raw"), KSERVE_CASES)
def test_kserve_client_round_trips_every_datatype(
    grpc_server: tuple[ServerProcess, str], datatype: str, raw: bool
) -> None:
    data = sample(datatype)
    tensor = InferInput("input", list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=raw)
    request = InferRequest(
        f"identity_{datatype.lower()}",
        [tensor],
        request_id="kserve-1",
        request_outputs=[RequestedOutput("copy")],
        parameters={"note": "zeroserve"},
    )
    response = kserve_call(grpc_server[1], lambda c: c.infer(request))
    outputs = {output.name: output for output in response.outputs}  # type: ignore[attr-defined]
    assert list(outputs) == ["copy"]
    # Answered in kind: raw contents for raw inputs, typed contents for typed ones.
    assert (outputs["copy"]._raw_data is not None) is raw
    assert_same(outputs["copy"].as_numpy(), data, datatype)
    assert response.id == "kserve-1"  # type: ignore[attr-defined]


# -- hand-built requests with kserve's stubs ---------------------------------------------------------------


def add_request(a: list[float] | None = None, **changes: object) -> pb.ModelInferRequest:
    """A good raw request for add version 1 (a + b on [1, 4] FP32)."""
    a_data = np.asarray(a if a is not None else [1, 2, 3, 4], np.float32)
    request = pb.ModelInferRequest(
        model_name="add",
        model_version="1",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="a", datatype="FP32", shape=[1, 4]),
            pb.ModelInferRequest.InferInputTensor(name="b", datatype="FP32", shape=[1, 4]),
        ],
        raw_input_contents=[a_data.tobytes(), np.ones(4, np.float32).tobytes()],
    )
    for field, value in changes.items():
        request.ClearField(field)
        if isinstance(value, list):
            getattr(request, field).extend(value)
        else:
            setattr(request, field, value)
    return request


def typed_add_request() -> pb.ModelInferRequest:
    contents = pb.InferTensorContents(fp32_contents=[1, 2, 3, 4])
    return pb.ModelInferRequest(
        model_name="add",
        model_version="1",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=[1, 4], contents=contents)
            for name in ("a", "b")
        ],
    )


@pytest.fixture
def stub(grpc_server: tuple[ServerProcess, str]) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    """kserve's generated stub; after the test, proves the same server still answers a good request."""
    with grpc.insecure_channel(grpc_server[1]) as channel:
        client = pb_grpc.GRPCInferenceServiceStub(channel)
        yield client
        response = client.ModelInfer(add_request(), timeout=10)
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4"), [2, 3, 4, 5])
    assert grpc_server[0].process.poll() is None


def assert_error(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, code: grpc.StatusCode,
                 *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()


def test_typed_request_is_answered_typed(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    response = stub.ModelInfer(typed_add_request(), timeout=10)
    assert not response.raw_output_contents
    assert list(response.outputs[0].contents.fp32_contents) == [2, 4, 6, 8]


def test_binary_data_output_parameter_picks_the_answer_form(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    typed = add_request()
    typed.parameters["binary_data_output"].bool_param = False
    response = stub.ModelInfer(typed, timeout=10)
    assert not response.raw_output_contents and list(response.outputs[0].contents.fp32_contents) == [2, 3, 4, 5]
    raw = typed_add_request()
    raw.parameters["binary_data_output"].bool_param = True
    response = stub.ModelInfer(raw, timeout=10)
    assert np.frombuffer(response.raw_output_contents[0], "<f4").tolist() == [2, 4, 6, 8]


def test_fp16_output_is_raw_even_for_a_typed_request(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(
        model_name="identity_int32",
        inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="INT32", shape=[1, 2], contents=pb.InferTensorContents(int_contents=[7, -7]),
        )],
    )
    assert list(stub.ModelInfer(request, timeout=10).outputs[0].contents.int_contents) == [7, -7]
    half = np.array([[0.5, -1.5]], np.float16)
    request = pb.ModelInferRequest(
        model_name="identity_fp16",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP16", shape=[1, 2])],
        raw_input_contents=[half.tobytes()],
    )
    request.parameters["binary_data_output"].bool_param = False
    response = stub.ModelInfer(request, timeout=10)
    assert len(response.raw_output_contents) == 2  # FP16 has no typed field: every output goes raw
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f2").reshape(1, 2), half)


def test_every_output_when_none_is_requested(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    data = np.arange(6, dtype=np.int64).reshape(2, 3)
    request = pb.ModelInferRequest(
        model_name="identity_int64",
        id="all-outputs",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="INT64", shape=[2, 3])],
        raw_input_contents=[data.tobytes()],
    )
    response = stub.ModelInfer(request, timeout=10)
    assert [o.name for o in response.outputs] == ["output", "copy"] and response.id == "all-outputs"
    assert [list(o.shape) for o in response.outputs] == [[2, 3], [2, 3]]
    for raw in response.raw_output_contents:
        np.testing.assert_array_equal(np.frombuffer(raw, "<i8").reshape(2, 3), data)


# -- one test per malformed request; the stub fixture proves the server keeps serving ------------------------


def _send_bytes(target: str, data: bytes) -> grpc.RpcError:
    """``data`` as the ModelInfer request, as it is: a client whose encoder is broken, or a truncated message."""
    with grpc.insecure_channel(target) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            infer(data, timeout=10)
    return info.value


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x0a\xff\xff\xff\xff\x0f", "runs past the end"),  # model_name claims 4 GiB
        (b"\x0a\x03add\x80", "varint is truncated"),
        (b"\x0b\x0c", "wire type 3"),  # a group: ModelInferRequest has none
        (b"\x2a\x02\xff\xff", "not a ModelInferRequest"),  # inputs[0] is not an InferInputTensor
        (b"\x3a\x00" * 100_000, "top-level fields"),  # 100,000 empty tensors: refused before any is kept
    ],
    ids=["field-past-the-end", "truncated-varint", "group", "bad-nested-message", "too-many-fields"],
)
def test_bytes_that_are_not_a_message(
    grpc_server: tuple[ServerProcess, str], stub: pb_grpc.GRPCInferenceServiceStub, data: bytes, fragment: str
) -> None:
    error = _send_bytes(grpc_server[1], data)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "not a ModelInferRequest protobuf message" in error.details() and fragment in error.details()


def test_truncated_message(grpc_server: tuple[ServerProcess, str], stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    whole = add_request().SerializeToString()
    error = _send_bytes(grpc_server[1], whole[:-3])  # the last raw tensor lost its tail
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "runs past the end" in error.details()


def test_raw_contents_in_any_order_of_fields(grpc_server: tuple[ServerProcess, str]) -> None:
    """Protobuf lets a sender put fields in any order: raw tensors before the inputs that they belong to."""
    request = add_request()
    raw = pb.ModelInferRequest(raw_input_contents=request.raw_input_contents).SerializeToString()
    request.ClearField("raw_input_contents")
    with grpc.insecure_channel(grpc_server[1]) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        answer = pb.ModelInferResponse.FromString(infer(raw + request.SerializeToString(), timeout=10))
    np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], "<f4"), [2, 3, 4, 5])


def test_unknown_model(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert_error(stub, add_request(model_name="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope' not found", "'add'")


def test_unknown_version(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert_error(stub, add_request(model_version="9"), grpc.StatusCode.NOT_FOUND, "no version '9'", "1, 2")


def test_wrong_raw_content_length(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request()
    request.raw_input_contents[0] = b"\0" * 12
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "input 'a' has 12 bytes", "[1, 4] of FP32 needs 16")


def test_too_many_raw_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request()
    request.raw_input_contents.append(b"\0" * 16)
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "3 raw_input_contents for 2 inputs")


def test_too_few_raw_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request()
    del request.raw_input_contents[1]
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "1 raw_input_contents for 2 inputs")


def test_raw_and_typed_contents_mixed(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request()
    request.inputs[1].contents.fp32_contents.extend([1, 1, 1, 1])
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "input 'b' has typed contents", "raw_input_contents")


def test_mismatched_shape(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request()
    request.inputs[0].ClearField("shape")
    request.inputs[0].shape.extend([1, 2, 2])
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "shape [1, 2, 2]", "expects [-1, 4]")


def test_unknown_datatype(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request()
    request.inputs[0].datatype = "FP8"
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "unknown datatype 'FP8'", "FP32")


def test_datatype_the_model_does_not_take(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request()
    request.inputs[0].datatype = "INT32"
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "datatype INT32", "expects FP32")


def test_negative_dimension(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request()
    request.inputs[0].shape[0] = -1
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "negative dimension")


def test_absurd_shape_is_refused_before_allocation(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request()
    request.inputs[0].shape[0] = 2**40
    # Its data says otherwise: a mistake (INVALID_ARGUMENT), not a large payload (RESOURCE_EXHAUSTED).
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, f"needs {2**40 * 16}")


def test_unknown_input_name(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request()
    request.inputs[0].name = "c"
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "no input named 'c'", "'a', 'b'")


def test_missing_input(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request()
    del request.inputs[1]
    del request.raw_input_contents[1]
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "needs input(s) 'b'")


def test_input_given_twice(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request()
    request.inputs[1].name = "a"
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "input 'a' appears more than once")


def test_no_inputs(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert_error(stub, pb.ModelInferRequest(model_name="add"), grpc.StatusCode.INVALID_ARGUMENT, "at least one input")


def test_no_data(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request()
    request.ClearField("raw_input_contents")
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "input 'a' has no data")


def test_typed_contents_in_the_wrong_field(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = typed_add_request()
    request.inputs[0].contents.ClearField("fp32_contents")
    request.inputs[0].contents.int_contents.extend([1, 2, 3, 4])
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "belongs in contents.fp32_contents", "int_contents")


def test_typed_contents_count_does_not_match_shape(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = typed_add_request()
    request.inputs[0].contents.fp32_contents.append(5)
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "has 5 data elements but shape [1, 4] needs 4")


def test_typed_value_out_of_range(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(
        model_name="identity_int8",
        inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="INT8", shape=[1, 2], contents=pb.InferTensorContents(int_contents=[1, 300]),
        )],
    )
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "out of range for INT8")


def test_typed_fp16_has_no_field(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(
        model_name="identity_fp16",
        inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP16", shape=[1, 1], contents=pb.InferTensorContents(fp32_contents=[1.0]),
        )],
    )
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "FP16, which has no typed contents field")


def test_truncated_bytes_element(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(
        model_name="identity_bytes",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="BYTES", shape=[1, 2])],
        raw_input_contents=[b"\x02\0\0\0hi\x09\0\0\0short"],
    )
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "BYTES element 1 claims 9 bytes")


def test_bytes_that_are_not_utf8(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(
        model_name="identity_bytes",
        inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="BYTES", shape=[1, 1], contents=pb.InferTensorContents(bytes_contents=[b"\xff"]),
        )],
    )
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "not UTF-8")


def test_unknown_output(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = add_request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="product")])
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "no output named 'product'", "'sum'")


def test_output_requested_twice(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    output = pb.ModelInferRequest.InferRequestedOutputTensor(name="sum")
    request = add_request(outputs=[output, output])
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "more than once")


def test_classification_extension(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    output = pb.ModelInferRequest.InferRequestedOutputTensor(name="sum")
    output.parameters["classification"].int64_param = 2
    assert_error(stub, add_request(outputs=[output]), grpc.StatusCode.INVALID_ARGUMENT, "classification")


def test_onnx_runtime_rejects_the_data(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(
        model_name="gather",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="index", datatype="INT64", shape=[1])],
        raw_input_contents=[np.array([99], np.int64).tobytes()],
    )
    assert_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "model 'gather' rejected the input")


# -- observability: the same request metrics as REST, Server-Timing as trailing metadata -------------------


def request_counts(metrics_url: str) -> dict[tuple[str, str, str], float]:
    """``zeroserve_inference_requests_total`` by (model, protocol, outcome) and the request-duration histogram's
    counts by ("duration", protocol, model), summed over versions, read with prometheus_client's parser."""
    families = {family.name: family for family in text_string_to_metric_families(httpx.get(metrics_url).text)}
    counts: dict[tuple[str, str, str], float] = {}
    for sample in families["zeroserve_inference_requests"].samples:
        key = (sample.labels["model"], sample.labels["protocol"], sample.labels["outcome"])
        counts[key] = counts.get(key, 0.0) + sample.value
    for sample in families["zeroserve_inference_request_duration_seconds"].samples:
        if sample.name.endswith("_count"):
            key = ("duration", sample.labels["protocol"], sample.labels["model"])
            counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def test_grpc_calls_are_counted_like_rest(grpc_server: tuple[ServerProcess, str]) -> None:
    server, address = grpc_server
    metrics_url = f"{server.url}/metrics"
    before = request_counts(metrics_url)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ModelInfer.with_call(add_request(), timeout=10)
        assert np.frombuffer(response.raw_output_contents[0], "<f4").tolist() == [2, 3, 4, 5]
        timing = dict(call.trailing_metadata())["server-timing"]
        assert {"queue", "infer"} <= {part.split(";")[0].strip() for part in timing.split(",")}
        assert_error(stub, add_request(model_name="nope"), grpc.StatusCode.NOT_FOUND)
        bad = add_request()
        bad.raw_input_contents[0] = b"\0" * 12
        assert_error(stub, bad, grpc.StatusCode.INVALID_ARGUMENT)
    rest = {"inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]} for name in "ab"]}
    assert httpx.post(f"{server.url}/v2/models/add/versions/1/infer", json=rest).status_code == 200
    after = request_counts(metrics_url)
    moved = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    assert moved == {
        ("add", "grpc", "success"): 1,
        ("add", "grpc", "failure"): 1,  # INVALID_ARGUMENT: counted as REST counts its 400
        ("", "grpc", "failure"): 1,  # NOT_FOUND: an unknown model mints no series of its own
        ("add", "rest", "success"): 1,
        ("duration", "grpc", "add"): 2,
        ("duration", "grpc", ""): 1,
        ("duration", "rest", "add"): 1,
    }


# -- deployments: loading, gRPC only on PORT, message limits, SIGTERM ----------------------------------------


def test_grpc_only_on_port_with_message_limit(model_repository: Path, tmp_path: Path) -> None:
    """Knative's single h2c port: --protocol grpc serves gRPC on PORT, and no REST listener exists."""
    port = unused_port()
    server = start_server(
        ["--model_dir", str(model_repository), "--protocol", "grpc", "--grpc_max_receive_message_length", "100000"],
        tmp_path / "log", env={"PORT": str(port)}, wait_ready=False,
    )
    address = f"127.0.0.1:{port}"
    try:
        wait_for(lambda: health_status(address) == health_pb2.HealthCheckResponse.SERVING)
        response = kserve_call(address, lambda c: c.infer(kserve_add_request()))
        np.testing.assert_array_equal(response.outputs[0].as_numpy(), [[2, 3, 4, 5]])  # type: ignore[attr-defined]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()  # --http_port: nothing there
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            too_big = add_request()
            too_big.raw_input_contents[0] = b"\0" * 200_000
            assert_error(stub, too_big, grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert stub.ModelInfer(add_request(), timeout=10).raw_output_contents
        assert "uvicorn" not in server.log().lower()
    finally:
        assert server.stop() == 0
    assert "stopping: draining gRPC calls" in server.log()


def kserve_add_request() -> InferRequest:
    tensors = []
    for name, data in (("a", [1, 2, 3, 4]), ("b", [1, 1, 1, 1])):
        tensor = InferInput(name, [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array([data], np.float32))
        tensors.append(tensor)
    return InferRequest("add", tensors, model_version="1")


def test_unavailable_while_loading_then_serving(
    gated_model_server: tuple[str, threading.Event], tmp_path: Path
) -> None:
    uri, gate = gated_model_server
    port = unused_port()
    server = start_server(
        ["--model_name", "mlp", "--model_dir", uri, "--cache_dir", str(tmp_path / "cache"), "--protocol", "grpc",
         "--grpc_port", str(port)],
        tmp_path / "log", wait_ready=False,
    )
    address = f"127.0.0.1:{port}"
    request = pb.ModelInferRequest(
        model_name="mlp",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 16])],
        raw_input_contents=[np.full((1, 16), 0.5, np.float32).tobytes()],
    )
    try:
        wait_for(lambda: health_status(address) is not None)
        assert health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            assert not stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=5).ready
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

            gate.set()
            wait_for(lambda: health_status(address) == health_pb2.HealthCheckResponse.SERVING)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            assert stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=5).ready
            assert len(stub.ModelInfer(request, timeout=5).raw_output_contents) == 1
    finally:
        server.stop()


def slow_model(path: Path, size: int = 384, steps: int = 400) -> Path:
    """``y = x @ x @ ... @ x``: long enough per run (about a second here) to be in flight at SIGTERM."""
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", "x"], [f"h{i + 1}"]) for i in range(steps)]
    nodes.append(helper.make_node("Identity", [f"h{steps}"], ["y"]))
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", test_models.OPSET)])
    model.ir_version = test_models.IR_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.mark.slow
def test_sigterm_stops_both_listeners_at_once_and_drains_both(tmp_path: Path) -> None:
    """SIGTERM: gRPC refuses new calls at the moment REST stops accepting, not after REST has drained;
    the gRPC call and the REST request in flight both finish."""
    slow_model(tmp_path / "model.onnx")
    port = unused_port()
    server = start_server(
        ["--model_dir", str(tmp_path), "--enable_grpc", "--grpc_port", str(port), "--shutdown_timeout", "20",
         "--no-warmup"],
        tmp_path / "log",
    )
    address = f"127.0.0.1:{port}"
    x = np.eye(384, dtype=np.float32)
    request = pb.ModelInferRequest(
        model_name="model",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[384, 384])],
        raw_input_contents=[x.tobytes()],
    )
    binary_input = {"name": "x", "shape": [384, 384], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
    header = json.dumps({"inputs": [binary_input], "parameters": {"binary_data_output": True}}).encode()
    body = header + x.tobytes()

    def grpc_refuses() -> bool:
        with grpc.insecure_channel(address) as fresh:
            try:
                pb_grpc.GRPCInferenceServiceStub(fresh).ServerLive(pb.ServerLiveRequest(), timeout=2)
                return False
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAVAILABLE

    try:
        with grpc.insecure_channel(address) as channel, socket.create_connection(("127.0.0.1", server.port)) as rest:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(request, timeout=60)
            # A REST request whose body is still arriving: in flight until the test sends the rest.
            rest.sendall(
                b"POST /v2/models/model/infer HTTP/1.1\r\nHost: t\r\n"
                + f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: {len(header)}\r\n\r\n".encode()
                + body[:1000]
            )
            time.sleep(0.2)
            server.process.send_signal(signal.SIGTERM)
            assert not call.done()  # the gRPC call is in flight too
            # Without the early stop, gRPC would accept calls until REST had drained, i.e. forever here.
            wait_for(grpc_refuses, timeout=10)
            rest.sendall(body[1000:])
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = rest.recv(65536)
                if not chunk:
                    break
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            response = call.result(timeout=60)
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(384, 384), x)
        # A stop asked for is a clean exit.
        assert server.process.wait(30) == 0
    finally:
        server.stop()


def test_calls_that_arrived_before_sigterm_are_answered_not_cancelled(tmp_path: Path) -> None:
    """gRPC cancels, at its stop, the calls it received but had not yet handed to a handler. A burst that a busy
    server had not taken in when SIGTERM landed (here: stopped with SIGSTOP while the calls arrive) is served."""
    test_models.mlp_model(tmp_path / "model.onnx")
    port = unused_port()
    server = start_server(["--model_dir", str(tmp_path), "--grpc_port", str(port), "--shutdown_timeout", "10"],
                          tmp_path / "log")
    x = np.full((1, 16), 0.5, dtype=np.float32)
    request = pb.ModelInferRequest(
        model_name="model",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 16])],
        raw_input_contents=[x.tobytes()],
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            infer(request, timeout=10)  # the channel is connected
            server.process.send_signal(signal.SIGSTOP)
            try:
                calls = [infer.future(request, timeout=30) for _ in range(32)]
                time.sleep(0.3)  # the calls' bytes wait in the server's socket buffer
                server.process.send_signal(signal.SIGTERM)
            finally:
                server.process.send_signal(signal.SIGCONT)
            codes = []
            for call in calls:
                try:
                    call.result()
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
        assert codes == ["OK"] * 32
        assert server.process.wait(30) == 0
    finally:
        server.stop()


def test_grpc_port_in_use_fails_the_start(model_repository: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server(
            ["--model_dir", str(model_repository), "--grpc_port", str(port)], tmp_path / "log", wait_ready=False
        )
        try:
            assert server.process.wait(30) != 0
        finally:
            server.stop()
    assert "cannot listen for gRPC" in server.log()
