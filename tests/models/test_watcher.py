"""The drop directory as writers really use it: slow copies, renames, temp names, removals."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Agent, MakeAgent
from models.kit import (
    NAME,
    active_version,
    affine,
    deploy,
    events,
    padded,
    rows,
    settled,
    status,
    wait_active,
    wait_until,
)
from structlog.testing import capture_logs

SETTLE_MS = 300


async def _reload(agent: Agent) -> dict[str, Any]:
    async with agent.client.post(f"{agent.url}/v1/reload") as resp:
        assert resp.status == 200
        return await resp.json()  # type: ignore[no-any-return]


class TestCarelessWriter:
    """Files written in place, slowly, are loaded only once complete."""

    async def test_a_slow_write_is_never_loaded_half_written(self, make_agent: MakeAgent) -> None:
        """Chunks arriving faster than settle_ms keep the file pending until it is complete."""
        agent = await make_agent(overrides={"models": {"settle_ms": SETTLE_MS}})
        data = padded(7, megabytes=6)
        chunks = [data[i : i + (1 << 19)] for i in range(0, len(data), 1 << 19)]
        target = agent.models_dir / f"{NAME}.onnx"
        with capture_logs() as logs:
            with target.open("wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    fh.flush()
                    os.fsync(fh.fileno())
                    await asyncio.sleep(SETTLE_MS / 1000 / 5)
                    assert events(logs, "model_file_settled") == []
            await wait_active(agent, 7)
        assert events(logs, "model_load_failed") == []
        assert len(events(logs, "model_file_settled")) == 1
        assert len(chunks) > 5


class TestNames:
    """Hidden and temporary names are never loaded; a rename into the folder is."""

    # watchdog warns from its own thread when nested folders appear faster than it adds
    # watches ("Callback ... already exists"); harmless, but an error under -W error.
    @pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
    async def test_temp_and_hidden_names_are_ignored(self, make_agent: MakeAgent) -> None:
        """``.aff.onnx``, ``aff.onnx.tmp``, ``aff.onnx.part`` and friends never become models."""
        agent = await make_agent()
        for name in (
            ".aff.onnx",
            "aff.onnx.tmp",
            "aff.onnx.part",
            "aff.onnx.partial",
            "aff.onnx~",
            "aff.onnx.swp",
            ".hidden/1/model.onnx",
        ):
            path = agent.models_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(affine(1))
        report = await _reload(agent)
        assert (report["queued"], report["settling"]) == ([], [])
        await asyncio.sleep(SETTLE_MS / 1000)
        assert agent.registry.models == {}

    async def test_a_rename_is_acted_on_at_once(self, make_agent: MakeAgent) -> None:
        """With a settle time of a minute, a file renamed into the folder still goes live."""
        agent = await make_agent(overrides={"models": {"settle_ms": 60_000}})
        part = agent.models_dir / f"{NAME}.onnx.part"
        part.write_bytes(affine(3))
        part.rename(agent.models_dir / f"{NAME}.onnx")
        await wait_active(agent, 3)

    async def test_a_move_from_outside_is_acted_on_at_once(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        """``mv /elsewhere/aff.onnx drop/`` counts as a rename although inotify sees no source."""
        agent = await make_agent(overrides={"models": {"settle_ms": 60_000}})
        outside = tmp_path / "aff.onnx"
        outside.write_bytes(affine(4))
        outside.rename(agent.models_dir / f"{NAME}.onnx")
        await wait_active(agent, 4)

    async def test_a_version_folder_moved_in_is_acted_on_at_once(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        """``mv staging aff/2`` is a rename too: version 2 goes live without settling."""
        base = settled(tmp_path / "agent", {f"{NAME}/1/model.onnx": affine(1, model_version=False)})
        agent = await make_agent(overrides={"models": {"settle_ms": 60_000}}, root=base)
        await wait_active(agent, 1)
        staging = tmp_path / "staging"  # outside the drop dir: inotify sees only the arrival
        staging.mkdir()
        (staging / "model.onnx").write_bytes(affine(2, model_version=False))
        staging.rename(agent.models_dir / NAME / "2")
        await wait_active(agent, 2)

    async def test_a_direct_write_waits_for_settle(self, make_agent: MakeAgent) -> None:
        """A file written in place is queued, not loaded, while settle_ms has not passed."""
        agent = await make_agent(overrides={"models": {"settle_ms": 60_000}})
        (agent.models_dir / f"{NAME}.onnx").write_bytes(affine(1))
        report = await _reload(agent)
        assert report["settling"] == [f"{NAME}.onnx"]
        assert NAME not in agent.registry.models


class TestRescan:
    """What inotify misses, the rescan finds."""

    async def test_a_replaced_drop_dir_is_found_by_reload(self, make_agent: MakeAgent) -> None:
        """After the drop dir itself is swapped for another, POST /v1/reload finds its models."""
        agent = await make_agent({f"{NAME}.onnx": affine(1)})
        fresh = agent.root / "fresh"
        fresh.mkdir()
        (fresh / f"{NAME}.onnx").write_bytes(affine(1))
        (fresh / "other.onnx").write_bytes(affine(5))
        old = agent.models_dir.rename(agent.root / "old")
        fresh.rename(agent.models_dir)  # the inotify watch still points at "old"
        shutil.rmtree(old)
        await _reload(agent)
        await wait_active(agent, 5, name="other")
        deploy(agent.models_dir, affine(2))  # and the watch follows the new folder
        await wait_active(agent, 2)


class TestRemoval:
    """Removing a model's files from the drop dir (``on_remove``)."""

    async def test_removing_the_file_unloads_after_in_flight_requests(
        self, make_agent: MakeAgent
    ) -> None:
        """With ``unload``, the model leaves; a request admitted before finishes on it."""
        agent = await make_agent({f"{NAME}.onnx": affine(1)})
        with agent.registry.lease(NAME) as live:
            (agent.models_dir / f"{NAME}.onnx").unlink()

            async def unloaded() -> bool:
                return (await status(agent)).get("state") == "unloaded"

            await wait_until(unloaded)
            assert not live.closed.is_set()
            answer = await live.batcher.infer({"x": np.zeros((1, 4), np.float32)}, ("y",))
            assert float(answer["y"][0][0]) == 1.0
        await asyncio.wait_for(live.closed.wait(), 5)
        status_code, body = await agent.infer_json(NAME, rows())
        assert status_code == 404, body

    async def test_keep_leaves_the_model_serving(self, make_agent: MakeAgent) -> None:
        """With ``keep``, deleting the file changes nothing."""
        agent = await make_agent({f"{NAME}.onnx": affine(1)}, {"models": {"on_remove": "keep"}})
        (agent.models_dir / f"{NAME}.onnx").unlink()
        await _reload(agent)
        await asyncio.sleep(0.3)
        await _reload(agent)
        assert await active_version(agent) == 1
        status_code, _ = await agent.infer_json(NAME, rows())
        assert status_code == 200

    async def test_delete_then_recreate_is_a_replacement(self, make_agent: MakeAgent) -> None:
        """``rm aff.onnx; mv new aff.onnx`` within settle_ms swaps versions without unloading."""
        agent = await make_agent({f"{NAME}.onnx": affine(1)}, {"models": {"settle_ms": 2_000}})
        with capture_logs() as logs:
            (agent.models_dir / f"{NAME}.onnx").unlink()
            deploy(agent.models_dir, affine(2))
            await wait_active(agent, 2)
            await _reload(agent)
        assert events(logs, "model_unloaded") == []
        assert (await status(agent))["state"] == "ready"
