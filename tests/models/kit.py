"""Helpers shared by the drop-directory tests: models that name their version, safe and
careless writers, V2 calls, status reads, and an agent that can be stopped and restarted.

Imported as ``models.kit`` (``tests`` is on ``sys.path``). Everything here is real: real
ONNX bytes, real files in the drop dir, real HTTP against a real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import modelgen
import numpy as np
import onnx
from aiohttp import web
from conftest import Agent, agent_config
from onnx import TensorProto, helper

from agent.app import build_app
from agent.cli import deploy_files

NAME = "aff"


def affine(version: int, *, features: int = 4, model_version: bool = True) -> bytes:
    """``y = x + version``: every answer names the version that computed it."""
    return modelgen.affine_model(
        1.0, float(version), features=features, model_version=version if model_version else 0
    )


def padded(version: int, megabytes: int) -> bytes:
    """``affine(version)`` made several MB large by an unused initializer."""
    model = onnx.load_from_string(affine(version))
    size = megabytes * (1 << 20) // 4
    padding = np.arange(size, dtype=np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(padding, name="padding"))
    return bytes(model.SerializeToString())


def reshape_to_one_row(version: int) -> bytes:
    """Declares x FP32 [N, 4] but reshapes to a fixed [1, 4]: any request of 2+ rows fails.

    It passes the smoke test and warm-up (one synthetic row) and fails on live traffic.
    """
    nodes = [
        helper.make_node("Reshape", ["x", "one_row"], ["flat"]),
        helper.make_node("Add", ["flat", "offset"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fragile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        initializer=[
            helper.make_tensor("one_row", TensorProto.INT64, [2], [1, 4]),
            helper.make_tensor("offset", TensorProto.FLOAT, [], [float(version)]),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", modelgen.OPSET)],
        ir_version=modelgen.IR_VERSION,
        model_version=version,
    )
    return bytes(model.SerializeToString())


def deploy(
    root: Path,
    data: bytes,
    *,
    name: str = NAME,
    version: int | None = None,
    manifest: str | None = None,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Deploy the way operators are told to: ``edge-agent deploy`` (temp file + rename)."""
    staging = root.parent / f"staging-{time.monotonic_ns()}"
    staging.mkdir()
    model = staging / "model.onnx"
    model.write_bytes(data)
    manifest_path = None
    if manifest is not None:
        manifest_path = staging / "manifest.toml"
        manifest_path.write_text(manifest)
    for rel, content in (files or {}).items():
        (staging / rel).write_bytes(content)
    try:
        return deploy_files(model, root, name, version, manifest_path)
    finally:
        shutil.rmtree(staging)


def settled(base: Path, files: dict[str, bytes]) -> Path:
    """Write files into ``base/models`` an hour old, so start-up need not wait for them."""
    old = time.time() - 3600
    for rel, content in files.items():
        path = base / "models" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, (old, old))
    return base


def rows(n: int = 1) -> dict[str, Any]:
    """A V2 JSON request of ``n`` rows of zeros: ``y`` is the version everywhere."""
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [n, 4], "data": [0.0] * (4 * n)}]}


async def status(agent: Agent, name: str = NAME) -> dict[str, Any]:
    """``GET /v1/models/{name}`` (an empty dict while the model is unknown)."""
    async with agent.client.get(f"{agent.url}/v1/models/{name}") as resp:
        return await resp.json() if resp.status == 200 else {}


async def active_version(agent: Agent, name: str = NAME) -> int | None:
    """The version ``GET /v1/models`` says is active."""
    return (await status(agent, name)).get("active_version")


async def wait_until(check: Any, timeout: float = 10.0) -> None:
    """Poll an async predicate until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


async def wait_active(agent: Agent, version: int, name: str = NAME, timeout: float = 10.0) -> None:
    """Wait until ``version`` is the active version of ``name``."""

    async def check() -> bool:
        return await active_version(agent, name) == version

    await wait_until(check, timeout)


def events(logs: list[dict[str, Any]], name: str, model: str = NAME) -> list[dict[str, Any]]:
    """Captured log events called ``name`` about ``model``."""
    return [e for e in logs if e.get("event") == name and e.get("model") == model]


@contextlib.asynccontextmanager
async def running(
    root: Path,
    files: dict[str, bytes] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> AsyncIterator[Agent]:
    """An in-process agent on ``root`` (drop dir and state under it) that stops on exit.

    Running it twice on the same ``root`` is a restart that keeps the state dir.
    """
    root.mkdir(parents=True, exist_ok=True)
    config = agent_config(root, overrides)
    drop = Path(config.models.dir)
    drop.mkdir(parents=True, exist_ok=True)
    drop.chmod(0o755)
    for rel, content in (files or {}).items():
        (drop / rel).parent.mkdir(parents=True, exist_ok=True)
        (drop / rel).write_bytes(content)
    runner = web.AppRunner(build_app(config), handle_signals=False, shutdown_timeout=2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            yield Agent(url, runner.app, config, client, root)
    finally:
        await runner.cleanup()
