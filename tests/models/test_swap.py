"""Hot swaps: new versions go live under load with no failed request, in both swap modes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from conftest import Agent, MakeAgent
from models.kit import NAME, affine, deploy, rows, status, wait_active, wait_until

CLIENTS = 4
SWAPS = 12
#: Bounds every client loop even if the test's stop signal never came.
MAX_REQUESTS_PER_CLIENT = 20_000


@dataclass
class Traffic:
    """What the client tasks saw, split by phase ("steady" or "swaps")."""

    phase: str = "steady"
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"steady": [], "swaps": []})
    failures: list[tuple[int, object]] = field(default_factory=list)
    mismatches: list[tuple[str, float]] = field(default_factory=list)
    versions: set[int] = field(default_factory=set)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def summary(self) -> str:
        """Requests, failures and p50/p99 latency per phase, one line."""
        parts = []
        for phase, values in self.latencies.items():
            ms = np.array(values) * 1000 if values else np.zeros(1)
            parts.append(
                f"{phase}: {len(values)} requests, p50 {np.percentile(ms, 50):.2f} ms, "
                f"p99 {np.percentile(ms, 99):.2f} ms"
            )
        return "; ".join(parts) + f"; failed {len(self.failures)}"


async def _client(agent: Agent, traffic: Traffic) -> None:
    for _ in range(MAX_REQUESTS_PER_CLIENT):
        if traffic.stop.is_set():
            return
        start = time.perf_counter()
        async with agent.client.post(f"{agent.url}/v2/models/{NAME}/infer", json=rows()) as resp:
            body = await resp.json(content_type=None)
        elapsed = time.perf_counter() - start
        if resp.status != 200:
            traffic.failures.append((resp.status, body))
            continue
        traffic.latencies[traffic.phase].append(elapsed)
        answered = body["outputs"][0]["data"][0]
        traffic.versions.add(int(body["model_version"]))
        if float(body["model_version"]) != answered:
            traffic.mismatches.append((body["model_version"], answered))


class TestSwapUnderLoad:
    """Continuous traffic while a dozen versions are deployed one after another."""

    async def test_no_request_fails_and_every_answer_names_a_deployed_version(
        self, make_agent: MakeAgent
    ) -> None:
        """Every request succeeds, and each answer comes from the version it names."""
        agent = await make_agent({f"{NAME}.onnx": affine(1)})
        traffic = Traffic()
        clients = [asyncio.create_task(_client(agent, traffic)) for _ in range(CLIENTS)]
        await asyncio.sleep(1.0)  # steady state, for the comparison
        traffic.phase = "swaps"
        live_after: list[float] = []
        try:
            for version in range(2, SWAPS + 2):
                start = time.perf_counter()
                deploy(agent.models_dir, affine(version))
                await wait_active(agent, version)
                live_after.append(time.perf_counter() - start)
        finally:
            traffic.stop.set()
            await asyncio.gather(*clients)
        print(
            f"\nswap test: {traffic.summary()}; version live after (s): "
            f"median {np.median(live_after):.3f}, max {max(live_after):.3f}"
        )
        assert traffic.failures == []
        assert traffic.mismatches == []
        assert traffic.versions <= set(range(1, SWAPS + 2))
        assert len(traffic.latencies["swaps"]) > 0

    async def test_an_admitted_request_finishes_on_its_version(self, make_agent: MakeAgent) -> None:
        """A lease taken before a swap still runs on the old version; its session closes after."""
        agent = await make_agent({f"{NAME}.onnx": affine(1)})
        x = {"x": np.zeros((1, 4), dtype=np.float32)}
        with agent.registry.lease(NAME) as old:
            deploy(agent.models_dir, affine(2))
            await wait_active(agent, 2)
            assert old.retired
            answer = await old.batcher.infer(x, ("y",))
            assert float(answer["y"][0][0]) == 1.0
        await asyncio.wait_for(old.closed.wait(), 5)
        with agent.registry.lease(NAME) as new:
            assert new.version == 2


class TestMemorySwap:
    """``swap = "memory"``: the old version is released before the new one loads."""

    async def test_503_with_retry_after_only_while_loading(self, make_agent: MakeAgent) -> None:
        """The model answers 503 + Retry-After while the new version loads, 200 otherwise."""
        agent = await make_agent({f"{NAME}.onnx": affine(1)}, {"models": {"swap": "memory"}})
        url = f"{agent.url}/v2/models/{NAME}/infer"
        async with agent.client.post(url, json=rows()) as resp:
            assert resp.status == 200
        # A long warm-up makes the loading window wide enough to observe.
        deploy(agent.models_dir, affine(2), manifest="[validation]\nwarmup_runs = 20000\n")

        async def loading() -> bool:
            return (await status(agent)).get("state") == "loading"

        await wait_until(loading)
        answers = []
        for _ in range(2_000):  # bounded: the warm-up takes a fraction of a second
            if not await loading():
                break
            async with agent.client.post(url, json=rows()) as resp:
                answers.append((resp.status, resp.headers.get("Retry-After"), await resp.json()))
        unavailable = [a for a in answers if a[0] == 503]
        assert unavailable, "no request was made while the new version loaded"
        assert all(int(retry or 0) >= 1 for _, retry, _ in unavailable)
        assert all("loading" in body["error"] for _, _, body in unavailable)
        assert all(body["model_version"] == "2" for code, _, body in answers if code == 200)
        await wait_active(agent, 2, timeout=30)
        async with agent.client.post(url, json=rows()) as resp:
            assert resp.status == 200
            assert (await resp.json())["model_version"] == "2"
        assert (await status(agent))["state"] == "ready"


class TestVersionedLayout:
    """``<name>/<version>/model.onnx`` folders."""

    async def test_a_higher_version_folder_becomes_active(self, make_agent: MakeAgent) -> None:
        """Dropping ``aff/2/model.onnx`` next to ``aff/1/`` makes version 2 active."""
        agent = await make_agent({f"{NAME}/1/model.onnx": affine(1, model_version=False)})
        await _answer(agent, 1)
        deploy(agent.models_dir, affine(2, model_version=False), version=2)
        await wait_active(agent, 2)
        await _answer(agent, 2)


async def _answer(agent: Agent, version: int) -> None:
    status_code, body = await agent.infer_json(NAME, rows())
    assert (status_code, body["model_version"]) == (200, str(version))
