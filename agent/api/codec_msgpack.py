"""The V2 request and response documents as msgpack (``application/msgpack``).

Same documents and checks as the JSON codec. A tensor's ``data`` is either raw
little-endian row-major bytes (msgpack bin; numeric datatypes only), turned into an array
with ``np.frombuffer`` without a further copy, or a flat or nested list; BYTES data is a
list of bin or str elements. Responses always carry numeric data as bin and BYTES as a
list of bin; binary-output flags do not apply. msgpack-python copies each bin out of the
body once while unpacking; nothing copies it again. Pure functions; no HTTP.
"""

from __future__ import annotations

from typing import Any

import msgpack

from agent.api import wire
from agent.api.codec_json import (
    TensorHead,
    parse_request,
    parse_response,
    request_document,
    require_data,
    response_document,
)
from agent.api.tensor_check import (
    array_from_buffer,
    array_from_list,
    byte_elements,
    raw_bytes,
)
from agent.errors import BadRequest
from agent.tensors import Array, InferRequest, InferResponse, v2_datatype

# What msgpack.unpackb raises on malformed input (its errors derive from ValueError,
# TypeError comes from unhashable map keys).
_UNPACK_ERRORS = (ValueError, TypeError, msgpack.UnpackException)


def decode_request(body: bytes, *, max_elements: int) -> InferRequest:
    """Decode a V2 inference request sent as msgpack."""
    document = _unpack(body, "request body")
    return parse_request(document, max_elements=max_elements, read_data=_read_data)


def encode_response(response: InferResponse) -> bytes:
    """Encode a response as msgpack: numeric data as bin, BYTES as a list of bin."""

    def write_output(name: str, array: Array) -> wire.ResponseOutput:
        return {
            "name": name,
            "datatype": v2_datatype(array),
            "shape": list(array.shape),
            "data": _raw_data(array),
        }

    return _pack(response_document(response, write_output))


def encode_request(request: InferRequest, *, raw: bool = True) -> bytes:
    """Encode a request as msgpack; ``raw`` False sends nested lists (and str for BYTES)."""

    def write_input(name: str, array: Array) -> wire.RequestInput:
        return {
            "name": name,
            "datatype": v2_datatype(array),
            "shape": list(array.shape),
            "data": _raw_data(array) if raw else _list_data(array),
        }

    return _pack(request_document(request, write_input))


def decode_response(body: bytes) -> InferResponse:
    """Decode a V2 inference response sent as msgpack."""
    return parse_response(_unpack(body, "response body"), read_data=_read_data)


def _read_data(head: TensorHead) -> Array:
    require_data(head)
    if not isinstance(head.data, bytes):
        return array_from_list(head.data, head.datatype, head.shape, head.where, allow_bin=True)
    if head.datatype == "BYTES":
        raise BadRequest(
            f"{head.where}: BYTES data must be a list of bin or str elements, got one bin; "
            "send one element per string"
        )
    return array_from_buffer(memoryview(head.data), head.datatype, head.shape, head.where)


def _raw_data(array: Array) -> memoryview | list[bytes]:
    if v2_datatype(array) == "BYTES":
        return byte_elements(array)
    return raw_bytes(array)


def _list_data(array: Array) -> list[Any] | list[bytes | str]:
    if v2_datatype(array) != "BYTES":
        return list(array.tolist()) if array.ndim else [array.item()]
    return [_text_or_bin(item) for item in byte_elements(array)]


def _text_or_bin(item: bytes) -> bytes | str:
    try:
        return item.decode()
    except UnicodeDecodeError:
        return item


def _unpack(body: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except _UNPACK_ERRORS as exc:
        raise BadRequest(
            f"the {what} is not valid msgpack ({str(exc)[:120]}); send one msgpack map "
            '{"inputs": [{"name", "shape", "datatype", "data"}, ...]}'
        ) from None


def _pack(document: wire.InferenceRequest | wire.InferenceResponse) -> bytes:
    packed: bytes = msgpack.packb(document, use_bin_type=True)
    return packed
