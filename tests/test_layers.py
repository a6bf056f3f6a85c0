"""The import layers of STYLE.md, checked on the source: data flows one way.

``daemon``/``app`` -> ``api`` -> ``models`` -> ``inference`` -> leaf modules; the side taps
(``drift``, ``feedback``, ``upstream``) import only leaf modules and their own package,
and only ``app.py`` wires them in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parent.parent / "agent"

LEAVES = {
    "errors",
    "config",
    "cores",
    "clock",
    "events",
    "tensors",
    "db",
    "logs",
    "metrics",
    "systemd",
    "ipc",
}

#: package (or top-level module) -> agent modules it must never import.
FORBIDDEN: dict[str, set[str]] = {
    "inference": {"models", "api", "app", "daemon", "cli", "drift", "feedback", "upstream"},
    "models": {"api", "app", "daemon", "cli", "drift", "feedback", "upstream"},
    "api": {"app", "daemon", "cli", "drift", "feedback", "upstream"},
    "drift": {"models", "inference", "api", "app", "daemon", "cli", "feedback", "upstream"},
    "feedback": {"models", "inference", "api", "app", "daemon", "cli", "drift", "upstream"},
    "upstream": {"models", "inference", "api", "app", "daemon", "cli", "drift", "feedback"},
    **{
        leaf: {
            "models",
            "inference",
            "api",
            "app",
            "daemon",
            "cli",
            "drift",
            "feedback",
            "upstream",
        }
        for leaf in LEAVES
    },
}


def _agent_imports(path: Path) -> set[str]:
    """First component after ``agent.`` of every agent import in a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "agent":
                names = [f"agent.{a.name}" for a in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("agent.")}
    return found


def _layer(path: Path) -> str:
    rel = path.relative_to(AGENT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


MODULES = sorted(p for p in AGENT.rglob("*.py") if _layer(p) in FORBIDDEN)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(AGENT)) for p in MODULES])
def test_imports_follow_the_layers(path: Path) -> None:
    """No module imports a layer above it or a side tap it must not know."""
    bad = _agent_imports(path) & FORBIDDEN[_layer(path)]
    assert not bad, f"{path.relative_to(AGENT)} imports {sorted(bad)}"


def test_the_check_sees_imports() -> None:
    """The scanner finds the imports it is meant to police (the test can fail)."""
    assert {"inference", "models"} <= _agent_imports(AGENT / "models" / "registry.py")
