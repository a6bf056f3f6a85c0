"""The drift states of the watched model versions, and every change made to them.

``Watched`` maps (model, version) to a ``ModelDriftState`` plus its ``Plan`` (what ``attach``
was told, resolved into settings), what loading its baseline said, and its last since-deploy
report. The mutating methods (``install``, ``remove``, ``update``, ``roll_all``, ``refresh``)
run in the monitor's worker thread, one at a time; the reading methods run on the event loop.
One lock guards the states, held for one batch or one version at a time. This module must not
queue, schedule, or emit anything: it returns the records to emit.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from operator import attrgetter
from pathlib import Path
from typing import Any, Final, Literal, cast

import numpy as np
import structlog

from agent.clock import Clock
from agent.drift.features import Batch, Kind, Stacked, spec_kind
from agent.drift.profile import BaselineError, Profile, check_compatible, expected_width
from agent.drift.scores import DriftThresholds, ModelReport, Status
from agent.drift.window import DriftSettings, ModelDriftState
from agent.events import PredictionEvent, UpstreamRecord
from agent.tensors import Array, TensorSpec

log = structlog.get_logger(__name__)

WindowName = Literal["deploy", "current"]
Gauges = list[tuple[tuple[str, ...], float]]
Key = tuple[str, int]
_Tensors = tuple[dict[str, Batch], dict[str, Batch]]
_Arrays = tuple[dict[str, Array], dict[str, Array]]

#: edge_agent_drift_status values.
_STATUS_VALUE: Final[dict[Status, float]] = {
    "ok": 0.0,
    "warn": 1.0,
    "alert": 2.0,
    "insufficient_data": -1.0,
}

#: The scores exported as edge_agent_drift_score{score=...}.
_SCORES: Final = ("psi", "js", "ks", "mean_shift")


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftConfig:
    """The config's ``[drift]`` settings, before a manifest overrides the thresholds."""

    window_s: float
    reference_rows: int
    psi_warn: float
    psi_alert: float
    min_rows: int
    alert_share: float

    def settings(self, psi_warn: float | None, psi_alert: float | None) -> DriftSettings:
        """Settings with a manifest's overrides; ValueError says what is inconsistent."""
        thresholds = DriftThresholds(
            psi_warn=self.psi_warn if psi_warn is None else psi_warn,
            psi_alert=self.psi_alert if psi_alert is None else psi_alert,
            min_rows=self.min_rows,
            alert_share=self.alert_share,
        )
        return DriftSettings(reference_rows=self.reference_rows, thresholds=thresholds)

    def settings_or_own(
        self, psi_warn: float | None, psi_alert: float | None
    ) -> tuple[DriftSettings, str | None]:
        """The manifest's thresholds, or these with a plain reason when they do not fit."""
        try:
            return self.settings(psi_warn, psi_alert), None
        except ValueError as exc:
            problem = (
                f"manifest [drift] thresholds refused ({exc}); using the config's psi_warn "
                f"{self.psi_warn} and psi_alert {self.psi_alert}"
            )
            return self.settings(None, None), problem


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What ``attach`` was told about one version, resolved into drift settings.

    ``problems`` are manifest settings that could not be used, in plain words.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    baseline: Path | None
    kinds: dict[str, Kind]
    names: dict[str, tuple[str, ...]]
    overrides: tuple[float | None, float | None]
    settings: DriftSettings
    problems: tuple[str, ...] = ()


def make_plan(
    config: DriftConfig,
    *,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    baseline: Path | None,
    features: dict[str, tuple[str, ...]],
    psi_warn: float | None,
    psi_alert: float | None,
) -> Plan:
    """Resolve kinds (from the declared tensors), feature names and thresholds."""
    problems: list[str] = []
    settings, problem = config.settings_or_own(psi_warn, psi_alert)
    if problem:
        problems.append(problem)
    names = _feature_names(inputs, features, problems)
    return Plan(
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        baseline=baseline,
        kinds={
            **{s.name: spec_kind(s, output=False) for s in inputs},
            **{s.name: spec_kind(s, output=True) for s in outputs},
        },
        names=names,
        overrides=(psi_warn, psi_alert),
        settings=settings,
        problems=tuple(problems),
    )


def _feature_names(
    inputs: Sequence[TensorSpec], features: dict[str, tuple[str, ...]], problems: list[str]
) -> dict[str, tuple[str, ...]]:
    """The manifest's feature names that fit the inputs; the rest become ``problems``."""
    declared = {spec.name: spec for spec in inputs}
    names: dict[str, tuple[str, ...]] = {}
    for tensor, given in features.items():
        spec = declared.get(tensor)
        if spec is None:
            problems.append(
                f'manifest [inputs] names the features of "{tensor}", which is not an input '
                f"(inputs: {', '.join(declared) or 'none'}); fix the name in the manifest"
            )
            continue
        kind = spec_kind(spec, output=False)
        width = expected_width(kind, spec.shape) if kind == "tabular" else None
        if width is not None and width != len(given):
            problems.append(
                f"manifest [inputs] {tensor} lists {len(given)} names for {width} columns; "
                "list one name per column (f0, f1, ... are used meanwhile)"
            )
            continue
        names[tensor] = tuple(given)
    return names


@dataclass(slots=True, eq=False)
class _Entry:
    """One watched version: its state and what the worker last learned about it."""

    state: ModelDriftState
    plan: Plan
    baseline_error: str | None = None
    status: Status = "insufficient_data"
    summary: ModelReport | None = None
    dirty: bool = True
    refused: bool = False


class Watched:
    """The drift states of the watched versions (see the module docstring for threading).

    ``refused`` counts batches a state refused (they did not fit its baseline).
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Key, _Entry] = {}
        self.refused = 0

    # --- worker thread ----------------------------------------------------------------------

    def install(self, key: Key, plan: Plan, start: float) -> list[UpstreamRecord]:
        """Watch a version from wall-clock ``start``: load its baseline, replace any state it
        had (whose current window is returned, closed)."""
        profile, error = _load_baseline(key, plan)
        state = ModelDriftState(
            model=key[0],
            version=str(key[1]),
            start=start,
            settings=plan.settings,
            baseline=profile,
            kinds=plan.kinds,
            names=plan.names,
        )
        with self._lock:
            records = self._close(key, self._entries.get(key))
            self._entries[key] = _Entry(state, plan, baseline_error=error)
        log.info(
            "drift_attached",
            model=key[0],
            version=key[1],
            reference="baseline" if profile else "live",
        )
        return records

    def remove(self, key: Key) -> list[UpstreamRecord]:
        """Stop watching a version; returns its current window, closed."""
        with self._lock:
            entry = self._entries.pop(key, None)
            records = self._close(key, entry)
        if entry is not None:
            log.info("drift_detached", model=key[0], version=key[1])
        return records

    def update(self, events: Sequence[PredictionEvent]) -> None:
        """Apply predictions, concatenated per version and declared tensors (names, dtypes
        and row shapes): one numpy pass per group instead of one per event. Events of
        unwatched versions are skipped."""
        by_version: dict[Key, list[PredictionEvent]] = {}
        for event in events:
            by_version.setdefault((event.model, event.version), []).append(event)
        for key, batch in by_version.items():
            entry = self._entries.get(key)
            if entry is None:
                continue
            for inputs, outputs in _batches(batch, entry.plan):
                with self._lock:
                    try:
                        entry.state.update(inputs, outputs)
                    except (BaselineError, ValueError) as exc:
                        self._refuse(entry, exc)
                        continue
                    entry.dirty = True

    def _refuse(self, entry: _Entry, exc: Exception) -> None:
        self.refused += 1
        if not entry.refused:  # once per version: a misfit repeats on every batch
            entry.refused = True
            state = entry.state
            log.warning(
                "drift_update_refused", model=state.model, version=state.version, error=str(exc)
            )

    def roll_all(self) -> list[UpstreamRecord]:
        """Close every current window; returns the ones that saw rows."""
        records: list[UpstreamRecord] = []
        for key in list(self._entries):
            with self._lock:
                records += self._close(key, self._entries.get(key))
        return records

    def _close(self, key: Key, entry: _Entry | None) -> list[UpstreamRecord]:
        """Close the entry's current window (call with the lock held)."""
        if entry is None:
            return []
        now = self._clock.wall()
        window = entry.state.roll_window(now)
        if window is None:
            return []
        return [UpstreamRecord("drift", now, key[0], key[1], {"window": window})]

    def refresh(self) -> list[UpstreamRecord]:
        """Recompute the since-deploy report of every version that saw rows since the last
        refresh; a status change becomes an event record and a log line."""
        records: list[UpstreamRecord] = []
        for (model, version), entry in list(self._entries.items()):
            if not entry.dirty:
                continue
            now = self._clock.wall()
            with self._lock:
                entry.summary = entry.state.report("deploy", now)
                entry.dirty = False
                old, new = entry.status, entry.summary["status"]
                entry.status = new
            if not _is_news(old, new):
                continue
            payload = {"event": "drift_status", "from": old, "to": new}
            records.append(UpstreamRecord("event", now, model, version, payload))
            level = log.info if new == "ok" else log.warning
            level("drift_status_changed", model=model, version=version, old=old, new=new)
        return records

    def retune(self, config: DriftConfig) -> None:
        """New config thresholds for every version (each keeps its manifest's overrides)."""
        with self._lock:
            for entry in self._entries.values():
                settings, _ = config.settings_or_own(*entry.plan.overrides)
                entry.plan = replace(entry.plan, settings=settings)
                entry.state.retune(settings)
                entry.dirty = True

    # --- event loop -------------------------------------------------------------------------

    def report(self, key: Key, window: WindowName) -> dict[str, Any] | None:
        """A fresh report of one version (None when it is not installed yet)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            report: dict[str, Any] = {
                **entry.state.report(window, self._clock.wall()),
                "version": key[1],
            }
        if entry.baseline_error:
            report["baseline_error"] = entry.baseline_error
        if entry.plan.problems:
            report["settings_error"] = "; ".join(entry.plan.problems)
        return report

    def status(self, key: Key) -> Status | None:
        """The since-deploy status at the last refresh (None when not installed yet)."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.status if entry else None

    def gauges(self, keys: Sequence[Key]) -> Gauges:
        """Score samples (model, version, io, feature, score) of these versions."""
        samples: Gauges = []
        with self._lock:
            for model, version in keys:
                entry = self._entries.get((model, version))
                if entry is not None and entry.summary is not None:
                    samples += _score_samples(model, version, entry.summary)
        return samples

    def status_gauges(self, keys: Sequence[Key]) -> Gauges:
        """Status samples (model, version) of these versions."""
        with self._lock:
            return [
                ((model, str(version)), _STATUS_VALUE[entry.status])
                for model, version in keys
                if (entry := self._entries.get((model, version))) is not None
            ]


def _load_baseline(key: Key, plan: Plan) -> tuple[Profile | None, str | None]:
    """The checked baseline, or None and the plain reason it cannot be used."""
    path = plan.baseline
    if path is None:
        return None, None
    try:
        profile = Profile.loads(path.read_bytes())
        check_compatible(
            profile, model=key[0], inputs=plan.inputs, outputs=plan.outputs, names=plan.names
        )
    except OSError as exc:
        reason = (
            f"cannot read the baseline {path}: {exc.strerror or exc}; check [drift] baseline "
            "in the manifest (a path relative to the manifest)"
        )
    except BaselineError as exc:
        reason = exc.message
    except Exception as exc:  # noqa: BLE001 -- any damage must leave the model serving
        reason = f"the baseline {path} cannot be used ({exc!r}); rebuild it: edge-agent baseline"
    else:
        return profile, None
    log.warning(
        "drift_baseline_refused", model=key[0], version=key[1], path=str(path), reason=reason
    )
    rows = plan.settings.reference_rows
    return None, f"{reason} (meanwhile drift compares against the first {rows} live rows)"


def _batches(events: Sequence[PredictionEvent], plan: Plan) -> list[_Tensors]:
    """One version's events as few batches as possible: one per distinct set of declared
    tensors, dtypes and row shapes, in order of first appearance (each batch lists its
    tensors in the order of its first event)."""
    declared = (tuple(s.name for s in plan.inputs), tuple(s.name for s in plan.outputs))
    uniform = _uniform(events, declared, plan.kinds)
    if uniform is not None:
        return [uniform]
    wanted = (frozenset(declared[0]), frozenset(declared[1]))
    groups: dict[tuple[Any, ...], list[_Arrays]] = {}
    for event in events:
        tensors = _known_tensors(event, wanted)
        groups.setdefault(_group_key(tensors), []).append(tensors)
    return [_concatenate(group) for group in groups.values()]


_DTYPE: Final = attrgetter("dtype")
_SHAPE: Final = attrgetter("shape")


def _uniform(
    events: Sequence[PredictionEvent],
    declared: tuple[tuple[str, ...], tuple[str, ...]],
    kinds: Mapping[str, Kind],
) -> _Tensors | None:
    """All events as one batch when they fit in one (the common case), else None.

    They fit when every declared tensor is either a batched array in every event, all of one
    dtype and row shape, or absent from every event. The checks build sets with ``map``
    (C loops) instead of a key per event in Python: this function is why a tabular job
    costs about a microsecond per event here, not several. Images stay ``Stacked``: their
    features copy a few rows at a time instead of the whole batch at once.
    """
    batch: list[dict[str, Batch]] = []
    for role, names in enumerate(declared):
        tensors = [event.outputs if role else event.inputs for event in events]
        # The first event's order, as the per-event path would give (it keeps dict order).
        present = [name for name in tensors[0] if name in names]
        order = present + [name for name in names if name not in tensors[0]]
        arrays_of: dict[str, Batch] = {}
        for name in order:
            arrays = [t.get(name) for t in tensors]
            types = set(map(type, arrays))
            if types == {type(None)}:
                continue
            if types != {np.ndarray} or len(set(map(_DTYPE, arrays))) != 1:
                return None
            shapes = set(map(_SHAPE, arrays))
            if () in shapes or len({shape[1:] for shape in shapes}) != 1:
                return None
            parts = cast(list[Array], arrays)  # every one is an ndarray (checked)
            if len(parts) == 1:
                arrays_of[name] = parts[0]
            elif kinds.get(name) == "image":
                arrays_of[name] = Stacked(tuple(parts))
            else:
                arrays_of[name] = np.concatenate(parts)
        batch.append(arrays_of)
    return batch[0], batch[1]


def _known_tensors(
    event: PredictionEvent, wanted: tuple[frozenset[str], frozenset[str]]
) -> _Arrays:
    """The event's arrays of declared tensors (batched: at least one dimension)."""

    def pick(arrays: dict[str, Array], names: frozenset[str]) -> dict[str, Array]:
        return {
            name: array
            for name, array in arrays.items()
            if name in names and isinstance(array, np.ndarray) and array.ndim >= 1
        }

    return pick(event.inputs, wanted[0]), pick(event.outputs, wanted[1])


def _group_key(tensors: _Arrays) -> tuple[Any, ...]:
    """Tensors with equal keys can be concatenated into one batch (in any dict order)."""
    return tuple(
        sorted(
            (role, name, array.dtype.str, array.shape[1:])
            for role, arrays in enumerate(tensors)
            for name, array in arrays.items()
        )
    )


def _concatenate(group: Sequence[_Arrays]) -> _Tensors:
    inputs, outputs = group[0]
    if len(group) == 1:
        return dict(inputs), dict(outputs)
    return (
        {name: np.concatenate([g[0][name] for g in group]) for name in inputs},
        {name: np.concatenate([g[1][name] for g in group]) for name in outputs},
    )


def _is_news(old: Status, new: Status) -> bool:
    """A status change worth an event: into warn or alert, or back to ok from them."""
    if new == old:
        return False
    return new in ("warn", "alert") or (new == "ok" and old in ("warn", "alert"))


def _score_samples(model: str, version: int, report: ModelReport) -> Gauges:
    samples: Gauges = []
    for io, features in (("input", report["features"]), ("output", report["outputs"])):
        qualify = len({f["input"] for f in features}) > 1
        for feature in features:
            name = f"{feature['input']}.{feature['name']}" if qualify else feature["name"]
            values = (feature["psi"], feature["js"], feature["ks"], feature["mean_shift"])
            samples += [
                ((model, str(version), io, name, score), float(value))
                for score, value in zip(_SCORES, values, strict=True)
                if value is not None
            ]
    return samples
