"""The V2 JSON codec, and the V2 document model the binary and msgpack codecs share.

Pure functions: bytes in, ``InferRequest``/``InferResponse`` out, and back. The document
functions (``parse_request``, ``parse_response``, ``request_document``,
``response_document``) check everything in a V2 request or response except how a
tensor's ``data`` is carried, which each codec supplies as a callback. Tensor checks live
in ``tensor_check``. This module must not know HTTP or aiohttp.

Decoding an input checks the shape product against ``max_elements`` (summed over all
inputs of the request) before any tensor is built. Request ``parameters`` other than
``binary_data_output`` are kept in ``InferRequest.parameters``; ``binary_data_output`` is
lifted into ``InferRequest.binary_output``. The classification and shared-memory
extensions are refused with a message saying so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from agent.api import wire
from agent.api.json_numbers import load_numeric
from agent.api.tensor_check import (
    array_from_list,
    check_datatype,
    check_shape,
    json_data,
    show,
    show_shape,
)
from agent.errors import BadRequest
from agent.tensors import Array, InferRequest, InferResponse, RequestedOutput, v2_datatype

#: No element limit: for decoding responses on the client side.
UNLIMITED: Final = 1 << 62

_REQUEST_HINT: Final = 'send {"inputs": [{"name", "shape", "datatype", "data"}, ...]}'
_UNSUPPORTED: Final = {
    "classification": "the classification extension is not supported; ask for the raw output",
    "shared_memory_region": "shared memory is not supported; send the data in the body",
}


@dataclass(frozen=True, slots=True)
class TensorHead:
    """Everything about one tensor of a document except its decoded data."""

    where: str
    name: str
    datatype: str
    shape: tuple[int, ...]
    parameters: dict[str, Any]
    has_data: bool
    data: object


#: Turns a tensor's head (with its raw ``data`` member) into an array.
ReadData = Callable[[TensorHead], Array]
#: Turns a named array into a request input or response output document.
WriteInput = Callable[[str, Array], wire.RequestInput]
WriteOutput = Callable[[str, Array], wire.ResponseOutput]


def decode_request(body: bytes, *, max_elements: int) -> InferRequest:
    """Decode a V2 JSON inference request (big numeric ones through ``json_numbers``)."""
    document = load_numeric(body)
    if document is not None:
        try:
            return parse_request(document, max_elements=max_elements, read_data=read_json_data)
        except BadRequest:
            pass  # decoded again below: its message shows the values as the client wrote them
    document = load_json(body, "request body")
    return parse_request(document, max_elements=max_elements, read_data=read_json_data)


def encode_request(request: InferRequest) -> bytes:
    """Encode a V2 JSON inference request (for clients, the bench and tests)."""
    document = request_document(request, write_json_input)
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_response(body: bytes) -> InferResponse:
    """Decode a V2 JSON inference response with every output as JSON data."""
    return parse_response(load_json(body, "response body"), read_data=read_json_data)


def load_json(body: bytes | memoryview, what: str) -> Any:
    """Parse JSON, or BadRequest saying where it breaks."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} "
            f"(byte {exc.pos}); {_REQUEST_HINT}"
        ) from None


def read_json_data(head: TensorHead) -> Array:
    """The array of a tensor whose values are in its JSON ``data`` member."""
    require_data(head)
    return array_from_list(head.data, head.datatype, head.shape, head.where)


def require_data(head: TensorHead) -> None:
    """BadRequest when a tensor carries no ``data``."""
    if not head.has_data:
        raise BadRequest(
            f'{head.where} has no "data"; send its values as "data", or as binary data '
            'with "parameters": {"binary_data_size": n}'
        )


def write_json_input(name: str, array: Array) -> wire.RequestInput:
    """A request input with its values as flat JSON data."""
    where = f'input "{name}"'
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": v2_datatype(array),
        "data": json_data(array, where),
    }


def parse_request(document: object, *, max_elements: int, read_data: ReadData) -> InferRequest:
    """Check a decoded V2 request document and build the request's arrays."""
    top = _object(document, "the request body", _REQUEST_HINT)
    parameters = _parameters(top.get("parameters"), "request")
    binary_output = _flag(parameters.pop("binary_data_output", None), "binary_data_output")
    return InferRequest(
        id=_request_id(top.get("id")),
        outputs=_requested_outputs(top.get("outputs")),
        binary_output=binary_output,
        parameters=parameters,
        inputs=_inputs(top.get("inputs"), max_elements, read_data),
    )


def parse_response(document: object, *, read_data: ReadData) -> InferResponse:
    """Check a decoded V2 response document and build its output arrays."""
    top = _object(document, "the response body", 'expected {"model_name", "outputs", ...}')
    outputs = _list(top.get("outputs"), '"outputs" of the response')
    arrays: dict[str, Array] = {}
    binary: set[str] = set()
    for index, item in enumerate(outputs):
        head = read_head(item, f"outputs[{index}]", "output", UNLIMITED)
        arrays[head.name] = read_data(head)
        if "binary_data_size" in head.parameters:
            binary.add(head.name)
    return InferResponse(
        model_name=_text(top.get("model_name"), "model_name"),
        model_version=_text(top.get("model_version", ""), "model_version"),
        id=_text(top.get("id", ""), "id"),
        outputs=arrays,
        binary=frozenset(binary),
        parameters=_parameters(top.get("parameters"), "response"),
    )


def request_document(request: InferRequest, write_input: WriteInput) -> wire.InferenceRequest:
    """The V2 document of a request, each input written by ``write_input``."""
    document: wire.InferenceRequest = {
        "inputs": [write_input(name, array) for name, array in request.inputs.items()]
    }
    if request.id is not None:
        document["id"] = request.id
    parameters = dict(request.parameters)
    if request.binary_output:
        parameters["binary_data_output"] = True
    if parameters:
        document["parameters"] = parameters
    if request.outputs is not None:
        document["outputs"] = [_requested_output_document(out) for out in request.outputs]
    return document


def response_document(response: InferResponse, write_output: WriteOutput) -> wire.InferenceResponse:
    """The V2 document of a response, each output written by ``write_output``."""
    document: wire.InferenceResponse = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": [write_output(name, array) for name, array in response.outputs.items()],
    }
    if response.parameters:
        document["parameters"] = response.parameters
    return document


def read_head(item: object, slot: str, role: str, max_elements: int) -> TensorHead:
    """Name, datatype, shape and parameters of one tensor document."""
    tensor = _object(item, slot, 'send {"name", "shape", "datatype", "data"}')
    name = _name(tensor.get("name"), slot)
    where = f'{role} "{name}"'
    parameters = _parameters(tensor.get("parameters"), where)
    _refuse_unsupported(parameters, where)
    return TensorHead(
        where=where,
        name=name,
        datatype=check_datatype(tensor.get("datatype"), where),
        shape=check_shape(tensor.get("shape"), where, max_elements),
        parameters=parameters,
        has_data="data" in tensor,
        data=tensor.get("data"),
    )


def _inputs(value: object, max_elements: int, read_data: ReadData) -> dict[str, Array]:
    items = _list(value, 'the request\'s "inputs"')
    if not items:
        raise BadRequest(f"the request has no inputs; {_REQUEST_HINT}")
    arrays: dict[str, Array] = {}
    total = 0
    for index, item in enumerate(items):
        head = read_head(item, f"inputs[{index}]", "input", max_elements)
        if head.name in arrays:
            raise BadRequest(f"{head.where} appears more than once; send each input once")
        count = math.prod(head.shape)
        total += count
        if total > max_elements:
            raise BadRequest(
                f"{head.where}: shape {show_shape(head.shape)} holds {count} elements, and a "
                f"request may hold at most {max_elements} over all its inputs; "
                "send fewer rows per request"
            )
        arrays[head.name] = read_data(head)
    return arrays


def _requested_outputs(value: object) -> tuple[RequestedOutput, ...] | None:
    if value is None:
        return None
    outputs: list[RequestedOutput] = []
    for index, item in enumerate(_list(value, 'the request\'s "outputs"')):
        output = _object(item, f"outputs[{index}]", 'send {"name", "parameters"?}')
        name = _name(output.get("name"), f"outputs[{index}]")
        where = f'requested output "{name}"'
        if any(out.name == name for out in outputs):
            raise BadRequest(f"{where} appears more than once; ask for each output once")
        parameters = _parameters(output.get("parameters"), where)
        _refuse_unsupported(parameters, where)
        binary = parameters.get("binary_data")
        outputs.append(
            RequestedOutput(name, None if binary is None else _flag(binary, "binary_data"))
        )
    return tuple(outputs)


def _requested_output_document(output: RequestedOutput) -> wire.RequestedOutput:
    document: wire.RequestedOutput = {"name": output.name}
    if output.binary is not None:
        document["parameters"] = {"binary_data": output.binary}
    return document


def _refuse_unsupported(parameters: dict[str, Any], where: str) -> None:
    for key, reason in _UNSUPPORTED.items():
        if key in parameters:
            raise BadRequest(f'{where}: parameter "{key}": {reason}')


def _object(value: object, what: str, hint: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be an object, got {show(value)}; {hint}")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadRequest(f"{what} must be a list, got {show(value)}; {_REQUEST_HINT}")
    return value


def _parameters(value: object, owner: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(
            f'"parameters" of the {owner} must be an object, got {show(value)}; '
            'send e.g. {"binary_data_output": true}'
        )
    return dict(value)


def _flag(value: object, key: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f'parameter "{key}" must be true or false, got {show(value)}')
    return value


def _name(value: object, slot: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(
            f'{slot} needs a "name" (a non-empty string), got {show(value)}; '
            "name every tensor as the model metadata does"
        )
    return value


def _request_id(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(
            f'"id" must be a string, got {show(value)}; send the request id as a string'
        )
    if not value.isprintable():
        # It is echoed in the X-Request-ID header, where a line break would end the header.
        raise BadRequest(
            f'"id" must be printable text, got {show(value)}; remove control characters '
            "(line breaks, tabs) from the request id"
        )
    return value


def _text(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f'"{key}" of the response must be a string, got {show(value)}')
    return value
