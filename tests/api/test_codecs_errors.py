"""Malformed V2 bodies: every codec answers BadRequest with a message that says what and how."""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import msgpack
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.api import codec_binary, codec_json, codec_msgpack
from agent.errors import BadRequest
from agent.tensors import InferRequest, InferResponse

LIMIT = 10_000
FUZZ = settings(max_examples=300, deadline=None)


def tensor(data: Any = None, **fields: Any) -> dict[str, Any]:
    """An input document: a 2x2 FP32 tensor unless fields say otherwise."""
    document = {
        "name": "x",
        "shape": [2, 2],
        "datatype": "FP32",
        "data": [1, 2, 3, 4] if data is None else data,
    }
    document.update(fields)
    return document


def json_error(document: Any, max_elements: int = LIMIT) -> str:
    """The message of the BadRequest that decoding ``document`` as JSON raises."""
    with pytest.raises(BadRequest) as caught:
        # the standard library writes integers beyond 64 bits, which orjson refuses to
        codec_json.decode_request(json.dumps(document).encode(), max_elements=max_elements)
    return caught.value.message


def binary_error(header: Any, tail: bytes, header_length: int | None = None) -> str:
    """The message of the BadRequest that decoding a binary-extension body raises."""
    head = orjson.dumps(header)
    with pytest.raises(BadRequest) as caught:
        codec_binary.decode_request(
            head + tail, len(head) if header_length is None else header_length, max_elements=LIMIT
        )
    return caught.value.message


def binary_input(size: int, **fields: Any) -> dict[str, Any]:
    """An input document whose data travels in the binary part."""
    document: dict[str, Any] = {"name": "x", "shape": [2], "datatype": "INT32"}
    document.update(fields)
    document["parameters"] = {"binary_data_size": size}
    return document


class TestJsonDocument:
    def test_invalid_json_says_where(self) -> None:
        """A syntax error names the line and column."""
        with pytest.raises(BadRequest, match=r"not valid JSON: .* line 2 column 9"):
            codec_json.decode_request(b'{"inputs":\n  [1, 2,, 3]}', max_elements=LIMIT)

    def test_top_level_must_be_an_object(self) -> None:
        """A JSON list at the top level is refused with the expected shape."""
        assert "must be an object, got [1,2]" in json_error([1, 2])

    def test_id_must_be_a_string(self) -> None:
        """A numeric request id is refused."""
        assert '"id" must be a string, got 42' in json_error({"id": 42, "inputs": [tensor()]})

    def test_id_must_be_printable(self) -> None:
        """A request id with a line break is refused: it would end the X-Request-ID header."""
        message = json_error({"id": "a\r\nSet-Cookie: x", "inputs": [tensor()]})
        assert '"id" must be printable text' in message
        assert "remove control characters" in message

    def test_inputs_are_required(self) -> None:
        """A request without inputs is refused."""
        assert '"inputs" must be a list, got null' in json_error({"id": "a"})

    def test_inputs_may_not_be_empty(self) -> None:
        """A request with an empty inputs list is refused."""
        assert "has no inputs" in json_error({"inputs": []})

    def test_input_must_be_an_object(self) -> None:
        """An input that is not an object is refused, naming its position."""
        assert "inputs[0] must be an object" in json_error({"inputs": ["x"]})

    def test_input_needs_a_name(self) -> None:
        """An input without a name is refused."""
        assert 'inputs[0] needs a "name"' in json_error({"inputs": [tensor(name=None)]})

    def test_duplicate_input_names(self) -> None:
        """The same input twice is refused."""
        assert 'input "x" appears more than once' in json_error({"inputs": [tensor(), tensor()]})

    def test_data_is_required(self) -> None:
        """An input without data is refused, pointing at data and binary_data_size."""
        document = tensor()
        del document["data"]
        assert 'input "x" has no "data"' in json_error({"inputs": [document]})

    def test_parameters_must_be_an_object(self) -> None:
        """Request parameters that are not an object are refused."""
        assert '"parameters" of the request' in json_error({"parameters": 3, "inputs": [tensor()]})

    def test_binary_data_output_must_be_boolean(self) -> None:
        """binary_data_output given as a string is refused."""
        document = {"parameters": {"binary_data_output": "yes"}, "inputs": [tensor()]}
        assert '"binary_data_output" must be true or false, got "yes"' in json_error(document)

    def test_duplicate_requested_outputs(self) -> None:
        """The same requested output twice is refused."""
        document = {"inputs": [tensor()], "outputs": [{"name": "y"}, {"name": "y"}]}
        assert 'requested output "y" appears more than once' in json_error(document)

    def test_classification_is_refused(self) -> None:
        """The classification extension is refused rather than ignored."""
        document = {
            "inputs": [tensor()],
            "outputs": [{"name": "y", "parameters": {"classification": 3}}],
        }
        assert "classification extension is not supported" in json_error(document)

    def test_shared_memory_is_refused(self) -> None:
        """Shared-memory inputs are refused rather than read as missing data."""
        document = tensor(parameters={"shared_memory_region": "r"})
        assert "shared memory is not supported" in json_error({"inputs": [document]})


class TestJsonTensor:
    def test_unknown_datatype(self) -> None:
        """An unknown datatype names the valid ones."""
        message = json_error({"inputs": [tensor(datatype="FLOAT32")]})
        assert message.startswith(
            'unknown datatype "FLOAT32" for input "x"; use one of BOOL, UINT8,'
        )
        assert message.endswith("FP64, BYTES")

    @pytest.mark.parametrize("shape", [[2, -1], [2.0, 2], "2x2", [True, 4], None])
    def test_shape_must_be_non_negative_integers(self, shape: Any) -> None:
        """Negative, fractional, boolean or missing dims are refused."""
        assert '"shape" must be a list of non-negative integers' in json_error(
            {"inputs": [tensor(shape=shape)]}
        )

    def test_size_mismatch(self) -> None:
        """Data with fewer elements than the shape holds is refused with both counts."""
        message = json_error({"inputs": [tensor(list(range(12)), shape=[3, 5])]})
        assert message == (
            'input "x": shape [3, 5] holds 15 elements but data has 12; '
            "send shape and data of the same size"
        )

    def test_nesting_must_match_shape(self) -> None:
        """Nested data must be nested exactly as the shape."""
        message = json_error({"inputs": [tensor([[1, 2, 3, 4]], shape=[4, 1])]})
        assert "data is nested as [1, 4] but shape is [4, 1]" in message

    def test_ragged_nesting(self) -> None:
        """Unevenly nested data is refused."""
        assert "nested unevenly" in json_error({"inputs": [tensor([[1, 2], [3]], shape=[3])]})

    def test_string_for_float(self) -> None:
        """A string in FP32 data is refused, naming the value and its position."""
        message = json_error({"inputs": [tensor([1, 2, "abc", 4])]})
        assert 'FP32 data must be numbers, got "abc" at element 2' in message

    def test_fraction_for_int(self) -> None:
        """3.5 in INT32 data is refused."""
        message = json_error({"inputs": [tensor([1, 3.5], shape=[2], datatype="INT32")]})
        assert (
            "INT32 data must be whole numbers (no decimal point), got 3.5 at element 1" in message
        )

    @pytest.mark.parametrize(
        ("datatype", "value"),
        [("INT8", 300), ("UINT8", -1), ("UINT64", 2**64), ("INT64", 2**63), ("UINT16", 70000)],
    )
    def test_out_of_range_int(self, datatype: str, value: int) -> None:
        """Integers outside the datatype's range are refused with the range."""
        message = json_error({"inputs": [tensor([0, value], shape=[2], datatype=datatype)]})
        assert f"{datatype} data must lie in [" in message
        assert f"got {value}" in message

    @pytest.mark.parametrize(("datatype", "value"), [("FP32", 1e39), ("FP16", 70000)])
    def test_out_of_range_float(self, datatype: str, value: float) -> None:
        """Numbers that would become infinite in the datatype are refused."""
        message = json_error({"inputs": [tensor([0, value], shape=[2], datatype=datatype)]})
        assert f"at element 1 is out of range for {datatype}" in message

    def test_bool_needs_booleans(self) -> None:
        """BOOL data given as 0/1 is refused."""
        message = json_error({"inputs": [tensor([1, 0], shape=[2], datatype="BOOL")]})
        assert "BOOL data must be JSON booleans (true or false), got 1 at element 0" in message

    def test_boolean_for_float(self) -> None:
        """FP32 data given as booleans is refused."""
        message = json_error({"inputs": [tensor([True, False], shape=[2])]})
        assert "FP32 data must be numbers, got true at element 0" in message

    def test_null_in_data(self) -> None:
        """A null among numbers is refused."""
        assert "got null at element 1" in json_error({"inputs": [tensor([1, None, 3, 4])]})

    def test_bytes_need_strings(self) -> None:
        """BYTES data given as numbers is refused."""
        message = json_error({"inputs": [tensor([1, 2], shape=[2], datatype="BYTES")]})
        assert "BYTES data must be strings, got 1 at element 0" in message

    def test_data_must_be_a_list(self) -> None:
        """A bare scalar as data is refused."""
        assert '"data" must be a list, got 5' in json_error({"inputs": [tensor(5, shape=[1])]})

    def test_element_limit_checked_before_data(self) -> None:
        """A huge shape is refused for the element limit before its data is looked at."""
        message = json_error({"inputs": [tensor([1], shape=[100, 101])]})
        assert "holds 10100 elements, and a request may hold at most 10000" in message

    def test_element_limit_sums_inputs(self) -> None:
        """The element limit applies to all inputs of a request together."""
        first = tensor([0] * 6, shape=[6])
        second = tensor([0] * 6, name="y", shape=[6])
        assert 'input "y": shape [6] holds 6 elements' in json_error(
            {"inputs": [first, second]}, 10
        )

    def test_huge_dimension_of_empty_tensor(self) -> None:
        """A zero-size shape with an absurd dimension is refused, not allocated."""
        message = json_error({"inputs": [tensor([], shape=[0, 2**62])]})
        assert "has a dimension over the limit of 10000 elements" in message


class TestBinaryBody:
    def test_header_length_with_thousands_of_digits_is_a_400(self) -> None:
        """A 5000-digit Inference-Header-Content-Length is refused, not a crash (Python
        will not convert that many digits to an int)."""
        with pytest.raises(BadRequest, match="byte length of the JSON header"):
            codec_binary.parse_header_length("1" * 5000)

    def test_header_length_not_a_number(self) -> None:
        """A non-numeric Inference-Header-Content-Length is refused."""
        with pytest.raises(
            BadRequest, match='must be the byte length of the JSON header, got "12a"'
        ):
            codec_binary.parse_header_length("12a")

    @pytest.mark.parametrize("header_length", [0, -1, 1000])
    def test_header_length_beyond_body(self, header_length: int) -> None:
        """A header length of zero, negative or past the body's end is refused."""
        message = binary_error({"inputs": [binary_input(8)]}, bytes(8), header_length)
        assert f"Inference-Header-Content-Length is {header_length} but the body has" in message

    def test_header_length_cuts_json(self) -> None:
        """A header length that cuts the JSON short reports invalid JSON in the header."""
        assert "the JSON header" in binary_error({"inputs": [binary_input(8)]}, bytes(8), 10)

    def test_too_few_bytes(self) -> None:
        """A binary_data_size past the end of the body is refused."""
        message = binary_error({"inputs": [binary_input(8)]}, bytes(5))
        assert "binary_data_size is 8 but only 5 bytes of binary data remain" in message

    def test_leftover_bytes(self) -> None:
        """Bytes that no input claims are refused."""
        message = binary_error({"inputs": [binary_input(8)]}, bytes(12))
        assert "4 bytes after the JSON header that no tensor claims" in message

    def test_size_must_match_shape(self) -> None:
        """A binary_data_size that is not shape times element size is refused."""
        message = binary_error({"inputs": [binary_input(6)]}, bytes(6))
        assert "shape [2] of INT32 needs 8 bytes (2 elements of 4) but data has 6" in message

    @pytest.mark.parametrize("size", [-1, 2.5, "8", True])
    def test_size_must_be_a_count(self, size: Any) -> None:
        """A binary_data_size that is not a non-negative integer is refused."""
        message = binary_error({"inputs": [binary_input(size)]}, bytes(8))
        assert "binary_data_size must be a non-negative integer" in message

    def test_data_and_binary_size(self) -> None:
        """An input carrying both JSON data and binary_data_size is refused."""
        message = binary_error({"inputs": [binary_input(8, data=[1, 2])]}, bytes(8))
        assert 'has both "data" and binary_data_size' in message

    def test_bool_bytes_are_zero_or_one(self) -> None:
        """Raw BOOL bytes other than 0 and 1 are refused."""
        message = binary_error({"inputs": [binary_input(2, datatype="BOOL")]}, b"\x01\x02")
        assert "BOOL data must be bytes 0 or 1" in message

    def test_bytes_framing_truncated_prefix(self) -> None:
        """BYTES data that ends inside a length prefix is refused."""
        tail = struct.pack("<I", 1) + b"a" + b"\x00\x00"
        message = binary_error({"inputs": [binary_input(len(tail), datatype="BYTES")]}, tail)
        assert "BYTES data ends after 1 of 2 elements" in message

    def test_bytes_framing_length_too_long(self) -> None:
        """A BYTES element longer than the data left is refused."""
        tail = struct.pack("<I", 1) + b"a" + struct.pack("<I", 50) + b"bc"
        message = binary_error({"inputs": [binary_input(len(tail), datatype="BYTES")]}, tail)
        assert "BYTES element 1 declares 50 bytes but only 2 remain" in message

    def test_bytes_framing_extra_elements(self) -> None:
        """BYTES data holding more elements than the shape is refused."""
        tail = (struct.pack("<I", 1) + b"a") * 3
        message = binary_error({"inputs": [binary_input(len(tail), datatype="BYTES")]}, tail)
        assert "BYTES data has 5 bytes left after the 2 elements" in message


class TestEncoding:
    def test_invalid_utf8_cannot_be_json(self) -> None:
        """A BYTES output that is not utf-8 cannot go out as JSON; the message says use binary."""
        output = np.array([b"ok", b"\xff\xfe"], dtype=object)
        with pytest.raises(BadRequest, match=r"element 1 is not valid utf-8.*binary_data"):
            codec_binary.encode_response(InferResponse("m", "1", "r", {"y": output}))

    def test_invalid_utf8_can_be_binary(self) -> None:
        """The same output encodes when it is asked for in binary."""
        output = np.array([b"ok", b"\xff\xfe"], dtype=object)
        response = InferResponse("m", "1", "r", {"y": output}, binary=frozenset({"y"}))
        body, header_length = codec_binary.encode_response(response)
        assert codec_binary.decode_response(body, header_length).outputs["y"].tolist() == [
            b"ok",
            b"\xff\xfe",
        ]


class TestMsgpack:
    def test_invalid_msgpack(self) -> None:
        """Bytes that are not msgpack are refused."""
        with pytest.raises(BadRequest, match="not valid msgpack"):
            codec_msgpack.decode_request(b"\xc1", max_elements=LIMIT)

    def test_not_a_map(self) -> None:
        """A msgpack list at the top level is refused."""
        with pytest.raises(BadRequest, match="must be an object"):
            codec_msgpack.decode_request(msgpack.packb([1]), max_elements=LIMIT)

    def test_raw_size_mismatch(self) -> None:
        """Raw bin data of the wrong length is refused with the expected byte count."""
        body = msgpack.packb({"inputs": [tensor(b"\x00" * 15)]})
        with pytest.raises(BadRequest, match=r"needs 16 bytes \(4 elements of 4\) but data has 15"):
            codec_msgpack.decode_request(body, max_elements=LIMIT)

    def test_bytes_need_a_list(self) -> None:
        """BYTES data given as one bin is refused."""
        body = msgpack.packb({"inputs": [tensor(b"abc", shape=[1], datatype="BYTES")]})
        with pytest.raises(BadRequest, match="BYTES data must be a list of bin or str"):
            codec_msgpack.decode_request(body, max_elements=LIMIT)

    def test_list_checks_match_json(self) -> None:
        """List data gets the same checks as JSON (here a fraction for INT32)."""
        body = msgpack.packb({"inputs": [tensor([1, 2.5], shape=[2], datatype="INT32")]})
        with pytest.raises(BadRequest, match="INT32 data must be whole numbers"):
            codec_msgpack.decode_request(body, max_elements=LIMIT)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
DATATYPE_NAMES = st.sampled_from(["FP32", "FP16", "INT8", "UINT64", "BOOL", "BYTES", "FLOAT", ""])


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """Request documents with plausible keys and arbitrary, often wrong, values."""
    fields = {
        "name": st.text(max_size=3) | SCALARS,
        "shape": st.lists(st.integers(-2, 5), max_size=4) | VALUES,
        "datatype": DATATYPE_NAMES | SCALARS,
        "data": VALUES,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-1, 9)})
        | VALUES,
    }
    inputs = st.lists(st.fixed_dictionaries({}, optional=fields) | VALUES, max_size=3)
    top = {
        "id": st.text(max_size=3) | SCALARS,
        "inputs": inputs | VALUES,
        "outputs": st.lists(st.fixed_dictionaries({}, optional={"name": SCALARS}), max_size=2)
        | VALUES,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": SCALARS}) | VALUES,
    }
    return draw(st.fixed_dictionaries({}, optional=top))


def _decodes_or_bad_request(decode: Any, *args: Any, **kwargs: Any) -> None:
    """Call a decoder; a BadRequest is fine, any other exception fails the test."""
    with contextlib.suppress(BadRequest):
        decode(*args, **kwargs)


class TestFuzz:
    @FUZZ
    @given(body=st.binary(max_size=200))
    def test_arbitrary_bytes_as_json(self, body: bytes) -> None:
        """Arbitrary bytes given to the JSON decoder raise nothing but BadRequest."""
        _decodes_or_bad_request(codec_json.decode_request, body, max_elements=LIMIT)

    @FUZZ
    @given(body=st.binary(max_size=200), header_length=st.integers(-2, 220))
    def test_arbitrary_bytes_as_binary(self, body: bytes, header_length: int) -> None:
        """Arbitrary bytes given to the binary decoder raise nothing but BadRequest."""
        _decodes_or_bad_request(
            codec_binary.decode_request, body, header_length, max_elements=LIMIT
        )

    @FUZZ
    @given(body=st.binary(max_size=200))
    def test_arbitrary_bytes_as_msgpack(self, body: bytes) -> None:
        """Arbitrary bytes given to the msgpack decoder raise nothing but BadRequest."""
        _decodes_or_bad_request(codec_msgpack.decode_request, body, max_elements=LIMIT)

    @FUZZ
    @given(document=documents(), tail=st.binary(max_size=12))
    def test_wrong_documents(self, document: dict[str, Any], tail: bytes) -> None:
        """Well-formed documents with wrong values raise nothing but BadRequest in any codec."""
        head = orjson.dumps(document)
        _decodes_or_bad_request(codec_json.decode_request, head, max_elements=LIMIT)
        _decodes_or_bad_request(
            codec_binary.decode_request, head + tail, len(head), max_elements=LIMIT
        )
        _decodes_or_bad_request(
            codec_msgpack.decode_request, msgpack.packb(document), max_elements=LIMIT
        )

    @FUZZ
    @given(document=documents())
    def test_decoded_requests_are_consistent(self, document: dict[str, Any]) -> None:
        """Whatever a wrong-looking document decodes to has arrays matching their shapes."""
        try:
            request = codec_json.decode_request(orjson.dumps(document), max_elements=LIMIT)
        except BadRequest:
            return
        assert isinstance(request, InferRequest)
        for array, spec in zip(request.inputs.values(), document["inputs"], strict=True):
            assert list(array.shape) == spec["shape"]
