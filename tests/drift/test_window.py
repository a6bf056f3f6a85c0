"""Model drift state: live windows against a baseline or a live reference, and their reports."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgpack
import numpy as np
import pytest

from agent.drift.profile import BaselineError, Profile, build_profile
from agent.drift.scores import DriftThresholds, FeatureReport, ModelReport
from agent.drift.window import DriftSettings, ModelDriftState

Batches = Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]

VOCABULARY_A = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "river", "bank"]
VOCABULARY_B = ["invoice", "payment", "overdue", "refund", "card", "transfer", "fee"]


def by_name(reports: list[FeatureReport]) -> dict[str, FeatureReport]:
    return {r["name"]: r for r in reports}


def feed(state: ModelDriftState, batches: Batches) -> None:
    for inputs, outputs in batches:
        state.update(inputs, outputs)


def tabular(rng: np.random.Generator, shift: dict[int, float], batches: int = 100) -> Batches:
    for _ in range(batches):
        x = rng.normal(size=(32, 8))
        for column, delta in shift.items():
            x[:, column] += delta
        yield {"x": x.astype(np.float32)}, {"label": (x[:, 1] > 0).astype(np.int64)}


def documents(rng: np.random.Generator, words: list[str], rows: int) -> np.ndarray:
    picked = rng.choice(words, size=(rows, 6))
    return np.array([" ".join(row).encode() for row in picked], dtype=object)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(8)


@pytest.fixture
def tabular_baseline(rng: np.random.Generator) -> Profile:
    x = rng.normal(size=(5000, 8))
    return build_profile("m", {"x": x}, {"label": (x[:, 1] > 0).astype(np.int64)})


@pytest.fixture
def make_state() -> Callable[..., ModelDriftState]:
    def make(baseline: Profile | None = None, **settings: object) -> ModelDriftState:
        return ModelDriftState(
            model="m",
            version="1",
            start=100.0,
            baseline=baseline,
            settings=DriftSettings(**settings),  # type: ignore[arg-type]
        )

    return make


class TestAgainstBaseline:
    def test_exactly_the_shifted_features_alert(
        self,
        rng: np.random.Generator,
        tabular_baseline: Profile,
        make_state: Callable[..., ModelDriftState],
    ) -> None:
        """With features 0 and 3 of 8 shifted by 1.5 std, those two alert and the rest are ok."""
        state = make_state(tabular_baseline)
        feed(state, tabular(rng, {0: 1.5, 3: 1.5}))
        report = state.report("deploy", now=200.0)
        statuses = {r["name"]: r["status"] for r in report["features"]}
        assert statuses == {f"f{j}": "alert" if j in (0, 3) else "ok" for j in range(8)}
        assert by_name(report["features"])["f0"]["mean_shift"] == pytest.approx(1.5, abs=0.15)
        assert report["outputs"][0]["status"] == "ok"
        assert (report["status"], report["reference"], report["window"]["rows"]) == (
            "alert",
            "baseline",
            3200,
        )

    def test_unshifted_traffic_is_ok(
        self,
        rng: np.random.Generator,
        tabular_baseline: Profile,
        make_state: Callable[..., ModelDriftState],
    ) -> None:
        """Traffic from the reference distribution leaves the model ok."""
        state = make_state(tabular_baseline)
        feed(state, tabular(rng, {}))
        assert state.report("deploy", now=200.0)["status"] == "ok"

    def test_few_rows_are_insufficient_data(
        self,
        rng: np.random.Generator,
        tabular_baseline: Profile,
        make_state: Callable[..., ModelDriftState],
    ) -> None:
        """Below min_rows every feature and the model report insufficient_data."""
        state = make_state(tabular_baseline, thresholds=DriftThresholds(min_rows=100))
        feed(state, tabular(rng, {0: 3.0}, batches=3))
        report = state.report("current", now=200.0)
        assert report["status"] == "insufficient_data"
        assert {r["status"] for r in report["features"]} == {"insufficient_data"}
        assert report["features"][0]["psi"] is not None

    def test_label_frequency_shift_alerts_on_the_output(
        self,
        rng: np.random.Generator,
        tabular_baseline: Profile,
        make_state: Callable[..., ModelDriftState],
    ) -> None:
        """When one class dominates the predictions, the label output alerts."""
        state = make_state(tabular_baseline)
        feed(state, tabular(rng, {1: 2.0}))
        (label,) = state.report("deploy", now=200.0)["outputs"]
        assert (label["input"], label["name"], label["status"]) == ("label", "class", "alert")

    def test_image_brightness_shift_alerts_on_channel_mean(
        self, rng: np.random.Generator, make_state: Callable[..., ModelDriftState]
    ) -> None:
        """Brighter images alert on every channel's mean."""
        images = rng.integers(40, 160, size=(400, 3, 16, 16), dtype=np.uint8)
        state = make_state(build_profile("m", {"img": images}))
        for _ in range(20):
            brighter = rng.integers(80, 200, size=(16, 3, 16, 16), dtype=np.uint8)
            state.update({"img": brighter}, {})
        features = by_name(state.report("deploy", now=200.0)["features"])
        assert {features[f"channel{c}.mean"]["status"] for c in range(3)} == {"alert"}

    def test_text_vocabulary_shift_alerts_on_tokens(
        self, rng: np.random.Generator, make_state: Callable[..., ModelDriftState]
    ) -> None:
        """Documents in another vocabulary alert on tokens and list the new words."""
        state = make_state(build_profile("m", {"text": documents(rng, VOCABULARY_A, 1000)}))
        for _ in range(10):
            state.update({"text": documents(rng, VOCABULARY_B, 32)}, {})
        tokens = by_name(state.report("deploy", now=200.0)["features"])["tokens"]
        assert tokens["status"] == "alert"
        assert {word for word, _ in tokens["new_categories"]} <= set(VOCABULARY_B)
        assert tokens["rows"] == 320

    def test_wrong_feature_count_is_a_baseline_error(
        self, tabular_baseline: Profile, make_state: Callable[..., ModelDriftState]
    ) -> None:
        """A batch with another number of features raises BaselineError naming the tensor."""
        state = make_state(tabular_baseline)
        with pytest.raises(BaselineError, match='input "x": the batch has 5 numeric'):
            state.update({"x": np.zeros((4, 5))}, {})


class TestWindows:
    def test_closed_window_is_serialisable_and_starts_a_new_one(
        self,
        rng: np.random.Generator,
        tabular_baseline: Profile,
        make_state: Callable[..., ModelDriftState],
    ) -> None:
        """roll_window returns the closed window as msgpack-able sketches and a report."""
        state = make_state(tabular_baseline)
        feed(state, tabular(rng, {}, batches=10))
        closed = state.roll_window(now=400.0)
        assert closed is not None
        document = msgpack.unpackb(msgpack.packb(closed), raw=False)
        assert (document["start"], document["end"], document["rows"]) == (100.0, 400.0, 320)
        assert document["report"]["window"]["kind"] == "tumbling"
        assert (document["format"], document["model_version"]) == ("edge-agent-window", "1")
        assert len(document["features"]) == 8
        assert state.report("current", now=401.0)["window"]["rows"] == 0

    def test_deploy_report_covers_closed_and_current_windows(
        self,
        rng: np.random.Generator,
        tabular_baseline: Profile,
        make_state: Callable[..., ModelDriftState],
    ) -> None:
        """Since deploy counts every row of closed windows plus the open one."""
        state = make_state(tabular_baseline)
        feed(state, tabular(rng, {}, batches=10))
        state.roll_window(now=400.0)
        feed(state, tabular(rng, {}, batches=5))
        report: ModelReport = state.report("deploy", now=500.0)
        assert (report["window"]["rows"], report["window"]["start"]) == (480, 100.0)
        assert report["features"][0]["rows"] == 480

    def test_empty_window_returns_nothing(
        self, tabular_baseline: Profile, make_state: Callable[..., ModelDriftState]
    ) -> None:
        """A window without rows is not shipped."""
        assert make_state(tabular_baseline).roll_window(now=400.0) is None

    def test_closed_windows_merge_upstream(
        self,
        rng: np.random.Generator,
        tabular_baseline: Profile,
        make_state: Callable[..., ModelDriftState],
    ) -> None:
        """Two shipped windows load and merge into the sketches of both."""
        state = make_state(tabular_baseline)
        feed(state, tabular(rng, {}, batches=4))
        first = state.roll_window(now=200.0)
        feed(state, tabular(rng, {}, batches=6))
        second = state.roll_window(now=300.0)
        assert first is not None
        assert second is not None
        merged = Profile.from_document(msgpack.unpackb(msgpack.packb(first), raw=False))
        merged.merge(Profile.from_document(second))
        assert merged.rows == 320
        assert merged.inputs[0].numeric.count(0) == 320


class TestLiveReference:
    def test_collects_then_scores_against_the_first_rows(
        self, rng: np.random.Generator, make_state: Callable[..., ModelDriftState]
    ) -> None:
        """Without a baseline the first reference_rows rows become the reference."""
        state = make_state(reference_rows=1000)
        feed(state, tabular(rng, {}, batches=16))
        waiting = state.report("deploy", now=150.0)
        assert (waiting["status"], waiting["reference"], waiting["features"]) == (
            "insufficient_data",
            "live",
            [],
        )
        feed(state, tabular(rng, {}, batches=16))
        assert state.baseline is not None
        assert state.baseline.rows == 1024
        feed(state, tabular(rng, {2: 1.5}, batches=40))
        report = state.report("deploy", now=200.0)
        assert report["reference"] == "live"
        assert report["reference_rows"] == 1024
        assert report["window"]["rows"] == 1280
        assert {r["name"] for r in report["features"] if r["status"] == "alert"} == {"f2"}

    def test_reference_window_is_not_shipped(
        self, rng: np.random.Generator, make_state: Callable[..., ModelDriftState]
    ) -> None:
        """While the reference is being collected, closing a window ships nothing."""
        state = make_state(reference_rows=1000)
        feed(state, tabular(rng, {}, batches=4))
        assert state.roll_window(now=400.0) is None
