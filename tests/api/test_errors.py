"""Every error path of the V2 API: right status, a message that says how to fix it, and
the agent keeps serving afterwards."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import Agent, MakeAgent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GOOD = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@pytest.fixture
async def agent(make_agent: MakeAgent) -> Agent:
    """An agent serving affine y = 2x + 1 as "aff", with a small body limit."""
    import modelgen

    return await make_agent(
        {"aff.onnx": modelgen.affine_model(2.0, 1.0)},
        {"server": {"max_body_bytes": 4096, "max_elements": 1000, "max_rows": 8}},
    )


async def post(
    agent: Agent, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any]:
    """POST raw bytes; returns status, JSON body and headers."""
    async with agent.client.post(
        agent.url + path, data=body, headers=headers or {"Content-Type": "application/json"}
    ) as r:
        return r.status, await r.json(content_type=None), r.headers


async def still_serving(agent: Agent) -> None:
    """The agent answers a good request correctly."""
    status, body = await agent.infer_json("aff", GOOD)
    assert status == 200
    assert body["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0]


def _doc(**tensor: Any) -> bytes:
    import orjson

    base = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    base.update(tensor)
    return orjson.dumps({"inputs": [base]})


CASES = [
    ("shape vs data length", _doc(shape=[2, 4]), 400, "holds 8 elements but data has 4"),
    ("wrong shape for model", _doc(shape=[1, 2], data=[1, 2]), 400, "expected shape [-1, 4]"),
    ("unknown datatype", _doc(datatype="FLOAT32"), 400, "FLOAT32"),
    ("wrong datatype", _doc(datatype="INT64"), 400, "expected datatype FP32"),
    ("no inputs", b'{"inputs": []}', 400, "no inputs"),
    ("unexpected input", _doc(name="z"), 400, 'unexpected input "z"'),
    ("garbage bytes", b"\x00\xff\xfe garbage", 400, "JSON"),
    ("not an object", b"[1, 2, 3]", 400, "object"),
    ("text where numbers go", _doc(data=["a", "b", "c", "d"]), 400, "FP32"),
    ("too many elements", _doc(shape=[1000, 4], data=[0]), 400, "at most 1000"),
    ("too many rows", _doc(shape=[10, 4], data=[0] * 40), 400, "max_rows"),
]


class TestBadRequests:
    """Malformed or mismatched requests get a 400 that names the problem."""

    @pytest.mark.parametrize(("case", "body", "status", "needle"), CASES, ids=[c[0] for c in CASES])
    async def test_bad_request(
        self, agent: Agent, case: str, body: bytes, status: int, needle: str
    ) -> None:
        """Each bad body gets its status and a message naming the problem."""
        got, doc, _ = await post(agent, "/v2/models/aff/infer", body)
        assert got == status, doc
        assert needle in doc["error"], doc["error"]
        await still_serving(agent)

    async def test_body_over_limit(self, agent: Agent) -> None:
        """A body over max_body_bytes is a 413 that says which limit."""
        got, doc, _ = await post(agent, "/v2/models/aff/infer", b"[" + b"1," * 5000 + b"1]")
        assert got == 413
        assert "max_body_bytes" in doc["error"]
        await still_serving(agent)

    async def test_unsupported_content_type(self, agent: Agent) -> None:
        """An unknown Content-Type is a 415 listing the supported ones."""
        got, doc, _ = await post(
            agent, "/v2/models/aff/infer", b"<x/>", {"Content-Type": "application/xml"}
        )
        assert got == 415
        assert "application/msgpack" in doc["error"]

    async def test_unsupported_content_encoding(self, agent: Agent) -> None:
        """An unknown Content-Encoding is refused (by aiohttp's parser, 400) and harms nothing."""
        async with agent.client.post(
            agent.url + "/v2/models/aff/infer",
            data=_doc(),
            headers={"Content-Type": "application/json", "Content-Encoding": "zstd"},
        ) as r:
            assert r.status in (400, 415)
        await still_serving(agent)

    async def test_broken_binary_header_length(self, agent: Agent) -> None:
        """A binary header length past the body is a 400."""
        got, doc, _ = await post(
            agent, "/v2/models/aff/infer", b"{}", {"Inference-Header-Content-Length": "999"}
        )
        assert got == 400
        assert "999" in doc["error"]
        await still_serving(agent)


class TestNotFound:
    """Unknown models, versions and routes are 404s that say what exists."""

    async def test_unknown_model(self, agent: Agent) -> None:
        """An unknown model names the models that are served."""
        got, doc, _ = await post(agent, "/v2/models/nope/infer", _doc())
        assert got == 404
        assert "aff" in doc["error"]

    async def test_unknown_version(self, agent: Agent) -> None:
        """An unknown version names the active one."""
        got, doc, _ = await post(agent, "/v2/models/aff/versions/9/infer", _doc())
        assert got == 404
        assert "version 1 is active" in doc["error"]

    async def test_known_version_serves(self, agent: Agent) -> None:
        """The active version answers on its versioned route."""
        status, body = await agent.infer_json("aff", GOOD, version=1)
        assert status == 200
        assert body["model_version"] == "1"

    async def test_unknown_route_is_json(self, agent: Agent) -> None:
        """Even an unknown route answers with the JSON error shape."""
        async with agent.client.get(agent.url + "/nowhere") as r:
            assert r.status == 404
            assert "error" in await r.json()

    async def test_wrong_method(self, agent: Agent) -> None:
        """GET on the infer route is a 405 with the error shape."""
        async with agent.client.get(agent.url + "/v2/models/aff/infer") as r:
            assert r.status == 405
            assert "POST" in (await r.json())["error"]


class TestFuzz:
    """Arbitrary bodies and headers never produce a 500 or stop the agent."""

    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        body=st.one_of(
            st.binary(max_size=300),
            st.recursive(
                st.none()
                | st.booleans()
                | st.integers(-(2**63), 2**63 - 1)
                | st.floats()
                | st.text(max_size=8),
                lambda children: (
                    st.lists(children, max_size=4)
                    | st.dictionaries(
                        st.sampled_from(
                            [
                                "inputs",
                                "name",
                                "shape",
                                "datatype",
                                "data",
                                "outputs",
                                "id",
                                "parameters",
                                "binary_data_size",
                            ]
                        ),
                        children,
                        max_size=5,
                    )
                ),
                max_leaves=20,
            ).map(lambda v: __import__("orjson").dumps(v, option=0)),
        ),
        ctype=st.sampled_from(["application/json", "application/msgpack", ""]),
        binary_header=st.one_of(
            st.none(),
            st.integers(-5, 400).map(str),
            st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=4),
        ),
    )
    async def test_no_500(
        self, agent: Agent, body: bytes, ctype: str, binary_header: str | None
    ) -> None:
        """Whatever arrives, the answer is a 2xx or a 4xx, never a 5xx."""
        headers = {"Content-Type": ctype} if ctype else {}
        if binary_header is not None:
            headers["Inference-Header-Content-Length"] = binary_header
        async with agent.client.post(
            agent.url + "/v2/models/aff/infer", data=body, headers=headers
        ) as r:
            assert r.status < 500, await r.text()

    async def test_serves_after_fuzz(self, agent: Agent) -> None:
        """A burst of garbage leaves the agent serving correctly."""
        rng = np.random.default_rng(0)
        for _ in range(50):
            await post(agent, "/v2/models/aff/infer", rng.bytes(64))
        await still_serving(agent)


async def test_missing_one_of_two_inputs(make_agent: MakeAgent) -> None:
    """A model with two inputs names the one that is missing."""
    import modelgen

    agent = await make_agent({"mio.onnx": modelgen.multi_io_model()})
    status, body = await agent.infer_json(
        "mio", {"inputs": [{"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    )
    assert status == 400
    assert 'missing input "b"' in body["error"]


class TestVersionAccounting:
    """What counts against a version (probation) and what does not."""

    async def test_client_mistakes_do_not_count_against_the_version(self, agent: Agent) -> None:
        """Too many rows is the client's mistake: a 400, not an error of the version."""
        body = _doc(shape=[10, 4], data=[0] * 40)
        for _ in range(3):
            got, _, _ = await post(agent, "/v2/models/aff/infer", body)
            assert got == 400
        live = agent.registry.models["aff"].active
        assert live is not None
        assert (live.stats.requests, live.stats.errors) == (0, 0)

    async def test_signature_rejections_count_against_the_version(self, agent: Agent) -> None:
        """A live request the version's signature refuses is counted as its failure."""
        got, _, _ = await post(agent, "/v2/models/aff/infer", _doc(shape=[1, 2], data=[1, 2]))
        assert got == 400
        live = agent.registry.models["aff"].active
        assert live is not None
        assert (live.stats.requests, live.stats.errors) == (1, 1)

    @pytest.mark.parametrize("segment", ["%C2%B2", "%D9%A3", "0", "x"])
    async def test_odd_version_segments_are_404(self, agent: Agent, segment: str) -> None:
        """Non-ASCII digits and other non-versions are a 404, never a 500."""
        async with agent.client.get(f"{agent.url}/v2/models/aff/versions/{segment}") as r:
            assert r.status == 404
