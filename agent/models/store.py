"""The agent's own copies of accepted models, and the registry state that survives restarts.

Layout under ``[state] dir``::

    store/<sha256>/model.onnx        the exact bytes that were validated
    store/<sha256>/manifest.toml     its manifest, if any, plus the files it references
    registry.json                    active version, versions, pins and bad marks per model

Content addressing means a later change in the drop dir cannot alter what is served,
and the same bytes dropped twice are recognised. Every write is a temp file in the
same folder, fsync, rename. Functions here block: call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ModelLoadError
from agent.models.dropdir import Candidate
from agent.models.manifest import Manifest
from agent.models.manifest import load as load_manifest

_CHUNK = 1 << 20


@dataclass(slots=True)
class VersionRecord:
    """One accepted version of a model."""

    sha256: str
    accepted_at: float
    source: str


@dataclass(slots=True)
class ModelRecord:
    """What the agent remembers about one model across restarts."""

    active: int | None = None
    pinned: bool = False
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)  # sha256 -> reason

    def version_of(self, sha256: str) -> int | None:
        """The version number these bytes were accepted as, if any."""
        for version, record in self.versions.items():
            if record.sha256 == sha256:
                return version
        return None


@dataclass(frozen=True, slots=True)
class Bundle:
    """A model's stored files: ``dir`` holds model.onnx and its manifest's files."""

    sha256: str
    dir: Path
    manifest: Manifest | None

    @property
    def model_path(self) -> Path:
        """The stored ONNX file."""
        return self.dir / "model.onnx"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Store:
    """Content-addressed model bundles plus ``registry.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "store"
        self.state_path = state_dir / "registry.json"
        self.root.mkdir(parents=True, exist_ok=True)

    def ingest(self, candidate: Candidate) -> Bundle:
        """Copy a candidate's model and manifest files into the store; verify sha256."""
        manifest = load_manifest(candidate.manifest_path) if candidate.manifest_path else None
        incoming = self.root / f".incoming-{uuid.uuid4().hex}.onnx"
        sha = _copy_hashed(candidate.model_path, incoming)
        if manifest and manifest.sha256 and manifest.sha256.lower() != sha:
            incoming.unlink(missing_ok=True)
            raise ModelLoadError(
                "sha256",
                f"{candidate.model_path} has sha256 {sha} but its manifest says "
                f"{manifest.sha256}; the copy is incomplete or the manifest is stale",
            )
        bundle_dir = self.root / sha
        bundle_dir.mkdir(exist_ok=True)
        os.replace(incoming, bundle_dir / "model.onnx")
        if candidate.manifest_path is not None and manifest is not None:
            self._copy_manifest_files(candidate.manifest_path, manifest, bundle_dir)
        return Bundle(sha, bundle_dir, manifest)

    def _copy_manifest_files(self, manifest_path: Path, manifest: Manifest, dest: Path) -> None:
        _atomic_write(dest / "manifest.toml", manifest.text.encode())
        for rel in manifest.referenced_files():
            src = manifest_path.parent / rel
            if not src.is_file():
                raise ModelLoadError(
                    "manifest",
                    f"{manifest_path} refers to {rel}, which does not exist next to it",
                )
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_hashed(src, target.with_name(target.name + ".tmp"))
            os.replace(target.with_name(target.name + ".tmp"), target)

    def bundle(self, sha256: str) -> Bundle:
        """A stored bundle by hash (after a restart, or for a rollback)."""
        bundle_dir = self.root / sha256
        if not (bundle_dir / "model.onnx").is_file():
            raise ModelLoadError("store", f"{bundle_dir}/model.onnx is missing from the store")
        manifest_path = bundle_dir / "manifest.toml"
        manifest = load_manifest(manifest_path) if manifest_path.is_file() else None
        return Bundle(sha256, bundle_dir, manifest)

    def prune(self, keep: set[str]) -> None:
        """Delete stored bundles whose hash is not in ``keep``."""
        for entry in self.root.iterdir():
            if entry.is_dir() and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    def load_state(self) -> dict[str, ModelRecord]:
        """The persisted registry state (empty on first start)."""
        if not self.state_path.is_file():
            return {}
        doc = json.loads(self.state_path.read_text(encoding="utf-8"))
        return {name: _record_from_json(body) for name, body in doc.get("models", {}).items()}

    def save_state(self, models: dict[str, ModelRecord]) -> None:
        """Persist the registry state atomically (temp file, fsync, rename)."""
        doc = {"format": 1, "models": {name: asdict(rec) for name, rec in models.items()}}
        _atomic_write(self.state_path, json.dumps(doc, indent=1, sort_keys=True).encode())


def _record_from_json(body: dict[str, Any]) -> ModelRecord:
    return ModelRecord(
        active=body.get("active"),
        pinned=bool(body.get("pinned", False)),
        versions={int(v): VersionRecord(**rec) for v, rec in body.get("versions", {}).items()},
        bad=dict(body.get("bad", {})),
    )


def _copy_hashed(src: Path, dest: Path) -> str:
    digest = hashlib.sha256()
    try:
        with src.open("rb") as fin, dest.open("wb") as fout:
            while chunk := fin.read(_CHUNK):
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as exc:
        dest.unlink(missing_ok=True)
        raise ModelLoadError("store", f"cannot copy {src} into the store: {exc}") from exc
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
