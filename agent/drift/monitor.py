"""The drift tap: predictions in through a bounded queue; windows, statuses and gauges out.

``DriftMonitor`` is the component ``app.py`` plugs in. ``record`` (the prediction tap) only
appends to a bounded queue: it never blocks or raises, and when the queue is full it drops
the event and counts it. One worker task applies the queue in order (predictions, attaches,
detaches) in a thread, at most ``_MAX_DRAIN`` events per job so that a report waiting for the
states' lock waits milliseconds; every ``window_s`` it closes each version's tumbling window
and hands the closed windows to ``emit`` (the outbox); about once per ``tick_s`` it refreshes
the since-deploy statuses, whose changes are emitted as events.

This module must not import the models, api, inference or upstream packages: ``emit`` is its
only way out. The states themselves live in ``versions.Watched``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from agent.clock import Clock
from agent.drift.versions import DriftConfig, Gauges, Key, Plan, Watched, WindowName, make_plan
from agent.errors import AgentError, NotFound
from agent.events import PredictionEvent, UpstreamRecord
from agent.tensors import TensorSpec

log = structlog.get_logger(__name__)

Emit = Callable[[list[UpstreamRecord]], Awaitable[None]]

#: Events applied per thread job: enough to amortise the per-job Python (grouping, numpy
#: calls per feature) over thousands of rows, few enough that a report waiting for the lock
#: waits only milliseconds. 256 instead of 64 serves about 10-20 % more tabular requests
#: per second on one process at c=32: the job's Python competes with the event loop for
#: the GIL, and most of it is per job, not per row.
_MAX_DRAIN: Final = 256

#: Predictions are folded in every ``_DRAIN_EVERY_S`` (or as soon as a job's worth wait, but
#: at most a quarter of ``queue_size``: the queue never fills while the worker sleeps), not
#: one thread hop per request: at high rates each hop then carries a large, cheap batch, and
#: at low rates the sketches cost nothing between requests.
_DRAIN_EVERY_S: Final = 0.2


@dataclass(frozen=True, slots=True)
class _Attach:
    key: Key
    plan: Plan
    start: float


@dataclass(frozen=True, slots=True)
class _Detach:
    key: Key


@dataclass(frozen=True, slots=True)
class _Barrier:
    done: asyncio.Future[None]


_Item = PredictionEvent | _Attach | _Detach | _Barrier


def _checked(**values: Any) -> DriftConfig:
    """A ``DriftConfig``, validated (ValueError for inconsistent thresholds)."""
    config = DriftConfig(**values)
    config.settings(None, None)
    return config


class DriftMonitor:
    """Drift of every live model version: the prediction tap, its worker, reports, gauges.

    ``dropped`` counts events refused because the queue was full; ``errors`` counts batches
    that did not fit a version's baseline, failed worker steps and failed ``emit`` calls.
    """

    def __init__(
        self,
        *,
        window_s: float,
        reference_rows: int,
        psi_warn: float,
        psi_alert: float,
        min_rows: int,
        alert_share: float,
        queue_size: int,
        clock: Clock,
        emit: Emit,
        tick_s: float = 1.0,
        stop_timeout_s: float = 10.0,
        sample_rate: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        """Raises ValueError for inconsistent thresholds (the config checks them first).

        Args:
            tick_s: how often the worker looks for a due window and refreshes statuses.
            stop_timeout_s: how long ``stop`` waits for the final flush before cancelling.
            sample_rate: share of predictions sketched (``[drift] sample_rate``).
        """
        self._config = _checked(
            window_s=window_s,
            reference_rows=reference_rows,
            psi_warn=psi_warn,
            psi_alert=psi_alert,
            min_rows=min_rows,
            alert_share=alert_share,
        )
        self._queue_size = queue_size
        self._wake_at = max(1, min(_MAX_DRAIN, queue_size // 4))
        self.sample_rate = sample_rate
        self._rng = rng or random.Random()  # noqa: S311 -- sampling, not security
        self._clock = clock
        self._emit = emit
        self._tick_s = tick_s
        self._stop_timeout_s = stop_timeout_s
        self._watched = Watched(clock)
        self._items: deque[_Item] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._pending: dict[Key, Plan] = {}
        self._active: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_roll = clock.monotonic() + window_s
        self._next_refresh = clock.monotonic()
        self.dropped = 0
        self._failures = 0

    @property
    def errors(self) -> int:
        """Refused batches, failed worker steps and failed ``emit`` calls."""
        return self._failures + self._watched.refused

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker task; the first window closes ``window_s`` from now."""
        if self._task is not None:
            return
        self._stopping = False
        self._next_roll = self._clock.monotonic() + self._config.window_s
        self._task = asyncio.get_running_loop().create_task(self._run(), name="drift-monitor")

    async def stop(self) -> None:
        """Apply what is queued, close and emit every current window, stop the worker."""
        self._stopping = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is None:
            await self._finish()
            return
        done, _ = await asyncio.wait({task}, timeout=self._stop_timeout_s)
        if not done:
            # emit (the outbox) is stuck: give up the flush rather than hang the shutdown.
            log.warning("drift_stop_timeout", queued=self._queued, timeout_s=self._stop_timeout_s)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def drain(self) -> None:
        """Wait until everything queued before this call is applied, a due window is closed
        and emitted, and the statuses are refreshed."""
        if self._task is None:
            while self._items:
                await self._step(force_refresh=True)
            return
        done = asyncio.get_running_loop().create_future()
        self._items.append(_Barrier(done))
        self._wakeup.set()
        await done

    def configure(
        self,
        *,
        window_s: float,
        reference_rows: int,
        psi_warn: float,
        psi_alert: float,
        min_rows: int,
        alert_share: float,
    ) -> None:
        """Apply a reloaded ``[drift]`` section: thresholds at once (manifest overrides stay),
        ``window_s`` from the next window, ``reference_rows`` for later attaches."""
        config = _checked(
            window_s=window_s,
            reference_rows=reference_rows,
            psi_warn=psi_warn,
            psi_alert=psi_alert,
            min_rows=min_rows,
            alert_share=alert_share,
        )
        self._config = config
        self._watched.retune(config)

    # --- the model side: attach, detach, record ---------------------------------------------

    def attach(
        self,
        model: str,
        version: int,
        *,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        baseline: Path | None,
        features: dict[str, tuple[str, ...]],
        psi_warn: float | None,
        psi_alert: float | None,
    ) -> None:
        """Watch a version that went live; it becomes the model's active one.

        The worker loads and checks the baseline. A bad one never raises: the version is
        compared with its first ``reference_rows`` live rows instead, and the report says why
        under ``baseline_error``. Feature names come from ``features`` (the manifest's
        ``[inputs]``), else f0, f1, ...
        """
        plan = make_plan(
            self._config,
            inputs=inputs,
            outputs=outputs,
            baseline=baseline,
            features=features,
            psi_warn=psi_warn,
            psi_alert=psi_alert,
        )
        if plan.problems:
            log.warning(
                "drift_settings_refused", model=model, version=version, problems=plan.problems
            )
        key = (model, version)
        self._active[model] = version
        self._pending[key] = plan
        self._items.append(_Attach(key, plan, self._clock.wall()))
        self._wakeup.set()

    def detach(self, model: str, version: int) -> None:
        """Stop watching a retired version; its current window is closed and emitted."""
        if self._active.get(model) == version:
            del self._active[model]
        self._items.append(_Detach((model, version)))
        self._wakeup.set()

    def record(self, event: PredictionEvent) -> None:
        """The prediction tap (call it on the event loop): queue the event, or drop and count.

        With ``sample_rate`` below 1, only that share of requests is sketched: every score
        is a rate or a distribution, so a uniform sample estimates the same thing for a
        fraction of the CPU (the report's ``rows`` counts sketched rows).
        """
        if self.sample_rate < 1.0 and self._rng.random() >= self.sample_rate:
            return
        if self._queued >= self._queue_size or self._stopping:
            self.dropped += 1
            return
        self._items.append(event)
        self._queued += 1
        if self._queued >= self._wake_at:
            self._wakeup.set()

    # --- reading ----------------------------------------------------------------------------

    def report(self, model: str, window: WindowName = "deploy") -> dict[str, Any]:
        """The drift report (SPEC section 10) of the model's active version, fresh.

        It adds ``reference`` ("baseline" or "live"), ``reference_rows``, and when relevant
        ``baseline_error`` and ``settings_error``. Raises NotFound for a model without a
        watched live version.
        """
        version = self._active.get(model)
        if version is None:
            known = ", ".join(sorted(self._active)) or "none"
            raise NotFound(
                f'no drift report for model "{model}": it has no live version (models with '
                f"one: {known}); check the name with GET /v1/models"
            )
        key = (model, version)
        report = self._watched.report(key, window)
        if report is None:
            return _pending_report(key, window, self._clock.wall(), self._pending.get(key))
        return report

    def status(self, model: str) -> str | None:
        """The since-deploy status of the model's active version at the last refresh (about
        ``tick_s`` old), or None when the model has no watched live version."""
        version = self._active.get(model)
        if version is None:
            return None
        return self._watched.status((model, version)) or "insufficient_data"

    def gauges(self) -> Gauges:
        """``edge_agent_drift_score`` samples labelled (model, version, io, feature, score)
        from the active versions' since-deploy reports at the last refresh; with several
        tensors on one side, the feature is ``tensor.feature``."""
        return self._watched.gauges(list(self._active.items()))

    def status_gauges(self) -> Gauges:
        """``edge_agent_drift_status`` samples labelled (model, version): 0 ok, 1 warn,
        2 alert, -1 insufficient data."""
        return self._watched.status_gauges(list(self._active.items()))

    # --- the worker -------------------------------------------------------------------------

    async def _run(self) -> None:
        log.info("drift_worker_started", window_s=self._config.window_s)
        try:
            while not self._stopping:
                await self._wait()
                await self._step(force_refresh=False)
            await self._finish()
        except asyncio.CancelledError:
            log.warning("drift_worker_cancelled", queued=self._queued)
            raise
        log.info("drift_worker_stopped", dropped=self.dropped, errors=self.errors)

    async def _wait(self) -> None:
        if self._queued >= self._wake_at or self._control_queued():
            return
        self._wakeup.clear()
        cadence = _DRAIN_EVERY_S if self._items else self._tick_s
        timeout = min(cadence, max(0.0, self._next_roll - self._clock.monotonic()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)

    def _control_queued(self) -> bool:
        """An attach, detach or drain is waiting: those are handled at once."""
        return any(not isinstance(item, PredictionEvent) for item in self._items)

    async def _step(self, *, force_refresh: bool) -> None:
        batch = self._take()
        barriers = [item.done for item in batch if isinstance(item, _Barrier)]
        records: list[UpstreamRecord] = []
        try:
            records += await asyncio.to_thread(self._apply, batch)
            self._forget_installed(batch)
            now = self._clock.monotonic()
            if now >= self._next_roll:
                # After a stall (suspend, overload) one window covers the gap: no burst.
                self._next_roll = max(self._next_roll + self._config.window_s, now)
                records += await asyncio.to_thread(self._watched.roll_all)
            if force_refresh or barriers or now >= self._next_refresh:
                self._next_refresh = now + self._tick_s
                records += await asyncio.to_thread(self._watched.refresh)
        except Exception:
            self._failures += 1
            log.exception("drift_step_failed", items=len(batch))
        await self._send(records)
        for done in barriers:
            if not done.done():
                done.set_result(None)

    async def _finish(self) -> None:
        """The flush at shutdown: everything queued, then every current window."""
        while self._items:
            await self._step(force_refresh=False)
        try:
            records = await asyncio.to_thread(self._watched.roll_all)
            records += await asyncio.to_thread(self._watched.refresh)
        except Exception:
            self._failures += 1
            log.exception("drift_flush_failed")
            return
        await self._send(records)

    def _forget_installed(self, batch: Sequence[_Item]) -> None:
        for item in batch:
            if isinstance(item, _Attach) and self._pending.get(item.key) is item.plan:
                del self._pending[item.key]

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        events = 0
        while self._items and events < _MAX_DRAIN:
            item = self._items.popleft()
            batch.append(item)
            events += isinstance(item, PredictionEvent)
        self._queued -= events
        return batch

    def _apply(self, batch: Sequence[_Item]) -> list[UpstreamRecord]:
        """(In the worker thread.) Apply events and commands in queue order; returns the
        windows closed by re-attaching or detaching."""
        records: list[UpstreamRecord] = []
        events: list[PredictionEvent] = []
        for item in batch:
            if isinstance(item, PredictionEvent):
                events.append(item)
                continue
            self._watched.update(events)
            events = []
            if isinstance(item, _Attach):
                records += self._watched.install(item.key, item.plan, item.start)
            elif isinstance(item, _Detach):
                records += self._watched.remove(item.key)
        self._watched.update(events)
        return records

    async def _send(self, records: list[UpstreamRecord]) -> None:
        if not records:
            return
        try:
            await self._emit(records)
        except AgentError as exc:
            self._failures += 1
            log.error("drift_emit_failed", records=len(records), error=exc.message)  # noqa: TRY400 -- an expected failure (disk full): no traceback
        except Exception:
            self._failures += 1
            log.exception("drift_emit_failed", records=len(records))


def _pending_report(key: Key, window: WindowName, now: float, plan: Plan | None) -> dict[str, Any]:
    """The report of a version whose attach the worker has not applied yet."""
    return {
        "model": key[0],
        "version": key[1],
        "window": {"kind": window, "start": now, "end": now, "rows": 0},
        "status": "insufficient_data",
        "reference": "baseline" if plan is not None and plan.baseline else "live",
        "reference_rows": 0,
        "features": [],
        "outputs": [],
    }
