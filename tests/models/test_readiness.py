"""Agent readiness while models come and go: a deploy never takes the node out."""

from __future__ import annotations

from conftest import MakeAgent
from models.kit import NAME, affine, deploy, status, wait_active, wait_until


class TestReadiness:
    """/v2/health/ready stays 200 while a new model loads; its own ready route says 503."""

    async def test_a_new_model_loading_keeps_the_agent_ready(self, make_agent: MakeAgent) -> None:
        """While a second model's first version loads, the agent stays ready."""
        agent = await make_agent({f"{NAME}.onnx": affine(1)})
        # A long warm-up makes the loading window wide enough to observe.
        deploy(
            agent.models_dir,
            affine(7),
            name="other",
            manifest="[validation]\nwarmup_runs = 200000\n",
        )

        async def loading() -> bool:
            return (await status(agent, "other")).get("state") == "loading"

        await wait_until(loading)
        async with agent.client.get(f"{agent.url}/v2/health/ready") as r:
            ready_status = r.status
        async with agent.client.get(f"{agent.url}/v2/models/other/ready") as r:
            other_status = r.status
        still_loading = await loading()
        assert ready_status == 200
        if still_loading:  # the model's own readiness is only checkable while it loads
            assert other_status == 503
        await wait_active(agent, 1)
