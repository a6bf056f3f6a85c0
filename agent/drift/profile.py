"""Profiles: the sketches of every feature of a model's inputs and outputs, and the baseline file.

A ``Profile`` is one ``TensorProfile`` per input and output tensor. Built from reference
data (``build_profile``) it is the baseline: its bin edges, chosen here from reference
quantiles, are frozen, and it is never updated again. ``Profile.empty_like`` gives live
sketches on the same edges and vocabularies, which the drift window updates and merges.

The baseline artifact is msgpack::

    {"format": "edge-agent-baseline", "version": 1, "model": str, "rows": int,
     "features": [feature, ...], "outputs": [feature, ...]}

where each feature is ``{"input", "name", "kind", "type": "numeric" | "categorical"}`` plus
its sketch's fields (see ``sketches``). ``loads`` and ``check_compatible`` raise
``BaselineError`` saying what is wrong and how to rebuild the baseline. This module must not
score drift, keep time, or log.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, cast

import msgpack
import numpy as np
import numpy.typing as npt

from agent.drift.features import (
    KINDS,
    Batch,
    Features,
    FloatArray,
    Kind,
    channels_first,
    extract_features,
    infer_kind,
)
from agent.drift.sketches import DEFAULT_KLL_K, CategoricalSketch, NumericSketch
from agent.errors import AgentError
from agent.tensors import TensorSpec

FORMAT: Final = "edge-agent-baseline"
VERSION: Final = 1

_REBUILD: Final = (
    "rebuild it with: edge-agent baseline --model {model} --data DATA -o baseline.msgpack"
)


class BaselineError(AgentError):
    """A baseline that cannot be read, or that does not fit the model it is meant for."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY


@dataclass(frozen=True, slots=True, kw_only=True)
class ProfileOptions:
    """How a reference becomes a baseline: bins per numeric feature, vocabulary size, KLL k."""

    bins: int = 10
    max_categories: int = 50
    max_new: int = 32
    kll_k: int = DEFAULT_KLL_K

    def __post_init__(self) -> None:
        if not 10 <= self.bins <= 20:
            raise ValueError(f"bins {self.bins}: expected 10 to 20 (PSI is defined on ~10 bins)")
        if self.max_categories < 1 or self.max_new < 1:
            raise ValueError("max_categories and max_new must be at least 1")


class TensorProfile:
    """The sketches of one tensor's features: a numeric block and categorical sketches."""

    __slots__ = ("categorical", "categorical_names", "kind", "numeric", "numeric_names", "tensor")

    def __init__(
        self,
        tensor: str,
        kind: Kind,
        numeric: tuple[tuple[str, ...], NumericSketch],
        categorical: Sequence[tuple[str, CategoricalSketch]] = (),
    ) -> None:
        self.tensor = tensor
        self.kind: Kind = kind
        self.numeric_names, self.numeric = numeric
        self.categorical_names = tuple(name for name, _ in categorical)
        self.categorical = tuple(sketch for _, sketch in categorical)

    def names(self) -> list[str]:
        """Feature names in report order: numeric first, then categorical."""
        return [*self.numeric_names, *self.categorical_names]

    def empty_like(self, *, k: int | None = None) -> TensorProfile:
        """Empty sketches on the same edges and vocabularies."""
        return TensorProfile(
            self.tensor,
            self.kind,
            (self.numeric_names, self.numeric.empty_like(k=k)),
            [
                (n, c.empty_like())
                for n, c in zip(self.categorical_names, self.categorical, strict=True)
            ],
        )

    def update(self, features: Features) -> None:
        """Add one batch of this tensor's features."""
        width, columns = features.numeric.shape[1], len(features.categorical)
        if width != self.numeric.width or columns != len(self.categorical):
            raise BaselineError(
                f'input "{self.tensor}": the batch has {width} numeric and {columns} '
                f"categorical features, the baseline {self.numeric.width} and "
                f"{len(self.categorical)}; send the tensor the baseline was built from, or "
                "rebuild the baseline"
            )
        self.numeric.update(features.numeric)
        for sketch, (_, items) in zip(self.categorical, features.categorical, strict=True):
            sketch.update(items, features.rows)

    def merge(self, other: TensorProfile) -> None:
        """Add another tensor's sketches (same edges and vocabularies) into these."""
        self.numeric.merge(other.numeric)
        for mine, theirs in zip(self.categorical, other.categorical, strict=True):
            mine.merge(theirs)

    def to_dicts(self) -> list[dict[str, Any]]:
        """One msgpack-friendly dict per feature."""
        head = {"input": self.tensor, "kind": self.kind}
        numeric = [
            {**head, "name": name, "type": "numeric", **column}
            for name, column in zip(self.numeric_names, self.numeric.to_dicts(), strict=True)
        ]
        categorical = [
            {**head, "name": name, "type": "categorical", **sketch.to_dict()}
            for name, sketch in zip(self.categorical_names, self.categorical, strict=True)
        ]
        return numeric + categorical

    @classmethod
    def from_dicts(cls, features: Sequence[Mapping[str, Any]]) -> TensorProfile:
        """Rebuild from the dicts of one tensor (ValueError names what is wrong)."""
        first = features[0]
        kind = first["kind"]
        if kind not in KINDS or any(f["kind"] != kind for f in features):
            raise ValueError(f"kind {kind!r}: expected one of {', '.join(KINDS)} for all")
        numeric = [f for f in features if f["type"] == "numeric"]
        categorical = [f for f in features if f["type"] == "categorical"]
        if len(numeric) + len(categorical) != len(features):
            raise ValueError('every feature "type" must be "numeric" or "categorical"')
        return cls(
            str(first["input"]),
            cast(Kind, kind),
            (tuple(str(f["name"]) for f in numeric), NumericSketch.from_dicts(numeric)),
            [(str(f["name"]), CategoricalSketch.from_dict(f)) for f in categorical],
        )


class Profile:
    """Sketches of all profiled inputs and outputs of one model, plus rows seen."""

    __slots__ = ("inputs", "model", "outputs", "rows")

    def __init__(
        self,
        model: str,
        inputs: Sequence[TensorProfile],
        outputs: Sequence[TensorProfile] = (),
        rows: int = 0,
    ) -> None:
        self.model = model
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.rows = rows

    def empty_like(self, *, k: int | None = None) -> Profile:
        """Empty live sketches on this profile's edges and vocabularies."""
        return Profile(
            self.model,
            [t.empty_like(k=k) for t in self.inputs],
            [t.empty_like(k=k) for t in self.outputs],
        )

    def copy(self) -> Profile:
        """An independent copy."""
        return Profile.from_document(self.to_document())

    def update(self, inputs: Mapping[str, Batch], outputs: Mapping[str, Batch]) -> None:
        """Add one batch; tensors this profile does not know are ignored."""
        rows = [_update(t, inputs) for t in self.inputs]
        rows += [_update(t, outputs) for t in self.outputs]
        self.rows += next((r for r in rows if r is not None), 0)

    def merge(self, other: Profile) -> None:
        """Add another profile on the same edges (e.g. a closed window) into this one."""
        mine_all, theirs_all = self.inputs + self.outputs, other.inputs + other.outputs
        if [t.tensor for t in mine_all] != [t.tensor for t in theirs_all]:
            raise ValueError("cannot merge profiles of different tensors")
        for mine, theirs in zip(mine_all, theirs_all, strict=True):
            mine.merge(theirs)
        self.rows += other.rows

    def to_document(self) -> dict[str, Any]:
        """The msgpack-friendly baseline document."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "rows": self.rows,
            "features": [f for t in self.inputs for f in t.to_dicts()],
            "outputs": [f for t in self.outputs for f in t.to_dicts()],
        }

    def dumps(self) -> bytes:
        """The baseline artifact as msgpack bytes."""
        body = msgpack.packb(self.to_document(), use_bin_type=True)
        assert isinstance(body, bytes)
        return body

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Profile:
        """Rebuild from ``to_document()`` (the format and version are not checked here)."""
        return cls(
            str(document["model"]),
            _tensors(document["features"], "features"),
            _tensors(document["outputs"], "outputs"),
            int(document["rows"]),
        )

    @classmethod
    def loads(cls, data: bytes) -> Profile:
        """Read a baseline artifact; BaselineError says what is wrong with it."""
        try:
            document = msgpack.unpackb(data, raw=False)
        except ValueError as exc:
            raise BaselineError(
                f"baseline is not a readable msgpack document ({exc}); the file is corrupt "
                "or truncated: rebuild it with edge-agent baseline"
            ) from exc
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            found = document.get("format") if isinstance(document, dict) else type(document)
            raise BaselineError(
                f"baseline format is {found!r}, expected {FORMAT!r}: this is not an edge-agent "
                "baseline; build one with edge-agent baseline"
            )
        if document.get("version") != VERSION:
            raise BaselineError(
                f"baseline version {document.get('version')!r} is not supported (this agent "
                f"reads version {VERSION}); rebuild it with this agent's edge-agent baseline"
            )
        try:
            return cls.from_document(document)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            model = document.get("model", "MODEL")
            raise BaselineError(
                f"baseline is damaged: {exc}; {_REBUILD.format(model=model)}"
            ) from exc


def _update(profile: TensorProfile, arrays: Mapping[str, Batch]) -> int | None:
    array = arrays.get(profile.tensor)
    if array is None:
        return None
    features = extract_features(array, profile.kind)
    profile.update(features)
    return features.rows


def _tensors(features: Sequence[Mapping[str, Any]], where: str) -> list[TensorProfile]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for i, feature in enumerate(features):
        if not isinstance(feature, Mapping) or "input" not in feature:
            raise ValueError(f"{where}[{i}] is not a feature with an input name")
        groups.setdefault(str(feature["input"]), []).append(feature)
    tensors = []
    for tensor, group in groups.items():
        try:
            tensors.append(TensorProfile.from_dicts(group))
        except KeyError as exc:
            raise ValueError(f'{where} of "{tensor}": field {exc} is missing') from exc
        except (TypeError, ValueError) as exc:
            raise ValueError(f'{where} of "{tensor}": {exc}') from exc
    return tensors


def freeze_edges(values: FloatArray, bins: int) -> tuple[list[float], tuple[float, float] | None]:
    """Inner bin edges at the reference quantiles (ties merged) and the reference (min, max).

    The outer bins are open, so ``bins`` quantile bins need ``bins - 1`` inner edges. Edges
    are reference values (inverted-CDF quantiles), so a discrete feature gets one bin per
    value it takes, never a cut between two of them; with few distinct values it gets fewer
    bins. No finite value: one bin, no bounds.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [], None
    ranks = np.arange(1, bins) / bins
    inner = np.unique(np.quantile(finite, ranks, method="inverted_cdf"))
    return [float(e) for e in inner], (float(finite.min()), float(finite.max()))


def tensor_profile(
    tensor: str, kind: Kind, features: Features, options: ProfileOptions
) -> TensorProfile:
    """Freeze edges and vocabularies from one tensor's reference features and sketch them."""
    frozen = [
        freeze_edges(features.numeric[:, j], options.bins)
        for j in range(len(features.numeric_names))
    ]
    numeric = NumericSketch([e for e, _ in frozen], [b for _, b in frozen], k=options.kll_k)
    numeric.update(features.numeric)
    categorical = []
    for name, items in features.categorical:
        ranked = sorted(Counter(items).items(), key=lambda kv: (-kv[1], kv[0]))
        vocabulary = [item for item, _ in ranked[: options.max_categories]]
        sketch = CategoricalSketch(vocabulary, max_new=options.max_new)
        sketch.update(items, features.rows)
        categorical.append((name, sketch))
    return TensorProfile(tensor, kind, (features.numeric_names, numeric), categorical)


def build_profile(
    model: str,
    inputs: Mapping[str, npt.NDArray[Any]],
    outputs: Mapping[str, npt.NDArray[Any]] | None = None,
    *,
    kinds: Mapping[str, Kind] | None = None,
    names: Mapping[str, Sequence[str]] | None = None,
    options: ProfileOptions | None = None,
) -> Profile:
    """Profile reference inputs (and the model's outputs on them) into a baseline.

    Args:
        kinds: how to read each tensor (see ``sketches.extract_features``); guessed from the
            array's dtype and rank when absent.
        names: feature names per tensor (the manifest's ``[inputs]``), else ``f0, f1, ...``.
    """
    kinds, names, options = kinds or {}, names or {}, options or ProfileOptions()

    def profiled(arrays: Mapping[str, npt.NDArray[Any]], output: bool) -> list[TensorProfile]:
        result = []
        for tensor, array in arrays.items():
            kind = kinds.get(tensor) or infer_kind(array, output=output)
            features = extract_features(array, kind, names.get(tensor))
            result.append(tensor_profile(tensor, kind, features, options))
        return result

    rows = next((int(a.shape[0]) if a.ndim else 1 for a in inputs.values()), 0)
    return Profile(model, profiled(inputs, False), profiled(outputs or {}, True), rows)


def check_compatible(
    profile: Profile,
    *,
    model: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec] = (),
    names: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Raise BaselineError when ``profile`` is not a baseline of this model's signature.

    Checks the model name, that every profiled tensor exists, its feature count where the
    declared shape fixes it, and the feature names the manifest gives.
    """
    rebuild = _REBUILD.format(model=model)
    if profile.model != model:
        raise BaselineError(f'baseline is for model "{profile.model}", not "{model}"; {rebuild}')
    for role, tensors, specs in (
        ("input", profile.inputs, inputs),
        ("output", profile.outputs, outputs),
    ):
        by_name = {spec.name: spec for spec in specs}
        for tensor in tensors:
            spec = by_name.get(tensor.tensor)
            if spec is None:
                known = ", ".join(sorted(by_name)) or "none"
                raise BaselineError(
                    f'baseline profiles {role} "{tensor.tensor}", which model "{model}" does '
                    f"not have (its {role}s: {known}); {rebuild}"
                )
            _check_width(tensor, spec, rebuild)
            _check_names(tensor, (names or {}).get(tensor.tensor), rebuild)


def _check_width(tensor: TensorProfile, spec: TensorSpec, rebuild: str) -> None:
    expected = expected_width(tensor.kind, spec.shape)
    if expected is not None and expected != tensor.numeric.width:
        raise BaselineError(
            f'baseline has {tensor.numeric.width} numeric features for "{tensor.tensor}" '
            f"({tensor.kind}), but its shape {spec.describe_shape()} gives {expected}; "
            f"{rebuild}"
        )


def expected_width(kind: Kind, shape: tuple[int, ...]) -> int | None:
    """Numeric features a tensor of this shape yields, when its shape fixes the number."""
    if kind == "label":
        return 0
    if kind == "image":
        if len(shape) != 4:
            return 3 if len(shape) == 3 else None
        channels = shape[1] if channels_first(shape) else shape[3]
        return 3 * channels if channels > 0 else None
    tail = shape[1:]
    if any(d < 1 for d in tail):
        return None
    return int(np.prod(tail)) if tail else 1


def _check_names(tensor: TensorProfile, names: Sequence[str] | None, rebuild: str) -> None:
    if names is None or tensor.kind not in ("tabular", "score"):
        return
    if tuple(names) != tensor.numeric_names:
        raise BaselineError(
            f'baseline names the features of "{tensor.tensor}" {list(tensor.numeric_names)}, '
            f"the manifest {list(names)}; fix the manifest's [inputs] or {rebuild}"
        )
