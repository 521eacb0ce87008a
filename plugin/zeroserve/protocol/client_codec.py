"""Client-side V2 inference bodies: arrays and lists to a request, a response back to arrays.

Requests use the binary tensor extension by default (tensor bytes after a small JSON header) and ask
for binary outputs; plain JSON is one flag away. numpy is imported inside the functions that need it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zeroserve.protocol import binary, dtypes

if TYPE_CHECKING:
    import numpy as np

JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class InferResponse:
    """A decoded inference response; ``outputs`` maps each output name to its array."""

    model_name: str
    model_version: str | None
    outputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def has_plain_values(inputs: Mapping[str, Any]) -> bool:
    """True when some input is a list or scalar rather than an array, so its datatype must come from
    the model's metadata."""
    return any(not hasattr(value, "dtype") for value in inputs.values())


def input_datatypes(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Input name -> V2 datatype from a model metadata answer."""
    found: dict[str, str] = {}
    for item in metadata.get("inputs") or ():
        if isinstance(item, Mapping) and isinstance(item.get("name"), str) and isinstance(item.get("datatype"), str):
            found[item["name"]] = item["datatype"]
    return found


def encode_request(
    inputs: Mapping[str, Any],
    *,
    binary_data: bool = True,
    datatypes: Mapping[str, str] | None = None,
    outputs: Sequence[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The body and content headers of an inference request.

    Args:
        inputs: input name -> numpy array, nested list or scalar.
        binary_data: send tensors with the binary extension and ask for binary outputs.
        datatypes: input name -> V2 datatype, used for lists and scalars (numpy arrays keep theirs).
        outputs: the outputs to return (all when None).
        parameters: request parameters.
        request_id: the request's ``id``.
    """
    if not inputs:
        raise ValueError("an inference request needs at least one input")
    chunks: list[bytes] = []
    tensors: list[dict[str, Any]] = []
    for name, value in inputs.items():
        array, datatype = _as_array(name, value, (datatypes or {}).get(name))
        tensor: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
        if binary_data:
            chunk = _to_bytes(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = _to_json_data(name, array, datatype)
        tensors.append(tensor)
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    header["inputs"] = tensors
    request_parameters = dict(parameters or {})
    if outputs is not None:
        header["outputs"] = [{"name": name, "parameters": {"binary_data": binary_data}} for name in outputs]
    elif binary_data:
        request_parameters["binary_data_output"] = True
    if request_parameters:
        header["parameters"] = request_parameters
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if not binary_data:
        return encoded, {"content-type": JSON_CONTENT_TYPE}
    headers = {"content-type": BINARY_CONTENT_TYPE, binary.HEADER_LENGTH: str(len(encoded))}
    return b"".join([encoded, *chunks]), headers


def decode_response(body: bytes, header_length: str | None) -> InferResponse:
    """Decode an inference response body (JSON, or JSON header + binary tensors); ValueError if malformed."""
    import numpy as np

    if header_length is not None:
        # One copy of the body makes every output a writable array without copying each one.
        header_bytes, raw = binary.split_body(body, header_length)
        raw = memoryview(bytearray(raw))
    else:
        header_bytes, raw = body, memoryview(b"")
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:
        raise ValueError(f"response is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("outputs"), list):
        raise ValueError("response has no 'outputs' list")
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for position, item in enumerate(header["outputs"]):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"outputs[{position}] has no name")
        name = item["name"]
        datatype, shape = item.get("datatype"), item.get("shape")
        if datatype not in dtypes.DATATYPES:
            raise ValueError(f"output '{name}' has unknown datatype {datatype!r}")
        if not isinstance(shape, list) or not all(isinstance(dim, int) and dim >= 0 for dim in shape):
            raise ValueError(f"output '{name}' has no valid shape")
        count = 1
        for dim in shape:
            count *= dim
        item_parameters = item.get("parameters") or {}
        size = item_parameters.get("binary_data_size") if isinstance(item_parameters, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(raw):
                raise ValueError(f"output '{name}' claims {size} binary bytes but {len(raw) - offset} remain")
            chunk = raw[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                array = _object_array(binary.decode_bytes_elements(chunk, count))
            else:
                expected = count * dtypes.ELEMENT_SIZE[datatype]
                if size != expected:
                    raise ValueError(
                        f"output '{name}' has {size} bytes but shape {shape} of {datatype} needs {expected}"
                    )
                array = np.frombuffer(chunk, dtype=dtypes.to_numpy(datatype), count=count)
        elif "data" in item:
            data = item["data"]
            if datatype == "BYTES":
                flat = _flatten(data)
                array = _object_array([e.encode() if isinstance(e, str) else bytes(e) for e in flat])
            else:
                array = np.asarray(data, dtype=dtypes.to_numpy(datatype))
            if array.size != count:
                raise ValueError(f"output '{name}' has {array.size} elements but shape {shape} needs {count}")
        else:
            raise ValueError(f"output '{name}' has neither data nor binary_data_size")
        outputs[name] = array.reshape(shape)
    if offset != len(raw):
        raise ValueError(f"{len(raw) - offset} bytes follow the last binary output")
    version, request_id, parameters = header.get("model_version"), header.get("id"), header.get("parameters")
    return InferResponse(
        model_name=str(header.get("model_name", "")),
        model_version=str(version) if version is not None else None,
        outputs=outputs,
        id=request_id if isinstance(request_id, str) else None,
        parameters=parameters if isinstance(parameters, dict) else {},
    )


def to_json_outputs(outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Output name -> nested lists (BYTES as UTF-8 text), for JSON answers."""
    result: dict[str, Any] = {}
    for name, array in outputs.items():
        if array.dtype.kind == "O":
            texts = [e.decode("utf-8", "replace") if isinstance(e, bytes) else str(e) for e in array.reshape(-1)]
            result[name] = _object_array(texts).reshape(array.shape).tolist()
        else:
            result[name] = array.tolist()
    return result


def _as_array(name: str, value: Any, datatype: str | None) -> tuple[np.ndarray, str]:
    import numpy as np

    if hasattr(value, "dtype"):
        array = np.asarray(value)
        if array.dtype.kind in "OUS":
            return array, "BYTES"
        try:
            return array, dtypes.from_numpy(array.dtype)
        except ValueError as exc:
            raise ValueError(f"input '{name}': {exc}") from None
    if datatype is not None and datatype in dtypes.DATATYPES:
        if datatype == "BYTES":
            return _object_array(_flatten(value)).reshape(np.shape(value)), "BYTES"
        try:
            return np.asarray(value, dtype=dtypes.to_numpy(datatype)), datatype
        except (TypeError, ValueError) as exc:
            raise ValueError(f"input '{name}' cannot be read as {datatype}: {exc}") from None
    array = np.asarray(value)
    if array.dtype.kind in "OUS":
        return array.astype(object), "BYTES"
    try:
        return array, dtypes.from_numpy(array.dtype)
    except ValueError as exc:
        raise ValueError(f"input '{name}': {exc}") from None


def _to_bytes(array: np.ndarray, datatype: str) -> bytes:
    import numpy as np

    if datatype == "BYTES":
        return binary.encode_bytes_elements(_element_bytes(element) for element in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=dtypes.to_numpy(datatype)).tobytes()


def _to_json_data(name: str, array: np.ndarray, datatype: str) -> list[Any]:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        try:
            return [e.decode("utf-8") if isinstance(e, bytes) else str(e) for e in flat]
        except UnicodeDecodeError:
            raise ValueError(f"input '{name}' holds bytes that are not UTF-8; send it as binary data") from None
    data: list[Any] = flat.tolist()
    return data


def _element_bytes(element: Any) -> bytes:
    if isinstance(element, bytes):
        return element
    return str(element).encode("utf-8")


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def _object_array(elements: Sequence[Any]) -> np.ndarray:
    import numpy as np

    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array
