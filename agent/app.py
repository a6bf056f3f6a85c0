"""The composition root: build the aiohttp application and wire every component.

``build_app(config)`` creates the components, registers one cleanup context per
component in dependency order (executors -> registry -> initial load -> watcher ->
probation), and connects outputs to inputs (registry events -> metrics and log;
predictions -> side taps). Startup either completes or unwinds; cleanup runs in
reverse. Background stages never call each other: only this module wires them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from agent.api import admin, v2
from agent.api.middleware import edge_middleware
from agent.api.services import SERVICES, Services
from agent.clock import Clock, SystemClock
from agent.config import Config
from agent.config import diff as config_diff
from agent.events import ModelEvent
from agent.inference.batcher import BatchSettings, RunObserver
from agent.inference.session import SessionSettings
from agent.metrics import Metrics
from agent.models import dropdir
from agent.models.loader import LoadSettings
from agent.models.registry import Registry, RegistrySettings
from agent.models.rollout import ProbationPolicy
from agent.models.store import Store
from agent.models.watcher import Watcher

log = structlog.get_logger(__name__)

REGISTRY = web.AppKey("registry", Registry)
WATCHER = web.AppKey("watcher", Watcher)

#: How often probation is judged; short enough to roll back within a second or two.
_PROBATION_TICK_S = 0.5


def batch_settings(config: Config) -> BatchSettings:
    """``[batching]`` as the batcher takes it."""
    b = config.batching
    return BatchSettings(
        enabled=b.enabled,
        max_batch_size=b.max_batch_size,
        max_delay_ms=b.max_delay_ms,
        max_queue=b.max_queue,
        workers=b.workers,
    )


def registry_settings(config: Config) -> RegistrySettings:
    """``[models]`` and ``[batching]`` as the registry takes them."""
    m = config.models
    return RegistrySettings(
        load=LoadSettings(
            session=SessionSettings(
                providers=m.providers,
                intra_op_threads=m.intra_op_threads,
                inter_op_threads=m.inter_op_threads,
                graph_optimization=m.graph_optimization,
            ),
            max_load_s=m.max_load_s,
            warmup_runs=m.warmup_runs,
        ),
        batching=batch_settings(config),
        keep_versions=m.keep_versions,
        swap=m.swap,
        probation=ProbationPolicy(
            probation_s=m.probation_s,
            max_error_rate=m.max_error_rate,
            max_p99_ratio=m.max_p99_ratio,
            min_requests=m.min_probation_requests,
        ),
    )


def _on_model_event(metrics: Metrics) -> Any:
    def handle(event: ModelEvent) -> None:
        if event.kind in ("loaded", "swapped"):
            metrics.loads.labels(event.model, "ok").inc()
            metrics.load_seconds.labels(event.model).observe(float(event.detail.get("load_s", 0)))
            if event.kind == "swapped":
                metrics.swaps.labels(event.model).inc()
        elif event.kind == "load_failed":
            metrics.loads.labels(event.model, "failed").inc()
        elif event.kind == "rolled_back" and str(event.detail.get("reason", "")).startswith(
            "probation"
        ):
            metrics.rollbacks.labels(event.model, "probation").inc()

    return handle


def _observer(metrics: Metrics) -> Any:
    def factory(model: str, version: int) -> RunObserver:
        labels = (model, str(version))
        rows_h = metrics.batch_rows.labels(*labels)
        reqs_h = metrics.batch_requests.labels(*labels)
        compute_h = metrics.compute_seconds.labels(*labels)
        queue_h = metrics.queue_seconds.labels(*labels)

        def observe(rows: int, requests: int, seconds: float, waits: list[float]) -> None:
            rows_h.observe(rows)
            reqs_h.observe(requests)
            compute_h.observe(seconds)
            for wait in waits:
                queue_h.observe(wait)

        return observe

    return factory


def build_app(config: Config, *, clock: Clock | None = None) -> web.Application:
    """The whole agent as an aiohttp application (started by ``web.AppRunner``)."""
    clock = clock or SystemClock()
    metrics = Metrics()
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[edge_middleware],
    )
    app.add_routes(v2.routes)
    app.add_routes(admin.routes)
    app.cleanup_ctx.append(_registry_ctx(config, clock, metrics))
    app.cleanup_ctx.append(_watcher_ctx)
    app.cleanup_ctx.append(_probation_ctx)
    return app


def _registry_ctx(config: Config, clock: Clock, metrics: Metrics) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        state_dir = Path(config.state.dir)
        await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
        infer_pool = ThreadPoolExecutor(config.batching.workers, thread_name_prefix="infer")
        # Loads use their own single thread: a big model being validated never takes
        # the inference threads, and two loads never compete for the cores.
        load_pool = ThreadPoolExecutor(1, thread_name_prefix="load")
        store = await asyncio.to_thread(Store, state_dir)
        registry = Registry(
            store,
            registry_settings(config),
            load_executor=load_pool,
            infer_executor=infer_pool,
            clock=clock,
            on_event=_on_model_event(metrics),
            observer=_observer(metrics),
        )
        app[REGISTRY] = registry
        app[SERVICES] = Services(config=config, registry=registry, metrics=metrics, clock=clock)
        app[SERVICES].extras["tokens"] = await asyncio.to_thread(read_tokens, config)
        _export_registry_gauges(metrics, registry)
        try:
            await registry.restore()
            yield
        finally:
            await registry.close()
            infer_pool.shutdown(wait=True, cancel_futures=True)
            load_pool.shutdown(wait=False, cancel_futures=True)

    return ctx


def _export_registry_gauges(metrics: Metrics, registry: Registry) -> None:
    def queue_depth() -> list[tuple[tuple[str, ...], float]]:
        return [
            ((e.name, str(e.active.version)), float(e.active.batcher.queue_depth))
            for e in registry.models.values()
            if e.active is not None
        ]

    def model_state() -> list[tuple[tuple[str, ...], float]]:
        return [
            ((e.name, str(e.active.version if e.active else ""), e.state), 1.0)
            for e in registry.models.values()
        ]

    metrics.gauge(
        "edge_agent_queue_depth", "Requests waiting for a batch.", ("model", "version"), queue_depth
    )
    metrics.gauge(
        "edge_agent_model_state",
        "1 for the current state of each model.",
        ("model", "version", "state"),
        model_state,
    )


async def _watcher_ctx(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    config = services.config
    registry = app[REGISTRY]
    root = Path(config.models.dir)
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    insecure = await asyncio.to_thread(dropdir.insecure_reason, root)
    if insecure and not config.models.allow_insecure_dir:
        log.error("drop_dir_refused", reason=insecure)
        services.extras["drop_dir_error"] = insecure
        yield
        return
    remove = registry.unload if config.models.on_remove == "unload" else None
    watcher = Watcher(
        root,
        settle_ms=config.models.settle_ms,
        rescan_s=config.models.rescan_s,
        clock=services.clock,
        on_ready=registry.deploy,
        on_remove=remove,
    )
    app[WATCHER] = watcher
    services.rescan = watcher.rescan
    await watcher.initial_load()
    await watcher.start()
    try:
        yield
    finally:
        await watcher.stop()


async def _probation_ctx(app: web.Application) -> AsyncIterator[None]:
    registry = app[REGISTRY]

    async def loop() -> None:
        while True:
            await asyncio.sleep(_PROBATION_TICK_S)
            try:
                await registry.check_probation()
            except Exception:
                log.exception("probation_check_failed")

    task = asyncio.get_running_loop().create_task(loop(), name="probation")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def read_tokens(config: Config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Predict and admin tokens: the config's lists plus one token per line of each file."""

    def from_file(path: Path | None) -> tuple[str, ...]:
        if path is None:
            return ()
        lines = path.read_text(encoding="utf-8").splitlines()
        return tuple(t.strip() for t in lines if t.strip() and not t.startswith("#"))

    auth = config.auth
    return (
        auth.predict_tokens + from_file(auth.predict_token_file),
        auth.admin_tokens + from_file(auth.admin_token_file),
    )


#: Keys a SIGHUP applies in place; every other changed key needs a restart.
LIVE_PREFIXES = (
    "log.",
    "auth.",
    "batching.max_batch_size",
    "batching.max_delay_ms",
    "batching.max_queue",
    "batching.enabled",
    "drift.",
    "upstream.",
    "capture.",
    "models.probation_s",
    "models.max_error_rate",
    "models.max_p99_ratio",
    "models.min_probation_requests",
    "models.warmup_runs",
    "models.max_load_s",
    "models.keep_versions",
    "server.max_elements",
    "feedback.input_sample_rate",
)


def reconfigure(app: web.Application, new: Config) -> tuple[list[str], list[str]]:
    """Apply what can change live; return (applied keys, keys that need a restart)."""
    services = app[SERVICES]
    changed = config_diff(services.config, new)
    live = [k for k in changed if k.startswith(LIVE_PREFIXES)]
    restart = [k for k in changed if k not in live]
    services.extras["tokens"] = read_tokens(new)
    registry = app[REGISTRY]
    registry.settings = registry_settings(new)
    for entry in registry.models.values():
        if entry.active is not None:
            entry.active.batcher.update(batch_settings(new))
    services.config = new
    return live, restart
