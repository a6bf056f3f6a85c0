"""What handlers may reach: one ``Services`` value under one typed ``AppKey``.

``app.py`` builds it; handlers read ``request.app[SERVICES]`` and nothing global.
Optional components (drift, feedback, outbox) are None until their issue lands or
when disabled in the config, and handlers say so plainly.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from aiohttp import web

from agent.clock import Clock
from agent.config import Config
from agent.events import PredictionEvent
from agent.metrics import Metrics
from agent.models.registry import Registry

PredictionSink = Callable[[PredictionEvent], None]


class FeedbackPort(Protocol):
    """What the feedback route needs (implemented by ``feedback.service.FeedbackLoop``)."""

    async def submit(self, doc: object) -> dict[str, Any]:
        """Join and durably queue feedback; returns the counts."""


class DriftPort(Protocol):
    """What the drift route and status need (implemented by ``drift.monitor.DriftMonitor``)."""

    def report(self, model: str, window: Literal["deploy", "current"] = "deploy") -> dict[str, Any]:
        """The drift report of a model's active version."""

    def status(self, model: str) -> str | None:
        """ok / warn / alert / insufficient_data, or None when unknown."""


def request_ids() -> Callable[[], str]:
    """Fresh request ids: a random per-process prefix and a counter (unique across restarts,
    and far cheaper per request than uuid4)."""
    prefix = secrets.token_hex(6)
    counter = itertools.count(1)
    return lambda: f"{prefix}-{next(counter):x}"


@dataclass(eq=False)
class Services:
    """The components behind the HTTP API (mutable: SIGHUP swaps ``config``)."""

    config: Config
    registry: Registry
    metrics: Metrics
    clock: Clock
    on_prediction: PredictionSink = lambda event: None
    feedback: FeedbackPort | None = None
    drift: DriftPort | None = None
    rescan: Callable[[], Awaitable[dict[str, Any]]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    accepting: bool = True
    new_request_id: Callable[[], str] = field(default_factory=request_ids)


SERVICES = web.AppKey("services", Services)
#: Per-request values the middleware and handlers share (for the access log line).
REQUEST_ID = web.RequestKey("request_id", str)
MODEL = web.RequestKey("model", str)
VERSION = web.RequestKey("version", int)
