"""A model's optional manifest (TOML beside the ONNX file) parsed into a frozen value.

Every key is optional; unknown keys and wrong types are refused with the key named,
because a typo in a manifest silently disabling QA would be worse than a refusal.
This module only parses; it never reads the files the manifest points to.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ModelLoadError

_SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "model": {
        "name": (str,),
        "version": (int,),
        "sha256": (str,),
        "description": (str,),
        "labels": (list,),
    },
    "inputs": {},  # free-form: input name -> list of feature names
    "validation": {
        "test_vectors": (str,),
        "rtol": (float, int),
        "atol": (float, int),
        "warmup_runs": (int,),
        "max_load_s": (float, int),
    },
    "drift": {"baseline": (str,), "psi_warn": (float, int), "psi_alert": (float, int)},
    "rollout": {
        "probation_s": (float, int),
        "max_error_rate": (float, int),
        "max_p99_ratio": (float, int),
        "shadow": (bool,),
        "canary": (float, int),
        "signature_change": (bool,),
    },
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """What a manifest says about one model version; None means "use the config"."""

    name: str | None = None
    version: int | None = None
    sha256: str | None = None
    description: str = ""
    labels: tuple[str, ...] = ()
    features: dict[str, tuple[str, ...]] = field(default_factory=dict)
    test_vectors: str | None = None
    rtol: float = 1e-4
    atol: float = 1e-5
    warmup_runs: int | None = None
    max_load_s: float | None = None
    baseline: str | None = None
    psi_warn: float | None = None
    psi_alert: float | None = None
    probation_s: float | None = None
    max_error_rate: float | None = None
    max_p99_ratio: float | None = None
    shadow: bool = False
    canary: float | None = None
    signature_change: bool = False
    text: str = ""

    def referenced_files(self) -> tuple[str, ...]:
        """Relative paths of the files the manifest points to (copied into the store)."""
        return tuple(p for p in (self.test_vectors, self.baseline) if p)


def load(path: Path) -> Manifest:
    """Read and check a manifest file; ModelLoadError("manifest", ...) names the bad key."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError("manifest", f"cannot read {path}: {exc}") from exc
    return parse(text, str(path))


def parse(text: str, source: str = "<manifest>") -> Manifest:
    """Parse manifest text (see ``load``)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelLoadError("manifest", f"{source}: not valid TOML: {exc}") from exc
    problems = _check(doc)
    if problems:
        raise ModelLoadError("manifest", f"{source}: " + "; ".join(problems))
    values: dict[str, Any] = {}
    for section in ("model", "validation", "drift", "rollout"):
        values.update(doc.get(section, {}))
    if "labels" in values:
        values["labels"] = tuple(str(x) for x in values["labels"])
    features = {k: tuple(str(x) for x in v) for k, v in doc.get("inputs", {}).items()}
    for key in (
        "rtol",
        "atol",
        "max_load_s",
        "psi_warn",
        "psi_alert",
        "probation_s",
        "max_error_rate",
        "max_p99_ratio",
        "canary",
    ):
        if key in values:
            values[key] = float(values[key])
    return Manifest(**values, features=features, text=text)


def _check(doc: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for section, body in doc.items():
        schema = _SCHEMA.get(section)
        if schema is None or not isinstance(body, dict):
            problems.append(f"[{section}] is not a manifest section; use {sorted(_SCHEMA)}")
            continue
        if section == "inputs":
            problems.extend(
                f"inputs.{k}: expected a list of feature names"
                for k, v in body.items()
                if not isinstance(v, list)
            )
            continue
        for key, value in body.items():
            types = schema.get(key)
            if types is None:
                problems.append(f"{section}.{key}: unknown key; known: {sorted(schema)}")
            elif (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                names = " or ".join(t.__name__ for t in types)
                problems.append(f"{section}.{key}: got {value!r}; expected {names}")
    version = doc.get("model", {}).get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version < 1:
        problems.append(f"model.version: got {version}; expected a positive integer")
    return problems
