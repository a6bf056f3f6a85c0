"""Feedback: validate labels, join them to logged predictions, keep live quality.

``parse_feedback`` checks a whole request before anything is accepted (all or nothing:
a 400 names the first bad record by index, and nothing was written, so the client fixes
and resends without creating duplicates). ``join`` pairs each record with its logged
prediction and returns the upstream records plus what was unknown. ``Quality`` keeps per
model version: accuracy and per-class counts for classification, MAE and RMSE for
regression, in a tumbling window and since start, and the label delay.

What a prediction "predicted": its ``label`` output if it has one, else the arg-max of its
first 2-D float output; for regression (``value``), its first float output. A request
with several rows takes a list of labels (one per row).

Labels are compared in one canonical form: a class index that the model's manifest names
(``[model] labels``) becomes that class name, on both sides, so ``0`` and ``"malignant"``
are the same class; anything else (an index the manifest does not name, a name) stays as
given. The canonical forms travel upstream too, so the collector compares like with like.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.errors import BadRequest
from agent.feedback.predlog import Prediction

MAX_RECORDS = 10_000


@dataclass(frozen=True, slots=True)
class Feedback:
    """One ground-truth record: a label (classification) or a value (regression)."""

    id: str
    label: Any = None
    value: float | list[float] | None = None


def parse_feedback(doc: object) -> list[Feedback]:
    """The records of ``{"id", "label"|"value"}`` or ``{"feedback": [...]}``; all or nothing."""
    if not isinstance(doc, dict):
        raise BadRequest('send {"id": ..., "label": ...} or {"feedback": [{...}, ...]}')
    items = doc.get("feedback", [doc]) if "feedback" in doc else [doc]
    if not isinstance(items, list) or not items:
        raise BadRequest('"feedback" must be a non-empty list of {"id", "label" | "value"}')
    if len(items) > MAX_RECORDS:
        raise BadRequest(f"at most {MAX_RECORDS} feedback records per request, got {len(items)}")
    return [_one(i, item) for i, item in enumerate(items)]


def _one(index: int, item: object) -> Feedback:
    where = f"feedback[{index}]"
    if not isinstance(item, dict):
        raise BadRequest(
            f"{where}: expected an object, got {type(item).__name__}; nothing was "
            "accepted, fix it and resend the whole request"
        )
    rid = item.get("id")
    if not isinstance(rid, str) or not rid:
        raise BadRequest(
            f'{where}: "id" must be the non-empty string id of a prediction; nothing was accepted'
        )
    has_label, has_value = "label" in item, "value" in item
    if has_label == has_value:
        raise BadRequest(
            f'{where} (id {rid!r}): give exactly one of "label" (classification) '
            'or "value" (regression); nothing was accepted'
        )
    if has_value:
        value = item["value"]
        values = value if isinstance(value, list) else [value]
        if not values or not all(_is_number(v) for v in values):
            raise BadRequest(
                f'{where} (id {rid!r}): "value" must be a number or a list of '
                "numbers; nothing was accepted"
            )
        return Feedback(rid, value=value)
    label = item["label"]
    labels = label if isinstance(label, list) else [label]
    if not labels or not all(isinstance(v, int | str) and not isinstance(v, bool) for v in labels):
        raise BadRequest(
            f'{where} (id {rid!r}): "label" must be a class index, a class name, '
            "or a list of them (one per row); nothing was accepted"
        )
    return Feedback(rid, label=label)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(float(v))


def predicted_labels(outputs: dict[str, Any]) -> list[Any] | None:
    """What a classifier predicted, per row (None if it has no classifier-like output)."""
    label = outputs.get("label")
    if label is not None:
        return [
            x.decode() if isinstance(x, bytes) else x.item() if hasattr(x, "item") else x
            for x in np.asarray(label).ravel()
        ]
    for array in outputs.values():
        a = np.asarray(array)
        if a.ndim == 2 and a.dtype.kind == "f":
            return [int(i) for i in a.argmax(axis=1)]
    return None


def predicted_values(outputs: dict[str, Any]) -> list[float] | None:
    """What a regressor predicted, per row (its first float output)."""
    for array in outputs.values():
        a = np.asarray(array)
        if a.dtype.kind == "f" and a.size:
            return [float(x) for x in a.reshape(a.shape[0] if a.ndim else 1, -1)[:, 0]]
    return None


@dataclass
class _Tally:
    n: int = 0
    correct: int = 0
    per_class: Counter[str] = field(default_factory=Counter)
    per_class_correct: Counter[str] = field(default_factory=Counter)
    reg_n: int = 0
    abs_err: float = 0.0
    sq_err: float = 0.0

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"labelled": self.n, "regression": self.reg_n}
        if self.n:
            out["accuracy"] = self.correct / self.n
            out["per_class"] = {
                k: {"count": v, "correct": self.per_class_correct[k]}
                for k, v in sorted(self.per_class.items())
            }
        if self.reg_n:
            out["mae"] = self.abs_err / self.reg_n
            out["rmse"] = float(np.sqrt(self.sq_err / self.reg_n))
        return out


class Quality:
    """Live quality per (model, version): a tumbling window plus since start."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._total: dict[tuple[str, int], _Tally] = {}
        self._window: dict[tuple[str, int], _Tally] = {}
        self._window_start: float | None = None

    def roll(self, now: float) -> dict[tuple[str, int], dict[str, Any]] | None:
        """Close the window when it is over; returns the closed window's reports."""
        if self._window_start is None:
            self._window_start = now
            return None
        if now - self._window_start < self.window_s:
            return None
        closed = {
            k: t.report() | {"window_start": self._window_start, "window_end": now}
            for k, t in self._window.items()
        }
        self._window, self._window_start = {}, now
        return closed

    def add_labels(self, key: tuple[str, int], truth: list[str], predicted: list[str]) -> None:
        """Count classification outcomes (both as strings, so names and indices compare)."""
        for tally in (
            self._total.setdefault(key, _Tally()),
            self._window.setdefault(key, _Tally()),
        ):
            for t, p in zip(truth, predicted, strict=True):
                tally.n += 1
                tally.per_class[t] += 1
                if t == p:
                    tally.correct += 1
                    tally.per_class_correct[t] += 1

    def add_values(self, key: tuple[str, int], truth: list[float], predicted: list[float]) -> None:
        """Count regression errors."""
        err = np.asarray(truth, dtype=np.float64) - np.asarray(predicted, dtype=np.float64)
        for tally in (
            self._total.setdefault(key, _Tally()),
            self._window.setdefault(key, _Tally()),
        ):
            tally.reg_n += len(err)
            tally.abs_err += float(np.abs(err).sum())
            tally.sq_err += float((err**2).sum())

    def report(self, model: str) -> dict[str, Any]:
        """Quality of every version of ``model``: since start and in the current window."""
        return {
            str(version): {
                "total": t.report(),
                "window": self._window.get((m, version), _Tally()).report(),
            }
            for (m, version), t in sorted(self._total.items())
            if m == model
        }

    def items(self) -> list[tuple[tuple[str, int], dict[str, Any]]]:
        """Since-start reports of every version (for gauges)."""
        return [(k, t.report()) for k, t in self._total.items()]


@dataclass(frozen=True, slots=True)
class Joined:
    """One feedback record with its prediction, ready for the outbox."""

    feedback: Feedback
    prediction: Prediction
    truth: list[Any]
    predicted: list[Any] | None
    delay_s: float


def join(
    records: list[Feedback],
    predictions: dict[str, Prediction],
    labels_of: dict[str, tuple[str, ...]],
    now: float,
) -> tuple[list[Joined], list[str]]:
    """Pair feedback with predictions; returns (joined, unknown ids).

    ``labels_of`` maps a model to its manifest's class names, so a label given by name
    and a prediction given by index (or the reverse) compare as the same class.
    """
    joined: list[Joined] = []
    unknown: list[str] = []
    for fb in records:
        pred = predictions.get(fb.id)
        if pred is None:
            unknown.append(fb.id)
            continue
        names = labels_of.get(pred.model, ())
        if fb.value is not None:
            truth: list[Any] = fb.value if isinstance(fb.value, list) else [fb.value]
            predicted: list[Any] | None = predicted_values(pred.outputs)
        else:
            raw = fb.label if isinstance(fb.label, list) else [fb.label]
            truth = [canonical_label(x, names) for x in raw]
            got = predicted_labels(pred.outputs)
            predicted = [canonical_label(x, names) for x in got] if got is not None else None
        joined.append(Joined(fb, pred, truth, predicted, max(0.0, now - pred.ts)))
    return joined, unknown


def canonical_label(value: Any, names: tuple[str, ...]) -> Any:
    """The class name for an index the manifest names; any other label as given."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    return value
