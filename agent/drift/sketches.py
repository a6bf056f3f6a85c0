"""Mergeable streaming sketches of feature columns.

This module owns two things: ``NumericSketch`` (fixed-edge histograms, counts, moments,
min/max and a KLL quantile sketch for a block of numeric columns, updated in one vectorised
pass) and ``CategoricalSketch`` (frequencies over a frozen vocabulary, an "other" bucket and
a bounded count of new categories). Turning tensors into columns is ``features``' job. It
must not score drift, choose bin edges, know about windows or baselines, or log.

Merging two sketches equals sketching the concatenated data: exactly for counts, histograms,
min and max; up to float rounding for the moments (Chan et al.'s parallel update); within the
KLL rank error for quantiles; for new categories exactly while fewer than ``max_new`` distinct
ones were seen (beyond that, Misra-Gries counts are lower bounds by at most ``new_undercount``).

Serialised sketches (``to_dicts``/``to_dict``) hold only msgpack-friendly values: ints, finite
floats or None, lists, str, and the KLL sketch's own serialised bytes. Bin edges are stored
without their open ends: ``edges`` lists the inner edges, bins are ``(-inf, e0)``,
``[e0, e1)``, ..., ``[e_last, +inf)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import datasketches
import numpy as np
import numpy.typing as npt

from agent.drift.scores import Distribution

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: KLL accuracy parameter: k=200 keeps ~1.7% rank error, k=100 ~3.3% in about half the bytes.
DEFAULT_KLL_K: Final = 200

#: Rows compared against all edges in one broadcast; bounds the temporary (rows*cols*bins bytes).
_CHUNK_ROWS: Final = 4096

#: Bin indexes are summed in uint8, so a column has at most this many bins.
_MAX_BINS: Final = 255

#: Rows buffered before the KLL sketches see them (width * this * 8 bytes per sketch).
_BUFFER_ROWS: Final = 256


class NumericSketch:
    """Histograms on frozen edges, moments, min/max and quantiles for ``width`` columns.

    Args:
        edges: per column, the strictly increasing finite inner edges (may be empty: one bin).
        bounds: per column, the baseline's (min, max); values outside count as out of range.
            None means no bound (nothing is out of range).
        k: the KLL accuracy parameter of the quantile sketches.
    """

    def __init__(
        self,
        edges: Sequence[Sequence[float]],
        bounds: Sequence[tuple[float, float] | None] | None = None,
        *,
        k: int = DEFAULT_KLL_K,
    ) -> None:
        width = len(edges)
        self._edges = tuple(tuple(float(e) for e in column) for column in edges)
        self._bounds = tuple(bounds) if bounds is not None else (None,) * width
        if len(self._bounds) != width:
            raise ValueError(f"{len(self._bounds)} bounds for {width} columns; give one each")
        self._nbins = np.array([len(e) + 1 for e in self._edges], dtype=np.int64)
        stride = int(self._nbins.max()) if width else 1
        if stride > _MAX_BINS:
            raise ValueError(f"{stride} bins in one column: at most {_MAX_BINS} are supported")
        # ``update`` works on the batch transposed, (width, rows) and C-contiguous: every
        # reduction then runs along memory in long inner loops (numpy costs several times
        # more per value when a loop covers 2 or 30 of them), and the KLL sketches take its
        # rows as they are. Hence the (width, 1) shapes below, which broadcast against it.
        # Inner edges padded with +inf to a rectangle, bins along axis 0.
        self._inner = np.full((stride - 1, width, 1), np.inf)
        for j, column in enumerate(self._edges):
            self._inner[: len(column), j, 0] = column
        self._low = np.array([[b[0] if b else -np.inf] for b in self._bounds]).reshape(width, 1)
        self._high = np.array([[b[1] if b else np.inf] for b in self._bounds]).reshape(width, 1)
        self._offsets = (np.arange(width, dtype=np.int64) * stride).reshape(width, 1)
        self._counts = np.zeros((width, stride), dtype=np.int64)
        self._n = np.zeros(width, dtype=np.int64)
        self._missing = np.zeros(width, dtype=np.int64)
        self._out_of_range = np.zeros(width, dtype=np.int64)
        self._mean = np.zeros(width)
        self._m2 = np.zeros(width)
        self._min = np.full(width, np.inf)
        self._max = np.full(width, -np.inf)
        self._quantiles = _Quantiles(width, k)

    @property
    def width(self) -> int:
        """Number of columns."""
        return len(self._edges)

    def edges(self, column: int) -> tuple[float, ...]:
        """The inner edges of one column."""
        return self._edges[column]

    def bounds(self, column: int) -> tuple[float, float] | None:
        """The (min, max) beyond which a value of this column is out of range."""
        return self._bounds[column]

    def empty_like(self, *, k: int | None = None) -> NumericSketch:
        """A new empty sketch on the same edges and bounds."""
        return NumericSketch(self._edges, self._bounds, k=self._quantiles.k if k is None else k)

    def copy(self) -> NumericSketch:
        """An independent copy (the KLL sketches are copied through their bytes)."""
        return NumericSketch.from_dicts(self.to_dicts())

    def update(self, values: npt.ArrayLike) -> None:
        """Add a batch: a (rows, width) array, or a 1-D array when width is 1.

        NaN and +-inf count as missing and enter nothing else.
        """
        x = np.asarray(values, dtype=np.float64)
        if x.ndim == 1 and self.width == 1:
            x = x.reshape(-1, 1)
        if x.ndim != 2 or x.shape[1] != self.width:
            raise ValueError(f"batch of shape {list(x.shape)}: expected [rows, {self.width}]")
        if x.shape[0] == 0 or self.width == 0:
            return
        # One transposing copy (well under a ns per value) speeds up every step below.
        columns = np.ascontiguousarray(x.T)
        with np.errstate(over="ignore", invalid="ignore"):
            sums = columns.sum(axis=1)
        # Finite column sums mean every value is finite: the common case skips all masking.
        if np.isfinite(sums).all():
            self._add_finite(columns, sums)
        else:
            self._add_with_missing(columns)

    def _add_finite(self, columns: FloatArray, sums: FloatArray) -> None:
        rows = columns.shape[1]
        mean = sums / rows
        deviation = columns - mean[:, None]
        m2 = np.einsum("ij,ij->i", deviation, deviation)
        count = np.full(self.width, rows, dtype=np.int64)
        self._combine(count, mean, m2, columns.min(axis=1), columns.max(axis=1))
        self._add_histogram(columns, None)
        self._out_of_range += ((columns < self._low) | (columns > self._high)).sum(axis=1)
        self._quantiles.add(columns)

    def _add_with_missing(self, columns: FloatArray) -> None:
        finite = np.isfinite(columns)
        count = finite.sum(axis=1)
        # Zeros stand in for missing values so the arithmetic stays warning-free; every sum
        # below masks them out again.
        clean = np.where(finite, columns, 0.0)
        mean = clean.sum(axis=1) / np.maximum(count, 1)
        deviation = np.where(finite, clean - mean[:, None], 0.0)
        m2 = np.einsum("ij,ij->i", deviation, deviation)
        low = np.where(finite, clean, np.inf).min(axis=1)
        high = np.where(finite, clean, -np.inf).max(axis=1)
        self._combine(count, mean, m2, low, high)
        self._add_histogram(clean, finite)
        self._missing += columns.shape[1] - count
        outside = (clean < self._low) | (clean > self._high)
        self._out_of_range += (outside & finite).sum(axis=1)
        # KLL ignores NaN, so NaN marks the missing values it must not see.
        self._quantiles.add(np.where(finite, columns, np.nan))

    def _add_histogram(self, clean: FloatArray, finite: npt.NDArray[np.bool_] | None) -> None:
        """Count a (width, rows) block into the bins (``finite``: which values to count)."""
        stride = self._counts.shape[1]
        for start in range(0, clean.shape[1], _CHUNK_ROWS):
            part = clean[:, start : start + _CHUNK_ROWS]
            # Bin index = how many inner edges are <= the value (bins are closed on the left).
            above = part[None, :, :] >= self._inner
            index = above.view(np.uint8).sum(axis=0, dtype=np.uint8) + self._offsets
            flat = (
                index.ravel() if finite is None else index[finite[:, start : start + _CHUNK_ROWS]]
            )
            self._counts += np.bincount(flat, minlength=self._counts.size).reshape(-1, stride)

    def _combine(
        self, n_b: IntArray, mean_b: FloatArray, m2_b: FloatArray, low: FloatArray, high: FloatArray
    ) -> None:
        # Chan, Golub & LeVeque's pairwise update: stable, and exact in the counts.
        n_a = self._n.astype(np.float64)
        n = n_a + n_b
        safe = np.maximum(n, 1.0)
        delta = mean_b - self._mean
        self._mean = np.where(n > 0, self._mean + delta * (n_b / safe), 0.0)
        self._m2 = self._m2 + m2_b + delta * delta * (n_a * n_b / safe)
        self._n = self._n + n_b
        self._min = np.minimum(self._min, low)
        self._max = np.maximum(self._max, high)

    def merge(self, other: NumericSketch) -> None:
        """Add another sketch on the same edges into this one."""
        if self._edges != other._edges:
            raise ValueError("cannot merge sketches on different bin edges; use one baseline")
        self._counts += other._counts
        self._missing += other._missing
        self._out_of_range += other._out_of_range
        self._combine(other._n, other._mean, other._m2, other._min, other._max)
        self._quantiles.merge(other._quantiles)

    def counts(self, column: int) -> IntArray:
        """Bin counts of one column (finite values only)."""
        return self._counts[column, : self._nbins[column]].copy()

    def count(self, column: int) -> int:
        """Finite values seen in one column."""
        return int(self._n[column])

    def missing(self, column: int) -> int:
        """NaN and infinite values seen in one column."""
        return int(self._missing[column])

    def out_of_range(self, column: int) -> int:
        """Finite values outside the column's bounds."""
        return int(self._out_of_range[column])

    def mean(self, column: int) -> float | None:
        """Mean of the finite values, None when there are none."""
        return float(self._mean[column]) if self._n[column] else None

    def variance(self, column: int) -> float | None:
        """Population variance of the finite values, None when there are none."""
        return float(self._m2[column] / self._n[column]) if self._n[column] else None

    def extremes(self, column: int) -> tuple[float, float] | None:
        """(min, max) of the finite values, None when there are none."""
        if not self._n[column]:
            return None
        return float(self._min[column]), float(self._max[column])

    def quantiles(self, column: int, ranks: Sequence[float]) -> list[float] | None:
        """Approximate quantiles (KLL) at normalised ranks in [0, 1]."""
        sketch = self._quantiles.settled()[column]
        return None if sketch.is_empty() else [float(q) for q in sketch.get_quantiles(ranks)]

    def rank_error(self, column: int) -> float:
        """The KLL sketch's normalised rank error bound (single-sided, ~99% confidence)."""
        return float(self._quantiles.settled()[column].normalized_rank_error(False))

    def distribution(self, column: int) -> Distribution:
        """One column as the scores see it."""
        variance = self.variance(column)
        return Distribution(
            counts=self.counts(column).astype(np.float64),
            missing=self.missing(column),
            out_of_range=self.out_of_range(column),
            rows=self.count(column) + self.missing(column),
            mean=self.mean(column),
            std=None if variance is None else float(np.sqrt(variance)),
        )

    def to_dicts(self) -> list[dict[str, Any]]:
        """One msgpack-friendly dict per column."""
        sketches = self._quantiles.settled()
        return [self._column_dict(j, sketches[j]) for j in range(self.width)]

    def _column_dict(self, j: int, quantiles: Any) -> dict[str, Any]:
        extremes = self.extremes(j)
        bounds = self._bounds[j]
        return {
            "edges": list(self._edges[j]),
            "bounds": list(bounds) if bounds else None,
            "counts": self.counts(j).tolist(),
            "count": self.count(j),
            "missing": self.missing(j),
            "out_of_range": self.out_of_range(j),
            "mean": self.mean(j),
            "variance": self.variance(j),
            "m2": float(self._m2[j]),
            "min": extremes[0] if extremes else None,
            "max": extremes[1] if extremes else None,
            "kll": bytes(quantiles.serialize()),
        }

    @classmethod
    def from_dicts(cls, columns: Sequence[Mapping[str, Any]]) -> NumericSketch:
        """Rebuild a sketch from ``to_dicts()`` output; raises ValueError naming a bad field."""
        parsed = [_parse_column(j, c) for j, c in enumerate(columns)]
        k = min((int(p.kll.k) for p in parsed), default=DEFAULT_KLL_K)
        sketch = cls([p.edges for p in parsed], [p.bounds for p in parsed], k=k)
        sketch._quantiles = _Quantiles(len(parsed), k, [p.kll for p in parsed])
        for j, p in enumerate(parsed):
            sketch._counts[j, : len(p.counts)] = p.counts
            sketch._n[j], sketch._missing[j], sketch._out_of_range[j] = p.totals
            sketch._mean[j], sketch._m2[j] = p.mean, p.m2
            sketch._min[j], sketch._max[j] = p.extremes
        return sketch


class _Quantiles:
    """One KLL sketch per column behind a small row buffer.

    A KLL ``update`` call costs microseconds however few values it gets, so small batches
    are buffered and handed over together; every read goes through ``settled()``.
    """

    def __init__(self, width: int, k: int, sketches: list[Any] | None = None) -> None:
        self.k = k
        self._sketches = sketches or [datasketches.kll_doubles_sketch(k) for _ in range(width)]
        self._buffer: FloatArray | None = None
        self._fill = 0

    def add(self, columns: FloatArray) -> None:
        """Add a (width, rows) block; NaN values are ignored by KLL."""
        rows = columns.shape[1]
        if self._fill + rows > _BUFFER_ROWS:
            self.settled()
        if rows >= _BUFFER_ROWS:
            for sketch, column in zip(self._sketches, np.ascontiguousarray(columns), strict=True):
                sketch.update(column)
            return
        if self._buffer is None:
            self._buffer = np.empty((len(self._sketches), _BUFFER_ROWS))
        self._buffer[:, self._fill : self._fill + rows] = columns
        self._fill += rows

    def settled(self) -> list[Any]:
        """The sketches, with every buffered value added."""
        if self._fill and self._buffer is not None:
            for sketch, column in zip(self._sketches, self._buffer[:, : self._fill], strict=True):
                sketch.update(column)
            self._fill = 0
        return self._sketches

    def merge(self, other: _Quantiles) -> None:
        """Merge another column set into this one."""
        for mine, theirs in zip(self.settled(), other.settled(), strict=True):
            mine.merge(theirs)


@dataclass(frozen=True, slots=True)
class _Column:
    edges: list[float]
    bounds: tuple[float, float] | None
    counts: list[int]
    totals: tuple[int, int, int]
    mean: float
    m2: float
    extremes: tuple[float, float]
    kll: Any


def _parse_column(j: int, column: Mapping[str, Any]) -> _Column:
    where = f"numeric column {j}"
    try:
        edges = [float(e) for e in column["edges"]]
        counts = [int(c) for c in column["counts"]]
        bounds = column["bounds"]
        totals = (int(column["count"]), int(column["missing"]), int(column["out_of_range"]))
        empty = totals[0] == 0
        parsed = _Column(
            edges=edges,
            bounds=(float(bounds[0]), float(bounds[1])) if bounds else None,
            counts=counts,
            totals=totals,
            mean=0.0 if empty else float(column["mean"]),
            m2=float(column["m2"]),
            extremes=(np.inf, -np.inf) if empty else (float(column["min"]), float(column["max"])),
            kll=datasketches.kll_doubles_sketch.deserialize(bytes(column["kll"])),
        )
    except KeyError as exc:
        raise ValueError(f"{where}: field {exc} is missing") from exc
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    if not all(np.isfinite(edges)) or bool(np.any(np.diff(edges) <= 0)):
        raise ValueError(f"{where}: edges {edges} must be finite and strictly increasing")
    if len(counts) != len(edges) + 1 or sum(counts) != totals[0]:
        raise ValueError(
            f"{where}: {len(counts)} bin counts summing to {sum(counts)} do not fit "
            f"{len(edges)} inner edges and count {totals[0]}"
        )
    return parsed


class CategoricalSketch:
    """Frequencies over a frozen vocabulary, an "other" bucket, and the top new categories.

    Categories outside the vocabulary count into "other" (the last count) and are also
    tracked by name in a Misra-Gries summary of at most ``max_new`` entries.
    """

    def __init__(self, vocabulary: Sequence[str], *, max_new: int = 32) -> None:
        self._vocabulary = tuple(vocabulary)
        self._index = {item: i for i, item in enumerate(self._vocabulary)}
        if len(self._index) != len(self._vocabulary):
            raise ValueError("vocabulary has duplicate categories; list each once")
        self._counts = [0] * (len(self._vocabulary) + 1)
        self._rows = 0
        self._max_new = max_new
        self._new: dict[str, int] = {}
        self._undercount = 0

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """The frozen categories, in order (their counts come first, "other" last)."""
        return self._vocabulary

    @property
    def rows(self) -> int:
        """Rows (documents, predictions) seen; a row may hold many categories."""
        return self._rows

    def empty_like(self) -> CategoricalSketch:
        """A new empty sketch on the same vocabulary."""
        return CategoricalSketch(self._vocabulary, max_new=self._max_new)

    def copy(self) -> CategoricalSketch:
        """An independent copy."""
        return CategoricalSketch.from_dict(self.to_dict())

    def update(self, items: Sequence[str], rows: int) -> None:
        """Add the categories (or tokens) of ``rows`` rows."""
        other = len(self._vocabulary)
        unseen: dict[str, int] = {}
        for item, n in Counter(items).items():
            i = self._index.get(item, other)
            self._counts[i] += n
            if i == other:
                unseen[item] = n
        self._rows += rows
        self._add_new(unseen)

    def _add_new(self, unseen: Mapping[str, int]) -> None:
        for item, n in unseen.items():
            self._new[item] = self._new.get(item, 0) + n
        if len(self._new) <= self._max_new:
            return
        # Mergeable Misra-Gries (Agarwal et al. 2012): subtract the (max_new+1)-th largest
        # count from all and keep what stays positive.
        pivot = sorted(self._new.values(), reverse=True)[self._max_new]
        self._new = {item: n - pivot for item, n in self._new.items() if n > pivot}
        self._undercount += pivot

    def merge(self, other: CategoricalSketch) -> None:
        """Add another sketch on the same vocabulary into this one."""
        if self._vocabulary != other._vocabulary:
            raise ValueError("cannot merge categorical sketches over different vocabularies")
        self._counts = [a + b for a, b in zip(self._counts, other._counts, strict=True)]
        self._rows += other._rows
        self._undercount += other._undercount
        self._add_new(other._new)

    def counts(self) -> IntArray:
        """Counts per vocabulary category, then "other"."""
        return np.array(self._counts, dtype=np.int64)

    def new_categories(self, limit: int = 10) -> list[tuple[str, int]]:
        """The most frequent categories outside the vocabulary, most frequent first."""
        ranked = sorted(self._new.items(), key=lambda kv: (-kv[1], kv[0]))
        return ranked[:limit]

    def distribution(self) -> Distribution:
        """The category counts as the scores see them (unordered, nothing missing)."""
        return Distribution(
            counts=self.counts().astype(np.float64),
            missing=0,
            out_of_range=0,
            rows=self._rows,
            ordered=False,
        )

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-friendly dict."""
        return {
            "vocabulary": list(self._vocabulary),
            "counts": list(self._counts),
            "rows": self._rows,
            "max_new": self._max_new,
            "new": [[item, n] for item, n in self.new_categories(self._max_new)],
            "new_undercount": self._undercount,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CategoricalSketch:
        """Rebuild a sketch from ``to_dict()`` output; raises ValueError naming a bad field."""
        try:
            sketch = cls([str(v) for v in data["vocabulary"]], max_new=int(data["max_new"]))
            counts = [int(c) for c in data["counts"]]
            sketch._rows = int(data["rows"])
            sketch._new = {str(item): int(n) for item, n in data["new"]}
            sketch._undercount = int(data["new_undercount"])
        except KeyError as exc:
            raise ValueError(f"categorical sketch: field {exc} is missing") from exc
        except (TypeError, ValueError) as exc:
            raise ValueError(f"categorical sketch: {exc}") from exc
        if len(counts) != len(sketch._counts):
            raise ValueError(
                f"categorical sketch: {len(counts)} counts for {len(sketch._vocabulary)} "
                "categories; expected one more (other)"
            )
        sketch._counts = counts
        return sketch
