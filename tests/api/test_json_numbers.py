"""Big numeric JSON requests through simdjson decode exactly as through orjson."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.api import codec_json
from agent.api.json_numbers import MIN_BYTES, load_numeric
from agent.errors import BadRequest
from agent.tensors import InferRequest

LIMIT = 10**8
#: Enough numbers that a body is over MIN_BYTES whatever their digits ("0," is two bytes).
COUNT = MIN_BYTES // 2 + 1


def ordinary(body: bytes) -> InferRequest:
    """The orjson way, which json_numbers must match."""
    return codec_json.parse_request(
        codec_json.load_json(body, "request body"),
        max_elements=LIMIT,
        read_data=codec_json.read_json_data,
    )


def outcome(decode: Any, body: bytes) -> tuple[str, Any]:
    """("ok", request) or ("error", message)."""
    try:
        return "ok", decode(body)
    except BadRequest as exc:
        return "error", exc.message


def same(body: bytes) -> None:
    """decode_request (simdjson when it can) and the orjson way agree, errors included."""
    got = outcome(lambda b: codec_json.decode_request(b, max_elements=LIMIT), body)
    want = outcome(ordinary, body)
    assert got[0] == want[0], (got, want)
    if got[0] == "error":
        assert got[1] == want[1]
        return
    a, b = got[1], want[1]
    assert (a.id, a.outputs, a.parameters, a.binary_output) == (
        b.id,
        b.outputs,
        b.parameters,
        b.binary_output,
    )
    assert a.inputs.keys() == b.inputs.keys()
    for name in a.inputs:
        assert a.inputs[name].dtype == b.inputs[name].dtype
        np.testing.assert_array_equal(a.inputs[name], b.inputs[name])


def body(data: Any, datatype: str = "FP32", shape: list[int] | None = None, **top: Any) -> bytes:
    """A one-input request (integers beyond 64 bits written as JSON allows)."""
    tensor = {"name": "x", "datatype": datatype, "shape": shape or [len(data)], "data": "@"}
    text = orjson.dumps({**top, "inputs": [tensor]})
    numbers = json.dumps(data, separators=(",", ":")).encode()
    return text.replace(b'"@"', numbers)


FLOATS = {
    "FP16": st.floats(-6e4, 6e4, width=16),
    "FP32": st.floats(allow_nan=False, allow_infinity=False, width=32),
    "FP64": st.floats(allow_nan=False, allow_infinity=False),
}


class TestSameAsOrjson:
    @settings(max_examples=30, deadline=None)
    @given(
        datatype=st.sampled_from(sorted(FLOATS)),
        data=st.data(),
        ints=st.booleans(),
        rows=st.integers(1, 4),
        extra=st.fixed_dictionaries(
            {},
            optional={
                "id": st.text(  # a "[" in a string falls back (tested below)
                    st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="["),
                    max_size=8,
                ),
                "outputs": st.just([{"name": "y"}]),
                "parameters": st.just({"priority": 1}),
            },
        ),
    )
    def test_flat_numbers(
        self, datatype: str, data: st.DataObject, ints: bool, rows: int, extra: dict[str, Any]
    ) -> None:
        """Flat float (or integer) data, any shape that holds it, with other fields."""
        per_row = COUNT // rows + 1
        elements = st.integers(-(2**53), 2**53) if ints else FLOATS[datatype]
        values = data.draw(hnp.arrays(np.float64, rows * per_row, elements=elements))
        listed = [int(v) for v in values] if ints else values.tolist()
        encoded = body(listed, datatype, [rows, per_row], **extra)
        doc = load_numeric(encoded)
        assert doc is not None  # the fast way was taken
        assert isinstance(doc["inputs"][0]["data"], np.ndarray)
        same(encoded)

    @pytest.mark.parametrize(
        "data",
        [
            [[1.5] * COUNT],  # nested as the shape
            [[1.5]] * COUNT,  # nested, one element per list: flattening would hide it
            [1.5, [2.5], *[0.5] * COUNT],  # ragged
            [True, *[0.5] * COUNT],
            [None, *[0.5] * COUNT],
            ["1.5", *[0.5] * COUNT],
            [10**30, *[0.5] * COUNT],  # beyond 64 bits
            [1e300, *[0.5] * COUNT],  # beyond FP32
        ],
    )
    def test_uncommon_data_falls_back_with_the_same_outcome(self, data: list[Any]) -> None:
        """Nested, ragged, non-numeric and out-of-range data: the ordinary way decides."""
        encoded = body(data, "FP32", [1, len(data)] if len(data) > 1 else [1, COUNT])
        same(encoded)

    def test_nested_data_is_not_taken(self) -> None:
        """simdjson would flatten nested lists; the bracket count sends them back."""
        assert load_numeric(body([[0.5]] * COUNT, "FP32", [COUNT, 1])) is None

    def test_duplicate_keys_fall_back(self) -> None:
        """orjson keeps the last of duplicate keys; the fast way does not guess."""
        first, second = ",".join(["0.5"] * COUNT), ",".join(["1.5"] * COUNT)
        encoded = (
            f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[{COUNT}],'
            f'"data":[{first}],"data":[{second}]}}]}}'
        ).encode()
        assert load_numeric(encoded) is None
        same(encoded)

    def test_bracket_in_a_string_falls_back(self) -> None:
        """A "[" inside a string cannot be told from nesting: the ordinary way decodes."""
        encoded = body([0.5] * COUNT, id="a[b")
        assert load_numeric(encoded) is None
        same(encoded)

    def test_integer_datatypes_and_small_bodies_are_left_alone(self) -> None:
        """INT tensors and bodies under MIN_BYTES are orjson's."""
        doc = load_numeric(body([1] * COUNT, "INT64"))
        assert doc is not None  # the document is taken...
        assert isinstance(doc["inputs"][0]["data"], list)  # ...but its data stays a list
        assert load_numeric(body([0.5] * 10)) is None

    @given(st.binary(min_size=1, max_size=64).map(lambda b: b * (MIN_BYTES // len(b) + 1)))
    @settings(max_examples=20, deadline=None)
    def test_garbage_is_refused_quietly(self, data: bytes) -> None:
        """Invalid JSON is None (the ordinary way then says where it breaks)."""
        assert load_numeric(data) is None
        same(data)
