"""Drift scores: PSI, JS, KS, mean shift, statuses and the report shapes."""

from __future__ import annotations

import numpy as np
import pytest

from agent.drift.scores import (
    Distribution,
    DriftThresholds,
    FeatureReport,
    feature_report,
    js_distance,
    ks_statistic,
    mean_shift,
    model_report,
    model_status,
    psi,
    status_for,
)

SPEC_FEATURE_KEYS = {
    "input",
    "name",
    "status",
    "psi",
    "js",
    "ks",
    "mean_shift",
    "missing_rate",
    "rows",
}


def decile_counts(reference: np.ndarray, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    edges = np.quantile(reference, np.arange(1, 10) / 10)

    def count(values: np.ndarray) -> np.ndarray:
        return np.bincount(np.searchsorted(edges, values, side="right"), minlength=10)

    return count(reference).astype(float), count(sample).astype(float)


def distribution(counts: list[float], *, missing: int = 0, mean: float = 0.0) -> Distribution:
    array = np.array(counts, dtype=float)
    return Distribution(
        counts=array,
        missing=missing,
        out_of_range=0,
        rows=int(array.sum()) + missing,
        mean=mean,
        std=1.0,
    )


def report(status: str) -> FeatureReport:
    return {
        "input": "x",
        "name": "f",
        "status": status,  # type: ignore[typeddict-item]
        "psi": 0.0,
        "js": 0.0,
        "ks": 0.0,
        "mean_shift": 0.0,
        "missing_rate": 0.0,
        "rows": 1000,
        "out_of_range_rate": 0.0,
    }


class TestDivergences:
    def test_identical_distributions_score_zero(self) -> None:
        """PSI, JS and KS are 0 when both sides have the same shares."""
        counts = np.array([10.0, 20.0, 30.0, 0.0])
        assert psi(counts, counts * 3) == pytest.approx(0.0, abs=1e-12)
        assert js_distance(counts, counts * 3) == pytest.approx(0.0, abs=1e-7)
        assert ks_statistic(counts, counts * 3) == pytest.approx(0.0, abs=1e-12)

    def test_disjoint_distributions_score_the_maximum(self) -> None:
        """Disjoint histograms give JS distance 1, KS 1 and a large PSI."""
        left, right = np.array([5.0, 5.0, 0.0, 0.0]), np.array([0.0, 0.0, 5.0, 5.0])
        assert js_distance(left, right) == pytest.approx(1.0)
        assert ks_statistic(left, right) == pytest.approx(1.0)
        assert psi(left, right) > 5

    def test_empty_bins_keep_psi_finite(self) -> None:
        """An empty bin on either side is smoothed: the PSI is finite."""
        value = psi(np.array([100.0, 0.0]), np.array([50.0, 50.0]))
        assert np.isfinite(value)
        assert value > 0.25

    @pytest.mark.parametrize("shift", [1.0, 1.5, 2.0])
    def test_psi_of_a_mean_shift_on_normal_data_alerts(self, shift: float) -> None:
        """Shifting normal data by 1 to 2 standard deviations gives a PSI above 0.25."""
        rng = np.random.default_rng(3)
        expected, actual = decile_counts(rng.normal(size=5000), rng.normal(shift, size=2000))
        assert psi(expected, actual) > 0.25

    def test_psi_of_a_resample_is_small(self) -> None:
        """Two samples of the same normal distribution stay below the warn threshold."""
        rng = np.random.default_rng(4)
        expected, actual = decile_counts(rng.normal(size=5000), rng.normal(size=2000))
        assert psi(expected, actual) < 0.1

    def test_ks_is_the_largest_cdf_gap(self) -> None:
        """KS on bins is the largest absolute gap between the cumulative shares."""
        assert ks_statistic(np.array([1.0, 1.0, 2.0]), np.array([2.0, 1.0, 1.0])) == pytest.approx(
            0.25
        )


class TestMeanShift:
    def test_shift_is_in_baseline_standard_deviations(self) -> None:
        """The shift is signed and divided by the baseline's standard deviation."""
        assert mean_shift(10.0, 2.0, 7.0) == -1.5

    def test_constant_baseline_gives_none_on_change(self) -> None:
        """A constant baseline gives 0 for the same mean and None for any other."""
        assert mean_shift(1.0, 0.0, 1.0) == 0.0
        assert mean_shift(1.0, 0.0, 2.0) is None


class TestStatus:
    @pytest.mark.parametrize(
        ("value", "status"),
        [(0.05, "ok"), (0.1, "warn"), (0.2, "warn"), (0.25, "alert"), (3.0, "alert")],
    )
    def test_psi_thresholds(self, value: float, status: str) -> None:
        """PSI below warn is ok, from warn is warn, from alert is alert."""
        assert status_for(value, 1000, DriftThresholds()) == status

    def test_few_rows_are_insufficient(self) -> None:
        """Below min_rows the status is insufficient_data whatever the PSI."""
        assert status_for(5.0, 99, DriftThresholds(min_rows=100)) == "insufficient_data"

    def test_model_status_is_the_worst(self) -> None:
        """By default the model takes its worst feature's status."""
        statuses = [report("ok"), report("warn"), report("insufficient_data")]
        assert model_status(statuses, DriftThresholds()) == "warn"

    def test_model_with_nothing_scored_is_insufficient(self) -> None:
        """A model whose features all lack data, or has none, is insufficient_data."""
        assert model_status([report("insufficient_data")], DriftThresholds()) == "insufficient_data"
        assert model_status([], DriftThresholds()) == "insufficient_data"

    def test_alert_share_needs_that_share_of_alerts(self) -> None:
        """With alert_share 0.5, one alert in four features only warns; two alert."""
        thresholds = DriftThresholds(alert_share=0.5)
        one = [report("alert"), report("ok"), report("ok"), report("ok")]
        two = [report("alert"), report("alert"), report("ok"), report("ok")]
        assert model_status(one, thresholds) == "warn"
        assert model_status(two, thresholds) == "alert"

    def test_thresholds_check_themselves(self) -> None:
        """A warn threshold above the alert threshold is refused with the defaults named."""
        with pytest.raises(ValueError, match="0 < psi_warn <= psi_alert"):
            DriftThresholds(psi_warn=0.3, psi_alert=0.2)


class TestReports:
    def test_feature_report_has_the_spec_shape(self) -> None:
        """A feature report has SPEC section 10's keys plus out_of_range_rate."""
        base = distribution([100, 100, 100])
        live = distribution([100, 100, 800], missing=250, mean=0.5)
        result = feature_report(
            tensor="x", name="age", baseline=base, live=live, thresholds=DriftThresholds()
        )
        assert set(result) == SPEC_FEATURE_KEYS | {"out_of_range_rate"}
        assert result["rows"] == 1250
        assert result["missing_rate"] == 0.2
        assert result["mean_shift"] == 0.5
        assert result["status"] == "alert"

    def test_missing_values_move_psi(self) -> None:
        """The same finite shares with many more missing values raise the PSI."""
        base = distribution([100, 100])
        live = distribution([100, 100], missing=200)
        result = feature_report(
            tensor="x", name="f", baseline=base, live=live, thresholds=DriftThresholds()
        )
        assert result["psi"] is not None
        assert result["psi"] > 0.25
        assert result["ks"] == pytest.approx(0.0)

    def test_categorical_report_has_no_ks_and_lists_new_categories(self) -> None:
        """Unordered categories get no KS or mean shift, and name their new categories."""
        counts = np.array([50.0, 50.0, 0.0])
        base = Distribution(counts=counts, missing=0, out_of_range=0, rows=100, ordered=False)
        result = feature_report(
            tensor="text",
            name="tokens",
            baseline=base,
            live=base,
            thresholds=DriftThresholds(),
            new_categories=[("spam", 3)],
        )
        assert (result["ks"], result["mean_shift"]) == (None, None)
        assert result["new_categories"] == [("spam", 3)]

    def test_model_report_has_the_spec_shape(self) -> None:
        """The model report carries model, version, window, status, reference and both lists."""
        result = model_report(
            model="iris",
            version="2",
            window={"kind": "deploy", "start": 1.0, "end": 2.0, "rows": 1000},
            reference="baseline",
            reference_rows=5000,
            features=[report("ok")],
            outputs=[report("alert")],
            thresholds=DriftThresholds(),
        )
        assert result["status"] == "alert"
        assert set(result) == {
            "model",
            "version",
            "window",
            "status",
            "reference",
            "reference_rows",
            "features",
            "outputs",
        }
