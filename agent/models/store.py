"""The agent's own copies of accepted models, and the registry state that survives restarts.

Layout under ``[state] dir``::

    store/<sha256>/model.onnx        the exact bytes that were validated
    store/<sha256>/manifest.toml     its manifest, if any, plus the files it references
    registry.json                    active version, versions, pins, bad marks and history

Content addressing means a later change in the drop dir cannot alter what is served,
and the same bytes dropped twice are recognised. A bundle is immutable once its
``model.onnx`` exists (that file is written last and marks the bundle complete).
Every write is a temp file in the same folder, fsync, rename. Functions here block:
call them through ``asyncio.to_thread``. This module never decides what serves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.errors import ModelLoadError
from agent.models.dropdir import Candidate
from agent.models.manifest import Manifest
from agent.models.manifest import load as load_manifest

log = structlog.get_logger(__name__)

_CHUNK = 1 << 20
_INCOMING = ".incoming-"
#: Swap-history entries kept per model in registry.json.
HISTORY_LIMIT = 20
#: Bad marks kept per model (oldest forgotten first): bounds registry.json.
BAD_LIMIT = 100


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
    history: list[dict[str, Any]] = field(default_factory=list)  # newest first

    def version_of(self, sha256: str) -> int | None:
        """The version number these bytes were accepted as, if any."""
        for version, record in self.versions.items():
            if record.sha256 == sha256:
                return version
        return None

    def explicit_version(self, name: str, version: int | None) -> int | None:
        """A directory's or manifest's version, refused when taken by other bytes."""
        if version is not None and version in self.versions:
            raise ModelLoadError(
                "version",
                f'version {version} of "{name}" already exists with other content '
                f"(sha256 {self.versions[version].sha256[:12]}); deploy new content as a "
                "new version",
            )
        return version

    def next_version(self, model_version: int | None) -> int:
        """A flat file's version: ONNX ``model_version`` when set and free, else max + 1."""
        if model_version is not None and model_version > 0 and model_version not in self.versions:
            return model_version
        return max(self.versions, default=0) + 1

    def previous_good(self, active: int | None, preferred: int | None) -> int | None:
        """The version a rollback goes to: ``preferred`` if good, else the newest good one."""
        good = [
            v
            for v, rec in sorted(self.versions.items(), reverse=True)
            if v != active and rec.sha256 not in self.bad
        ]
        if preferred in good:
            return preferred
        return good[0] if good else None

    def remember(self, item: dict[str, Any]) -> None:
        """Add a swap to the history (newest first, at most ``HISTORY_LIMIT``)."""
        self.history.insert(0, item)
        del self.history[HISTORY_LIMIT:]

    def prune(self, keep: int) -> None:
        """Forget all but the newest ``keep`` versions; the active one always stays."""
        for version in sorted(self.versions)[:-keep] if len(self.versions) > keep else []:
            if version != self.active:
                del self.versions[version]

    def mark_bad(self, sha256: str, reason: str) -> None:
        """Remember refused bytes (newest last), forgetting the oldest beyond ``BAD_LIMIT``."""
        self.bad.pop(sha256, None)
        self.bad[sha256] = reason
        for old in list(self.bad)[: max(0, len(self.bad) - BAD_LIMIT)]:
            del self.bad[old]


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


class StillWriting(ModelLoadError):
    """The drop-dir file changed while it was being copied: a writer is not done yet."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            "store",
            f"{path} changed while it was being copied into the store; it is still being "
            "written (it will be picked up once it settles; write to a temp name and rename)",
        )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Store:
    """Content-addressed model bundles plus ``registry.json``."""

    def __init__(self, state_dir: Path, *, owner: bool = True) -> None:
        """``owner``: this process writes the store (the primary). A replica's store
        (``owner=False``) only reads: it never removes the primary's copies in progress
        nor moves an unreadable ``registry.json`` aside."""
        self.root = state_dir / "store"
        self.state_path = state_dir / "registry.json"
        self.owner = owner
        self.root.mkdir(parents=True, exist_ok=True)
        if owner:
            for leftover in self.root.glob(_INCOMING + "*"):  # copies cut short by a crash
                leftover.unlink(missing_ok=True)

    def ingest(self, candidate: Candidate) -> Bundle:
        """Copy a candidate's model and manifest files into the store; verify sha256.

        Bytes already in the store keep their stored bundle (manifest included): what
        was validated is never rewritten underneath a serving version.
        """
        manifest = load_manifest(candidate.manifest_path) if candidate.manifest_path else None
        incoming = self.root / f"{_INCOMING}{uuid.uuid4().hex}.onnx"
        try:
            sha = _copy_settled(candidate.model_path, incoming)
            _check_sha256(candidate, manifest, sha)
            bundle_dir = self.root / sha
            if (bundle_dir / "model.onnx").is_file():
                return self.bundle(sha)
            bundle_dir.mkdir(exist_ok=True)
            if candidate.manifest_path is not None and manifest is not None:
                self._copy_manifest_files(candidate.manifest_path, manifest, bundle_dir)
            os.replace(incoming, bundle_dir / "model.onnx")  # last: the bundle is complete
            _fsync_dir(bundle_dir)
        except OSError as exc:
            raise ModelLoadError("store", f"cannot store {candidate.model_path}: {exc}") from exc
        finally:
            incoming.unlink(missing_ok=True)
        return Bundle(sha, bundle_dir, manifest)

    def _copy_manifest_files(self, manifest_path: Path, manifest: Manifest, dest: Path) -> None:
        for rel in manifest.referenced_files():
            src = manifest_path.parent / rel
            target = dest / rel
            if rel == manifest.baseline and not src.is_file():
                # Drift is advisory: a missing baseline must not stop the model from serving.
                # The drift report says the file is missing (the monitor cannot open it).
                log.warning("drift_baseline_missing", manifest=str(manifest_path), baseline=rel)
                continue
            if not src.is_file() or not target.resolve().is_relative_to(dest.resolve()):
                raise ModelLoadError(
                    "manifest",
                    f"{manifest_path} refers to {rel}, which is not a file in the manifest's "
                    "folder; put it next to the manifest and use a relative path",
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
            _copy_hashed(src, tmp)
            os.replace(tmp, target)
        _atomic_write(dest / "manifest.toml", manifest.text.encode())

    def bundle(self, sha256: str) -> Bundle:
        """A stored bundle by hash (after a restart, or for a rollback)."""
        bundle_dir = self.root / sha256
        if not (bundle_dir / "model.onnx").is_file():
            raise ModelLoadError(
                "store",
                f"{bundle_dir}/model.onnx is missing from the store; drop the model file "
                "again to restore it",
            )
        manifest_path = bundle_dir / "manifest.toml"
        manifest = load_manifest(manifest_path) if manifest_path.is_file() else None
        return Bundle(sha256, bundle_dir, manifest)

    def prune(self, keep: set[str]) -> list[str]:
        """Delete stored bundles whose hash is not in ``keep``; returns the hashes removed."""
        removed = []
        for entry in self.root.iterdir():
            if entry.is_dir() and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    def load_state(self) -> dict[str, ModelRecord]:
        """The persisted registry state (empty on first start).

        An unreadable file is moved aside (``registry.json.unreadable-<ts>``) and reported
        as ``ModelLoadError("state", ...)``, so the agent can start empty without losing it.
        """
        if not self.state_path.is_file():
            return {}
        try:
            doc = json.loads(self.state_path.read_text(encoding="utf-8"))
            return {name: _record_from_json(body) for name, body in doc["models"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            if not self.owner:
                raise ModelLoadError("state", f"{self.state_path} is unreadable ({exc})") from exc
            stamp = f"{time.time():.0f}"
            aside = self.state_path.with_name(f"{self.state_path.name}.unreadable-{stamp}")
            os.replace(self.state_path, aside)
            raise ModelLoadError(
                "state",
                f"{self.state_path} is unreadable ({exc}); moved it to {aside.name} and "
                "started with no remembered models (they load again from the drop dir)",
            ) from exc

    @staticmethod
    def encode_state(models: dict[str, ModelRecord]) -> bytes:
        """The registry state as JSON bytes (call on the loop: it reads live records)."""
        doc = {"format": 1, "models": {name: asdict(rec) for name, rec in models.items()}}
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    def write_state(self, data: bytes) -> None:
        """Persist encoded registry state atomically (temp file, fsync, rename)."""
        _atomic_write(self.state_path, data)

    def save_state(self, models: dict[str, ModelRecord]) -> None:
        """Encode and persist the registry state (only when nothing mutates it meanwhile)."""
        self.write_state(self.encode_state(models))


def _record_from_json(body: dict[str, Any]) -> ModelRecord:
    return ModelRecord(
        active=body.get("active"),
        pinned=bool(body.get("pinned", False)),
        versions={int(v): VersionRecord(**rec) for v, rec in body.get("versions", {}).items()},
        bad=dict(body.get("bad", {})),
        history=[dict(h) for h in body.get("history", [])][:HISTORY_LIMIT],
    )


def _check_sha256(candidate: Candidate, manifest: Manifest | None, sha: str) -> None:
    if manifest and manifest.sha256 and manifest.sha256.lower() != sha:
        raise ModelLoadError(
            "sha256",
            f"{candidate.model_path} has sha256 {sha} but its manifest says "
            f"{manifest.sha256}; the copy is incomplete or the manifest is stale",
        )


def _copy_settled(src: Path, dest: Path) -> str:
    """Copy and hash ``src``; ``StillWriting`` if it changed during the copy."""
    before = _fingerprint(src)
    sha = _copy_hashed(src, dest)
    if _fingerprint(src) != before:
        raise StillWriting(src)
    return sha


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


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
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
