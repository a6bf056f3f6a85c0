"""The feedback loop as one component: log predictions, take feedback, keep quality.

``FeedbackLoop.record`` is the prediction tap (never blocks). ``submit`` parses a
feedback request, joins it with the log, hands the joined records to ``emit`` (the
outbox, wired by app.py) and answers only once ``emit`` returned, i.e. once the records
are durable. It also samples captures (``[capture] rate``) for retraining and hands them
to ``capture`` (the bounded upstream pump), which also takes the live-quality reports of
each closed window (``metrics`` records; the window tumbles when feedback arrives).
This module must not import the upstream package: ``emit`` and ``capture`` are its only
ways out.

A feedback record upstream carries ``id``, ``label`` (canonical: the class name when the
manifest names the index) or ``value``, ``predicted`` in the same form (one value for a
one-row prediction, a list per row otherwise), the prediction's ``outputs``, its sampled
``inputs`` when kept, ``prediction_ts`` and ``delay_s``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from agent.clock import Clock
from agent.events import PredictionEvent, UpstreamRecord
from agent.feedback.join import Joined, Quality, join, parse_feedback
from agent.feedback.predlog import PredictionLog

log = structlog.get_logger(__name__)

Emit = Callable[[list[UpstreamRecord]], Awaitable[None]]
LabelsOf = Callable[[], dict[str, tuple[str, ...]]]


class FeedbackLoop:
    """Prediction log + joins + live quality + captures."""

    def __init__(
        self,
        predlog: PredictionLog,
        quality: Quality,
        *,
        emit: Emit,
        capture: Callable[[UpstreamRecord], None] | None = None,
        labels_of: LabelsOf,
        clock: Clock,
        capture_rate: float = 0.0,
        on_delay: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.predlog = predlog
        self.quality = quality
        self._emit = emit
        self._labels_of = labels_of
        self._clock = clock
        self.capture_rate = capture_rate
        self._on_delay = on_delay
        self._rng = rng or random.Random()  # noqa: S311 -- sampling, not security
        self._capture = capture
        self.accepted = 0
        self.unknown = 0

    def record(self, event: PredictionEvent) -> None:
        """The prediction tap: log it, and maybe keep a capture (never blocks)."""
        self.predlog.record(event)
        sampled = self.capture_rate and self._rng.random() < self.capture_rate
        if sampled and self._capture is not None:
            self._capture(
                UpstreamRecord(
                    "capture",
                    event.ts,
                    event.model,
                    event.version,
                    {
                        "id": event.id,
                        "inputs": _plain(event.inputs),
                        "outputs": _plain(event.outputs),
                    },
                )
            )

    async def submit(self, doc: object) -> dict[str, Any]:
        """Accept feedback; returns {"accepted", "unknown", "unknown_ids"} once durable."""
        records = parse_feedback(doc)
        predictions = await self.predlog.lookup(list({r.id for r in records}))
        now = self._clock.wall()
        self._roll_quality(now)
        joined, unknown = join(records, predictions, self._labels_of(), now)
        if joined:
            # Building the records converts arrays to lists: off the loop for big requests.
            upstream = await asyncio.to_thread(lambda: [_upstream(j, now) for j in joined])
            await self._emit(upstream)
        for j in joined:
            self._count(j)
        self.accepted += len(joined)
        self.unknown += len(unknown)
        if unknown:
            log.info("feedback_unknown_ids", count=len(unknown), sample=unknown[:5])
        return {"accepted": len(joined), "unknown": len(unknown), "unknown_ids": unknown[:20]}

    def _roll_quality(self, now: float) -> None:
        """Close the quality window when it is over and ship its reports (metrics records)."""
        closed = self.quality.roll(now)
        if not closed or self._capture is None:
            return
        for (model, version), report in closed.items():
            self._capture(UpstreamRecord("metrics", now, model, version, {"quality": report}))

    def _count(self, j: Joined) -> None:
        key = (j.prediction.model, j.prediction.version)
        if self._on_delay is not None:
            self._on_delay(j.delay_s)
        if j.predicted is None or len(j.predicted) != len(j.truth):
            return  # nothing comparable (e.g. one label for a 3-row request): shipped only
        if j.feedback.value is not None:
            self.quality.add_values(
                key, [float(x) for x in j.truth], [float(x) for x in j.predicted]
            )
        else:
            self.quality.add_labels(key, [str(x) for x in j.truth], [str(x) for x in j.predicted])


def _upstream(j: Joined, now: float) -> UpstreamRecord:
    fb, pred = j.feedback, j.prediction
    given = fb.value if fb.value is not None else fb.label
    payload: dict[str, Any] = {
        "id": fb.id,
        "prediction_ts": pred.ts,
        "delay_s": round(j.delay_s, 3),
        "outputs": _plain(pred.outputs),
        "predicted": _like(given, j.predicted),
    }
    if fb.value is not None:
        payload["value"] = fb.value
    else:
        payload["label"] = _like(given, j.truth)
    if pred.inputs is not None:
        payload["inputs"] = _plain(pred.inputs)
    return UpstreamRecord("feedback", now, pred.model, pred.version, payload)


def _like(given: object, values: list[Any] | None) -> Any:
    """``values`` shaped as the client gave its label: a list for a list, else one value.

    A one-value label against a several-row prediction keeps the list (the upstream sees
    that they do not compare); no prediction gives ``None``.
    """
    if values is None or isinstance(given, list) or len(values) != 1:
        return values
    return values[0]


def _plain(arrays: dict[str, Any]) -> dict[str, Any]:
    """Arrays as nested lists (BYTES as strings where they decode), for any wire format."""
    out: dict[str, Any] = {}
    for name, a in arrays.items():
        if a.dtype.kind in "OSU":
            out[name] = [
                x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in a.ravel()
            ]
        else:
            out[name] = a.tolist()
    return out
