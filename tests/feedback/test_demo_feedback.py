"""scripts/demo_feedback.py against a real agent and the reference collector."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from conftest import MakeAgent, load_collector, load_script
from feedback.kit import breast_cancer_files

TOKEN = "demo-token"


@pytest.fixture
async def collector_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """The reference collector on an ephemeral port."""
    runner, url = await load_collector().start_collector(
        tmp_path_factory.mktemp("collector") / "c.db", (TOKEN,)
    )
    yield url
    await runner.cleanup()


class TestDemo:
    async def test_demo_reports_matching_figures(
        self, make_agent: MakeAgent, collector_url: str
    ) -> None:
        """Every record arrives; live, offline and upstream accuracy agree; one unknown id."""
        upstream = {"url": collector_url + "/v1/batches", "token": TOKEN, "agent_id": "demo"}
        agent = await make_agent(
            breast_cancer_files(), {"upstream": upstream | {"flush_interval_s": 0.1}}
        )
        demo = load_script("demo_feedback", "edge_demo_feedback")
        # The demo is synchronous (urllib): run it off the loop that serves agent and collector.
        result = await asyncio.to_thread(
            demo.feedback_demo, agent.url, collector_url, collector_token=TOKEN, timeout_s=20.0
        )
        assert (result["accepted"], result["unknown"]) == (114, 1)
        assert result["delivered"] == result["expected"] == 114
        assert result["agent"] == "demo"
        assert result["live_quality"]["accuracy"] == pytest.approx(result["offline_accuracy"])
        upstream_quality = result["collector_summary"]["models"]["breast_cancer"]["quality"]
        assert upstream_quality["labelled"] == 114
        assert upstream_quality["accuracy"] == pytest.approx(result["offline_accuracy"])
