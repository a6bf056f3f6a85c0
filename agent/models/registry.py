"""Which version of each model serves, and the one-assignment swap between versions.

The registry owns, per model, an immutable ``LiveVersion`` pointer. A request leases
the active version and releases it in ``finally``; a swap replaces the pointer in one
assignment, so requests already admitted finish on the version they started on and
new ones see the new version. A retired version is closed when its last lease ends.

Deploys go through ``loader.prepare`` first (availability mode: the new version loads
before the old one is released). Every failure leaves the active version serving,
marks the bytes bad so they are not retried in a loop, and is reported through
``on_event``. The registry persists its state through the ``Store`` after every change.
This module must not know about HTTP.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from agent.clock import Clock
from agent.errors import AgentError, ModelLoadError, NotFound, Unavailable
from agent.events import ModelEvent, ModelEventKind
from agent.inference.batcher import Batcher, BatchSettings, RunObserver
from agent.inference.session import OrtRunner
from agent.models import loader
from agent.models.dropdir import Candidate
from agent.models.manifest import Manifest
from agent.models.rollout import Decision, ProbationPolicy, VersionStats, judge
from agent.models.store import Bundle, ModelRecord, Store, VersionRecord

log = structlog.get_logger(__name__)

State = Literal["loading", "ready", "failed", "probation", "unloaded"]
SwapMode = Literal["availability", "memory"]


@dataclass(eq=False)
class LiveVersion:
    """A loaded version: its runner, batcher, lease count and request statistics."""

    name: str
    version: int
    bundle: Bundle
    runner: OrtRunner
    batcher: Batcher
    loaded_at: float
    load_s: float
    stats: VersionStats = field(default_factory=VersionStats)
    leases: int = 0
    retired: bool = False

    @property
    def manifest(self) -> Manifest | None:
        """The manifest it was deployed with."""
        return self.bundle.manifest


@dataclass(eq=False)
class ModelEntry:
    """Runtime state of one model name."""

    name: str
    active: LiveVersion | None = None
    state: State = "loading"
    last_error: str | None = None
    probation_until: float | None = None
    probation_baseline_p99: float | None = None
    previous: int | None = None
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistrySettings:
    """What the registry needs from ``[models]`` and ``[batching]``."""

    load: loader.LoadSettings
    batching: BatchSettings
    keep_versions: int = 5
    swap: SwapMode = "availability"
    probation: ProbationPolicy


EventSink = Callable[[ModelEvent], None]
ObserverFactory = Callable[[str, int], RunObserver | None]


class Registry:
    """Active versions by model name; leases, deploys, swaps, rollbacks, probation."""

    def __init__(
        self,
        store: Store,
        settings: RegistrySettings,
        *,
        load_executor: Executor,
        infer_executor: Executor,
        clock: Clock,
        on_event: EventSink,
        observer: ObserverFactory | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self._load_executor = load_executor
        self._infer_executor = infer_executor
        self._clock = clock
        self._on_event = on_event
        self._observer = observer
        self.models: dict[str, ModelEntry] = {}
        self.records: dict[str, ModelRecord] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._save_lock = asyncio.Lock()
        self._inflight: set[str] = set()
        self._ingests = 0  # hashes being loaded: never pruned from the store

    # -- serving -------------------------------------------------------------------------

    @contextmanager
    def lease(self, name: str, version: int | None = None) -> Iterator[LiveVersion]:
        """Hold a model version for the duration of one request."""
        live = self._resolve(name, version)
        live.leases += 1
        try:
            yield live
        finally:
            live.leases -= 1
            if live.retired and live.leases == 0:
                self._close(live)

    def _resolve(self, name: str, version: int | None) -> LiveVersion:
        entry = self.models.get(name)
        if entry is None or (entry.active is None and not self.records.get(name)):
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f'unknown model "{name}"; models served here: {known} (GET /v2/models)')
        live = entry.active
        if live is None:
            raise Unavailable(
                f'model "{name}" is {entry.state}; no version is serving yet'
                + (f" (last error: {entry.last_error})" if entry.last_error else ""),
                retry_after_s=1,
            )
        if version is not None and version != live.version:
            known_versions = sorted(self.records[name].versions) if name in self.records else []
            raise NotFound(
                f'model "{name}" has no loaded version {version}; version {live.version} is '
                f"active (stored versions: {known_versions}; activate one with "
                f'POST /v1/models/{name}/rollback {{"version": v}})'
            )
        return live

    def ready(self) -> bool:
        """True when every known model has a serving version."""
        return all(e.active is not None for e in self.models.values() if e.state != "unloaded")

    # -- lifecycle -----------------------------------------------------------------------

    async def restore(self) -> None:
        """Load what was served before the restart, from the store."""
        self.records = await asyncio.to_thread(self.store.load_state)
        for name, record in self.records.items():
            if record.active is None or record.active not in record.versions:
                continue
            entry = self.models.setdefault(name, ModelEntry(name))
            sha = record.versions[record.active].sha256
            try:
                bundle = await asyncio.to_thread(self.store.bundle, sha)
                await self._go_live(entry, bundle, record.active, "restored")
            except AgentError as exc:
                await self._failed(entry, sha, exc, mark_bad=False)

    async def deploy(self, candidate: Candidate) -> LiveVersion | None:
        """Validate a dropped file and make it the active version; None if nothing to do."""
        entry = self.models.setdefault(candidate.name, ModelEntry(candidate.name))
        async with entry.lock:
            self._ingests += 1
            try:
                bundle = await asyncio.to_thread(self.store.ingest, candidate)
            except AgentError as exc:
                await self._failed(entry, None, exc, mark_bad=False)
                return None
            finally:
                self._ingests -= 1
            self._inflight.add(bundle.sha256)  # before the next await: never pruned mid-load
            try:
                return await self._deploy_bundle(entry, candidate, bundle)
            finally:
                self._inflight.discard(bundle.sha256)

    async def _deploy_bundle(
        self, entry: ModelEntry, candidate: Candidate, bundle: Bundle
    ) -> LiveVersion | None:
        record = self.records.setdefault(candidate.name, ModelRecord())
        if bundle.sha256 in record.bad or record.version_of(bundle.sha256) is not None:
            if entry.active is None and entry.state == "loading":
                entry.state = "failed"
            return None  # the same bytes again: already live, stored, or refused
        try:
            version = self._version_for(candidate, bundle, record)
            return await self._go_live(entry, bundle, version, "deployed")
        except AgentError as exc:
            await self._failed(entry, bundle.sha256, exc, mark_bad=True)
            return None

    async def rollback(self, name: str, to: int | None = None, *, reason: str = "") -> LiveVersion:
        """Reactivate a stored version (default: the previous one) and mark the current bad."""
        entry = self.models.get(name)
        record = self.records.get(name)
        if entry is None or record is None:
            raise NotFound(f'unknown model "{name}"; see GET /v1/models')
        async with entry.lock:
            current = entry.active
            target = to if to is not None else self._previous_version(entry, record)
            if target not in record.versions:
                raise NotFound(
                    f'model "{name}" has no stored version {target}; stored: '
                    f"{sorted(record.versions)}"
                )
            bundle = await asyncio.to_thread(self.store.bundle, record.versions[target].sha256)
            live = await self._go_live(entry, bundle, target, "rolled_back", probation=False)
            if current is not None and current.version != target:
                record.bad[current.bundle.sha256] = reason or "rolled back by the operator"
            record.pinned = to is not None
            await self._save()
            self._emit(
                "rolled_back",
                name,
                target,
                {"from": current.version if current else None, "reason": reason or "operator"},
            )
            return live

    def _previous_version(self, entry: ModelEntry, record: ModelRecord) -> int:
        active = entry.active.version if entry.active else None
        candidates = [
            v
            for v, rec in sorted(record.versions.items(), reverse=True)
            if v != active and rec.sha256 not in record.bad
        ]
        if entry.previous is not None and entry.previous in candidates:
            return entry.previous
        if not candidates:
            raise NotFound(f'model "{entry.name}" has no earlier good version to roll back to')
        return candidates[0]

    async def unload(self, name: str) -> None:
        """Stop serving a model (its files left the drop dir); in-flight requests finish."""
        entry = self.models.get(name)
        if entry is None:
            return
        async with entry.lock:
            if entry.active is not None:
                self._retire(entry.active)
                self._emit("unloaded", name, entry.active.version, {})
            entry.active = None
            entry.state = "unloaded"

    async def close(self) -> None:
        """Retire every version and wait for their batchers to stop."""
        for entry in self.models.values():
            if entry.active is not None:
                self._retire(entry.active)
                entry.active = None
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    # -- the pipeline --------------------------------------------------------------------

    def _version_for(self, candidate: Candidate, bundle: Bundle, record: ModelRecord) -> int | None:
        """The directory's or manifest's version; None = decide once the model is loaded."""
        manifest_version = bundle.manifest.version if bundle.manifest else None
        explicit = candidate.version or manifest_version
        if explicit is not None:
            if explicit in record.versions:
                raise ModelLoadError(
                    "version",
                    f'version {explicit} of "{candidate.name}" already exists with other content; '
                    "deploy new content as a new version",
                )
            return explicit
        return None

    def _implicit_version(self, name: str, runner: OrtRunner) -> int:
        """ONNX model_version when set and free, else one more than the highest seen."""
        record = self.records.setdefault(name, ModelRecord())
        if runner.model_version is not None and runner.model_version not in record.versions:
            return runner.model_version
        return max(record.versions, default=0) + 1

    async def _go_live(
        self,
        entry: ModelEntry,
        bundle: Bundle,
        version: int | None,
        how: str,
        *,
        probation: bool = True,
    ) -> LiveVersion:
        old = entry.active
        if old is not None and self.settings.swap == "memory":
            entry.active = None  # small devices: release first, serve 503 while loading
            self._retire(old)
        entry.state = "loading"
        start = self._clock.monotonic()
        try:
            runner = await loader.prepare(
                bundle,
                self.settings.load,
                self._load_executor,
                old.runner.signature if old is not None else None,
            )
        except AgentError:
            if old is not None and self.settings.swap == "memory":
                await self._reload_after_memory_swap(entry, old)
            entry.state = "ready" if entry.active is not None else "failed"
            raise
        if version is None:
            version = self._implicit_version(entry.name, runner)
        live = self._make_live(entry.name, version, bundle, runner, self._clock.monotonic() - start)
        entry.active = live  # the swap: one assignment
        if old is not None and not old.retired:
            self._retire(old)
        await self._accept(entry, live, old, how, probation=probation)
        return live

    async def _reload_after_memory_swap(self, entry: ModelEntry, old: LiveVersion) -> None:
        runner = await loader.prepare(old.bundle, self.settings.load, self._load_executor, None)
        entry.active = self._make_live(entry.name, old.version, old.bundle, runner, 0.0)

    def _make_live(
        self, name: str, version: int, bundle: Bundle, runner: OrtRunner, load_s: float
    ) -> LiveVersion:
        observe = self._observer(name, version) if self._observer else None
        batcher = Batcher(
            runner,
            self._infer_executor,
            self.settings.batching,
            self._clock,
            label=f"{name}:{version}",
            observe=observe,
        )
        batcher.start()
        return LiveVersion(name, version, bundle, runner, batcher, self._clock.wall(), load_s)

    async def _accept(
        self,
        entry: ModelEntry,
        live: LiveVersion,
        old: LiveVersion | None,
        how: str,
        *,
        probation: bool,
    ) -> None:
        record = self.records.setdefault(entry.name, ModelRecord())
        if live.version not in record.versions:
            record.versions[live.version] = VersionRecord(
                live.bundle.sha256, self._clock.wall(), how
            )
        record.active = live.version
        entry.previous = old.version if old is not None else entry.previous
        entry.last_error = None if how != "restored" else entry.last_error
        self._start_probation(entry, live, old, enabled=probation and old is not None)
        self._prune(record)
        await self._save()
        entry.history.appendleft(
            {
                "ts": self._clock.wall(),
                "version": live.version,
                "how": how,
                "from": old.version if old else None,
            }
        )
        log.info(
            "model_swapped" if old else "model_loaded",
            model=entry.name,
            version=live.version,
            previous=old.version if old else None,
            how=how,
            load_s=round(live.load_s, 3),
            sha256=live.bundle.sha256[:12],
        )
        self._emit(
            "swapped" if old else "loaded",
            entry.name,
            live.version,
            {"from": old.version if old else None, "how": how, "load_s": live.load_s},
        )

    def _start_probation(
        self, entry: ModelEntry, live: LiveVersion, old: LiveVersion | None, *, enabled: bool
    ) -> None:
        policy = self._policy(live)
        if not enabled or policy.probation_s <= 0 or old is None:
            entry.state, entry.probation_until = "ready", None
            return
        entry.state = "probation"
        entry.probation_until = self._clock.monotonic() + policy.probation_s
        entry.probation_baseline_p99 = old.stats.p99() if old.stats.requests >= 20 else None

    def _policy(self, live: LiveVersion) -> ProbationPolicy:
        base = self.settings.probation
        m = live.manifest
        if m is None:
            return base
        return ProbationPolicy(
            probation_s=m.probation_s if m.probation_s is not None else base.probation_s,
            max_error_rate=(
                m.max_error_rate if m.max_error_rate is not None else base.max_error_rate
            ),
            max_p99_ratio=m.max_p99_ratio if m.max_p99_ratio is not None else base.max_p99_ratio,
            min_requests=base.min_requests,
        )

    def _prune(self, record: ModelRecord) -> None:
        keep = self.settings.keep_versions
        for version in sorted(record.versions)[:-keep] if len(record.versions) > keep else []:
            if version != record.active:
                del record.versions[version]

    async def _failed(
        self, entry: ModelEntry, sha: str | None, exc: AgentError, *, mark_bad: bool
    ) -> None:
        entry.last_error = exc.message
        entry.state = (
            "failed"
            if entry.active is None
            else ("probation" if entry.probation_until else "ready")
        )
        record = self.records.setdefault(entry.name, ModelRecord())
        if mark_bad and sha is not None:
            record.bad[sha] = exc.message
            await asyncio.to_thread(self.store.save_state, self.records)
        log.warning(
            "model_load_failed",
            model=entry.name,
            reason=exc.message,
            sha256=sha[:12] if sha else None,
            serving=entry.active.version if entry.active else None,
        )
        self._emit("load_failed", entry.name, None, {"reason": exc.message, "sha256": sha})

    # -- probation -----------------------------------------------------------------------

    async def check_probation(self) -> None:
        """Judge every version on probation; roll back the ones that fail."""
        now = self._clock.monotonic()
        for entry in list(self.models.values()):
            live = entry.active
            if entry.state != "probation" or live is None or entry.probation_until is None:
                continue
            policy = self._policy(live)
            elapsed = policy.probation_s - (entry.probation_until - now)
            decision = judge(live.stats, policy, elapsed, entry.probation_baseline_p99)
            await self._act(entry, live, decision)

    async def _act(self, entry: ModelEntry, live: LiveVersion, decision: Decision) -> None:
        if decision.verdict == "passed":
            entry.state, entry.probation_until = "ready", None
            log.info(
                "probation_passed",
                model=entry.name,
                version=live.version,
                requests=live.stats.requests,
            )
            self._emit(
                "probation_passed", entry.name, live.version, {"requests": live.stats.requests}
            )
        elif decision.verdict == "rollback":
            log.warning(
                "probation_failed", model=entry.name, version=live.version, reason=decision.reason
            )
            try:
                await self.rollback(entry.name, reason=f"probation: {decision.reason}")
            except AgentError as exc:
                log.warning("probation_rollback_failed", model=entry.name, reason=exc.message)
                entry.state, entry.probation_until = "ready", None
            else:
                self.records[entry.name].pinned = False
                entry.last_error = f"version {live.version} rolled back: {decision.reason}"

    # -- helpers -------------------------------------------------------------------------

    def _retire(self, live: LiveVersion) -> None:
        live.retired = True
        if live.leases == 0:
            self._close(live)

    def _close(self, live: LiveVersion) -> None:
        async def close() -> None:
            await live.batcher.stop()
            live.runner.close()
            log.debug("version_released", model=live.name, version=live.version)

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _save(self) -> None:
        async with self._save_lock:  # one writer: the file always holds the newest state
            await asyncio.to_thread(self.store.save_state, self.records)
        keep = {v.sha256 for rec in self.records.values() for v in rec.versions.values()}
        keep |= self._inflight
        if not self._ingests:  # a copy in progress is not in any record yet
            await asyncio.to_thread(self.store.prune, keep)

    def _emit(
        self, kind: ModelEventKind, model: str, version: int | None, detail: dict[str, Any]
    ) -> None:
        self._on_event(ModelEvent(kind, model, version, self._clock.wall(), detail))
