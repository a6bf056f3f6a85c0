"""The composition root: build the aiohttp application and wire every component.

``build_app(config)`` creates the components, registers one cleanup context per
component in dependency order (executors -> registry -> initial load -> watcher ->
probation), and connects outputs to inputs (registry events -> metrics and log;
predictions -> side taps). Startup either completes or unwinds; cleanup runs in
reverse. Background stages never call each other: only this module wires them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog
from aiohttp import web

from agent.api import admin, v2
from agent.api.middleware import TRACKER, edge_middleware
from agent.api.services import SERVICES, Services
from agent.clock import Clock, SystemClock
from agent.config import Config
from agent.config import diff as config_diff
from agent.drift.monitor import DriftMonitor
from agent.events import ModelEvent, PredictionEvent, UpstreamRecord
from agent.feedback.join import Quality
from agent.feedback.predlog import PredictionLog, PredLogSettings
from agent.feedback.service import FeedbackLoop
from agent.inference.batcher import BatchSettings, RunObserver
from agent.inference.session import SessionSettings
from agent.metrics import Metrics
from agent.models import dropdir
from agent.models.loader import LoadSettings
from agent.models.registry import Registry, RegistrySettings
from agent.models.rollout import ProbationPolicy
from agent.models.store import Store
from agent.models.watcher import Watcher
from agent.upstream.outbox import Outbox
from agent.upstream.pump import Pump, to_outbox
from agent.upstream.shipper import Shipper

log = structlog.get_logger(__name__)

REGISTRY = web.AppKey("registry", Registry)
WATCHER = web.AppKey("watcher", Watcher)
OUTBOX = web.AppKey("outbox", Outbox)
SHIPPER = web.AppKey("shipper", Shipper)
PUMP = web.AppKey("pump", Pump)
FEEDBACK = web.AppKey("feedback", FeedbackLoop)
DRIFT = web.AppKey("drift", DriftMonitor)

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
        inline_max_us=b.inline_max_us,
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


def _on_model_event(app: web.Application, metrics: Metrics) -> Any:
    """Registry events -> metrics, an upstream event record, and the drift monitor."""

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
        if PUMP in app:
            app[PUMP].push(
                UpstreamRecord(
                    "event",
                    event.ts,
                    event.model,
                    event.version,
                    {"event": event.kind, **event.detail},
                )
            )
        for hook in app[SERVICES].extras.get("model_event_hooks", ()):
            hook(event)

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
    # One context per component, in dependency order; cleanup runs in reverse, so the
    # watcher stops first and the outbox, which everything writes to, closes last.
    app.cleanup_ctx.append(_outbox_ctx(config, clock))
    app.cleanup_ctx.append(_shipper_ctx(config, clock))
    app.cleanup_ctx.append(_pump_ctx(config, clock))
    app.cleanup_ctx.append(_registry_ctx(config, clock, metrics))
    app.cleanup_ctx.append(_feedback_ctx)
    if config.drift.enabled:
        app.cleanup_ctx.append(_drift_ctx)
    app.cleanup_ctx.append(_watcher_ctx)
    app.cleanup_ctx.append(_probation_ctx)
    return app


def _registry_ctx(config: Config, clock: Clock, metrics: Metrics) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        state_dir = Path(config.state.dir)
        await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
        store = await asyncio.to_thread(Store, state_dir)
        on_event = _on_model_event(app, metrics)
        serving = running_registry(app, Registry, store, config, clock, metrics, on_event)
        async with serving as registry:
            app[SERVICES] = Services(config=config, registry=registry, metrics=metrics, clock=clock)
            app[SERVICES].extras["tokens"] = await asyncio.to_thread(read_tokens, config)
            _export_registry_gauges(metrics, registry)
            _export_upstream_gauges(metrics, app)
            await registry.restore()
            yield

    return ctx


R = TypeVar("R", bound=Registry)


@contextlib.asynccontextmanager
async def running_registry(
    app: web.Application,
    kind: type[R],
    store: Store,
    config: Config,
    clock: Clock,
    metrics: Metrics,
    on_event: Callable[[ModelEvent], None],
) -> AsyncIterator[R]:
    """A registry (``Registry``, or a replica's ``Follower``) on its own thread pools, as
    ``app[REGISTRY]``; closed, and its pools shut down, on exit."""
    infer_pool = ThreadPoolExecutor(config.batching.workers, thread_name_prefix="infer")
    # Loads use their own single thread: a big model being validated never takes the
    # inference threads, and two loads never compete for the cores.
    load_pool = ThreadPoolExecutor(1, thread_name_prefix="load")
    registry = kind(
        store,
        registry_settings(config),
        load_executor=load_pool,
        infer_executor=infer_pool,
        clock=clock,
        on_event=on_event,
        observer=_observer(metrics),
        busy=lambda: _http_busy(app),
    )
    as_registry: Registry = registry
    app[REGISTRY] = as_registry
    try:
        yield registry
    finally:
        await registry.close()
        # Off the loop: a run still in onnxruntime must not block the other cleanups.
        await asyncio.to_thread(infer_pool.shutdown, wait=True, cancel_futures=True)
        load_pool.shutdown(wait=False, cancel_futures=True)


def _http_busy(app: web.Application) -> bool:
    """More than one HTTP request in flight: fast models then batch on the loop."""
    tracker = app.get(TRACKER)
    return tracker is not None and tracker.active > 1


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


def _outbox_ctx(config: Config, clock: Clock) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        state_dir = Path(config.state.dir)
        await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
        outbox = Outbox(
            state_dir / "outbox.db",
            max_bytes=config.outbox.max_bytes,
            clock=clock,
            fsync=config.outbox.fsync,
        )
        await outbox.open()
        app[OUTBOX] = outbox
        try:
            yield
        finally:
            await outbox.close()

    return ctx


def _upstream_token(config: Config) -> str | None:
    up = config.upstream
    if up.token_file is not None:
        return up.token_file.read_text(encoding="utf-8").strip() or None
    return up.token or None


def _shipper_ctx(config: Config, clock: Clock) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        up = config.upstream
        token = await asyncio.to_thread(_upstream_token, config)
        shipper = Shipper(
            app[OUTBOX],
            url=up.url or None,
            token=token,
            agent_id=up.agent_id or socket.gethostname(),
            clock=clock,
            rng=random.Random(),  # noqa: S311 -- backoff jitter, not security
            format=up.format,
            gzip=up.gzip,
            flush_interval_s=up.flush_interval_s,
            max_backoff_s=up.max_backoff_s,
            batch_max_records=up.batch_max_records,
            batch_max_bytes=up.batch_max_bytes,
            timeout_s=up.timeout_s,
        )
        app[SHIPPER] = shipper
        shipper.start()
        try:
            yield
        finally:
            # Last chance to ship what the components flushed while stopping; bounded, so a
            # dead upstream cannot hold the exit (the outbox keeps the rest for next start).
            await shipper.stop(flush_timeout_s=min(5.0, config.server.drain_timeout_s))

    return ctx


def _pump_ctx(config: Config, clock: Clock) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        pump = Pump(
            app[OUTBOX],
            clock=clock,
            snapshot=lambda: _metrics_snapshot(app, clock),
            snapshot_every_s=max(config.upstream.flush_interval_s * 12, 60.0),
        )
        app[PUMP] = pump
        pump.start()
        try:
            yield
        finally:
            await pump.stop()

    return ctx


def _metrics_snapshot(app: web.Application, clock: Clock) -> list[UpstreamRecord]:
    if SERVICES not in app:
        return []
    registry = app[SERVICES].registry
    models = {
        e.name: {
            "version": e.active.version if e.active else None,
            "state": e.state,
            "requests": e.active.stats.requests if e.active else 0,
            "errors": e.active.stats.errors if e.active else 0,
            "p99_s": e.active.stats.p99() if e.active else None,
        }
        for e in registry.models.values()
    }
    quality = app[FEEDBACK].quality.items() if FEEDBACK in app else []
    return [
        UpstreamRecord(
            "metrics",
            clock.wall(),
            None,
            None,
            {
                "models": models,
                "quality": [{"model": m, "version": v, **q} for (m, v), q in quality],
            },
        )
    ]


def _labels_of(app: web.Application) -> dict[str, tuple[str, ...]]:
    registry = app[REGISTRY]
    return {
        e.name: e.active.manifest.labels
        for e in registry.models.values()
        if e.active is not None and e.active.manifest is not None
    }


async def _feedback_ctx(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    config = services.config
    fb = config.feedback
    predlog = PredictionLog(
        Path(config.state.dir) / "predictions.db",
        PredLogSettings(
            ttl_s=fb.ttl_s, max_bytes=fb.max_bytes, input_sample_rate=fb.input_sample_rate
        ),
        services.clock,
    )
    await predlog.open()
    emit = _outbox_emit(app[OUTBOX])
    loop = FeedbackLoop(
        predlog,
        Quality(fb.window_s),
        emit=emit,
        capture=app[PUMP].push,
        labels_of=lambda: _labels_of(app),
        clock=services.clock,
        capture_rate=config.capture.rate,
        on_delay=services.metrics.label_delay.observe,
    )
    app[FEEDBACK] = loop
    services.feedback = loop
    _add_tap(services, loop.record)
    _export_quality_gauges(services.metrics, loop, app)
    services.extras.setdefault("model_details", {})["quality"] = loop.quality.report
    services.extras.setdefault("status_sections", {})["upstream"] = lambda: _upstream_status(app)
    try:
        yield
    finally:
        services.feedback = None
        await predlog.close()


async def _drift_ctx(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    d = services.config.drift
    emit = _outbox_emit(app[OUTBOX])
    monitor = DriftMonitor(
        **_drift_thresholds(services.config),
        queue_size=d.queue_size,
        clock=services.clock,
        emit=emit,
        sample_rate=d.sample_rate,
    )
    app[DRIFT] = monitor
    registry = app[REGISTRY]

    def attach(event: ModelEvent) -> None:
        """A version went live (or came back): give drift its signature and baseline;
        a version that left service: let drift close its window and forget it."""
        previous = event.detail.get("from")
        if event.kind in ("swapped", "rolled_back") and previous not in (None, event.version):
            monitor.detach(event.model, int(previous))
        if event.kind == "unloaded" and event.version is not None:
            monitor.detach(event.model, event.version)
        entry = registry.models.get(event.model)
        live = entry.active if entry else None
        if event.kind not in ("loaded", "swapped", "rolled_back") or live is None:
            return
        manifest = live.manifest
        baseline = manifest.baseline if manifest else None
        sig = live.runner.signature
        monitor.attach(
            live.name,
            live.version,
            inputs=sig.inputs,
            outputs=sig.outputs,
            baseline=live.bundle.dir / baseline if baseline else None,
            features=dict(manifest.features) if manifest else {},
            psi_warn=manifest.psi_warn if manifest else None,
            psi_alert=manifest.psi_alert if manifest else None,
        )

    await monitor.start()
    # Versions restored before this component started need attaching too.
    for entry in registry.models.values():
        if entry.active is not None:
            attach(ModelEvent("loaded", entry.name, entry.active.version, services.clock.wall()))
    services.extras.setdefault("model_event_hooks", []).append(attach)
    services.extras.setdefault("model_details", {})["drift"] = lambda name: {
        "status": monitor.status(name)
    }
    services.drift = monitor
    _add_tap(services, monitor.record)
    services.metrics.gauge(
        "edge_agent_drift_score",
        "Drift scores of the deploy window.",
        ("model", "version", "io", "feature", "score"),
        monitor.gauges,
    )
    services.metrics.gauge(
        "edge_agent_drift_status",
        "Model drift status: 0 ok, 1 warn, 2 alert, -1 too few rows.",
        ("model", "version"),
        monitor.status_gauges,
    )
    try:
        yield
    finally:
        services.drift = None
        await monitor.stop()


def _outbox_emit(outbox: Outbox) -> Any:
    """An ``emit`` for components whose records must be durable when it returns."""

    async def emit(records: list[UpstreamRecord]) -> None:
        await outbox.put_many([to_outbox(r) for r in records])

    return emit


def _drift_thresholds(config: Config) -> dict[str, Any]:
    d = config.drift
    return {
        "window_s": d.window_s,
        "reference_rows": d.reference_rows,
        "psi_warn": d.psi_warn,
        "psi_alert": d.psi_alert,
        "min_rows": d.min_rows,
        "alert_share": d.alert_share,
    }


def _upstream_status(app: web.Application) -> dict[str, Any]:
    """Outbox and shipper health for GET /v1/models and ``edge-agent status``."""
    ob, sh = app[OUTBOX].stats(), app[SHIPPER].stats()
    return {
        "url_set": bool(app[SERVICES].config.upstream.url),
        "outbox_records": ob.total_records,
        "outbox_bytes": ob.total_bytes,
        "outbox_max_bytes": ob.max_bytes,
        "oldest_age_s": round(ob.oldest_age_s, 1),
        "dropped": {k: v for k, v in ob.dropped.items() if v},
        "dead_letter_records": ob.dead_letter_records,
        "corrupt_records": ob.corrupt_records,
        "sent_records": sh.sent_records,
        "consecutive_failures": sh.consecutive_failures,
        "last_error": sh.last_error,
    }


def _add_tap(services: Services, tap: Any) -> None:
    """Fan predictions out to one more side tap (each never blocks)."""
    taps = services.extras.setdefault("taps", [])
    taps.append(tap)

    def fan_out(event: PredictionEvent) -> None:
        for t in taps:
            t(event)

    services.on_prediction = taps[0] if len(taps) == 1 else fan_out


def _export_quality_gauges(metrics: Metrics, loop: FeedbackLoop, app: web.Application) -> None:
    def quality() -> list[tuple[tuple[str, ...], float]]:
        return [
            ((model, str(version), key), float(report[key]))
            for (model, version), report in loop.quality.items()
            for key in ("accuracy", "mae", "rmse")
            if key in report
        ]

    metrics.gauge(
        "edge_agent_quality",
        "Live quality from feedback joins (since start).",
        ("model", "version", "metric"),
        quality,
    )
    metrics.gauge(
        "edge_agent_feedback_records",
        "Feedback records by outcome.",
        ("outcome",),
        lambda: [(("accepted",), float(loop.accepted)), (("unknown",), float(loop.unknown))],
    )

    def dropped() -> list[tuple[tuple[str, ...], float]]:
        rows: list[tuple[tuple[str, ...], float]] = [
            (("predlog", "prediction"), float(loop.predlog.dropped))
        ]
        if DRIFT in app:
            rows.append((("drift", "prediction"), float(app[DRIFT].dropped)))
        if PUMP in app:
            rows += [(("pump", kind), float(n)) for kind, n in app[PUMP].dropped.items()]
        return rows

    metrics.gauge(
        "edge_agent_tap_dropped",
        "Records dropped before the outbox: a side tap's queue was full.",
        ("tap", "kind"),
        dropped,
    )


def _export_upstream_gauges(metrics: Metrics, app: web.Application) -> None:
    def outbox() -> list[tuple[tuple[str, ...], float]]:
        st = app[OUTBOX].stats()
        rows: list[tuple[tuple[str, ...], float]] = []
        for kind, n in st.records.items():
            rows.append((("records", kind), float(n)))
        for kind, n in st.bytes.items():
            rows.append((("bytes", kind), float(n)))
        for kind, n in st.dropped.items():
            rows.append((("dropped", kind), float(n)))
        rows += [
            (("oldest_age_s", ""), st.oldest_age_s),
            (("corrupt_records", ""), float(st.corrupt_records)),
            (("dead_letter_records", ""), float(st.dead_letter_records)),
            (("max_bytes", ""), float(st.max_bytes)),
        ]
        return rows

    def upstream() -> list[tuple[tuple[str, ...], float]]:
        st = app[SHIPPER].stats()
        return [((outcome,), float(n)) for outcome, n in st.outcomes.items()]

    metrics.gauge(
        "edge_agent_outbox",
        "Outbox records, bytes and drops by kind; oldest age.",
        ("measure", "kind"),
        outbox,
    )
    metrics.gauge(
        "edge_agent_upstream_sends", "Upstream send attempts by outcome.", ("outcome",), upstream
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
    "batching.inline_max_us",
    "models.probation_s",
    "models.max_error_rate",
    "models.max_p99_ratio",
    "models.min_probation_requests",
    "models.warmup_runs",
    "models.max_load_s",
    "models.keep_versions",
    "server.max_elements",
    "server.max_rows",
    "capture.rate",
    "drift.window_s",
    "drift.reference_rows",
    "drift.psi_warn",
    "drift.psi_alert",
    "drift.min_rows",
    "drift.alert_share",
    "drift.sample_rate",
    "upstream.token",
    "upstream.token_file",
)


def reconfigure(app: web.Application, new: Config) -> tuple[list[str], list[str]]:
    """Apply what can change live; return (applied keys, keys that need a restart).

    Raises OSError when a token file named by the new config cannot be read; the caller
    then keeps the running config.
    """
    services = app[SERVICES]
    changed = config_diff(services.config, new)
    live = [k for k in changed if k.startswith(LIVE_PREFIXES)]
    restart = [k for k in changed if k not in live]
    tokens = read_tokens(new)
    upstream_token = _upstream_token(new)
    services.extras["tokens"] = tokens
    if SHIPPER in app:
        app[SHIPPER].update_token(upstream_token)
    if FEEDBACK in app:
        app[FEEDBACK].capture_rate = new.capture.rate
    if DRIFT in app:
        app[DRIFT].configure(**_drift_thresholds(new))
        app[DRIFT].sample_rate = new.drift.sample_rate
    registry = app[REGISTRY]
    registry.settings = registry_settings(new)
    for entry in registry.models.values():
        if entry.active is not None:
            entry.active.batcher.update(batch_settings(new))
    services.config = new
    return live, restart
