"""gRPC protocol messages <-> inference messages: typed ``contents`` and ``raw_input_contents``.

The checks are shared with REST (``tensors.check_shape``, ``tensors.array_from_raw``, ...), so a
tensor is validated the same way whichever protocol carried it: shape and element count against the
limits before anything is allocated, raw bytes against shape x datatype size, BYTES elements
length-prefixed as in the binary extension. What is gRPC's alone lives here: which typed field
carries which datatype, raw-versus-typed rules, and parameter values. ``ModelInfer`` travels as bytes
(``parse_infer_request``, ``encode_result``), so its raw tensors are never copied into a protobuf message
(``grpc_wire.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
from google.protobuf.message import DecodeError

from zeroserve.protocol import dtypes
from zeroserve.runtime import grpc_wire
from zeroserve.runtime._proto import open_inference_grpc_pb2 as pb
from zeroserve.runtime.messages import InferRequest, InferResult, InputTensor, RequestedOutput
from zeroserve.runtime.server_errors import InvalidInput
from zeroserve.runtime.settings import Limits
from zeroserve.runtime.tensors import (
    array_from_raw,
    as_bytes,
    check_datatype,
    check_shape,
    check_size,
    count_error,
    raw_from_array,
)

# The InferTensorContents field that carries each datatype. FP16 has none: it travels raw only.
CONTENTS_FIELD: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# The numpy type of each field's values, before narrowing to the tensor's own datatype.
_FIELD_DTYPE: Final[dict[str, str]] = {
    "bool_contents": "bool",
    "uint_contents": "<u4",
    "uint64_contents": "<u8",
    "int_contents": "<i4",
    "int64_contents": "<i8",
    "fp32_contents": "<f4",
    "fp64_contents": "<f8",
}


def parse_infer_request(data: bytes) -> tuple[pb.ModelInferRequest, list[memoryview]]:
    """A serialized ModelInferRequest: the message without its raw tensors, and those as views over ``data``."""
    try:
        rest, raw_contents = grpc_wire.split_raw_input_contents(data)
        return pb.ModelInferRequest.FromString(rest), raw_contents
    except (grpc_wire.WireError, DecodeError) as exc:
        raise InvalidInput(f"the request is not a ModelInferRequest protobuf message: {exc}") from None


def decode_request(
    message: pb.ModelInferRequest, limits: Limits, raw_contents: Sequence[bytes | memoryview] | None = None
) -> tuple[InferRequest, bool]:
    """The request, and whether to answer with raw outputs (in kind with the inputs, unless the
    request's ``binary_data_output`` parameter says otherwise). ``raw_contents``: the raw tensors when
    ``parse_infer_request`` took them out of the message; else the message's own."""
    tensors = message.inputs
    if not tensors:
        raise InvalidInput("request needs at least one input")
    if raw_contents is None:
        raw_contents = message.raw_input_contents
    raw = len(raw_contents) > 0
    if raw and len(raw_contents) != len(tensors):
        raise InvalidInput(
            f"request has {len(raw_contents)} raw_input_contents for {len(tensors)} inputs; "
            "send one per input, in the order of 'inputs'"
        )
    inputs: list[InputTensor] = []
    for position, tensor in enumerate(tensors):
        name = tensor.name
        if not name:
            raise InvalidInput(f"inputs[{position}] needs a name")
        check_datatype(tensor.datatype, name)
        shape = check_shape(list(tensor.shape), name, limits)
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input '{name}' has typed contents but the request also has raw_input_contents; "
                    "use one or the other for every input"
                )
            array = array_from_raw(raw_contents[position], tensor.datatype, shape, count, name, limits)
        else:
            array = _from_contents(tensor, shape, count, limits)
        inputs.append(InputTensor(name, tensor.datatype, shape, array))

    outputs: list[RequestedOutput] | None = None
    if message.outputs:
        outputs = []
        for position, output in enumerate(message.outputs):
            if not output.name:
                raise InvalidInput(f"outputs[{position}] needs a name")
            if "classification" in output.parameters:
                raise InvalidInput("the classification extension is not supported")
            outputs.append(RequestedOutput(output.name))
    parameters = parameter_values(message.parameters)
    raw_out = parameters.get("binary_data_output")
    request = InferRequest(inputs, outputs, message.id or None, parameters)
    return request, raw_out if isinstance(raw_out, bool) else raw


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int], count: int, limits: Limits
) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input '{name}' is {datatype}, which has no typed contents field; send raw_input_contents")
    for descriptor, _ in tensor.contents.ListFields():  # only the fields that hold values
        if descriptor.name != field:
            raise InvalidInput(
                f"input '{name}' is {datatype}, so its data belongs in contents.{field}, not contents.{descriptor.name}"
            )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        if count and not values and not tensor.HasField("contents"):
            raise InvalidInput(f"input '{name}' has no data: set its contents or send raw_input_contents")
        raise count_error(name, len(values), shape, count)
    check_size(name, datatype, shape, count, limits)
    if datatype == "BYTES":
        try:
            text = [element.decode("utf-8") for element in values]
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"input '{name}': BYTES element is not UTF-8: {exc}") from None
        return np.array(text, dtype=object).reshape(shape)
    wide = np.fromiter(values, dtype=_FIELD_DTYPE[field], count=count)
    target = dtypes.to_numpy(datatype)
    if target.kind in "iu" and target.itemsize < wide.itemsize and count:
        # INT8/INT16 and UINT8/UINT16 ride in 32-bit fields: a value may not fit the tensor's type.
        info = np.iinfo(target)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(f"input '{name}': a value is out of range for {datatype}")
    return wide.astype(target, copy=False).reshape(shape)


def encode_result(result: InferResult, raw: bool) -> bytes:
    """The serialized ModelInferResponse; outputs raw or typed. FP16 has no typed field, and raw contents
    are all or nothing, so an FP16 output makes every output raw."""
    response = pb.ModelInferResponse(
        model_name=result.model_name, model_version=result.model_version, id=result.id or ""
    )
    if not raw and any(output.datatype not in CONTENTS_FIELD for output in result.outputs):
        raw = True
    raw_contents: list[bytes | memoryview] = []
    for output in result.outputs:
        array = output.array
        tensor = response.outputs.add(name=output.name, datatype=output.datatype, shape=array.shape)
        if raw:
            raw_contents.append(raw_from_array(array, output.datatype))
        elif output.datatype == "BYTES":
            tensor.contents.bytes_contents.extend(as_bytes(element) for element in array.reshape(-1))
        else:
            getattr(tensor.contents, CONTENTS_FIELD[output.datatype]).extend(array.reshape(-1).tolist())
    return grpc_wire.append_raw_output_contents(response.SerializeToString(), raw_contents)


def parameter_values(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """Parameter name -> its Python value (bool, int, str or float); unset values are left out."""
    values: dict[str, Any] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values


def server_metadata(metadata: Mapping[str, Any]) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(
        name=metadata["name"], version=metadata["version"], extensions=metadata["extensions"]
    )


def model_metadata(metadata: Mapping[str, Any]) -> pb.ModelMetadataResponse:
    """From the data plane's (REST-shaped) model metadata."""

    def tensors(specs: list[dict[str, Any]]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [pb.ModelMetadataResponse.TensorMetadata(**spec) for spec in specs]

    return pb.ModelMetadataResponse(
        name=metadata["name"],
        versions=metadata["versions"],
        platform=metadata["platform"],
        inputs=tensors(metadata["inputs"]),
        outputs=tensors(metadata["outputs"]),
    )
