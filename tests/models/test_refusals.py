"""Bad versions are refused with a clear reason while the active version keeps serving."""

from __future__ import annotations

import io
import os
from pathlib import Path

import modelgen
import numpy as np
import pytest
from conftest import Agent, MakeAgent
from models.kit import (
    NAME,
    affine,
    deploy,
    events,
    rows,
    settled,
    status,
    wait_active,
    wait_until,
)
from structlog.testing import capture_logs

CORRUPT = b"\x08\x07" + b"this is not an ONNX model " * 40


def _vectors(offset: float) -> bytes:
    """Test vectors for ``y = x + offset`` on three rows."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    buffer = io.BytesIO()
    np.savez(buffer, x=x, **{"expected/y": x + offset})
    return buffer.getvalue()


#: (what is dropped as the next version, the step named in the refusal)
BAD_VERSIONS = {
    "corrupt bytes": (dict(data=CORRUPT), "session:"),
    "failing test vectors": (
        dict(
            data=affine(2),
            manifest='[validation]\ntest_vectors = "vectors.npz"\n',
            files={"vectors.npz": _vectors(offset=7.0)},
        ),
        "qa:",
    ),
    "changed signature": (dict(data=modelgen.identity_model("FP64", [None, 4])), "signature:"),
    "slower than max_load_s": (
        dict(data=affine(2), manifest="[validation]\nmax_load_s = 0.001\nwarmup_runs = 20000\n"),
        "timeout:",
    ),
    "wrong sha256": (
        dict(data=affine(2), manifest=f'[model]\nsha256 = "{"0" * 64}"\n'),
        "sha256:",
    ),
}


async def _refused(agent: Agent, logs: list[dict[str, object]], step: str) -> str:
    """Wait for the refusal; return the reason the status API gives."""

    async def reported() -> bool:
        return bool(events(logs, "model_load_failed"))

    await wait_until(reported, timeout=15)
    reason = str(events(logs, "model_load_failed")[0]["reason"])
    assert reason.startswith(step), reason
    assert (await status(agent))["last_error"] == reason
    return reason


async def _serves(agent: Agent, version: int) -> None:
    code, body = await agent.infer_json(NAME, rows())
    assert (code, body.get("model_version")) == (200, str(version)), body


class TestRefusals:
    """Every step of the go-live pipeline can refuse a version."""

    @pytest.mark.parametrize("kind", list(BAD_VERSIONS))
    async def test_refused_while_the_old_version_serves(
        self, make_agent: MakeAgent, tmp_path: Path, kind: str
    ) -> None:
        """The bad version is refused with its step named; version 1 keeps serving."""
        drop, step = BAD_VERSIONS[kind]
        agent = await make_agent(root=settled(tmp_path / "a", {f"{NAME}.onnx": affine(1)}))
        with capture_logs() as logs:
            deploy(agent.models_dir, **drop)  # type: ignore[arg-type]
            await _refused(agent, logs, step)
        await _serves(agent, 1)
        doc = await status(agent)
        assert doc["active_version"] == 1
        assert doc["state"] == "ready"
        (agent.models_dir / f"{NAME}.toml").unlink(missing_ok=True)
        deploy(agent.models_dir, affine(3))  # the watcher did not wedge
        await wait_active(agent, 3)
        assert (await status(agent))["last_error"] is None

    async def test_the_same_bad_bytes_are_not_retried(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        """Dropping refused bytes again loads nothing and reports nothing new."""
        agent = await make_agent(root=settled(tmp_path / "a", {f"{NAME}.onnx": affine(1)}))
        with capture_logs() as logs:
            deploy(agent.models_dir, CORRUPT)
            await _refused(agent, logs, "session:")
            deploy(agent.models_dir, affine(1))
            deploy(agent.models_dir, CORRUPT)

            async def skipped() -> bool:
                return bool(events(logs, "model_bytes_refused_before"))

            await wait_until(skipped)
        assert len(events(logs, "model_load_failed")) == 1
        assert [e["sha256"] for e in (await status(agent))["bad"]] != []
        await _serves(agent, 1)

    async def test_a_refusal_is_counted_in_metrics(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        """``/metrics`` counts the failed load for the model."""
        agent = await make_agent(root=settled(tmp_path / "a", {f"{NAME}.onnx": affine(1)}))
        with capture_logs() as logs:
            deploy(agent.models_dir, CORRUPT)
            await _refused(agent, logs, "session:")
        async with agent.client.get(f"{agent.url}/metrics") as resp:
            text = await resp.text()
        failed = [line for line in text.splitlines() if "failed" in line and NAME in line]
        assert any(line.split()[-1] != "0.0" for line in failed if "load" in line), failed


class TestFirstLoad:
    """A model whose first version is refused."""

    async def test_failed_then_ready(self, make_agent: MakeAgent, tmp_path: Path) -> None:
        """A refused first version leaves the model "failed" (503); a good file makes it ready."""
        agent = await make_agent(root=settled(tmp_path / "a", {f"{NAME}.onnx": CORRUPT}))
        doc = await status(agent)
        assert (doc["state"], doc["active_version"]) == ("failed", None)
        assert doc["last_error"].startswith("session:")
        code, body = await agent.infer_json(NAME, rows())
        assert code == 503, body
        async with agent.client.get(f"{agent.url}/v2/health/ready") as resp:
            assert resp.status == 200  # one refused model does not take the node out
        deploy(agent.models_dir, affine(2))
        await wait_active(agent, 2)
        assert (await status(agent))["state"] == "ready"
        await _serves(agent, 2)

    async def test_a_manifest_refers_outside_its_folder(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        """Test vectors must sit next to the manifest: ``../`` paths are refused."""
        agent = await make_agent(root=settled(tmp_path / "a", {f"{NAME}.onnx": affine(1)}))
        (agent.models_dir.parent / "vectors.npz").write_bytes(_vectors(2.0))
        (agent.models_dir / f"{NAME}.toml").write_text(
            '[validation]\ntest_vectors = "../vectors.npz"\n'
        )
        with capture_logs() as logs:
            # A plain rename (edge-agent deploy would refuse to copy "../" files itself).
            tmp = agent.models_dir / f".{NAME}.onnx.tmp"
            tmp.write_bytes(affine(2))
            os.replace(tmp, agent.models_dir / f"{NAME}.onnx")
            await _refused(agent, logs, "manifest:")
        await _serves(agent, 1)
        os.unlink(agent.models_dir / f"{NAME}.toml")
