"""Checks and conversions of single V2 tensors, shared by the JSON, binary and msgpack codecs.

Turns the parts of a tensor on the wire (datatype name, shape, data as a nested list, as
raw little-endian bytes, or as length-prefixed BYTES) into numpy arrays, and arrays back
into wire data. Every malformed value raises ``BadRequest`` naming the tensor, the value
and the fix. This module must not parse whole documents (``codec_json`` does) and must
not loop in Python per element of a numeric tensor: numpy does that work. BYTES tensors
are loops by nature (one Python object per element).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import orjson

from agent.errors import BadRequest
from agent.tensors import V2_TO_NUMPY, V2_TO_WIRE_DTYPE, Array, v2_datatype

#: At most this many dimensions (numpy allows 64; no model needs more than a few).
MAX_DIMS: Final = 32

_DATATYPES: Final = ", ".join(V2_TO_NUMPY)
_LENGTH: Final = struct.Struct("<I")
_FIX_SIZE: Final = "send shape and data of the same size"


def show(value: object, limit: int = 60) -> str:
    """A short JSON-like rendering of a client value for error messages."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_shape(shape: tuple[int, ...]) -> str:
    """A shape as V2 documents write it: ``[3, 5]``."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_datatype(value: object, where: str) -> str:
    """The V2 datatype name, or BadRequest naming the valid ones."""
    if isinstance(value, str) and value in V2_TO_NUMPY:
        return value
    if value is None:
        raise BadRequest(f'{where} has no "datatype"; use one of {_DATATYPES}')
    raise BadRequest(f"unknown datatype {show(value)} for {where}; use one of {_DATATYPES}")


def check_shape(value: object, where: str, max_elements: int) -> tuple[int, ...]:
    """A shape of non-negative dims, each no larger than ``max_elements``."""
    if not isinstance(value, list):
        raise BadRequest(
            f'{where}: "shape" must be a list of non-negative integers, got {show(value)}; '
            "send the size of every dimension, e.g. [1, 4]"
        )
    if len(value) > MAX_DIMS:
        raise BadRequest(
            f"{where}: shape has {len(value)} dimensions, more than {MAX_DIMS}; "
            "send a tensor with fewer dimensions"
        )
    for dim in value:
        if type(dim) is not int or dim < 0:
            raise BadRequest(
                f'{where}: "shape" must be a list of non-negative integers, got {show(value)}; '
                "send the actual size of every dimension (no -1, no fractions)"
            )
        if dim > max_elements:
            raise BadRequest(
                f"{where}: shape {show(value)} has a dimension over the limit of "
                f"{max_elements} elements; send fewer rows per request"
            )
    return tuple(value)


def array_from_list(
    data: object, datatype: str, shape: tuple[int, ...], where: str, *, allow_bin: bool = False
) -> Array:
    """Build an array from flat or nested list data (JSON or msgpack).

    Args:
        allow_bin: BYTES elements may be ``bytes`` as well as ``str`` (msgpack bin).
    """
    if isinstance(data, np.ndarray):  # flat float64 numbers for an FP tensor (json_numbers)
        return _cast_floats(_fit_shape(data, shape, where), datatype, where)
    if not isinstance(data, list):
        raise BadRequest(
            f'{where}: "data" must be a list, got {show(data)}; '
            "send the tensor values as a flat list or nested as the shape"
        )
    if datatype == "BYTES":
        return _bytes_from_list(data, shape, where, allow_bin)
    try:
        found = np.asarray(data)
    except ValueError:  # numpy refuses ragged nesting and more than 64 levels
        raise BadRequest(
            f'{where}: "data" is nested unevenly; send a flat list, or nest lists exactly '
            f"as the shape {show_shape(shape)}"
        ) from None
    found = _fit_shape(found, shape, where)
    if found.size == 0:
        return np.zeros(shape, V2_TO_NUMPY[datatype])
    return _convert(found, data, datatype, where)


def array_from_buffer(
    buffer: memoryview | bytes, datatype: str, shape: tuple[int, ...], where: str
) -> Array:
    """A zero-copy, read-only view of raw little-endian tensor bytes (not for BYTES)."""
    wire = V2_TO_WIRE_DTYPE[datatype]
    count = math.prod(shape)
    if len(buffer) != count * wire.itemsize:
        raise BadRequest(
            f"{where}: shape {show_shape(shape)} of {datatype} needs {count * wire.itemsize} bytes "
            f"({count} elements of {wire.itemsize}) but data has {len(buffer)}; {_FIX_SIZE}"
        )
    array = np.frombuffer(buffer, dtype=wire).reshape(shape)
    if datatype == "BOOL" and array.size and int(array.view(np.uint8).max()) > 1:
        raise BadRequest(f"{where}: BOOL data must be bytes 0 or 1; send one byte per element")
    if not wire.isnative:  # a big-endian host: hand the model native numbers
        return array.astype(wire.newbyteorder("="))
    return array


def array_from_framed(buffer: memoryview | bytes, shape: tuple[int, ...], where: str) -> Array:
    """BYTES elements framed as a 4-byte little-endian length followed by the bytes."""
    data = bytes(buffer)  # one copy: slicing bytes is ~3x faster than slicing a memoryview
    size = len(data)
    count = math.prod(shape)
    items: list[bytes] = []
    offset = 0
    for index in range(count):
        if offset + 4 > size:
            raise BadRequest(
                f"{where}: BYTES data ends after {index} of {count} elements (shape "
                f"{show_shape(shape)}); frame each element as a 4-byte little-endian length "
                f"followed by its bytes, and {_FIX_SIZE}"
            )
        (length,) = _LENGTH.unpack_from(data, offset)
        start = offset + 4
        offset = start + length
        if offset > size:
            raise BadRequest(
                f"{where}: BYTES element {index} declares {length} bytes but only "
                f"{size - start} remain; frame each element as a 4-byte little-endian "
                "length followed by exactly that many bytes"
            )
        items.append(data[start:offset])
    if offset != size:
        raise BadRequest(
            f"{where}: BYTES data has {size - offset} bytes left after the {count} "
            f"elements of shape {show_shape(shape)}; {_FIX_SIZE}"
        )
    return _object_array(items, shape)


def byte_elements(array: Array) -> list[bytes]:
    """The elements of a BYTES array in row-major order; ``str`` elements become utf-8."""
    return [_as_bytes(item) for item in np.asarray(array).ravel().tolist()]


def frame_bytes(array: Array) -> bytes:
    """BYTES elements framed as tritonclient does: 4-byte little-endian length + bytes."""
    parts: list[bytes] = []
    for item in byte_elements(array):
        parts += (_LENGTH.pack(len(item)), item)
    return b"".join(parts)


def raw_bytes(array: Array, datatype: str | None = None) -> memoryview:
    """The little-endian bytes of a numeric array, row-major, without a copy when possible
    (``datatype``: the array's V2 datatype, when the caller has it already)."""
    wire = V2_TO_WIRE_DTYPE[datatype or v2_datatype(array)]
    contiguous = np.ascontiguousarray(array, dtype=wire)
    return contiguous.reshape(-1).view(np.uint8).data


def json_data(array: Array, where: str) -> Array | list[str]:
    """Flat data ready for orjson (OPT_SERIALIZE_NUMPY): a native array, or strings for BYTES.

    BYTES elements that are not valid utf-8 cannot be JSON strings: BadRequest tells the
    client to ask for binary output instead (we never change the encoding behind its back).
    """
    datatype = v2_datatype(array)
    if datatype == "BYTES":
        return [_as_text(item, index, where) for index, item in enumerate(byte_elements(array))]
    dtype = np.dtype(np.float32) if datatype == "FP16" else V2_TO_NUMPY[datatype]
    return np.ascontiguousarray(array, dtype=dtype).reshape(-1)


def _fit_shape(found: Array, shape: tuple[int, ...], where: str) -> Array:
    """Accept flat data of the right size, or data nested exactly as the shape."""
    count = math.prod(shape)
    if found.ndim == 1 and found.size == count:
        return found.reshape(shape)
    if found.shape == shape:
        return found
    if found.size == count == 0 and found.shape == shape[: found.ndim]:
        return found.reshape(shape)  # JSON cannot nest below an empty list: [[]] for [1, 0, 3]
    if found.size != count:
        raise BadRequest(
            f"{where}: shape {show_shape(shape)} holds {count} elements but data has "
            f"{found.size}; {_FIX_SIZE}"
        )
    raise BadRequest(
        f"{where}: data is nested as {show_shape(found.shape)} but shape is "
        f"{show_shape(shape)}; nest the data exactly as the shape, or send it flat"
    )


def _convert(found: Array, data: list[Any], datatype: str, where: str) -> Array:
    """Check the kind numpy inferred against the datatype, then cast."""
    kind = found.dtype.kind
    target = V2_TO_NUMPY[datatype]
    if datatype == "BOOL":
        if kind != "b":
            _reject(data, datatype, where, "JSON booleans (true or false)", _is_bool)
        return found
    if target.kind in "iu":
        if kind in "iu":
            return _cast_ints(found, datatype, where)
        # float64 may hide exact uint64 values numpy could not infer; look at the originals
        return _exact_ints(data, found.shape, datatype, where)
    if kind not in "iuf":  # strings, booleans, nulls, or ints beyond 64 bits (kind O)
        _find_bad(data, datatype, where, "numbers", _is_number)
    return _cast_floats(found, datatype, where)


def _cast_floats(found: Array, datatype: str, where: str) -> Array:
    target = V2_TO_NUMPY[datatype]
    try:
        with np.errstate(over="ignore"):
            cast = found.astype(target)
    except OverflowError:  # a Python int beyond any float
        cast = np.full(found.shape, np.inf, dtype=target)
    if not np.isfinite(cast).all():
        index = int(np.flatnonzero(~np.isfinite(cast))[0])
        value = found.ravel()[index : index + 1].tolist()[0]
        raise BadRequest(
            f"{where}: {show(value)} at element {index} is out of range "
            f"for {datatype}; send finite values that fit {datatype}"
        )
    return cast


def _cast_ints(found: Array, datatype: str, where: str) -> Array:
    info = np.iinfo(V2_TO_NUMPY[datatype])
    low, high = int(found.min()), int(found.max())
    if low < info.min or high > info.max:
        _out_of_range(low if low < info.min else high, None, datatype, where)
    return found.astype(V2_TO_NUMPY[datatype])


def _exact_ints(data: list[Any], shape: tuple[int, ...], datatype: str, where: str) -> Array:
    """Slow path for integers numpy inferred as float or object: check each original value.

    orjson reads integers beyond 64 bits as floats; an integral float out of range is
    reported as out of range, any other float as not a whole number.
    """
    originals = np.array(data, dtype=object).reshape(shape)
    info = np.iinfo(V2_TO_NUMPY[datatype])
    for index, value in enumerate(originals.ravel().tolist()):
        number = _whole(value)
        if number is None:
            _find_bad(data, datatype, where, "whole numbers (no decimal point)", _is_int)
        elif not info.min <= number <= info.max:
            _out_of_range(number, index, datatype, where)
        elif type(value) is not int:
            _find_bad(data, datatype, where, "whole numbers (no decimal point)", _is_int)
    return originals.astype(V2_TO_NUMPY[datatype])


def _whole(value: object) -> int | None:
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    return None


def _out_of_range(value: int, index: int | None, datatype: str, where: str) -> None:
    info = np.iinfo(V2_TO_NUMPY[datatype])
    at = "" if index is None else f" at element {index}"
    raise BadRequest(
        f"{where}: {datatype} data must lie in [{info.min}, {info.max}], got {value}{at}; "
        f"send values that fit {datatype} or use a wider datatype"
    )


def _find_bad(
    data: object, datatype: str, where: str, wanted: str, ok: Callable[[object], bool]
) -> None:
    """Raise for the first element that is not ``ok`` (an error path or a rare slow path)."""
    for index, value in enumerate(np.array(data, dtype=object).ravel().tolist()):
        if not ok(value):
            raise BadRequest(
                f"{where}: {datatype} data must be {wanted}, got {show(value)} at element "
                f"{index}; send {datatype} values, or declare the datatype the data has"
            )


def _reject(
    data: list[Any], datatype: str, where: str, wanted: str, ok: Callable[[object], bool]
) -> None:
    _find_bad(data, datatype, where, wanted, ok)
    raise BadRequest(f"{where}: {datatype} data must be {wanted}; send {datatype} values")


def _is_bool(value: object) -> bool:
    return type(value) is bool


def _is_int(value: object) -> bool:
    return type(value) is int


def _is_number(value: object) -> bool:
    return type(value) is int or type(value) is float


def _bytes_from_list(data: list[Any], shape: tuple[int, ...], where: str, allow_bin: bool) -> Array:
    try:
        nested = np.array(data, dtype=object)
    except ValueError:  # more than 64 levels of lists
        raise BadRequest(
            f'{where}: "data" is nested too deeply; send a flat list of strings'
        ) from None
    found = _fit_shape(nested, shape, where)
    wanted = "strings or bin" if allow_bin else "strings"
    items: list[bytes] = []
    for index, value in enumerate(found.ravel().tolist()):
        if type(value) is str:
            items.append(_encode(value, index, where))
        elif allow_bin and type(value) is bytes:
            items.append(value)
        else:
            raise BadRequest(
                f"{where}: BYTES data must be {wanted}, got {show(value)} at element {index}; "
                "send one string per element, nested as the shape or flat"
            )
    return _object_array(items, shape)


def _encode(value: str, index: int, where: str) -> bytes:
    try:
        return value.encode()
    except UnicodeEncodeError:
        raise BadRequest(
            f"{where}: BYTES element {index} is not encodable as utf-8 (a lone surrogate); "
            "send valid unicode text, or raw bytes with the binary extension"
        ) from None


def _object_array(items: list[bytes], shape: tuple[int, ...]) -> Array:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def _as_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8", "surrogatepass")
    return str(item).encode()  # as tritonclient does for non-string objects


def _as_text(item: bytes, index: int, where: str) -> str:
    try:
        return item.decode()
    except UnicodeDecodeError:
        raise BadRequest(
            f"{where}: element {index} is not valid utf-8 text, so it cannot be sent as JSON; "
            'ask for this output in binary ("binary_data": true, or "binary_data_output": '
            "true) or use msgpack"
        ) from None
