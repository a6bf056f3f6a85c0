"""Frozen values passed between stages: model lifecycle events and predictions.

Producers (registry, API handlers) hand these to callbacks wired by ``app.py``;
they never know who consumes them. This module holds no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from agent.tensors import Array

ModelEventKind = Literal[
    "loaded",
    "load_failed",
    "swapped",
    "rolled_back",
    "unloaded",
    "probation_passed",
    "drift_status",
]


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """Something happened to a model version; ``detail`` is JSON-able."""

    kind: ModelEventKind
    model: str
    version: int | None
    ts: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PredictionEvent:
    """One answered request: what the side taps (drift, prediction log, capture) consume."""

    id: str
    model: str
    version: int
    ts: float
    inputs: dict[str, Array]
    outputs: dict[str, Array]
    latency_s: float


@dataclass(frozen=True, slots=True)
class UpstreamRecord:
    """Something bound upstream; ``app.py`` hands it to the outbox (kinds as in SPEC 10)."""

    kind: Literal["feedback", "capture", "drift", "metrics", "event"]
    ts: float
    model: str | None
    version: int | None
    payload: dict[str, Any] = field(default_factory=dict)
