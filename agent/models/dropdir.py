"""The drop directory's two layouts, and which names in it are never to be touched.

- flat: ``<dir>/<name>.onnx`` with optional manifest ``<dir>/<name>.toml``
- versioned: ``<dir>/<name>/<version>/model.onnx`` with optional ``manifest.toml``

This module only reads directory listings; it never opens a model.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

IGNORED_PATTERNS = ("*.tmp", "*.part", "*.partial", "*.swp", "*~")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A model file found in the drop directory; ``version`` is None for the flat layout."""

    name: str
    model_path: Path
    manifest_path: Path | None
    version: int | None

    @property
    def key(self) -> tuple[str, int | None]:
        """Identity of the slot this file occupies in the drop dir."""
        return (self.name, self.version)


def is_ignored(path: Path) -> bool:
    """Hidden and temporary names (editors, scp, rsync) are never loaded."""
    return any(part.startswith(".") for part in path.parts[-3:]) or any(
        fnmatch(path.name, pattern) for pattern in IGNORED_PATTERNS
    )


def valid_name(name: str) -> bool:
    """Model names are URL-safe: letters, digits, ``_ . -``, at most 128 characters."""
    return bool(_NAME.match(name))


def scan(root: Path) -> list[Candidate]:
    """Every model file in the drop directory, both layouts, sorted by name and version."""
    found: list[Candidate] = []
    if not root.is_dir():
        return found
    for entry in sorted(root.iterdir()):
        if is_ignored(entry) or not valid_name(entry.stem if entry.is_file() else entry.name):
            continue
        if entry.is_file() and entry.suffix == ".onnx":
            manifest = entry.with_suffix(".toml")
            found.append(
                Candidate(entry.stem, entry, manifest if manifest.is_file() else None, None)
            )
        elif entry.is_dir():
            found.extend(_scan_versions(entry))
    return found


def _scan_versions(model_dir: Path) -> list[Candidate]:
    found = []
    for version_dir in model_dir.iterdir():
        if not (version_dir.is_dir() and version_dir.name.isdigit()):
            continue
        version = int(version_dir.name)
        model = version_dir / "model.onnx"
        if version < 1 or not model.is_file() or is_ignored(model):
            continue
        manifest = version_dir / "manifest.toml"
        found.append(
            Candidate(model_dir.name, model, manifest if manifest.is_file() else None, version)
        )
    return sorted(found, key=lambda c: c.version or 0)


def candidate_for(root: Path, path: Path) -> Candidate | None:
    """The candidate a changed path belongs to (a model file or its manifest), if any."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None
    if is_ignored(path) or not rel.parts:
        return None
    if len(rel.parts) == 1 and path.suffix in (".onnx", ".toml"):
        model = root / (path.stem + ".onnx")
        manifest = root / (path.stem + ".toml")
        if not valid_name(path.stem):
            return None
        return Candidate(path.stem, model, manifest if manifest.is_file() else None, None)
    if len(rel.parts) >= 2 and rel.parts[1].isdigit() and int(rel.parts[1]) >= 1:
        version_dir = root / rel.parts[0] / rel.parts[1]
        manifest = version_dir / "manifest.toml"
        return Candidate(
            rel.parts[0],
            version_dir / "model.onnx",
            manifest if manifest.is_file() else None,
            int(rel.parts[1]),
        )
    return None


def insecure_reason(root: Path) -> str | None:
    """Why the drop dir is unsafe (writable by others than owner and group), else None."""
    try:
        mode = root.stat().st_mode
    except OSError:
        return None
    if mode & stat.S_IWOTH:
        return (
            f"{root} is writable by every user (mode {stat.S_IMODE(mode):o}): anyone could deploy "
            f"a model; run `chmod o-w {root}` or set [models] allow_insecure_dir = true"
        )
    return None
