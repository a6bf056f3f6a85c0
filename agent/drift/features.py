"""How a tensor becomes feature columns: the kinds of tensors and their features.

``extract_features`` turns one tensor's batch into named numeric columns and categorical
items (tabular columns; per-channel image statistics; text lengths and tokens; labels),
``spec_kind`` chooses the kind from a declared tensor and ``infer_kind`` guesses it from an
array. It must not sketch, score, or log.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
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


def infer_kind(array: npt.NDArray[Any], *, output: bool) -> Kind:
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
    array: npt.NDArray[Any],
    kind: Kind,
    names: Sequence[str] | None = None,
    *,
    saturation: tuple[float, float] | None = None,
) -> Features:
    """Turn one tensor's batch into feature columns.

    Args:
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
    rows = int(array.shape[0]) if array.ndim else 1
    if kind in ("tabular", "score"):
        return _tabular(array, rows, names)
    if kind == "image":
        return _image(array, rows, saturation)
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


def _image(array: npt.NDArray[Any], rows: int, saturation: tuple[float, float] | None) -> Features:
    x = array[:, None] if array.ndim == 3 else array
    if x.ndim != 4:
        raise ValueError(f"image batch of shape {list(array.shape)}: expected 3 or 4 dimensions")
    dark, bright = saturation or _saturation_of(x.dtype)
    if channels_first(x.shape):
        pixels, axis = x.reshape(rows, x.shape[1], -1), 2
    else:
        pixels, axis = x.reshape(rows, -1, x.shape[3]), 1
    mean = pixels.mean(axis=axis, dtype=np.float64)
    std = pixels.std(axis=axis, dtype=np.float64)
    saturated = ((pixels <= dark) | (pixels >= bright)).mean(axis=axis)
    channels = mean.shape[1]
    matrix = np.stack([mean, std, saturated], axis=2).reshape(rows, 3 * channels)
    names = tuple(
        f"channel{c}.{stat}" for c in range(channels) for stat in ("mean", "std", "saturated")
    )
    return Features(rows, names, matrix)


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
