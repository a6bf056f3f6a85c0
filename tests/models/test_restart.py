"""After a restart the agent serves exactly what it served before."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from conftest import ROOT, render_config
from models.kit import NAME, affine, deploy, rows, running, settled, status, wait_active

STARTUP_S = 30


async def _port(log: Path, proc: asyncio.subprocess.Process) -> int:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if doc.get("event") == "server_listening":
                    return int(doc["port"])
        if proc.returncode is not None:
            raise AssertionError(f"the agent exited with {proc.returncode}:\n{log.read_text()}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"no server_listening line within {STARTUP_S} s:\n{log.read_text()}")


@contextlib.asynccontextmanager
async def daemon(base: Path, run: int) -> AsyncIterator[str]:
    """``python -m agent run --config`` on ``base``; SIGTERM on exit, which must give 0."""
    config = base / "agent.toml"
    config.write_text(
        render_config(
            {
                "server": {"host": "127.0.0.1", "port": 0},
                "models": {"dir": base / "models", "settle_ms": 100, "probation_s": 0.0},
                "state": {"dir": base / "state"},
                "log": {"level": "info", "format": "json"},
            }
        )
    )
    log = base / f"run{run}.log"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "run", "--config", str(config),
            cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{await _port(log, proc)}"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), STARTUP_S) == 0, log.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _models(client: aiohttp.ClientSession, url: str) -> dict[str, dict[str, object]]:
    async with client.get(f"{url}/v1/models") as resp:
        return {m["name"]: m for m in (await resp.json())["models"]}


async def _wait_version(client: aiohttp.ClientSession, url: str, version: int) -> None:
    for _ in range(500):
        if (await _models(client, url)).get(NAME, {}).get("active_version") == version:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"version {version} never became active")


class TestDaemonRestart:
    """The real process, stopped with SIGTERM and started again on the same state dir."""

    async def test_a_rolled_back_version_stays_rolled_back(self, tmp_path: Path) -> None:
        """v2 is rolled back to v1; after a restart v1 serves although v2 is in the drop dir."""
        base = settled(tmp_path / "agent", {f"{NAME}.onnx": affine(1)})
        async with aiohttp.ClientSession() as client:
            async with daemon(base, 1) as url:
                await _wait_version(client, url, 1)
                deploy(base / "models", affine(2))
                await _wait_version(client, url, 2)
                async with client.post(f"{url}/v1/models/{NAME}/rollback") as resp:
                    assert resp.status == 200
            async with daemon(base, 2) as url:
                model = (await _models(client, url))[NAME]
                assert model["active_version"] == 1
                assert len(model["bad"]) == 1  # type: ignore[arg-type]
                assert model["history"][0]["how"] == "restored"  # type: ignore[index]
                async with client.post(f"{url}/v2/models/{NAME}/infer", json=rows()) as resp:
                    assert (await resp.json())["model_version"] == "1"


class TestStateAcrossRestarts:
    """In-process restarts (same state dir) for the edge cases of ``registry.json``."""

    async def test_an_unloaded_model_does_not_come_back(self, tmp_path: Path) -> None:
        """A model whose files were removed is not restored by the next start."""
        base = settled(tmp_path / "a", {f"{NAME}.onnx": affine(1), "keep.onnx": affine(4)})
        async with running(base) as agent:
            (agent.models_dir / f"{NAME}.onnx").unlink()
            for _ in range(200):
                if (await status(agent)).get("state") == "unloaded":
                    break
                await asyncio.sleep(0.02)
            assert (await status(agent))["state"] == "unloaded"
        async with running(base) as agent:
            code, _ = await agent.infer_json(NAME, rows())
            assert code == 404
            assert (await status(agent, "keep"))["active_version"] == 4

    async def test_old_version_folders_do_not_take_over(self, tmp_path: Path) -> None:
        """With keep_versions = 2, folder 1 (pruned from the history) stays inactive."""
        files = {f"{NAME}/{v}/model.onnx": affine(v, model_version=False) for v in (1, 2, 3)}
        base = settled(tmp_path / "a", files)
        keep = {"models": {"keep_versions": 2}}
        async with running(base, overrides=keep) as agent:
            assert (await status(agent))["active_version"] == 3
        async with running(base, overrides=keep) as agent:
            doc = await status(agent)
            assert doc["active_version"] == 3
            assert [v["version"] for v in doc["versions"]] == [2, 3]

    async def test_a_missing_store_bundle_is_recovered_from_the_drop_dir(
        self, tmp_path: Path
    ) -> None:
        """If the stored copy vanished, the same bytes in the drop dir serve again."""
        base = settled(tmp_path / "a", {f"{NAME}.onnx": affine(1)})
        async with running(base) as agent:
            sha = (await status(agent))["versions"][0]["sha256"]
        for path in (base / "state" / "store" / sha).iterdir():
            path.unlink()
        async with running(base) as agent:
            await wait_active(agent, 1)
            assert (await agent.infer_json(NAME, rows()))[0] == 200

    async def test_an_unreadable_state_file_is_moved_aside(self, tmp_path: Path) -> None:
        """A corrupt ``registry.json`` is kept aside; the drop dir is loaded as on a first start."""
        base = settled(tmp_path / "a", {f"{NAME}.onnx": affine(1)})
        (base / "state").mkdir(parents=True)
        (base / "state" / "registry.json").write_text("{not json")
        async with running(base) as agent:
            assert (await status(agent))["active_version"] == 1
        assert len(list((base / "state").glob("registry.json.unreadable-*"))) == 1

    @pytest.mark.parametrize("swap", ["availability", "memory"])
    async def test_history_survives(self, tmp_path: Path, swap: str) -> None:
        """The swap history in ``GET /v1/models`` is the same after a restart."""
        base = settled(tmp_path / "a", {f"{NAME}.onnx": affine(1)})
        async with running(base, overrides={"models": {"swap": swap}}) as agent:
            deploy(agent.models_dir, affine(2))
            await wait_active(agent, 2)
            before = (await status(agent))["history"]
        async with running(base, overrides={"models": {"swap": swap}}) as agent:
            after = (await status(agent))["history"]
        assert after[1:] == before
        assert [h["how"] for h in after] == ["restored", "deployed", "deployed"]
