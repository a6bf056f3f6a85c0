"""Drift state of one model version: live sketches in tumbling windows, since deploy, reports.

``ModelDriftState`` holds the baseline ``Profile`` (or collects the first ``reference_rows``
live rows and freezes a reference from them), the sketches of the current tumbling window,
and the merge of all closed windows ("since deploy"). Every batch updates only the current
window; closing it (``roll_window``) merges it into the deploy sketches and returns it
serialised for the outbox. Reports merge on read.

This module must not keep time (callers pass wall-clock seconds), schedule anything, ship
anything, or log: the drift tap in ``app.py`` owns the queue, the timer and the outbox.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np

from agent.drift.features import Batch, Features, Kind, extract_features, infer_kind
from agent.drift.profile import (
    BaselineError,
    Profile,
    ProfileOptions,
    TensorProfile,
    tensor_profile,
)
from agent.drift.scores import (
    DriftThresholds,
    FeatureReport,
    ModelReport,
    Reference,
    WindowInfo,
    feature_report,
    model_report,
)

WINDOW_FORMAT: Final = "edge-agent-window"
WINDOW_VERSION: Final = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftSettings:
    """Drift settings of one model: thresholds, live reference size, sketch sizes.

    ``kll_k`` sizes the live quantile sketches: 100 keeps about 3.3% rank error in at most
    ~2.5 KB per feature and window (200: ~1.7%, ~4.7 KB).
    """

    reference_rows: int = 1000
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)
    profile: ProfileOptions = field(default_factory=ProfileOptions)
    kll_k: int = 100

    def __post_init__(self) -> None:
        if self.reference_rows < 1:
            raise ValueError(f"reference_rows {self.reference_rows}: expected at least 1")


class ModelDriftState:
    """Baseline, current window and since-deploy sketches of one model version."""

    def __init__(
        self,
        *,
        model: str,
        version: str,
        start: float,
        settings: DriftSettings | None = None,
        baseline: Profile | None = None,
        kinds: Mapping[str, Kind] | None = None,
        names: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Start at wall-clock ``start``; without ``baseline``, the first rows become one.

        Args:
            kinds, names: how to read tensors and name features while collecting a live
                reference (as ``profile.build_profile``); unused with a baseline.
        """
        self.model = model
        self.version = version
        self._settings = settings or DriftSettings()
        self._deploy_start = start
        self._window_start = start
        self._reference: Reference = "baseline" if baseline else "live"
        self._collector = None if baseline else _Collector(kinds or {}, names or {})
        self._baseline = baseline
        self._window = baseline.empty_like(k=self._settings.kll_k) if baseline else None
        self._deploy = baseline.empty_like(k=self._settings.kll_k) if baseline else None

    def retune(self, settings: DriftSettings) -> None:
        """Score with new settings from now on (``reference_rows`` counts only while a live
        reference is still being collected; sketch sizes apply from the next window)."""
        self._settings = settings

    @property
    def reference(self) -> Reference:
        """Where the reference comes from: a baseline file, or the first live rows."""
        return self._reference

    @property
    def baseline(self) -> Profile | None:
        """The frozen reference, None while live reference rows are still being collected."""
        return self._baseline

    def update(self, inputs: Mapping[str, Batch], outputs: Mapping[str, Batch]) -> None:
        """Add one batch of a request's inputs and the model's outputs.

        Raises BaselineError when a tensor does not fit the baseline (feature count).
        """
        if self._collector is not None:
            self._collector.add(inputs, outputs)
            if self._collector.rows >= self._settings.reference_rows:
                self._freeze(self._collector.freeze(self.model, self._settings.profile))
        elif self._window is not None:
            self._window.update(inputs, outputs)

    def _freeze(self, baseline: Profile) -> None:
        self._baseline = baseline
        self._collector = None
        self._window = baseline.empty_like(k=self._settings.kll_k)
        self._deploy = baseline.empty_like(k=self._settings.kll_k)

    def roll_window(self, now: float) -> dict[str, Any] | None:
        """Close the current window at wall-clock ``now`` and start the next one.

        Returns the closed window as a msgpack-friendly dict, or None when it saw no rows:
        ``{"format": "edge-agent-window", "format_version": 1, "model", "model_version",
        "reference", "start", "end", "rows", "features", "outputs", "report"}``, where
        features and outputs are sketches as in the baseline artifact (they load and merge
        with ``Profile.from_document``) and ``report`` is this window's drift report.
        """
        start, self._window_start = self._window_start, now
        closed = self._window
        if closed is None or self._deploy is None:
            return None
        self._window = closed.empty_like(k=self._settings.kll_k)
        self._deploy.merge(closed)
        if closed.rows == 0:
            return None
        report = self._report(
            closed, {"kind": "tumbling", "start": start, "end": now, "rows": closed.rows}
        )
        document = closed.to_document()
        # "version" in a shipped record is the model's version; the format's goes elsewhere.
        del document["version"]
        return {
            **document,
            "format": WINDOW_FORMAT,
            "format_version": WINDOW_VERSION,
            "model_version": self.version,
            "reference": self._reference,
            "start": start,
            "end": now,
            "report": report,
        }

    def report(self, window: Literal["deploy", "current"], now: float) -> ModelReport:
        """The drift report since deploy (closed windows plus the current one) or of the
        current window alone."""
        start = self._deploy_start if window == "deploy" else self._window_start
        sketches = self._window
        if window == "deploy" and self._window is not None and self._deploy is not None:
            sketches = self._deploy.copy()
            sketches.merge(self._window)
        rows = sketches.rows if sketches is not None else 0
        return self._report(sketches, {"kind": window, "start": start, "end": now, "rows": rows})

    def _report(self, live: Profile | None, window: WindowInfo) -> ModelReport:
        features: list[FeatureReport] = []
        outputs: list[FeatureReport] = []
        if live is not None and self._baseline is not None:
            thresholds = self._settings.thresholds
            features = _tensor_reports(self._baseline.inputs, live.inputs, thresholds)
            outputs = _tensor_reports(self._baseline.outputs, live.outputs, thresholds)
        collected = self._collector.rows if self._collector else 0
        return model_report(
            model=self.model,
            version=self.version,
            window=window,
            reference=self._reference,
            reference_rows=self._baseline.rows if self._baseline else collected,
            features=features,
            outputs=outputs,
            thresholds=self._settings.thresholds,
        )


def _tensor_reports(
    baseline: Sequence[TensorProfile],
    live: Sequence[TensorProfile],
    thresholds: DriftThresholds,
) -> list[FeatureReport]:
    reports = []
    for base, current in zip(baseline, live, strict=True):
        for j, name in enumerate(base.numeric_names):
            reports.append(
                feature_report(
                    tensor=base.tensor,
                    name=name,
                    baseline=base.numeric.distribution(j),
                    live=current.numeric.distribution(j),
                    thresholds=thresholds,
                )
            )
        for name, base_sketch, sketch in zip(
            base.categorical_names, base.categorical, current.categorical, strict=True
        ):
            reports.append(
                feature_report(
                    tensor=base.tensor,
                    name=name,
                    baseline=base_sketch.distribution(),
                    live=sketch.distribution(),
                    thresholds=thresholds,
                    new_categories=sketch.new_categories(),
                )
            )
    return reports


class _Collector:
    """The first live rows, as extracted features, until they are enough for a reference."""

    def __init__(self, kinds: Mapping[str, Kind], names: Mapping[str, Sequence[str]]) -> None:
        self._kinds = dict(kinds)
        self._names = dict(names)
        self._batches: dict[tuple[bool, str], list[Features]] = {}
        self.rows = 0

    def add(self, inputs: Mapping[str, Batch], outputs: Mapping[str, Batch]) -> None:
        """Keep one batch (every row of it, even past the target)."""
        rows = [self._keep(name, array, output=False) for name, array in inputs.items()]
        rows += [self._keep(name, array, output=True) for name, array in outputs.items()]
        self.rows += rows[0] if rows else 0

    def _keep(self, tensor: str, array: Batch, *, output: bool) -> int:
        kind = self._kinds.setdefault(tensor, infer_kind(array, output=output))
        features = extract_features(array, kind, self._names.get(tensor))
        kept = self._batches.setdefault((output, tensor), [])
        if kept and kept[0].numeric.shape[1] != features.numeric.shape[1]:
            raise BaselineError(
                f'input "{tensor}": a batch with {features.numeric.shape[1]} features after '
                f"batches with {kept[0].numeric.shape[1]}; send one shape per tensor"
            )
        kept.append(features)
        return features.rows

    def freeze(self, model: str, options: ProfileOptions) -> Profile:
        """The reference profile of everything kept."""
        profiles: dict[bool, list[TensorProfile]] = {False: [], True: []}
        for (output, tensor), batches in self._batches.items():
            features = _concatenate(batches)
            profiles[output].append(tensor_profile(tensor, self._kinds[tensor], features, options))
        return Profile(model, profiles[False], profiles[True], self.rows)


def _concatenate(batches: Sequence[Features]) -> Features:
    first = batches[0]
    categorical = tuple(
        (name, [item for batch in batches for item in batch.categorical[i][1]])
        for i, (name, _) in enumerate(first.categorical)
    )
    return Features(
        rows=sum(b.rows for b in batches),
        numeric_names=first.numeric_names,
        numeric=np.concatenate([b.numeric for b in batches]),
        categorical=categorical,
    )
