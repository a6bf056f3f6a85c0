"""Big numeric V2 JSON requests decoded without a Python float per number (pysimdjson).

orjson turns every number of an image's ``"data"`` into a Python float (12,288 of them
for 3x64x64), and numpy then looks at each one again to infer a dtype: together about
1.1 ms of the 1.3 ms a small CNN's JSON request costs. simdjson parses the body in C++
and hands a flat ``"data"`` list over as one buffer of doubles.

Only the narrow, common case is taken: a body of at least ``MIN_BYTES``, an object whose
``"inputs"`` are objects, each ``FP16``/``FP32``/``FP64`` tensor's ``"data"`` a flat list
of finite numbers. Anything else (nested or ragged data, booleans, strings, integers
beyond 64 bits, duplicate keys, invalid JSON) gives None, and the caller decodes the
body the ordinary way, which also words every error. Both ways give the same document,
except that a taken ``"data"`` is a float64 array instead of a list of numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import simdjson

from agent.tensors import Array

#: Below this, orjson is as fast: the buffer only pays for itself on thousands of numbers.
MIN_BYTES = 16_384
_FLOATS = frozenset({"FP16", "FP32", "FP64"})
#: What simdjson raises on input it will not represent the way we ask (the caller falls back).
_REFUSED = (ValueError, TypeError, RuntimeError)


def load_numeric(body: bytes) -> dict[str, Any] | None:
    """The request document with flat floating-point ``data`` as float64 arrays, or None
    when the body is not the common case (see the module docstring)."""
    if len(body) < MIN_BYTES:
        return None
    try:
        return _load(body)
    except _REFUSED:
        return None


def _load(body: bytes) -> dict[str, Any] | None:
    doc = simdjson.Parser().parse(body)  # a parser per call: no document outlives its parser
    if not isinstance(doc, simdjson.Object):
        return None
    inputs = doc.get("inputs")
    if not isinstance(inputs, simdjson.Array):
        return None
    out = _plain_fields(doc, skip="inputs")
    if out is None:
        return None
    tensors: list[dict[str, Any]] = []
    arrays = _arrays(out)
    for item in inputs:
        if not isinstance(item, simdjson.Object):
            return None
        tensor = _plain_fields(item, skip="data")
        if tensor is None:
            return None
        arrays += _arrays(tensor)
        if "data" in item:
            flat = _numbers(item["data"]) if tensor.get("datatype") in _FLOATS else None
            tensor["data"] = flat if flat is not None else _plain(item["data"])
            arrays += 1 if flat is not None else _arrays(tensor["data"])
        tensors.append(tensor)
    out["inputs"] = tensors
    # Every "[" of the body is an array the document accounts for: a list nested inside a
    # taken "data" (which simdjson would flatten) adds one, and so does a "[" in a string
    # (harmless, but then the ordinary way decides).
    if body.count(b"[") != arrays + 1:
        return None
    return out


def _plain_fields(obj: Any, *, skip: str) -> dict[str, Any] | None:
    """An object's members as plain Python values, ``skip`` left out; None on duplicate
    keys (orjson keeps the last of them, simdjson's lookup the first)."""
    keys = list(obj.keys())  # not items(): that would build the skipped value too
    fields = {key: _plain(obj[key]) for key in keys if key != skip}
    if len(fields) + (skip in keys) != len(keys):
        return None
    return fields


def _plain(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _numbers(data: Any) -> Array | None:
    """A flat list of finite numbers as float64, or None."""
    if not isinstance(data, simdjson.Array) or len(data) == 0:
        return None
    flat = np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)
    if flat.size != len(data) or not np.isfinite(flat).all():
        return None
    return flat


def _arrays(value: object) -> int:
    """How many JSON arrays a plain value holds."""
    if isinstance(value, list):
        return 1 + sum(_arrays(v) for v in value)
    if isinstance(value, dict):
        return sum(_arrays(v) for v in value.values())
    return 0
