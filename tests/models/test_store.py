"""The content-addressed store and registry state: concurrency, immutability, bounds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import MakeAgent
from models.kit import affine, running

from agent.errors import ModelLoadError
from agent.models.dropdir import Candidate
from agent.models.store import BAD_LIMIT, ModelRecord, Store, VersionRecord

MODELS = 6
ROUNDS = 8


def _candidate(folder: Path, name: str, data: bytes, manifest: str | None = None) -> Candidate:
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / f"{name}.onnx"
    model.write_bytes(data)
    manifest_path = None
    if manifest is not None:
        manifest_path = folder / f"{name}.toml"
        manifest_path.write_text(manifest)
    return Candidate(name, model, manifest_path, None)


class TestConcurrentDeploys:
    """Deploys of different models at once never lose a stored bundle to pruning."""

    async def test_concurrent_deploys_and_pruning(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        """Every version a record names is in the store, and all of it restores."""
        overrides = {"models": {"keep_versions": 1}}
        agent = await make_agent(overrides=overrides, root=tmp_path / "a")
        registry = agent.registry
        for round_ in range(1, ROUNDS + 1):
            staging = tmp_path / f"round{round_}"
            candidates = [
                _candidate(staging, f"m{i}", affine(round_ * 100 + i, model_version=False))
                for i in range(MODELS)
            ]
            await asyncio.gather(*(registry.deploy(c) for c in candidates))
            for name, record in registry.records.items():
                assert record.active is not None, name
                for version in record.versions.values():
                    assert (registry.store.root / version.sha256 / "model.onnx").is_file()
        assert {e.active.version for e in registry.models.values() if e.active} == {ROUNDS}
        stored = {p.name for p in registry.store.root.iterdir() if p.is_dir()}
        assert len(stored) == MODELS  # keep_versions = 1: only the active bundles remain

    async def test_a_restart_restores_them(self, tmp_path: Path) -> None:
        """The state written under concurrent deploys restores every model."""
        base = tmp_path / "a"
        async with running(base) as agent:
            candidates = [
                _candidate(tmp_path / "s", f"m{i}", affine(i + 1, model_version=False))
                for i in range(MODELS)
            ]
            await asyncio.gather(*(agent.registry.deploy(c) for c in candidates))
        async with running(base) as agent:
            assert all(e.active is not None for e in agent.registry.models.values())
            assert len(agent.registry.models) == MODELS


class TestStore:
    """``Store`` on its own (blocking calls, real files)."""

    def test_stored_bundles_are_immutable(self, tmp_path: Path) -> None:
        """The same bytes with another manifest keep the manifest they were validated with."""
        store = Store(tmp_path / "state")
        first = store.ingest(_candidate(tmp_path / "d1", "m", affine(1), "[model]\nversion = 1\n"))
        again = store.ingest(_candidate(tmp_path / "d2", "m", affine(1), "[model]\nversion = 7\n"))
        assert again.sha256 == first.sha256
        assert again.manifest is not None
        assert again.manifest.version == 1

    def test_copies_cut_short_are_cleaned_up(self, tmp_path: Path) -> None:
        """A crash mid-copy leaves ``.incoming-*``; the next start removes it."""
        Store(tmp_path / "state")
        leftover = tmp_path / "state" / "store" / ".incoming-deadbeef.onnx"
        leftover.write_bytes(b"half a model")
        Store(tmp_path / "state")
        assert not leftover.exists()

    def test_sha256_mismatch_is_refused(self, tmp_path: Path) -> None:
        """A manifest sha256 that does not match the bytes names both hashes."""
        store = Store(tmp_path / "state")
        candidate = _candidate(tmp_path / "d", "m", affine(1), f'[model]\nsha256 = "{"a" * 64}"\n')
        with pytest.raises(ModelLoadError, match="sha256") as info:
            store.ingest(candidate)
        assert info.value.step == "sha256"
        assert [p for p in store.root.iterdir() if p.is_dir()] == []

    def test_unreadable_state_is_moved_aside(self, tmp_path: Path) -> None:
        """``load_state`` on a corrupt file raises ``ModelLoadError("state")`` and keeps it."""
        store = Store(tmp_path / "state")
        store.state_path.write_text('{"models": 3}')
        with pytest.raises(ModelLoadError, match="unreadable"):
            store.load_state()
        assert not store.state_path.exists()
        assert store.load_state() == {}


class TestModelRecord:
    """Version numbering and bounds on what is remembered."""

    def test_next_version(self) -> None:
        """ONNX model_version when free, else one more than the highest seen."""
        record = ModelRecord(versions={3: VersionRecord("a", 0.0, "x")})
        assert record.next_version(7) == 7
        assert record.next_version(3) == 4
        assert record.next_version(None) == 4

    def test_an_explicit_version_taken_by_other_bytes(self) -> None:
        """Reusing a version number for other content is a ``version`` refusal."""
        record = ModelRecord(versions={3: VersionRecord("a" * 64, 0.0, "x")})
        with pytest.raises(ModelLoadError, match="already exists"):
            record.explicit_version("m", 3)
        assert record.explicit_version("m", 4) == 4

    def test_bad_marks_are_bounded(self) -> None:
        """Only the newest ``BAD_LIMIT`` bad marks are kept."""
        record = ModelRecord()
        for i in range(BAD_LIMIT + 10):
            record.mark_bad(f"{i:064x}", "bad")
        assert len(record.bad) == BAD_LIMIT
        assert f"{BAD_LIMIT + 9:064x}" in record.bad
        assert f"{0:064x}" not in record.bad

    def test_prune_keeps_the_active_version(self) -> None:
        """Pruning to one version never forgets the active one."""
        record = ModelRecord(
            active=1, versions={v: VersionRecord(str(v), 0, "x") for v in (1, 2, 3)}
        )
        record.prune(1)
        assert sorted(record.versions) == [1, 3]
