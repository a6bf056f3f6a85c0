"""Round trips of the V2 codecs (JSON, binary extension, msgpack); tritonclient compatibility."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.api import codec_binary, codec_json, codec_msgpack
from agent.tensors import (
    V2_TO_NUMPY,
    Array,
    InferRequest,
    InferResponse,
    RequestedOutput,
    v2_datatype,
)

LIMIT = 1_000_000
DATATYPES = tuple(V2_TO_NUMPY)
SHAPES = st.one_of(
    st.sampled_from([(), (0,), (1,), (2, 0), (1, 3, 2, 2)]),
    hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=3),
)
FAST = settings(max_examples=60, deadline=None)


def _elements(datatype: str, finite: bool) -> st.SearchStrategy[Any] | None:
    dtype = V2_TO_NUMPY[datatype]
    if dtype.kind != "f":
        return None
    return st.floats(width=dtype.itemsize * 8, allow_nan=not finite, allow_infinity=not finite)


def object_array(items: list[Any], shape: tuple[int, ...]) -> Array:
    """An object array of the given elements (numpy would otherwise guess a str/bytes dtype)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


@st.composite
def tensors(
    draw: st.DrawFn,
    datatypes: tuple[str, ...] = DATATYPES,
    *,
    finite: bool = False,
    text: bool = False,
) -> Array:
    """Arrays of any V2 datatype; ``text`` keeps BYTES utf-8, ``finite`` drops NaN and inf."""
    datatype = draw(st.sampled_from(datatypes))
    shape = draw(SHAPES)
    if datatype != "BYTES":
        dtype = V2_TO_NUMPY[datatype]
        return draw(hnp.arrays(dtype, shape, elements=_elements(datatype, finite)))
    size = math.prod(shape)
    element = st.text(max_size=6).map(str.encode) if text else st.binary(max_size=6)
    return object_array(draw(st.lists(element, min_size=size, max_size=size)), shape)


#: Request ids: printable text (a control character is refused; it goes into a header).
IDS = st.text(st.characters(codec="utf-8").filter(str.isprintable), max_size=8)


@st.composite
def requests(draw: st.DrawFn, *, finite: bool = False, text: bool = False) -> InferRequest:
    """Requests of one to three inputs with ids, requested outputs and parameters."""
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3, unique=True))
    output = st.builds(RequestedOutput, st.text(min_size=1, max_size=5), st.none() | st.booleans())
    outputs = st.lists(output, max_size=3, unique_by=lambda out: out.name).map(tuple)
    keys = st.text(max_size=5).filter(lambda key: key != "binary_data_output")
    return InferRequest(
        inputs={name: draw(tensors(finite=finite, text=text)) for name in names},
        id=draw(st.none() | IDS),
        outputs=draw(st.none() | outputs),
        binary_output=draw(st.booleans()),
        parameters=draw(
            st.dictionaries(keys, st.integers(-5, 5) | st.text(max_size=4), max_size=2)
        ),
    )


@st.composite
def responses(draw: st.DrawFn, *, finite: bool = False, text: bool = False) -> InferResponse:
    """Responses of one to three outputs, some of them binary."""
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3, unique=True))
    return InferResponse(
        model_name=draw(st.text(min_size=1, max_size=8)),
        model_version=draw(st.sampled_from(["1", "12", ""])),
        id=draw(st.text(max_size=8)),
        outputs={name: draw(tensors(finite=finite, text=text)) for name in names},
        binary=frozenset(draw(st.lists(st.sampled_from(names), max_size=3))),
        parameters=draw(st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2)),
    )


def assert_same(actual: Array, expected: Array) -> None:
    """Same shape, same datatype, same elements (numeric bit for bit; BYTES as bytes)."""
    assert actual.shape == expected.shape
    assert v2_datatype(actual) == v2_datatype(expected)
    if v2_datatype(expected) == "BYTES":
        assert actual.dtype == object
        assert actual.ravel().tolist() == expected.ravel().tolist()
    else:
        assert actual.dtype == expected.dtype
        assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes()


def assert_same_request(actual: InferRequest, expected: InferRequest) -> None:
    """Every field of two requests agrees."""
    assert (actual.id, actual.outputs) == (expected.id, expected.outputs)
    assert (actual.binary_output, actual.parameters) == (
        expected.binary_output,
        expected.parameters,
    )
    assert list(actual.inputs) == list(expected.inputs)
    for name, array in expected.inputs.items():
        assert_same(actual.inputs[name], array)


def assert_same_response(actual: InferResponse, expected: InferResponse) -> None:
    """Every field of two responses agrees (``binary`` only for the binary codec)."""
    assert (actual.model_name, actual.model_version) == (
        expected.model_name,
        expected.model_version,
    )
    assert (actual.id, actual.parameters) == (expected.id, expected.parameters)
    assert list(actual.outputs) == list(expected.outputs)
    for name, array in expected.outputs.items():
        assert_same(actual.outputs[name], array)


class TestJsonRoundTrip:
    @FAST
    @given(request=requests(finite=True, text=True))
    def test_request_round_trips(self, request: InferRequest) -> None:
        """A request encoded as JSON decodes to the same request, for every datatype and shape."""
        body = codec_json.encode_request(request)
        assert_same_request(codec_json.decode_request(body, max_elements=LIMIT), request)

    @FAST
    @given(array=tensors(finite=True, text=True))
    def test_nested_data_decodes(self, array: Array) -> None:
        """Data nested exactly as the shape decodes like flat data."""
        values = array.ravel().tolist()
        if array.dtype == object:
            values = [item.decode() for item in values]
        nested = object_array(values, array.shape).tolist() if array.ndim else values
        tensor = {"name": "x", "shape": list(array.shape), "datatype": v2_datatype(array)}
        body = orjson.dumps({"inputs": [{**tensor, "data": nested}]})
        assert_same(codec_json.decode_request(body, max_elements=LIMIT).inputs["x"], array)

    def test_image_tensor_decodes_nested(self) -> None:
        """A 1x3x64x64 FP32 image sent as nested lists decodes to the same float32 values."""
        image = np.random.default_rng(7).random((1, 3, 64, 64), dtype=np.float32)
        document = {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 3, 64, 64],
                    "datatype": "FP32",
                    "data": image.tolist(),
                }
            ]
        }
        request = codec_json.decode_request(orjson.dumps(document), max_elements=LIMIT)
        assert_same(request.inputs["image"], image)

    def test_big_uint64_values_are_exact(self) -> None:
        """UINT64 values on both sides of 2**63 decode exactly (numpy alone would infer float64)."""
        document = {
            "inputs": [{"name": "x", "shape": [3], "datatype": "UINT64", "data": [0, 5, 2**64 - 1]}]
        }
        request = codec_json.decode_request(orjson.dumps(document), max_elements=LIMIT)
        assert request.inputs["x"].tolist() == [0, 5, 2**64 - 1]

    def test_binary_data_output_is_lifted(self) -> None:
        """The request parameter binary_data_output becomes binary_output, other parameters stay."""
        document = {
            "id": "r1",
            "parameters": {"binary_data_output": True, "priority": 2},
            "inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1]}],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
        }
        request = codec_json.decode_request(orjson.dumps(document), max_elements=LIMIT)
        assert (request.id, request.binary_output, request.parameters) == (
            "r1",
            True,
            {"priority": 2},
        )
        assert request.outputs == (RequestedOutput("y", False), RequestedOutput("z", None))

    @FAST
    @given(response=responses(finite=True, text=True))
    def test_all_json_response_round_trips(self, response: InferResponse) -> None:
        """A response with no binary output is plain JSON that decode_response reads back."""
        plain = InferResponse(
            response.model_name,
            response.model_version,
            response.id,
            response.outputs,
            parameters=response.parameters,
        )
        body, header_length = codec_binary.encode_response(plain)
        assert header_length is None
        assert_same_response(codec_json.decode_response(body), plain)

    def test_str_outputs_encode_as_utf8(self) -> None:
        """Object arrays of str (as onnxruntime returns) go out as utf-8 strings."""
        labels = object_array(["chat", "héllo"], (2,))
        response = InferResponse("m", "1", "r", {"label": labels})
        body, _ = codec_binary.encode_response(response)
        assert orjson.loads(body)["outputs"][0]["data"] == ["chat", "héllo"]


class TestBinaryRoundTrip:
    @FAST
    @given(request=requests())
    def test_request_round_trips(self, request: InferRequest) -> None:
        """A request with binary inputs decodes to the same request, NaN and raw bytes included."""
        body, header_length = codec_binary.encode_request(request, binary_inputs=True)
        assert header_length is not None
        decoded = codec_binary.decode_request(body, header_length, max_elements=LIMIT)
        assert_same_request(decoded, request)

    @FAST
    @given(request=requests(finite=True, text=True))
    def test_json_inputs_make_a_plain_json_request(self, request: InferRequest) -> None:
        """Without binary inputs the request is plain JSON that the JSON codec decodes."""
        body, header_length = codec_binary.encode_request(request, binary_inputs=False)
        assert header_length is None
        assert_same_request(codec_json.decode_request(body, max_elements=LIMIT), request)

    @FAST
    @given(response=responses())
    def test_response_round_trips(self, response: InferResponse) -> None:
        """Binary outputs come back bit for bit, JSON outputs by value, and each keeps its form."""
        response = _binary_for_raw_bytes(response)
        body, header_length = codec_binary.encode_response(response)
        decoded = codec_binary.decode_response(body, header_length)
        assert_same_response(decoded, response)
        assert decoded.binary == response.binary & set(response.outputs)

    def test_inputs_are_views_of_the_body(self) -> None:
        """Binary inputs are decoded zero-copy: the array shares memory with the body."""
        array = np.arange(12, dtype=np.float32).reshape(3, 4)
        body, header_length = codec_binary.encode_request(
            InferRequest({"x": array}), binary_inputs=True
        )
        assert header_length is not None
        decoded = codec_binary.decode_request(body, header_length, max_elements=LIMIT).inputs["x"]
        assert np.shares_memory(decoded, np.frombuffer(body, dtype=np.uint8))

    def test_header_length_parses(self) -> None:
        """The Inference-Header-Content-Length header value parses as a byte count."""
        assert codec_binary.parse_header_length(" 128 ") == 128

    def test_non_contiguous_output_encodes(self) -> None:
        """A transposed (non-contiguous) output is sent in row-major order of its shape."""
        array = np.arange(6, dtype=np.float64).reshape(2, 3).T
        response = InferResponse("m", "1", "r", {"y": array, "z": array}, binary=frozenset({"y"}))
        body, header_length = codec_binary.encode_response(response)
        decoded = codec_binary.decode_response(body, header_length)
        assert_same(decoded.outputs["y"], array)
        assert_same(decoded.outputs["z"], array)


def _binary_for_raw_bytes(response: InferResponse) -> InferResponse:
    """Outputs JSON cannot carry exactly (NaN, inf, non-utf-8 BYTES) are made binary."""
    binary = set(response.binary)
    for name, array in response.outputs.items():
        if array.dtype == object:
            if not all(_is_utf8(item) for item in array.ravel().tolist()):
                binary.add(name)
        elif array.dtype.kind == "f" and not np.isfinite(array).all():
            binary.add(name)
    return InferResponse(
        response.model_name,
        response.model_version,
        response.id,
        response.outputs,
        frozenset(binary),
        response.parameters,
    )


def _is_utf8(item: bytes) -> bool:
    try:
        item.decode()
    except UnicodeDecodeError:
        return False
    return True


class TestTritonclientCompatibility:
    @FAST
    @given(array=tensors(finite=True, text=True), binary=st.booleans(), request_id=IDS)
    def test_client_request_decodes(self, array: Array, binary: bool, request_id: str) -> None:
        """A request built by tritonclient.http, binary or JSON, decodes to the client's array."""
        infer_input = httpclient.InferInput("x", list(array.shape), v2_datatype(array))
        infer_input.set_data_from_numpy(array, binary_data=binary)
        body, header_length = httpclient.InferenceServerClient.generate_request_body(
            [infer_input], request_id=request_id
        )
        request = (
            codec_json.decode_request(body, max_elements=LIMIT)
            if header_length is None
            else codec_binary.decode_request(body, header_length, max_elements=LIMIT)
        )
        assert request.id == (request_id or None)
        assert request.binary_output
        assert_same(request.inputs["x"], array)

    def test_client_requested_outputs_decode(self) -> None:
        """tritonclient's requested outputs carry their binary_data flags."""
        infer_input = httpclient.InferInput("x", [2], "FP32").set_data_from_numpy(
            np.ones(2, np.float32)
        )
        outputs = [
            httpclient.InferRequestedOutput("y", binary_data=False),
            httpclient.InferRequestedOutput("z"),
        ]
        body, header_length = httpclient.InferenceServerClient.generate_request_body(
            [infer_input], outputs=outputs
        )
        assert header_length is not None
        request = codec_binary.decode_request(body, header_length, max_elements=LIMIT)
        assert request.outputs == (RequestedOutput("y", False), RequestedOutput("z", True))
        assert not request.binary_output

    @FAST
    @given(array=tensors(finite=True, text=True), binary=st.booleans())
    def test_client_parses_response(self, array: Array, binary: bool) -> None:
        """tritonclient.http parses our response, binary or JSON, back to the array."""
        response = InferResponse(
            "m", "1", "r", {"y": array}, binary=frozenset({"y"} if binary else ())
        )
        body, header_length = codec_binary.encode_response(response)
        result = httpclient.InferenceServerClient.parse_response_body(
            body, header_length=header_length
        )
        got = result.as_numpy("y")
        if array.dtype == object and not binary:
            got = object_array([item.encode() for item in got.ravel().tolist()], got.shape)
        assert_same(got, array)

    def test_client_parses_mixed_outputs(self) -> None:
        """With binary and JSON outputs interleaved, tritonclient finds each one's bytes."""
        outputs = {
            "a": np.arange(6, dtype=np.int64).reshape(2, 3),
            "b": np.array([0.5, -1.25], dtype=np.float16),
            "c": object_array([b"\x00\xff", b"", b"ok"], (3,)),
            "d": np.array([[True], [False]]),
        }
        response = InferResponse("m", "1", "r", outputs, binary=frozenset({"a", "c"}))
        body, header_length = codec_binary.encode_response(response)
        result = httpclient.InferenceServerClient.parse_response_body(
            body, header_length=header_length
        )
        for name, array in outputs.items():
            assert_same(result.as_numpy(name), array)
        assert result.get_response()["id"] == "r"


class TestMsgpackRoundTrip:
    @FAST
    @given(request=requests(), raw=st.booleans())
    def test_request_round_trips(self, request: InferRequest, raw: bool) -> None:
        """A request packed with raw bin data or with nested lists decodes to the same request."""
        if not raw:
            request = _finite(request)
        body = codec_msgpack.encode_request(request, raw=raw)
        assert_same_request(codec_msgpack.decode_request(body, max_elements=LIMIT), request)

    @FAST
    @given(response=responses())
    def test_response_round_trips(self, response: InferResponse) -> None:
        """A response packed as msgpack decodes to the same outputs, bit for bit."""
        decoded = codec_msgpack.decode_response(codec_msgpack.encode_response(response))
        assert_same_response(decoded, response)

    def test_raw_data_is_not_copied(self) -> None:
        """Raw bin data becomes an array viewing the unpacked bytes, not a copy."""
        document = {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 2],
                    "datatype": "FP32",
                    "data": np.ones(4, "<f4").tobytes(),
                }
            ]
        }
        decoded = codec_msgpack.decode_request(msgpack.packb(document), max_elements=LIMIT).inputs[
            "x"
        ]
        assert not decoded.flags.owndata
        assert (
            not decoded.flags.writeable
        )  # a view over the immutable bin; a copy would be writable

    def test_bytes_elements_may_mix_bin_and_str(self) -> None:
        """BYTES data may be a list mixing bin and str elements."""
        document = {
            "inputs": [
                {"name": "s", "shape": [1, 2], "datatype": "BYTES", "data": [[b"\xff", "é"]]}
            ]
        }
        decoded = codec_msgpack.decode_request(msgpack.packb(document), max_elements=LIMIT).inputs[
            "s"
        ]
        assert decoded.tolist() == [[b"\xff", "é".encode()]]

    def test_response_carries_bin(self) -> None:
        """Numeric outputs go out as one bin of little-endian bytes, BYTES as a list of bin."""
        outputs = {"y": np.array([1, 2], dtype=np.int32), "s": object_array(["a"], (1,))}
        document = msgpack.unpackb(
            codec_msgpack.encode_response(InferResponse("m", "1", "r", outputs))
        )
        assert [out["data"] for out in document["outputs"]] == [
            b"\x01\x00\x00\x00\x02\x00\x00\x00",
            [b"a"],
        ]


def _finite(request: InferRequest) -> InferRequest:
    """The request with NaN and inf replaced, so list data compares by value."""
    inputs = {
        name: np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=-1.0)
        if array.dtype.kind == "f"
        else array
        for name, array in request.inputs.items()
    }
    return InferRequest(
        inputs, request.id, request.outputs, request.binary_output, request.parameters
    )


@pytest.mark.parametrize("datatype", DATATYPES)
def test_zero_size_tensor_round_trips_in_every_codec(datatype: str) -> None:
    """A tensor of shape [2, 0] survives JSON, binary and msgpack for every datatype."""
    array = np.empty((2, 0), dtype=V2_TO_NUMPY[datatype])
    request = InferRequest({"x": array})
    assert_same(
        codec_json.decode_request(codec_json.encode_request(request), max_elements=LIMIT).inputs[
            "x"
        ],
        array,
    )
    body, header_length = codec_binary.encode_request(request, binary_inputs=True)
    assert header_length is not None
    assert_same(
        codec_binary.decode_request(body, header_length, max_elements=LIMIT).inputs["x"], array
    )
    body = codec_msgpack.encode_request(request)
    assert_same(codec_msgpack.decode_request(body, max_elements=LIMIT).inputs["x"], array)
