"""Sketches: histograms, moments, quantiles, categories, merge laws, feature extraction."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.drift.sketches import CategoricalSketch, NumericSketch

EDGES = [[-1.0, 0.0, 1.0], [10.0, 20.0], []]
BOUNDS: list[tuple[float, float] | None] = [(-2.0, 2.0), (0.0, 30.0), None]

values = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
rows = st.lists(st.tuples(values, values, values), min_size=0, max_size=300)


def sketch_of(data: list[tuple[float, float, float]] | np.ndarray) -> NumericSketch:
    sketch = NumericSketch(EDGES, BOUNDS, k=100)
    sketch.update(np.asarray(data, dtype=np.float64).reshape(-1, 3))
    return sketch


def assert_same_exact_parts(a: NumericSketch, b: NumericSketch) -> None:
    for j in range(a.width):
        assert a.counts(j).tolist() == b.counts(j).tolist()
        assert (a.count(j), a.missing(j), a.out_of_range(j)) == (
            b.count(j),
            b.missing(j),
            b.out_of_range(j),
        )
        assert a.extremes(j) == b.extremes(j)


def assert_close_moments(a: NumericSketch, b: NumericSketch) -> None:
    for j in range(a.width):
        if a.count(j) == 0:
            assert b.mean(j) is None
            continue
        assert a.mean(j) == pytest.approx(b.mean(j), rel=1e-9, abs=1e-6)
        assert a.variance(j) == pytest.approx(b.variance(j), rel=1e-7, abs=1e-4)


def assert_quantiles_within_bound(sketch: NumericSketch, data: np.ndarray) -> None:
    for j in range(sketch.width):
        column = data[:, j][np.isfinite(data[:, j])]
        found = sketch.quantiles(j, [0.1, 0.5, 0.9])
        if column.size == 0:
            assert found is None
            continue
        assert found is not None
        # 3x the KLL single-sided 99% bound, plus one rank of slack for ties: never flaky.
        tolerance = 3 * sketch.rank_error(j) + 1 / column.size
        for rank, value in zip([0.1, 0.5, 0.9], found, strict=True):
            below, upto = np.mean(column < value), np.mean(column <= value)
            assert below - tolerance <= rank <= upto + tolerance


class TestNumericSketchUpdate:
    def test_histogram_matches_searchsorted(self) -> None:
        """Bin counts equal a per-column searchsorted on the inner edges (left-closed bins)."""
        data = np.random.default_rng(0).normal(scale=15, size=(1000, 3))
        sketch = sketch_of(data)
        for j, edges in enumerate(EDGES):
            index = np.searchsorted(edges, data[:, j], side="right")
            assert (
                sketch.counts(j).tolist() == np.bincount(index, minlength=len(edges) + 1).tolist()
            )

    def test_value_on_an_edge_goes_to_the_bin_it_opens(self) -> None:
        """A value equal to an edge counts in the bin that starts at that edge."""
        sketch = NumericSketch([[0.0, 1.0]])
        sketch.update(np.array([0.0, 1.0, 0.5]))
        assert sketch.counts(0).tolist() == [0, 2, 1]

    def test_nan_and_inf_count_as_missing_only(self) -> None:
        """Non-finite values count as missing and stay out of counts, moments and quantiles."""
        sketch = NumericSketch([[0.0]])
        sketch.update(np.array([1.0, np.nan, np.inf, -np.inf, 3.0]))
        assert (sketch.count(0), sketch.missing(0)) == (2, 3)
        assert sketch.counts(0).tolist() == [0, 2]
        assert sketch.mean(0) == 2.0
        assert sketch.extremes(0) == (1.0, 3.0)
        assert sketch.quantiles(0, [0.0, 1.0]) == [1.0, 3.0]

    def test_out_of_range_counts_values_beyond_the_bounds(self) -> None:
        """Finite values outside the baseline's [min, max] are out of range, the bounds are not."""
        sketch = NumericSketch([[0.0]], [(-1.0, 1.0)])
        sketch.update(np.array([-1.0, 1.0, 1.5, -7.0, np.nan]))
        assert sketch.out_of_range(0) == 2

    def test_moments_match_numpy(self) -> None:
        """Mean and population variance over many small batches match numpy on the whole."""
        data = np.random.default_rng(1).normal(loc=5, scale=3, size=(960, 3))
        sketch = NumericSketch(EDGES, BOUNDS)
        for batch in np.split(data, 30):
            sketch.update(batch)
        for j in range(3):
            assert sketch.mean(j) == pytest.approx(data[:, j].mean(), rel=1e-12)
            assert sketch.variance(j) == pytest.approx(data[:, j].var(), rel=1e-10)

    def test_small_batches_reach_the_quantile_sketch(self) -> None:
        """Values buffered from small batches are all in the quantiles (exact below k)."""
        sketch = NumericSketch([[]], k=200)
        for value in range(50):
            sketch.update(np.array([float(value)]))
        assert sketch.quantiles(0, [0.0, 1.0]) == [0.0, 49.0]

    def test_wrong_width_is_refused(self) -> None:
        """A batch with another number of columns raises a ValueError naming both shapes."""
        with pytest.raises(ValueError, match=r"expected \[rows, 3\]"):
            NumericSketch(EDGES).update(np.zeros((4, 2)))

    def test_empty_sketch_has_no_moments(self) -> None:
        """Before any value, mean, variance, extremes and quantiles are None."""
        sketch = NumericSketch([[0.0]])
        assert (sketch.mean(0), sketch.variance(0), sketch.extremes(0)) == (None, None, None)
        assert sketch.quantiles(0, [0.5]) is None


class TestNumericMergeLaws:
    @settings(max_examples=80, deadline=None)
    @given(data=rows, cut=st.floats(min_value=0, max_value=1))
    def test_merging_halves_equals_sketching_the_whole(
        self, data: list[tuple[float, float, float]], cut: float
    ) -> None:
        """Sketch(a) merged with sketch(b) equals sketch(a + b): exact counts, close moments."""
        split = int(len(data) * cut)
        merged = sketch_of(data[:split])
        merged.merge(sketch_of(data[split:]))
        whole = sketch_of(data)
        assert_same_exact_parts(merged, whole)
        assert_close_moments(merged, whole)
        assert_quantiles_within_bound(merged, np.asarray(data, dtype=np.float64).reshape(-1, 3))

    @settings(max_examples=50, deadline=None)
    @given(a=rows, b=rows, c=rows)
    def test_merge_is_associative(
        self,
        a: list[tuple[float, float, float]],
        b: list[tuple[float, float, float]],
        c: list[tuple[float, float, float]],
    ) -> None:
        """(a + b) + c equals a + (b + c)."""
        left = sketch_of(a)
        left.merge(sketch_of(b))
        left.merge(sketch_of(c))
        right_tail = sketch_of(b)
        right_tail.merge(sketch_of(c))
        right = sketch_of(a)
        right.merge(right_tail)
        assert_same_exact_parts(left, right)
        assert_close_moments(left, right)

    @settings(max_examples=50, deadline=None)
    @given(data=rows)
    def test_serialised_sketch_survives_msgpack(
        self, data: list[tuple[float, float, float]]
    ) -> None:
        """to_dicts through msgpack and from_dicts gives back the same sketch."""
        sketch = sketch_of(data)
        wire = msgpack.unpackb(msgpack.packb(sketch.to_dicts()), raw=False)
        restored = NumericSketch.from_dicts(wire)
        assert_same_exact_parts(restored, sketch)
        assert restored.to_dicts() == sketch.to_dicts()

    def test_merging_other_edges_is_refused(self) -> None:
        """Sketches on different edges cannot merge."""
        with pytest.raises(ValueError, match="different bin edges"):
            NumericSketch([[0.0]]).merge(NumericSketch([[1.0]]))

    def test_damaged_column_names_the_field(self) -> None:
        """from_dicts says which field of which column is wrong."""
        column = sketch_of([(0.0, 1.0, 2.0)]).to_dicts()[1]
        del column["counts"]
        with pytest.raises(ValueError, match="numeric column 0: field 'counts' is missing"):
            NumericSketch.from_dicts([column])

    def test_counts_that_do_not_fit_the_edges_are_refused(self) -> None:
        """Bin counts must be one more than the inner edges and sum to the count."""
        column = sketch_of([(0.0, 1.0, 2.0)]).to_dicts()[0]
        column["counts"] = [1, 0]
        with pytest.raises(ValueError, match="do not fit"):
            NumericSketch.from_dicts([column])


categories = st.lists(st.sampled_from(["a", "b", "c", "x", "y", "z"]), max_size=60)


def categorical_of(items: list[str]) -> CategoricalSketch:
    sketch = CategoricalSketch(["a", "b", "c"], max_new=8)
    sketch.update(items, len(items))
    return sketch


class TestCategoricalSketch:
    def test_counts_vocabulary_then_other(self) -> None:
        """Known categories count in place, the rest in the trailing "other" bucket."""
        sketch = categorical_of(["a", "a", "c", "zz", "yy", "zz"])
        assert sketch.counts().tolist() == [2, 0, 1, 3]
        assert sketch.new_categories() == [("zz", 2), ("yy", 1)]

    def test_new_categories_are_bounded(self) -> None:
        """At most max_new new categories are tracked, with the undercount recorded."""
        sketch = CategoricalSketch(["a"], max_new=4)
        sketch.update(["hot"] * 50 + [f"rare{i}" for i in range(100)], 150)
        assert len(sketch.new_categories(100)) <= 4
        assert sketch.new_categories()[0][0] == "hot"
        assert sketch.to_dict()["new_undercount"] > 0
        assert sketch.counts().tolist() == [0, 150]

    @settings(max_examples=80, deadline=None)
    @given(items=categories, cut=st.floats(min_value=0, max_value=1))
    def test_merging_halves_equals_sketching_the_whole(self, items: list[str], cut: float) -> None:
        """Merged counts, rows and new categories equal those of the concatenation."""
        split = int(len(items) * cut)
        merged = categorical_of(items[:split])
        merged.merge(categorical_of(items[split:]))
        assert merged.to_dict() == categorical_of(items).to_dict()

    @settings(max_examples=50, deadline=None)
    @given(a=categories, b=categories, c=categories)
    def test_merge_is_associative(self, a: list[str], b: list[str], c: list[str]) -> None:
        """(a + b) + c equals a + (b + c)."""
        left = categorical_of(a)
        left.merge(categorical_of(b))
        left.merge(categorical_of(c))
        tail = categorical_of(b)
        tail.merge(categorical_of(c))
        right = categorical_of(a)
        right.merge(tail)
        assert left.to_dict() == right.to_dict()

    def test_serialised_sketch_survives_msgpack(self) -> None:
        """to_dict through msgpack and from_dict gives back the same sketch."""
        sketch = categorical_of(["a", "x", "x", "b"])
        wire = msgpack.unpackb(msgpack.packb(sketch.to_dict()), raw=False)
        assert CategoricalSketch.from_dict(wire).to_dict() == sketch.to_dict()

    def test_merging_other_vocabularies_is_refused(self) -> None:
        """Sketches over different vocabularies cannot merge."""
        with pytest.raises(ValueError, match="different vocabularies"):
            CategoricalSketch(["a"]).merge(CategoricalSketch(["b"]))
