"""Shared fixtures: real ONNX models, a real agent on 127.0.0.1:0, a real client.

``make_agent`` is a factory fixture that owns cleanup (aiohttp's ``make_runner`` idea):
each call builds the app from a real config, loads the models dropped into its own
drop dir, binds an ephemeral port and returns an ``Agent`` handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import modelgen
import pytest
import uvloop
from aiohttp import web

from agent import config as config_module
from agent.api.fastpath import close_connections, tcp_site
from agent.app import REGISTRY, build_app
from agent.config import Config
from agent.models.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "models"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Async tests run on the standard loop; those marked ``both_loops`` also on uvloop
    (the daemon's default ``[server] event_loop``)."""
    if item.get_closest_marker("both_loops") is not None:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def load_script(name: str, module: str) -> ModuleType:
    """``scripts/<name>.py`` as module ``module`` (scripts/ is not a package); loaded once."""
    if module in sys.modules:
        return sys.modules[module]
    spec = importlib.util.spec_from_file_location(module, ROOT / "scripts" / (name + ".py"))
    assert spec is not None
    assert spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)
    return loaded


def load_collector() -> ModuleType:
    """The reference collector, ``scripts/collector.py``."""
    return load_script("collector", "edge_collector")


def toml_value(value: Any) -> str:
    """A Python value as TOML (enough for test configs)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def render_config(sections: dict[str, dict[str, Any]]) -> str:
    """Sections of settings as TOML text."""
    lines = []
    for section, body in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in body.items())
        lines.append("")
    return "\n".join(lines)


def agent_config(tmp: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """A config for a test agent: ephemeral port, dirs under ``tmp``, fast settling."""
    sections: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "models": {"dir": tmp / "models", "settle_ms": 100, "rescan_s": 2.0, "probation_s": 0.0},
        "state": {"dir": tmp / "state"},
        "log": {"level": "warning", "format": "json"},
    }
    for section, body in (overrides or {}).items():
        sections.setdefault(section, {}).update(body)
    path = tmp / "agent.toml"
    path.write_text(render_config(sections))
    return config_module.load(path)


@dataclass
class Agent:
    """A running agent: its URL, app, registry, config, and an HTTP client."""

    url: str
    app: web.Application
    config: Config
    client: aiohttp.ClientSession
    root: Path
    site: web.BaseSite | None = None

    @property
    def registry(self) -> Registry:
        """The registry of the running app."""
        return self.app[REGISTRY]

    @property
    def models_dir(self) -> Path:
        """The drop directory."""
        return Path(self.config.models.dir)

    async def infer_json(
        self, model: str, doc: dict[str, Any], version: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        """POST a V2 JSON request; returns status and decoded JSON body."""
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        async with self.client.post(self.url + path, json=doc) as resp:
            return resp.status, await resp.json(content_type=None)


MakeAgent = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def make_agent(tmp_path: Path) -> AsyncIterator[MakeAgent]:
    """Start agents on 127.0.0.1:0; every one is stopped when the test ends."""
    runners: list[web.AppRunner] = []
    sites: list[web.BaseSite] = []
    clients: list[aiohttp.ClientSession] = []
    counter = 0

    async def start(
        files: dict[str, bytes | Path] | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        root: Path | None = None,
    ) -> Agent:
        nonlocal counter
        counter += 1
        base = root or tmp_path / f"agent{counter}"
        base.mkdir(parents=True, exist_ok=True)
        config = agent_config(base, overrides)
        drop = Path(config.models.dir)
        drop.mkdir(parents=True, exist_ok=True)
        drop.chmod(0o755)
        for rel, content in (files or {}).items():
            target = drop / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                target.write_bytes(content)
        app = build_app(config)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2)
        await runner.setup()
        runners.append(runner)
        site = tcp_site(runner, "127.0.0.1", 0, fast=config.server.fast_path)
        await site.start()
        sites.append(site)
        port = runner.addresses[0][1]
        client = aiohttp.ClientSession()
        clients.append(client)
        return Agent(f"http://127.0.0.1:{port}", app, config, client, base, site)

    yield start
    for client in clients:
        await client.close()
    await close_connections(sites, 1.0)
    for runner in reversed(runners):
        with contextlib.suppress(Exception):
            await runner.cleanup()


@pytest.fixture(scope="session")
def models() -> dict[str, bytes]:
    """Real ONNX models built once per test session."""
    return {
        "tabular": modelgen.tabular_classifier(),
        "tabular_v2": modelgen.tabular_classifier_v2(),
        "image": modelgen.image_classifier(),
        "text": modelgen.text_classifier(),
        "multi_io": modelgen.multi_io_model(),
        "fixed": modelgen.fixed_batch_model(),
    }


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05
) -> None:
    """Poll until ``predicate()`` is true; fail the test after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
