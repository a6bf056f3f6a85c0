"""The binary tensor data extension of KServe V2, byte-compatible with ``tritonclient.http``.

A body is a JSON header of ``header_length`` bytes (sent in the
``Inference-Header-Content-Length`` HTTP header) followed by the raw data of every tensor
whose ``parameters`` carry ``binary_data_size``, in document order. Fixed-size datatypes
are little-endian, row-major; BYTES elements are each a 4-byte little-endian length
followed by the bytes. Incoming tensors are zero-copy, read-only views over the body.

V2 responses are always encoded here: a response with no binary output is a plain JSON
document (``header_length`` None). Outputs sent as JSON carry BYTES as strings; an element
that is not valid utf-8 cannot be a JSON string, so encoding it raises BadRequest telling
the client to ask for that output in binary. Pure functions; no HTTP, no aiohttp.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from agent.api import wire
from agent.api.codec_json import (
    TensorHead,
    load_json,
    parse_request,
    parse_response,
    read_json_data,
    request_document,
    response_document,
)
from agent.api.tensor_check import (
    array_from_buffer,
    array_from_framed,
    frame_bytes,
    json_data,
    raw_bytes,
    show,
)
from agent.errors import BadRequest
from agent.tensors import Array, InferRequest, InferResponse, v2_datatype

_HEADER: Final = "Inference-Header-Content-Length"


def parse_header_length(value: str) -> int:
    """The value of the ``Inference-Header-Content-Length`` HTTP header as a byte count."""
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise BadRequest(
            f"{_HEADER} must be the byte length of the JSON header, got {show(value)}; "
            "send a whole number of bytes"
        )
    return int(text)


def decode_request(body: bytes, header_length: int, *, max_elements: int) -> InferRequest:
    """Decode a request of the binary extension: JSON header, then binary tensor data."""
    view = _check_header_length(body, header_length)
    tails = _Tails(view[header_length:])
    document = load_json(view[:header_length], f"the JSON header ({_HEADER}: {header_length})")
    request = parse_request(document, max_elements=max_elements, read_data=tails.read)
    tails.finish()
    return request


def encode_response(response: InferResponse) -> tuple[bytes, int | None]:
    """Encode a response; returns ``(body, header_length)``, None when it is all JSON."""
    tails: list[bytes | memoryview] = []

    def write_output(name: str, array: Array) -> wire.ResponseOutput:
        datatype = v2_datatype(array)
        output: wire.ResponseOutput = {"name": name, "datatype": datatype, "shape": [*array.shape]}
        if name in response.binary:
            output["parameters"] = {"binary_data_size": _append_raw(tails, array, datatype)}
        else:
            output["data"] = json_data(array, f'output "{name}"')
        return output

    return _join(response_document(response, write_output), tails)


def encode_request(request: InferRequest, *, binary_inputs: bool) -> tuple[bytes, int | None]:
    """Encode a request as tritonclient does; returns ``(body, header_length)``."""
    tails: list[bytes | memoryview] = []

    def write_input(name: str, array: Array) -> wire.RequestInput:
        datatype = v2_datatype(array)
        tensor: wire.RequestInput = {"name": name, "shape": [*array.shape], "datatype": datatype}
        if binary_inputs:
            tensor["parameters"] = {"binary_data_size": _append_raw(tails, array, datatype)}
        else:
            tensor["data"] = json_data(array, f'input "{name}"')
        return tensor

    return _join(request_document(request, write_input), tails)


def decode_response(body: bytes, header_length: int | None) -> InferResponse:
    """Decode a response; ``header_length`` None means the body is all JSON."""
    if header_length is None:
        document = load_json(body, "the response body")
        return parse_response(document, read_data=_Tails(memoryview(b"")).read)
    view = _check_header_length(body, header_length)
    tails = _Tails(view[header_length:])
    document = load_json(view[:header_length], f"the response header ({_HEADER})")
    response = parse_response(document, read_data=tails.read)
    tails.finish()
    return response


class _Tails:
    """Hands out consecutive slices of the binary part of a body, in tensor order."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._offset = 0

    def read(self, head: TensorHead) -> Array:
        """The tensor's array: from the next binary slice, or from its JSON ``data``."""
        if "binary_data_size" not in head.parameters:
            return read_json_data(head)
        size = _binary_size(head)
        remaining = len(self._view) - self._offset
        if size > remaining:
            raise BadRequest(
                f"{head.where}: binary_data_size is {size} but only {remaining} bytes of binary "
                "data remain after the JSON header and the tensors before it; make "
                "binary_data_size match the bytes sent"
            )
        chunk = self._view[self._offset : self._offset + size]
        self._offset += size
        if head.datatype == "BYTES":
            return array_from_framed(chunk, head.shape, head.where)
        return array_from_buffer(chunk, head.datatype, head.shape, head.where)

    def finish(self) -> None:
        """BadRequest when binary data is left over that no tensor claimed."""
        left = len(self._view) - self._offset
        if left:
            raise BadRequest(
                f"the body has {left} bytes after the JSON header that no tensor claims "
                f"(binary_data_size adds up to {self._offset} of {len(self._view)}); "
                f"make binary_data_size and {_HEADER} match the bytes sent"
            )


def _binary_size(head: TensorHead) -> int:
    size: Any = head.parameters["binary_data_size"]
    if type(size) is not int or size < 0:
        raise BadRequest(
            f"{head.where}: binary_data_size must be a non-negative integer, got {show(size)}; "
            "send the byte length of the tensor's binary data"
        )
    if head.has_data:
        raise BadRequest(
            f'{head.where} has both "data" and binary_data_size; send its values one way only'
        )
    return size


def _check_header_length(body: bytes, header_length: int) -> memoryview:
    if type(header_length) is not int or not 0 < header_length <= len(body):
        raise BadRequest(
            f"{_HEADER} is {show(header_length)} but the body has {len(body)} bytes; send the "
            "byte length of the JSON header, which must fit in the body"
        )
    return memoryview(body)


def _append_raw(tails: list[bytes | memoryview], array: Array, datatype: str) -> int:
    raw = frame_bytes(array) if datatype == "BYTES" else raw_bytes(array, datatype)
    tails.append(raw)
    return len(raw)  # raw_bytes views are flat uint8: len is the byte count


def _join(
    document: wire.InferenceRequest | wire.InferenceResponse, tails: list[bytes | memoryview]
) -> tuple[bytes, int | None]:
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not tails:
        return header, None
    return b"".join([header, *tails]), len(header)
