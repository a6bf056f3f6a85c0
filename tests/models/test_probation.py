"""Probation: a new version that fails live traffic is rolled back by itself."""

from __future__ import annotations

from pathlib import Path

from conftest import MakeAgent
from models.kit import (
    NAME,
    affine,
    deploy,
    events,
    reshape_to_one_row,
    rows,
    settled,
    status,
    wait_active,
    wait_until,
)
from structlog.testing import capture_logs

PROBATION = {"models": {"probation_s": 30.0, "max_error_rate": 0.1, "min_probation_requests": 5}}


class TestProbation:
    """Health-gated rollout after a swap."""

    async def test_a_version_failing_live_requests_is_rolled_back(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        """Errors on live traffic roll back to the previous version, which is marked bad."""
        base = settled(tmp_path / "a", {f"{NAME}.onnx": affine(1)})
        agent = await make_agent(overrides=PROBATION, root=base)
        with capture_logs() as logs:
            deploy(agent.models_dir, reshape_to_one_row(2))  # passes QA on one row
            await wait_active(agent, 2)
            assert (await status(agent))["state"] == "probation"
            for _ in range(10):
                code, _ = await agent.infer_json(NAME, rows(2))
                assert code == 500
            await wait_active(agent, 1)

            async def logged() -> bool:
                return bool(events(logs, "model_rolled_back"))

            await wait_until(logged)
        doc = await status(agent)
        assert doc["state"] == "ready"
        assert doc["last_error"].startswith("version 2 rolled back: probation: error rate")
        assert [b["sha256"] for b in doc["bad"]] == [doc["versions"][1]["sha256"]]
        assert doc["history"][0]["how"] == "rolled_back"
        assert events(logs, "probation_failed")[0]["version"] == 2
        assert events(logs, "model_rolled_back")[0]["reason"].startswith("probation: ")
        code, body = await agent.infer_json(NAME, rows(2))
        assert (code, body["model_version"]) == (200, "1")

    async def test_a_healthy_version_passes(self, make_agent: MakeAgent, tmp_path: Path) -> None:
        """A version with no errors leaves probation when the manifest's probation_s is over."""
        base = settled(tmp_path / "a", {f"{NAME}.onnx": affine(1)})
        agent = await make_agent(overrides=PROBATION, root=base)
        with capture_logs() as logs:
            deploy(agent.models_dir, affine(2), manifest="[rollout]\nprobation_s = 0.5\n")
            await wait_active(agent, 2)
            for _ in range(10):
                assert (await agent.infer_json(NAME, rows(2)))[0] == 200

            async def passed() -> bool:
                return (await status(agent))["state"] == "ready"

            await wait_until(passed)
        assert events(logs, "probation_passed")[0]["version"] == 2
        assert (await status(agent))["bad"] == []
