"""Signature compatibility between an active version and its candidate successor."""

from __future__ import annotations

import pytest

from agent.inference.signature import ModelSignature
from agent.tensors import TensorSpec


def sig(inp: tuple[int, ...], out: tuple[int, ...], dtype: str = "FP32") -> ModelSignature:
    """A one-input, one-output signature."""
    return ModelSignature((TensorSpec("x", dtype, inp),), (TensorSpec("y", "FP32", out),))


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (sig((-1, 4), (-1, 2)), sig((-1, 4), (-1, 2)), None),
        (sig((1, 4), (-1, 2)), sig((-1, 4), (-1, 2)), None),  # input widened: fine
        (sig((-1, 4), (-1, 2)), sig((-1, 4), (1, 2)), None),  # output narrowed: fine
        (sig((-1, 4), (-1, 2)), sig((-1, 5), (-1, 2)), 'input "x" changed shape'),
        (sig((-1, 4), (-1, 2)), sig((1, 4), (-1, 2)), 'input "x" changed shape'),
        (sig((-1, 4), (-1, 2)), sig((-1, 4), (-1, 3)), 'output "y" changed shape'),
        (sig((-1, 4), (-1, 2)), sig((-1, 4, 1), (-1, 2)), 'input "x" changed shape'),
        (sig((-1, 4), (-1, 2)), sig((-1, 4), (-1, 2), "FP64"), "changed datatype FP32 -> FP64"),
    ],
)
def test_compatibility(old: ModelSignature, new: ModelSignature, problem: str | None) -> None:
    """Changes that would break the old version's clients are named; the rest pass."""
    problems = new.compatible_with(old)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1
        assert problem in problems[0]
