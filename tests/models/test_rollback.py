"""History and rollback: the API, the CLI, bad marks, and what dropping old bytes does."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from conftest import ROOT, Agent, MakeAgent
from models.kit import NAME, affine, deploy, events, rows, settled, status, wait_active, wait_until
from structlog.testing import capture_logs


async def _two_versions(make_agent: MakeAgent, tmp_path: Path) -> Agent:
    agent = await make_agent(root=settled(tmp_path / "a", {f"{NAME}.onnx": affine(1)}))
    deploy(agent.models_dir, affine(2))
    await wait_active(agent, 2)
    return agent


async def _rollback(agent: Agent, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    url = f"{agent.url}/v1/models/{NAME}/rollback"
    async with agent.client.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


class TestRollbackApi:
    """``POST /v1/models/{name}/rollback``."""

    async def test_rollback_activates_the_previous_version(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        """Without a body the previous version serves again and the current one is marked bad."""
        agent = await _two_versions(make_agent, tmp_path)
        v2_sha = (await status(agent))["versions"][1]["sha256"]
        assert await _rollback(agent) == (200, {"model": NAME, "active_version": 1})
        code, body = await agent.infer_json(NAME, rows())
        assert (code, body["model_version"]) == (200, "1")
        doc = await status(agent)
        assert [b["sha256"] for b in doc["bad"]] == [v2_sha]
        assert doc["history"][0]["how"] == "rolled_back"
        assert doc["pinned"] is False

    async def test_rollback_to_a_named_version(self, make_agent: MakeAgent, tmp_path: Path) -> None:
        """``{"version": 1}`` activates version 1 from a history of three and pins it."""
        agent = await _two_versions(make_agent, tmp_path)
        deploy(agent.models_dir, affine(3))
        await wait_active(agent, 3)
        assert await _rollback(agent, {"version": 1}) == (200, {"model": NAME, "active_version": 1})
        assert (await status(agent))["pinned"] is True

    async def test_nothing_to_roll_back_to(self, make_agent: MakeAgent, tmp_path: Path) -> None:
        """A model with one version answers 404 with the stored versions named."""
        agent = await make_agent(root=settled(tmp_path / "a", {f"{NAME}.onnx": affine(1)}))
        code, body = await _rollback(agent)
        assert code == 404
        assert "no earlier good version" in body["error"]

    async def test_an_unknown_version_is_refused(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        """A version that is not stored answers 404 and changes nothing."""
        agent = await _two_versions(make_agent, tmp_path)
        code, body = await _rollback(agent, {"version": 9})
        assert code == 404
        assert "stored: [1, 2]" in body["error"]
        assert (await status(agent))["active_version"] == 2


class TestRollbackCli:
    """``edge-agent rollback NAME [--to V]`` against a running agent."""

    async def test_cli_rollback(self, make_agent: MakeAgent, tmp_path: Path) -> None:
        """The CLI rolls back over HTTP and prints the version now active."""
        agent = await _two_versions(make_agent, tmp_path)
        code, out, err = await _cli("rollback", NAME, "--to", "1", "--url", agent.url)
        assert (code, out.strip()) == (0, f"{NAME}: version 1 is active"), err
        assert (await status(agent))["active_version"] == 1

    async def test_cli_reports_a_failed_rollback(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        """An impossible rollback exits 1 with the agent's reason."""
        agent = await make_agent(root=settled(tmp_path / "a", {f"{NAME}.onnx": affine(1)}))
        code, _, err = await _cli("rollback", NAME, "--url", agent.url)
        assert code == 1
        assert "no earlier good version" in err


class TestDroppingKnownBytes:
    """Bytes the registry already knows never start a swap by themselves."""

    async def test_rolled_back_bytes_dropped_again_stay_inactive(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        """After a rollback, dropping the bad version's bytes again does not re-activate it."""
        agent = await _two_versions(make_agent, tmp_path)
        await _rollback(agent)
        with capture_logs() as logs:
            deploy(agent.models_dir, affine(2))

            async def noted() -> bool:
                return bool(events(logs, "model_bytes_refused_before"))

            await wait_until(noted)
        assert (await status(agent))["active_version"] == 1

    async def test_an_older_stored_version_dropped_again_is_a_no_op(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        """Dropping version 1's bytes while 2 serves changes nothing (rollback does that)."""
        agent = await _two_versions(make_agent, tmp_path)
        with capture_logs() as logs:
            deploy(agent.models_dir, affine(1))

            async def noted() -> bool:
                return bool(events(logs, "model_bytes_already_stored"))

            await wait_until(noted)
        assert [e for e in events(logs, "model_swapped") if e["version"] == 1] == []
        assert (await status(agent))["active_version"] == 2


class TestVersionNumbers:
    """Version of a flat file: manifest, else ONNX model_version, else one more than seen."""

    async def test_numbering(self, make_agent: MakeAgent, tmp_path: Path) -> None:
        """model_version 5 is 5; a manifest's 9 is 9; no version at all is 10."""
        agent = await make_agent(root=settled(tmp_path / "a", {f"{NAME}.onnx": affine(5)}))
        assert (await status(agent))["active_version"] == 5
        deploy(agent.models_dir, affine(6), manifest="[model]\nversion = 9\n")
        await wait_active(agent, 9)
        (agent.models_dir / f"{NAME}.toml").unlink()
        deploy(agent.models_dir, affine(7, model_version=False))
        await wait_active(agent, 10)
        code, body = await agent.infer_json(NAME, rows())
        assert (code, body["outputs"][0]["data"][0]) == (200, 7.0)
