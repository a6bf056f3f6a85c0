"""A model's signature (inputs, outputs) and the checks a request must pass against it.

Everything here is computed once per model version; per request we only compare
small tuples. This module must not run inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from agent.errors import BadRequest
from agent.tensors import InferRequest, TensorSpec, v2_datatype


def _dims_fit(kind: str, old: tuple[int, ...], new: tuple[int, ...]) -> bool:
    """Clients of the old version still fit: an input's fixed dim may only widen to -1 (it
    still takes what clients send); an output's dynamic dim may narrow to a fixed one (it
    still gives what clients accept), but a fixed dim must stay as it was."""
    pairs = zip(old, new, strict=True)
    if kind == "input":
        return all(n in (-1, o) for o, n in pairs)
    return all(o in (-1, n) for o, n in pairs)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class ModelSignature:
    """Inputs and outputs of one model version, with -1 for dynamic dimensions."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @cached_property
    def input_map(self) -> dict[str, TensorSpec]:
        """Inputs by name."""
        return {spec.name: spec for spec in self.inputs}

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        """Output names in model order."""
        return tuple(spec.name for spec in self.outputs)

    @cached_property
    def batchable(self) -> bool:
        """True when every input's first dimension is dynamic (requests can be concatenated)."""
        return bool(self.inputs) and all(s.shape and s.shape[0] == -1 for s in self.inputs)

    def check(self, request: InferRequest, model: str) -> None:
        """Raise BadRequest unless the request's inputs and outputs fit this signature."""
        expected = self.input_map
        for name in request.inputs:
            if name not in expected:
                raise BadRequest(
                    f'unexpected input "{name}"; model "{model}" takes '
                    f"{self._names(self.inputs)} (see GET /v2/models/{model})"
                )
        for spec in self.inputs:
            array = request.inputs.get(spec.name)
            if array is None:
                raise BadRequest(
                    f'missing input "{spec.name}" ({spec.datatype} {spec.describe_shape()}); '
                    f'model "{model}" takes {self._names(self.inputs)}'
                )
            self._check_tensor(spec, array.shape, v2_datatype(array), model)
        if request.outputs is not None:
            known = set(self.output_names)
            for out in request.outputs:
                if out.name not in known:
                    raise BadRequest(
                        f'unknown output "{out.name}"; model "{model}" has outputs '
                        f"{self._names(self.outputs)}"
                    )
        self._check_rows(request, model)

    def _check_rows(self, request: InferRequest, model: str) -> None:
        if len(request.inputs) < 2 or not self.batchable:
            return
        rows = {int(a.shape[0]) for a in request.inputs.values()}
        if len(rows) > 1:
            raise BadRequest(
                f'inputs of model "{model}" must have the same first dimension (rows); '
                f"got {sorted(rows)}"
            )

    @staticmethod
    def _check_tensor(spec: TensorSpec, shape: tuple[int, ...], datatype: str, model: str) -> None:
        if datatype != spec.datatype:
            raise BadRequest(
                f'input "{spec.name}": expected datatype {spec.datatype}, got {datatype}; '
                f"send {spec.datatype} data (see GET /v2/models/{model})"
            )
        fits = len(shape) == len(spec.shape) and all(
            want in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
        )
        if not fits:
            raise BadRequest(
                f'input "{spec.name}": expected shape {spec.describe_shape()}, got '
                f"{_shape_text(shape)}; -1 marks a dimension of any size "
                f"(see GET /v2/models/{model})"
            )

    @staticmethod
    def _names(specs: tuple[TensorSpec, ...]) -> str:
        return ", ".join(f'"{s.name}" ({s.datatype} {s.describe_shape()})' for s in specs)

    def compatible_with(self, other: ModelSignature) -> list[str]:
        """Differences that would break clients of ``other`` (empty when compatible)."""
        problems: list[str] = []
        for kind, mine, theirs in (
            ("input", self.inputs, other.inputs),
            ("output", self.outputs, other.outputs),
        ):
            new = {s.name: s for s in mine}
            for old in theirs:
                spec = new.get(old.name)
                if spec is None:
                    problems.append(f'{kind} "{old.name}" is gone')
                elif spec.datatype != old.datatype:
                    problems.append(
                        f'{kind} "{old.name}" changed datatype {old.datatype} -> {spec.datatype}'
                    )
                elif len(spec.shape) != len(old.shape) or not _dims_fit(
                    kind, old.shape, spec.shape
                ):
                    problems.append(
                        f'{kind} "{old.name}" changed shape '
                        f"{old.describe_shape()} -> {spec.describe_shape()}"
                    )
            if kind == "input":
                added = sorted(set(new) - {s.name for s in theirs})
                problems.extend(f'input "{name}" is new (clients do not send it)' for name in added)
        return problems
