"""The KServe V2 REST surface on a real server, with real clients and real models."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from typing import Any

import modelgen
import msgpack
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from conftest import EXAMPLES, Agent, MakeAgent

from agent.api import codec_msgpack
from agent.tensors import InferRequest


def ort_run(model: bytes, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
    """The reference: onnxruntime called in-process."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def triton_infer(
    url: str, model: str, name: str, array: np.ndarray, datatype: str, *, binary: bool
) -> dict[str, np.ndarray]:
    """Call the agent with tritonclient.http (blocking: run it in a thread)."""
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    try:
        inp = triton.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array, binary_data=binary)
        outputs = [
            triton.InferRequestedOutput(o, binary_data=binary) for o in ("label", "probabilities")
        ]
        result = client.infer(model, [inp], outputs=outputs, request_id="req-42")
        assert result.get_response()["id"] == "req-42"
        return {o: result.as_numpy(o) for o in ("label", "probabilities")}
    finally:
        client.close()


@pytest.fixture
async def examples_agent(make_agent: MakeAgent) -> Agent:
    """An agent serving the three bundled examples (flat and versioned layouts)."""
    return await make_agent(
        {
            "breast_cancer.onnx": EXAMPLES / "breast_cancer.onnx",
            "digits/1/model.onnx": EXAMPLES / "digits" / "1" / "model.onnx",
            "sentiment.onnx": EXAMPLES / "sentiment.onnx",
        }
    )


def _example_inputs() -> list[tuple[str, str, np.ndarray, str, bytes]]:
    x_tab, _ = modelgen.tabular_data("test")
    x_img, _ = modelgen.image_data("test")
    texts, _ = modelgen.text_data("test")
    return [
        (
            "breast_cancer",
            "float_input",
            x_tab[:5].astype(np.float32),
            "FP32",
            (EXAMPLES / "breast_cancer.onnx").read_bytes(),
        ),
        (
            "digits",
            "image",
            x_img[:3].astype(np.float32),
            "FP32",
            (EXAMPLES / "digits" / "1" / "model.onnx").read_bytes(),
        ),
        (
            "sentiment",
            "text",
            np.array(texts[:4], dtype=object),
            "BYTES",
            (EXAMPLES / "sentiment.onnx").read_bytes(),
        ),
    ]


class TestTritonClient:
    """tritonclient.http talks to the agent as it would to Triton."""

    @pytest.mark.parametrize("binary", [True, False])
    async def test_outputs_equal_in_process_onnxruntime(
        self, examples_agent: Agent, binary: bool
    ) -> None:
        """Every example model answers tritonclient exactly as onnxruntime does in-process."""
        for model, name, array, datatype, onnx_bytes in _example_inputs():
            got = await asyncio.to_thread(
                triton_infer, examples_agent.url, model, name, array, datatype, binary=binary
            )
            feed = array.astype(str).astype(object) if datatype == "BYTES" else array
            want = ort_run(onnx_bytes, {name: feed})
            np.testing.assert_array_equal(got["label"], want["label"])
            np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=1e-6)

    async def test_server_and_model_metadata(self, examples_agent: Agent) -> None:
        """Server and model metadata, liveness and readiness answer like Triton's."""

        def check() -> None:
            client = triton.InferenceServerClient(examples_agent.url.removeprefix("http://"))
            try:
                assert client.is_server_live()
                assert client.is_server_ready()
                assert client.is_model_ready("digits")
                assert client.is_model_ready("digits", "1")
                meta = client.get_model_metadata("digits")
                assert meta["inputs"] == [
                    {"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
                ]
                assert client.get_server_metadata()["name"] == "edge-agent"
            finally:
                client.close()

        await asyncio.to_thread(check)


class TestBodies:
    """JSON (flat and nested), msgpack (raw and lists), gzip and ids."""

    async def test_json_nested_and_flat_agree(self, examples_agent: Agent) -> None:
        """Nested data and flat data with the same shape give the same answer."""
        x, _ = modelgen.tabular_data("test")
        rows = x[:3].astype(np.float32)
        base = {"name": "float_input", "shape": [3, 30], "datatype": "FP32"}
        s1, flat = await examples_agent.infer_json(
            "breast_cancer", {"inputs": [{**base, "data": rows.ravel().tolist()}]}
        )
        s2, nested = await examples_agent.infer_json(
            "breast_cancer", {"inputs": [{**base, "data": rows.tolist()}]}
        )
        assert (s1, s2) == (200, 200)
        assert flat["outputs"] == nested["outputs"]

    @pytest.mark.parametrize("raw", [True, False])
    async def test_msgpack_raw_and_lists(self, examples_agent: Agent, raw: bool) -> None:
        """msgpack with raw little-endian bytes or nested lists matches onnxruntime."""
        x, _ = modelgen.image_data("test")
        images = x[:2].astype(np.float32)
        body = codec_msgpack.encode_request(
            InferRequest(inputs={"image": images}, id="m1"), raw=raw
        )
        async with examples_agent.client.post(
            examples_agent.url + "/v2/models/digits/infer",
            data=body,
            headers={"Content-Type": "application/msgpack"},
        ) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/msgpack"
            decoded = codec_msgpack.decode_response(await resp.read())
        want = ort_run((EXAMPLES / "digits" / "1" / "model.onnx").read_bytes(), {"image": images})
        assert decoded.id == "m1"
        np.testing.assert_array_equal(decoded.outputs["label"], want["label"])

    async def test_msgpack_answer_in_json_when_accept_says_so(self, examples_agent: Agent) -> None:
        """The response format follows Accept."""
        body = msgpack.packb(
            {
                "inputs": [
                    {
                        "name": "text",
                        "shape": [1],
                        "datatype": "BYTES",
                        "data": ["great value, works well"],
                    }
                ]
            }
        )
        async with examples_agent.client.post(
            examples_agent.url + "/v2/models/sentiment/infer",
            data=body,
            headers={"Content-Type": "application/msgpack", "Accept": "application/json"},
        ) as resp:
            assert resp.status == 200
            doc = await resp.json()
        assert doc["outputs"][0]["name"] == "label"

    @pytest.mark.parametrize("encoding", ["gzip", "deflate"])
    async def test_compressed_json_body(self, examples_agent: Agent, encoding: str) -> None:
        """gzip and deflate request bodies are inflated before decoding."""
        raw = (EXAMPLES.parent / "data" / "breast_cancer_request.json").read_bytes()
        body = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
        async with examples_agent.client.post(
            examples_agent.url + "/v2/models/breast_cancer/infer",
            data=body,
            headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        ) as resp:
            assert resp.status == 200
            assert len((await resp.json())["outputs"]) == 2

    async def test_generated_ids_are_unique(self, examples_agent: Agent) -> None:
        """A request without an id gets a fresh one, different every time."""
        doc = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["ok"]}]}
        ids = set()
        for _ in range(5):
            status, body = await examples_agent.infer_json("sentiment", doc)
            assert status == 200
            ids.add(body["id"])
        assert len(ids) == 5

    async def test_requested_outputs_only(self, examples_agent: Agent) -> None:
        """Only the outputs the client asked for come back."""
        doc = {
            "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["ok"]}],
            "outputs": [{"name": "probabilities"}],
        }
        status, body = await examples_agent.infer_json("sentiment", doc)
        assert status == 200
        assert [o["name"] for o in body["outputs"]] == ["probabilities"]

    async def test_multi_input_model(self, make_agent: MakeAgent, models: dict[str, bytes]) -> None:
        """Two inputs and two outputs of different dtypes are served correctly."""
        agent = await make_agent({"mio.onnx": models["multi_io"]})
        a = np.arange(6, dtype=np.float32).reshape(2, 3)
        b = np.array([[1], [2]], dtype=np.int64)
        status, body = await agent.infer_json(
            "mio",
            {
                "inputs": [
                    {"name": "a", "shape": [2, 3], "datatype": "FP32", "data": a.ravel().tolist()},
                    {"name": "b", "shape": [2, 1], "datatype": "INT64", "data": b.ravel().tolist()},
                ]
            },
        )
        assert status == 200
        out = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in body["outputs"]}
        np.testing.assert_allclose(out["sum"], a + b)
        np.testing.assert_allclose(out["prod"], a * 2)


DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


class TestDatatypes:
    """Every V2 datatype travels through the agent and back unchanged."""

    @pytest.mark.parametrize("binary", [True, False])
    async def test_identity_for_every_datatype(self, make_agent: MakeAgent, binary: bool) -> None:
        """An Identity model returns exactly what it was sent, for all 13 datatypes."""
        files = {
            f"id_{dt.lower()}.onnx": modelgen.identity_model(dt, [None, 3]) for dt in DATATYPES
        }
        agent = await make_agent(files)
        rng = np.random.default_rng(3)

        def call_all() -> None:
            client = triton.InferenceServerClient(agent.url.removeprefix("http://"))
            try:
                for dt in DATATYPES:
                    array = _random_array(rng, dt, (2, 3))
                    inp = triton.InferInput("x", [2, 3], dt)
                    inp.set_data_from_numpy(array, binary_data=binary)
                    out = triton.InferRequestedOutput("y", binary_data=binary)
                    got = client.infer(f"id_{dt.lower()}", [inp], outputs=[out]).as_numpy("y")
                    if dt == "BYTES":
                        assert [_as_bytes(v) for v in got.ravel()] == list(array.ravel()), dt
                    else:
                        np.testing.assert_array_equal(got, array, err_msg=dt)
            finally:
                client.close()

        await asyncio.to_thread(call_all)


def _as_bytes(value: object) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)  # type: ignore[call-overload]


def _random_array(rng: np.random.Generator, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if datatype == "BYTES":
        words = [b"alpha", b"beta", "gr\u00fc\u00dfe".encode(), b""]
        return np.array([words[i % 4] for i in range(int(np.prod(shape)))], dtype=object).reshape(
            shape
        )
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    dtype = triton.triton_to_np_dtype(datatype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)
