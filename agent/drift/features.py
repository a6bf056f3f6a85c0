"""How a tensor becomes feature columns: the kinds of tensors and their features.

``extract_features`` turns one tensor's batch into named numeric columns and categorical
items (tabular columns; per-channel image statistics; text lengths and tokens; labels),
``spec_kind`` chooses the kind from a declared tensor and ``infer_kind`` guesses it from an
array. It must not sketch, score, or log.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from agent.tensors import TensorSpec

FloatArray = npt.NDArray[np.float64]

#: How a tensor becomes features: inputs are tabular, image or text; outputs label or score.
Kind = Literal["tabular", "image", "text", "label", "score"]
KINDS: Final[tuple[Kind, ...]] = ("tabular", "image", "text", "label", "score")

#: A token is a run of word characters (letters, digits, underscore) after lower-casing.
_TOKEN: Final = re.compile(r"\w+")


@dataclass(frozen=True, slots=True)
class Features:
    """A batch of one tensor as feature columns.

    ``numeric`` is (rows, len(numeric_names)) float64; each categorical entry is a feature
    name and the categories or tokens of all rows, flattened.
    """

    rows: int
    numeric_names: tuple[str, ...]
    numeric: FloatArray
    categorical: tuple[tuple[str, list[str]], ...] = ()


@dataclass(frozen=True, slots=True)
class Stacked:
    """A batch given as arrays of one dtype and row shape, read as their concatenation along
    axis 0.

    Image features copy a block of rows at a time into a cache-sized buffer instead of
    first concatenating a whole batch (48 KB per 3x64x64 float32 row) into memory that each
    pass over it then streams again; other kinds concatenate the parts.
    """

    parts: tuple[npt.NDArray[Any], ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.parts[0].dtype

    @property
    def ndim(self) -> int:
        return self.parts[0].ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(len(part) for part in self.parts), *self.parts[0].shape[1:])

    def concatenate(self) -> npt.NDArray[Any]:
        """The batch as one array."""
        return np.concatenate(self.parts)


#: One tensor's batch: an array, or arrays to be read as one.
Batch = npt.NDArray[Any] | Stacked


def infer_kind(array: Batch, *, output: bool) -> Kind:
    """Guess how to profile a tensor: strings are text (or labels), 3-D/4-D inputs images,
    1-D integer or string outputs labels, other outputs scores, other inputs tabular."""
    stringy = array.dtype.kind in ("U", "S", "O")
    if output:
        column = array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)
        labels = stringy or array.dtype.kind in ("i", "u", "b")
        return "label" if labels and column else "score"
    if stringy:
        return "text"
    return "image" if array.ndim in (3, 4) else "tabular"


def extract_features(
    array: Batch,
    kind: Kind,
    names: Sequence[str] | None = None,
    *,
    saturation: tuple[float, float] | None = None,
) -> Features:
    """Turn one tensor's batch into feature columns.

    Args:
        array: the batch: an array, or ``Stacked`` arrays read as their concatenation.
        kind: "tabular"/"score": one numeric feature per column (1-D: one feature), named by
            ``names`` or ``f0, f1, ...``. "image" (N,C,H,W / N,H,W,C / N,H,W): per sample and
            channel, ``channel{c}.mean``, ``.std`` and ``.saturated`` (share of pixels at or
            beyond ``saturation``). "text": per column, the length in characters (numeric)
            and the lower-cased word tokens (categorical); with one column the features are
            ``length`` and ``tokens``, else ``{name}.length`` and ``{name}.tokens``.
            "label": the values as categories, one feature ``class``.
        saturation: (dark, bright) pixel values; by default the integer dtype's range,
            or (0, 1) for float images.
    """
    if kind == "image":
        return _image(array, saturation)
    if isinstance(array, Stacked):
        array = array.concatenate()
    rows = int(array.shape[0]) if array.ndim else 1
    if kind in ("tabular", "score"):
        return _tabular(array, rows, names)
    if kind == "text":
        return _text(array, rows, names)
    return Features(rows, (), np.empty((rows, 0)), (("class", _labels(np.asarray(array))),))


def _labels(array: npt.NDArray[Any]) -> list[str]:
    """The values as category names (str() of each), in no particular order."""
    flat = array.reshape(-1)
    if flat.dtype.kind not in ("b", "i", "u", "U"):
        return [_as_text(v) for v in flat.tolist()]
    # Labels take few values: naming each distinct one once is ~15x cheaper per row.
    values, counts = np.unique(flat, return_counts=True)
    return np.repeat(np.array([str(v) for v in values.tolist()]), counts).tolist()


def _tabular(array: npt.NDArray[Any], rows: int, names: Sequence[str] | None) -> Features:
    matrix = np.asarray(array).reshape(rows, -1).astype(np.float64, copy=False)
    width = matrix.shape[1]
    if names is None:
        names = [f"f{j}" for j in range(width)]
    elif len(names) != width:
        raise ValueError(f"{width} columns but {len(names)} feature names; give one per column")
    return Features(rows, tuple(names), matrix)


def _image(batch: Batch, saturation: tuple[float, float] | None) -> Features:
    parts = batch.parts if isinstance(batch, Stacked) else (batch,)
    shape, dtype = batch.shape, batch.dtype
    if len(shape) == 3:
        parts, shape = tuple(part[:, None] for part in parts), (shape[0], 1, *shape[1:])
    if len(shape) != 4:
        raise ValueError(f"image batch of shape {list(batch.shape)}: expected 3 or 4 dimensions")
    dark, bright = saturation or _saturation_of(dtype)
    if dtype.kind not in "biuf":
        parts, dtype = tuple(np.asarray(part, dtype=np.float64) for part in parts), np.dtype("f8")
    rows = shape[0]
    first = channels_first(shape)
    channels = shape[1] if first else shape[3]
    stats = np.empty((rows, channels, 3))
    if rows and channels:
        _ImageStats(dtype, first, dark, bright).into(parts, stats)
    return Features(rows, _image_names(channels), stats.reshape(rows, 3 * channels))


@cache
def _image_names(channels: int) -> tuple[str, ...]:
    return tuple(
        f"channel{c}.{stat}" for c in range(channels) for stat in ("mean", "std", "saturated")
    )


#: Pixel values per block of image rows reduced together: a block's pixels and deviations
#: stay in the CPU caches across the five or so passes over them, and numpy's cost per call
#: is spread over many rows.
_IMAGE_BLOCK_VALUES: Final = 1 << 18

#: float32 results for pixels all smaller in magnitude than this are recomputed in float64:
#: their squared deviations could underflow float32 (near 1e-38).
_FLOAT32_SMALLEST: Final = 2.0**-40

#: A (row, channel) whose std is at most this share of |mean| may be constant (rounding the
#: mean of a constant leaves a std of about 1e-7 of it); min and max tell.
_CONSTANT_SPREAD: Final = 1e-3

#: Summing mask bytes in uint16 is several times faster than in int64; it is exact for
#: at most this many values per sum.
_UINT16_SUM: Final = 65535


class _ImageStats:
    """Per (row, channel) mean, standard deviation and saturated share of an image batch.

    Matches ``pixels.mean(dtype=float64)``, ``pixels.std(dtype=float64)`` and the share of
    pixels at or beyond (dark, bright) up to float rounding, at a fraction of the cost:

    - Pixels of dtypes float32 holds exactly (float16/32, bool, 8- and 16-bit integers) are
      reduced in float32, other dtypes in float64. Sums are numpy's pairwise sums along the
      contiguous pixel axis: relative error about log2(pixels) * 6e-8 in float32, where
      einsum's (one accumulator per SIMD lane) grows with the pixel count instead.
    - The variance is two-pass, the mean of squared deviations from the mean, never
      E[x^2] - mean^2 (which cancels catastrophically when std << |mean|).
    - The rare results float32 could get wrong (NaN or infinite pixels, overflow, tiny
      pixels) are recomputed in float64, and constant channels made exact, after the fact:
      the common case pays no min/max passes for them.
    - Saturated pixels are counted as integers (uint16 sums of the mask's bytes).
    """

    def __init__(self, dtype: np.dtype[Any], first: bool, dark: float, bright: float) -> None:
        self._first = first
        exact32 = dtype.kind == "b" or dtype.itemsize <= (4 if dtype.kind == "f" else 2)
        self._work = np.dtype(np.float32 if exact32 else np.float64)
        self._bounds = _bounds_in(dtype, self._work, dark, bright)

    def _pixels(self, images: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """NCHW or NHWC images as (rows, channels, pixels), a view."""
        rows, *rest = images.shape
        if self._first:
            return images.reshape(rows, rest[0], rest[1] * rest[2])
        return images.reshape(rows, rest[0] * rest[1], rest[2]).transpose(0, 2, 1)

    def into(self, parts: Sequence[npt.NDArray[Any]], out: FloatArray) -> None:
        """Write the (rows, channels, 3) statistics of the parts' rows into ``out``."""
        rows, channels, _ = out.shape
        area = self._pixels(parts[0][:0]).shape[2]
        if area == 0:
            out[...] = np.nan
            return
        block = min(rows, max(1, _IMAGE_BLOCK_VALUES // (channels * area)))
        # Allocated once per batch: fresh arrays per block would page-fault memory in again.
        raw: npt.NDArray[Any] | None = None  # runs of small parts, concatenated as they are
        staging = np.empty((block, channels, area), self._work)  # converted, (rows, C, pixels)
        scratch = np.empty_like(staging)
        start = 0
        for run in _runs(parts, block):
            if len(run) == 1:
                images = run[0]
            else:
                if raw is None:
                    raw = np.empty((block, *run[0].shape[1:]), run[0].dtype)
                images = np.concatenate(run, out=raw[: sum(len(part) for part in run)])
            pixels = self._pixels(images)
            size = len(pixels)
            if pixels.dtype == self._work and pixels.flags.c_contiguous:
                values = pixels
            else:
                values = staging[:size]
                np.copyto(values, pixels, casting="unsafe")
            self._block(values, scratch[:size], out[start : start + size])
            start += size

    def _block(self, values: npt.NDArray[Any], scratch: npt.NDArray[Any], out: FloatArray) -> None:
        # NaN and infinite pixels give NaN or infinite statistics, without warnings.
        with np.errstate(invalid="ignore", over="ignore"):
            self._reduce(values, scratch, out)

    def _reduce(self, values: npt.NDArray[Any], scratch: npt.NDArray[Any], out: FloatArray) -> None:
        area = values.shape[2]
        mean = values.sum(axis=2).astype(np.float64) / area
        deviations = np.subtract(values, mean.astype(values.dtype)[:, :, None], out=scratch)
        squares = np.square(deviations, out=deviations).sum(axis=2)
        std = np.sqrt(squares.astype(np.float64) / area)
        if values.dtype == np.float32:
            _redo_in_float64(values, mean, std)
        _exact_constants(values, mean, std)
        out[:, :, 0] = mean
        out[:, :, 1] = std
        out[:, :, 2] = _count_at_bounds(values, *self._bounds) / area


def _redo_in_float64(values: npt.NDArray[Any], mean: FloatArray, std: FloatArray) -> None:
    """Recompute, as numpy's float64 mean and std, the (row, channel)s whose float32 result
    may be off: not finite (NaN or infinite pixels, or float32 overflow, which cannot pass
    silently: it leaves an inf) or with pixels so small that squared deviations underflow.
    Their largest magnitude is at most |mean| + std * sqrt(pixels) (Samuelson)."""
    magnitude = np.abs(mean) + std * np.sqrt(values.shape[2])
    redo = ~(np.isfinite(magnitude) & (magnitude >= _FLOAT32_SMALLEST))
    if redo.any():
        pixels = values[redo].astype(np.float64)
        mean[redo], std[redo] = pixels.mean(axis=1), pixels.std(axis=1)


def _exact_constants(values: npt.NDArray[Any], mean: FloatArray, std: FloatArray) -> None:
    """Make (row, channel)s whose spread is tiny next to their mean exact: constant ones
    get the value as mean and std 0; the others are recomputed in float64, because the
    float32 mean subtracted from every pixel is off by up to half an ulp of the mean, which
    is then a large share of so small a spread. Only these can be affected."""
    maybe = std <= _CONSTANT_SPREAD * np.abs(mean)
    if maybe.any():
        pixels = values[maybe]
        low, high = pixels.min(axis=1), pixels.max(axis=1)
        constant = low == high
        exact = pixels.astype(np.float64)
        mean[maybe] = np.where(constant, low, exact.mean(axis=1))
        std[maybe] = np.where(constant, 0.0, exact.std(axis=1))


def _runs(parts: Sequence[npt.NDArray[Any]], block: int) -> Iterator[list[npt.NDArray[Any]]]:
    """The parts' rows in order, as runs of slices of at most ``block`` rows together."""
    run: list[npt.NDArray[Any]] = []
    size = 0
    for part in parts:
        start = 0
        while start < len(part):
            take = min(block - size, len(part) - start)
            run.append(part[start : start + take])
            size, start = size + take, start + take
            if size == block:
                yield run
                run, size = [], 0
    if run:
        yield run


def _count_at_bounds(values: npt.NDArray[Any], dark: Any, bright: Any) -> npt.NDArray[np.int64]:
    """Along the last axis, how many values are <= dark or >= bright."""
    mask = values <= dark
    np.logical_or(mask, values >= bright, out=mask)
    as_bytes = mask.view(np.uint8)
    counts = np.zeros(mask.shape[:-1], dtype=np.int64)
    for start in range(0, mask.shape[-1], _UINT16_SUM):
        counts += as_bytes[..., start : start + _UINT16_SUM].sum(axis=-1, dtype=np.uint16)
    return counts


def _bounds_in(dtype: np.dtype[Any], work: np.dtype[Any], dark: float, bright: float) -> Any:
    """(dark, bright) as ``work`` values that classify pixels of ``dtype`` as comparing the
    original array with the Python floats does: numpy compares a float array in its own
    dtype (the bound rounded to it), an integer array exactly (in float64), so for integer
    pixels, all exact in ``work``, the bounds are rounded outward instead."""
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            return work.type(dtype.type(dark)), work.type(dtype.type(bright))
    low, high = work.type(dark), work.type(bright)
    # (Compared as Python floats: against a Python float, numpy would round it to ``work``.)
    if float(low) > dark:
        low = np.nextafter(low, work.type(-np.inf))
    if float(high) < bright:
        high = np.nextafter(high, work.type(np.inf))
    return low, high


def channels_first(shape: tuple[int, ...]) -> bool:
    """Whether a 4-D image shape is NCHW: axis 1 looks like channels (1, 3 or 4) and axis 3
    does not; when both or neither do, the smaller of the two (NCHW on a tie)."""
    small = (1, 3, 4)
    if (shape[1] in small) != (shape[3] in small):
        return shape[1] in small
    return shape[1] <= shape[3]


def _saturation_of(dtype: np.dtype[Any]) -> tuple[float, float]:
    if dtype.kind in ("i", "u"):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def _text(array: npt.NDArray[Any], rows: int, names: Sequence[str] | None) -> Features:
    table = np.asarray(array, dtype=object).reshape(rows, -1)
    width = table.shape[1]
    names = names or [f"f{j}" for j in range(width)]
    if len(names) != width:
        raise ValueError(f"{width} text columns but {len(names)} names; give one per column")
    lengths = np.empty((rows, width))
    categorical: list[tuple[str, list[str]]] = []
    for j in range(width):
        docs = [_as_text(v) for v in table[:, j].tolist()]
        lengths[:, j] = [len(d) for d in docs]
        prefix = "" if width == 1 else f"{names[j]}."
        # Newlines are not word characters, so no token spans two documents.
        categorical.append((f"{prefix}tokens", _TOKEN.findall("\n".join(docs).lower())))
    numeric_names = ("length",) if width == 1 else tuple(f"{n}.length" for n in names)
    return Features(rows, numeric_names, lengths, tuple(categorical))


def _as_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def spec_kind(spec: TensorSpec, *, output: bool) -> Kind:
    """How to profile a declared tensor: BYTES inputs are text, 4-D numeric inputs images,
    other inputs tabular; integer, boolean or BYTES outputs of one column are labels (BYTES
    outputs always are), other outputs scores."""
    if output:
        if spec.datatype == "BYTES":
            return "label"
        discrete = spec.datatype == "BOOL" or spec.datatype.startswith(("INT", "UINT"))
        column = len(spec.shape) == 1 or (len(spec.shape) == 2 and spec.shape[1] == 1)
        return "label" if discrete and column else "score"
    if spec.datatype == "BYTES":
        return "text"
    return "image" if len(spec.shape) == 4 else "tabular"
