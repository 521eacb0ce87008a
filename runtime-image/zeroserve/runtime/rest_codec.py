"""V2 REST bodies <-> inference messages: JSON tensors and the binary tensor data extension, and the
V2 error answer. The tensor checks are ``tensors``', shared with gRPC."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from zeroserve.protocol import binary, dtypes
from zeroserve.protocol.start import START_HEADER, retry_after_value
from zeroserve.runtime.messages import InferRequest, InferResult, InputTensor, RequestedOutput
from zeroserve.runtime.server_errors import InvalidInput, ServerError
from zeroserve.runtime.settings import Limits
from zeroserve.runtime.tensors import (
    HEAVY_RAW_BYTES,
    array_from_raw,
    check_datatype,
    check_shape,
    check_size,
    count_error,
    raw_from_array,
)

JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

# What a JSON array may hold for each kind of numpy target: ints never arrive as floats, bools only as bools.
_ACCEPTED_KINDS = {"b": "b", "u": "iub", "i": "iub", "f": "iubf"}


# Decoding this much on the event loop would hold every other connection for long (JSON parsing and BYTES elements
# cost Python work per value; raw numeric tensors are views and cost nothing): it runs in a thread. The thread does
# not make the work parallel (the parser holds the GIL); it lets the loop answer between its switch intervals, and
# costs the request itself a third of its decode time, so it is for what would hold the loop for tens of ms: about
# 35 ms for a 4 MiB JSON part here.
HEAVY_JSON_BYTES = 4 * 1024 * 1024


def decode_is_heavy(body: bytes, header_length: str | None) -> bool:
    """Whether decoding ``body`` is worth a thread: a large JSON part, or large raw data with BYTES tensors."""
    if header_length is None or not header_length.isdigit():
        return len(body) > HEAVY_JSON_BYTES
    json_length = int(header_length)
    if json_length > HEAVY_JSON_BYTES:
        return True
    return len(body) - json_length > HEAVY_RAW_BYTES and b'"BYTES"' in body[:json_length]


def decode_request(body: bytes, header_length: str | None, limits: Limits) -> InferRequest:
    if header_length is not None:
        try:
            header_bytes, raw = binary.split_body(body, header_length)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
    else:
        header_bytes, raw = body, memoryview(b"")
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidInput("request body must be a JSON object with an 'inputs' list")

    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request needs a non-empty 'inputs' list")
    offset = 0
    inputs: list[InputTensor] = []
    for position, item in enumerate(raw_inputs):
        tensor, used = _decode_input(item, position, raw[offset:], limits)
        inputs.append(tensor)
        offset += used
    if offset != len(raw):
        raise InvalidInput(
            f"{len(raw) - offset} bytes follow the last binary input; binary_data_size values "
            "must add up to the body length after the JSON header"
        )

    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    parameters = _parameters(header, "request")
    return InferRequest(inputs, _decode_outputs(header.get("outputs")), request_id, parameters)


def _decode_input(item: Any, position: int, raw: memoryview, limits: Limits) -> tuple[InputTensor, int]:
    if not isinstance(item, dict):
        raise InvalidInput(f"inputs[{position}] must be an object with name, shape, datatype and data")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{position}] needs a 'name' string")
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input '{name}' needs a 'datatype' string")
    check_datatype(datatype, name)
    shape = check_shape(item.get("shape"), name, limits)
    count = math.prod(shape)
    parameters = item.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidInput(f"input '{name}': 'parameters' must be an object")
    size = parameters.get("binary_data_size") if parameters else None
    if size is not None:
        if "data" in item:
            raise InvalidInput(f"input '{name}' has both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer")
        if size > len(raw):
            raise InvalidInput(
                f"input '{name}' claims {size} binary bytes but only {len(raw)} remain in the body "
                "(truncated request?)"
            )
        array = array_from_raw(raw[:size], datatype, shape, count, name, limits)
        return InputTensor(name, datatype, shape, array), size
    if "data" not in item:
        raise InvalidInput(f"input '{name}' has neither 'data' nor a binary_data_size parameter")
    array = _from_json(item["data"], datatype, shape, count, name, limits)
    return InputTensor(name, datatype, shape, array), 0


def _from_json(data: Any, datatype: str, shape: list[int], count: int, name: str, limits: Limits) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        array = np.array(data, dtype=object)
        if array.size != count:
            raise count_error(name, array.size, shape, count)
        check_size(name, datatype, shape, count, limits)
        flat = array.reshape(-1)
        for index, element in enumerate(flat):
            if not isinstance(element, str):
                raise InvalidInput(f"input '{name}': BYTES element {index} must be a string")
        return flat.reshape(shape)
    target = dtypes.to_numpy(datatype)
    try:
        array = np.asarray(data)
    except ValueError:
        raise InvalidInput(f"input '{name}': 'data' is not a regular (rectangular) array of numbers") from None
    if array.size != count:
        raise count_error(name, array.size, shape, count)
    check_size(name, datatype, shape, count, limits)
    if count == 0:
        return np.zeros(shape, dtype=target)
    if target.kind in "iu" and array.dtype.kind in "fO":
        # numpy infers float64 (or object) for integers beyond int64, e.g. UINT64's upper half.
        array = _exact_integers(data, target, name, datatype)
    if array.dtype.kind not in _ACCEPTED_KINDS[target.kind]:
        raise InvalidInput(f"input '{name}': 'data' holds {_kind_name(array.dtype)} values, not {datatype}")
    if target.kind in "iu" and (array.min() < np.iinfo(target).min or array.max() > np.iinfo(target).max):
        raise InvalidInput(f"input '{name}': a value is out of range for {datatype}")
    return array.astype(target, copy=False).reshape(shape)


def _exact_integers(data: list[Any], target: np.dtype, name: str, datatype: str) -> np.ndarray:
    values = np.asarray(data, dtype=object).reshape(-1)
    if not all(type(value) is int for value in values):
        raise InvalidInput(f"input '{name}': 'data' holds floating-point values, not {datatype}")
    try:
        return np.array(values.tolist(), dtype=target)
    except OverflowError:
        raise InvalidInput(f"input '{name}': a value is out of range for {datatype}") from None


def _kind_name(dtype: np.dtype) -> str:
    return {"b": "boolean", "i": "integer", "u": "integer", "f": "floating-point", "U": "string"}.get(
        dtype.kind, "mixed or non-numeric"
    )


def _parameters(item: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = item.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    return parameters


def _decode_outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidInput("'outputs' must be a list of {\"name\": ...} objects")
    outputs = []
    for position, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"outputs[{position}] needs a 'name' string")
        parameters = _parameters(item, f"output '{item['name']}'")
        if "classification" in parameters:
            raise InvalidInput("the classification extension is not supported")
        flag = parameters.get("binary_data")
        outputs.append(RequestedOutput(item["name"], flag if isinstance(flag, bool) else None))
    return outputs


def asks_binary_outputs(request: InferRequest) -> bool:
    """Whether the answer will carry binary tensors (the request asked for them, for some output or all)."""
    if request.parameters.get("binary_data_output") is True:
        return True
    return any(output.binary for output in request.outputs or ())


def encode_result(result: InferResult, request: InferRequest) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers; outputs go binary where the request asked for it."""
    binary_default = request.parameters.get("binary_data_output") is True
    wants_binary = {output.name: output.binary for output in request.outputs} if request.outputs else {}
    chunks: list[bytes | memoryview] = []
    outputs_json = []
    for output in result.outputs:
        array = output.array
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(array.shape)}
        flag = wants_binary.get(output.name)
        if flag if flag is not None else binary_default:
            chunk = raw_from_array(array, output.datatype)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = _to_json_data(array, output.datatype)
        outputs_json.append(entry)
    response: dict[str, Any] = {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "outputs": outputs_json,
    }
    if result.id is not None:
        response["id"] = result.id
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"content-type": JSON_CONTENT_TYPE}
    headers = {"content-type": BINARY_CONTENT_TYPE, binary.HEADER_LENGTH: str(len(header))}
    return b"".join([header, *chunks]), headers


def _to_json_data(array: np.ndarray, datatype: str) -> Any:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [element.decode("utf-8", "replace") if isinstance(element, bytes) else str(element) for element in flat]
    return flat  # orjson serializes numpy arrays natively


def encode_error(exc: ServerError) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the V2 error answer for ``exc``: ``{"error": ...}``, with ``Retry-After`` and
    the start-state marker and ``start`` object when the error carries them (zeroserve.protocol.start)."""
    headers = {"content-type": JSON_CONTENT_TYPE}
    if exc.retry_after is not None:
        headers["retry-after"] = retry_after_value(exc.retry_after)
    if exc.start is None:
        return exc.status, headers, orjson.dumps({"error": exc.message})
    headers[START_HEADER] = exc.start.state
    return exc.status, headers, orjson.dumps({"error": exc.message, "start": exc.start.to_json()})
