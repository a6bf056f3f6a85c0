"""Drift scores: PSI, Jensen-Shannon distance, KS statistic, mean shift, and a status.

Pure functions over counts and moments. This module must not hold state, read sketches'
internals, know about windows or baselines, or log.

Conventions, so reports read the same everywhere:

- Histograms are compared on the baseline's frozen bins. Missing values (NaN, inf) form one
  more bin at the end, so PSI and JS move when the share of missing values changes.
- PSI smooths every bin's share additively by ``eps`` (then renormalises), so an empty bin on
  either side gives a large but finite term instead of infinity.
- JS is the Jensen-Shannon *distance* (square root of the divergence) in base 2: 0 for equal
  distributions, 1 for disjoint ones.
- KS is the largest gap between the two cumulative histograms on the shared bins (without the
  missing bin). It is a lower bound of the exact two-sample KS statistic: differences inside
  a bin are invisible. It is None for categorical features, whose categories have no order.
- The mean shift is signed and in baseline standard deviations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, NotRequired, TypedDict

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

Status = Literal["ok", "warn", "alert", "insufficient_data"]
Reference = Literal["baseline", "live"]

#: Severity order used to pick the worst status; insufficient data ranks below ok.
_SEVERITY: Final[dict[Status, int]] = {"insufficient_data": 0, "ok": 1, "warn": 2, "alert": 3}


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftThresholds:
    """When a PSI warns or alerts, how many rows a verdict needs, how a model's status forms.

    ``alert_share`` 0 makes the model status the worst feature or output status; above 0 the
    model alerts only when at least that share of its scored features and outputs alert.

    ``min_rows`` defaults to 300 because PSI is biased upwards on small samples (about
    bins/rows): on 10 bins, a window of 100 rows drawn from the baseline itself warns 39% of
    the time, one of 300 rows 0.2%, one of 500 never (measured over 2000 draws).
    """

    psi_warn: float = 0.1
    psi_alert: float = 0.25
    min_rows: int = 300
    alert_share: float = 0.0
    eps: float = 1e-4

    def __post_init__(self) -> None:
        if not 0 < self.psi_warn <= self.psi_alert:
            raise ValueError(
                f"psi_warn {self.psi_warn} and psi_alert {self.psi_alert}: expected "
                "0 < psi_warn <= psi_alert; the defaults are 0.1 and 0.25"
            )
        if self.min_rows < 1:
            raise ValueError(f"min_rows {self.min_rows}: expected at least 1 (default 300)")
        if not 0 <= self.alert_share <= 1:
            raise ValueError(f"alert_share {self.alert_share}: expected a share in [0, 1]")
        if not 0 < self.eps < 0.01:
            raise ValueError(f"eps {self.eps}: expected a small positive share such as 1e-4")


@dataclass(frozen=True, slots=True, kw_only=True)
class Distribution:
    """What the scores need from one side (baseline or live) of one feature.

    ``counts`` are bin counts (numeric) or category counts with "other" last (categorical);
    ``rows`` is how many rows this side has seen (for text, documents, not tokens).
    """

    counts: FloatArray
    missing: int
    out_of_range: int
    rows: int
    mean: float | None = None
    std: float | None = None
    ordered: bool = True

    def with_missing(self) -> FloatArray:
        """The counts with the missing values appended as one more bin."""
        return np.append(self.counts, float(self.missing))


class WindowInfo(TypedDict):
    """Which rows a report covers: ``kind`` is "deploy", "current" or "tumbling"."""

    kind: str
    start: float
    end: float
    rows: int


class FeatureReport(TypedDict):
    """Scores of one feature or output (SPEC section 10), plus two extras."""

    input: str
    name: str
    status: Status
    psi: float | None
    js: float | None
    ks: float | None
    mean_shift: float | None
    missing_rate: float | None
    rows: int
    out_of_range_rate: float | None
    new_categories: NotRequired[list[tuple[str, int]]]


class ModelReport(TypedDict):
    """The drift report of one model version (SPEC section 10, plus the reference's size)."""

    model: str
    version: str
    window: WindowInfo
    status: Status
    reference: Reference
    reference_rows: int
    features: list[FeatureReport]
    outputs: list[FeatureReport]


def _shares(counts: FloatArray) -> FloatArray:
    total = float(counts.sum())
    return counts / total if total > 0 else np.zeros_like(counts)


def psi(expected_counts: FloatArray, actual_counts: FloatArray, eps: float = 1e-4) -> float:
    """Population stability index of ``actual`` against ``expected`` on the same bins.

    Each share gets ``eps`` added (then the shares are renormalised), so empty bins on either
    side stay finite.
    """
    bins = len(expected_counts)
    expected = (_shares(expected_counts) + eps) / (1.0 + bins * eps)
    actual = (_shares(actual_counts) + eps) / (1.0 + bins * eps)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def js_distance(expected_counts: FloatArray, actual_counts: FloatArray) -> float:
    """Jensen-Shannon distance in base 2 (0 identical, 1 disjoint)."""
    p = _shares(expected_counts)
    q = _shares(actual_counts)
    m = (p + q) / 2.0
    divergence = (_kl_bits(p, m) + _kl_bits(q, m)) / 2.0
    return float(np.sqrt(max(divergence, 0.0)))


def _kl_bits(p: FloatArray, m: FloatArray) -> float:
    # Where p is 0 the term is 0 by convention; where p > 0, m >= p/2 > 0, so no division by 0.
    used = p > 0
    return float(np.sum(p[used] * np.log2(p[used] / m[used])))


def ks_statistic(expected_counts: FloatArray, actual_counts: FloatArray) -> float:
    """Largest gap between the two cumulative histograms on shared bins (a lower bound of KS)."""
    gap = np.cumsum(_shares(expected_counts)) - np.cumsum(_shares(actual_counts))
    return float(np.max(np.abs(gap))) if gap.size else 0.0


def mean_shift(baseline_mean: float, baseline_std: float, live_mean: float) -> float | None:
    """Signed shift of the live mean in baseline standard deviations.

    A constant baseline (std 0) gives 0 when the means agree and None otherwise, since any
    change is infinitely many standard deviations.
    """
    delta = live_mean - baseline_mean
    if baseline_std > 0:
        return delta / baseline_std
    return 0.0 if delta == 0 else None


def status_for(psi_value: float | None, rows: int, thresholds: DriftThresholds) -> Status:
    """ok / warn / alert from the PSI, or insufficient_data below ``min_rows`` rows."""
    if rows < thresholds.min_rows or psi_value is None:
        return "insufficient_data"
    if psi_value >= thresholds.psi_alert:
        return "alert"
    if psi_value >= thresholds.psi_warn:
        return "warn"
    return "ok"


def _rate(part: int, rows: int) -> float | None:
    return part / rows if rows > 0 else None


def feature_report(
    *,
    tensor: str,
    name: str,
    baseline: Distribution,
    live: Distribution,
    thresholds: DriftThresholds,
    new_categories: Sequence[tuple[str, int]] | None = None,
) -> FeatureReport:
    """Score one feature (or output column) of a live window against its baseline."""
    expected, actual = baseline.with_missing(), live.with_missing()
    comparable = expected.sum() > 0 and actual.sum() > 0
    has_values = baseline.counts.sum() > 0 and live.counts.sum() > 0
    psi_value = psi(expected, actual, thresholds.eps) if comparable else None
    report: FeatureReport = {
        "input": tensor,
        "name": name,
        "status": status_for(psi_value, live.rows, thresholds),
        "psi": psi_value,
        "js": js_distance(expected, actual) if comparable else None,
        "ks": ks_statistic(baseline.counts, live.counts)
        if has_values and baseline.ordered
        else None,
        "mean_shift": _mean_shift_of(baseline, live),
        "missing_rate": _rate(live.missing, live.rows),
        "rows": live.rows,
        "out_of_range_rate": _rate(live.out_of_range, live.rows),
    }
    if new_categories is not None:
        report["new_categories"] = [(item, count) for item, count in new_categories]
    return report


def _mean_shift_of(baseline: Distribution, live: Distribution) -> float | None:
    if baseline.mean is None or baseline.std is None or live.mean is None:
        return None
    return mean_shift(baseline.mean, baseline.std, live.mean)


def worst_status(statuses: Sequence[Status]) -> Status:
    """The most severe status (insufficient_data only when nothing else is known)."""
    return max(statuses, key=_SEVERITY.__getitem__, default="insufficient_data")


def model_status(reports: Sequence[FeatureReport], thresholds: DriftThresholds) -> Status:
    """The model's status from its features' and outputs' statuses.

    With ``alert_share`` 0 it is the worst one. Otherwise the model alerts when at least that
    share of the scored (not insufficient) features and outputs alert, and else warns when any
    of them warns or alerts.
    """
    statuses = [r["status"] for r in reports]
    worst = worst_status(statuses)
    if thresholds.alert_share == 0 or worst != "alert":
        return worst
    scored = [s for s in statuses if s != "insufficient_data"]
    share = scored.count("alert") / len(scored)
    return "alert" if share >= thresholds.alert_share else "warn"


def model_report(
    *,
    model: str,
    version: str,
    window: WindowInfo,
    reference: Reference,
    reference_rows: int,
    features: list[FeatureReport],
    outputs: list[FeatureReport],
    thresholds: DriftThresholds,
) -> ModelReport:
    """Assemble a model's report; its status follows :func:`model_status`.

    ``reference_rows`` is how many rows the reference holds (or has collected so far).
    """
    return {
        "model": model,
        "version": version,
        "window": window,
        "status": model_status([*features, *outputs], thresholds),
        "reference": reference,
        "reference_rows": reference_rows,
        "features": features,
        "outputs": outputs,
    }
