"""Malformed requests to every route the agent serves: never a 500, never a stall."""

from __future__ import annotations

import re
from typing import Any

import modelgen
import orjson
import pytest
from conftest import Agent, MakeAgent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GOOD = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}

SEGMENTS = st.one_of(
    st.just("aff"),
    st.just("1"),
    st.sampled_from(["0", "-1", "99999999999999999999", "..", "%00", "a b", "ü", "²", "٣"]),
    st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=6),
)
JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda kids: (
        st.lists(kids, max_size=3)
        | st.dictionaries(
            st.sampled_from(["id", "label", "value", "feedback", "version", "inputs", "x"]),
            kids,
            max_size=4,
        )
    ),
    max_leaves=12,
)
BODIES = st.one_of(st.binary(max_size=200), JSONISH.map(orjson.dumps))


@pytest.fixture
async def agent(make_agent: MakeAgent) -> Agent:
    """An agent serving affine y = 2x + 1 as "aff"."""
    return await make_agent({"aff.onnx": modelgen.affine_model(2.0, 1.0)})


async def routes(agent: Agent) -> list[tuple[str, str]]:
    """(method, path template) of every route, from the agent's own OpenAPI document."""
    async with agent.client.get(agent.url + "/openapi.json") as r:
        assert r.status == 200
        doc = await r.json()
    return [(m.upper(), p) for p, ops in doc["paths"].items() for m in ops]


async def test_openapi_lists_the_routes(agent: Agent) -> None:
    """The document names the inference, admin and metrics routes."""
    found = {p for _, p in await routes(agent)}
    assert {"/v2/models/{name}/infer", "/v1/feedback", "/v1/models", "/metrics"} <= found


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
async def test_no_route_answers_500(agent: Agent, data: Any) -> None:
    """Any route, any method it takes, odd path segments and bodies: no 5xx but 503."""
    table = await routes(agent)
    method, template = data.draw(st.sampled_from(table))
    path = re.sub(r"\{[^}]+\}", lambda _: data.draw(SEGMENTS), template)
    body = data.draw(BODIES) if method == "POST" else None
    ctype = data.draw(st.sampled_from(["application/json", "application/msgpack", "text/plain"]))
    async with agent.client.request(
        method, agent.url + path, data=body, headers={"Content-Type": ctype}
    ) as r:
        text = await r.text()
        assert r.status < 500 or r.status == 503, (method, path, r.status, text)


async def test_still_serving_after_the_fuzz(agent: Agent) -> None:
    """After garbage on every route, the agent answers a good request correctly."""
    for method, template in await routes(agent):
        path = template.replace("{name}", "aff").replace("{version}", "1")
        async with agent.client.request(method, agent.url + path, data=b"\xff\x00garbage"):
            pass
    status, body = await agent.infer_json("aff", GOOD)
    assert status == 200
    assert body["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0]
