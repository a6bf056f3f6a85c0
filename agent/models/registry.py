"""Which version of each model serves, and the one-assignment swap between versions.

The registry owns, per model, an immutable ``LiveVersion`` pointer. A request leases
the active version and releases it in ``finally``; a swap replaces the pointer in one
assignment, so requests already admitted finish on the version they started on and
new ones see the new version. A retired version is closed when its last lease ends.

Deploys go through ``loader.prepare`` first. By default (``swap = "availability"``)
the new version loads before the old one is released; ``swap = "memory"`` releases
the old one first and answers 503 for that model while loading. Every failure leaves
the active version serving (or restores it), marks the bytes bad so they are not
retried in a loop, and is reported through ``on_event`` and the log. The state
(active version, versions, bad marks, history) is persisted through the ``Store``
after every change. This module must not know about HTTP or the drop directory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from agent.clock import Clock
from agent.errors import AgentError, ModelLoadError, NotFound, Unavailable
from agent.events import ModelEvent, ModelEventKind
from agent.inference.batcher import Batcher, BatchSettings, RunObserver
from agent.inference.session import OrtRunner
from agent.inference.signature import ModelSignature
from agent.models import loader
from agent.models.dropdir import Candidate
from agent.models.manifest import Manifest
from agent.models.rollout import Decision, ProbationPolicy, VersionStats, judge
from agent.models.store import (
    Bundle,
    ModelRecord,
    StillWriting,
    Store,
    VersionRecord,
)

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
    closed: asyncio.Event = field(default_factory=asyncio.Event)

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


class Lease:
    """A request's hold on a version: a retired version closes when its last lease ends.

    A plain class rather than a generator context manager: it is on every request's path,
    and this costs a third of the calls.
    """

    __slots__ = ("_live", "_registry")

    def __init__(self, registry: Registry, live: LiveVersion) -> None:
        self._registry = registry
        self._live = live
        live.leases += 1

    def __enter__(self) -> LiveVersion:
        return self._live

    def __exit__(self, *exc_info: object) -> None:
        live = self._live
        live.leases -= 1
        if live.retired and live.leases == 0:
            self._registry._close(live)


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
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self._load_executor = load_executor
        self._own_executors: list[ThreadPoolExecutor] = []
        self._infer_executor = infer_executor
        self._clock = clock
        self._on_event = on_event
        self._observer = observer
        self._busy = busy
        self.models: dict[str, ModelEntry] = {}
        self.records: dict[str, ModelRecord] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._save_lock = asyncio.Lock()
        # Ingest and prune never overlap: a bundle being copied is in no record yet.
        self._store_lock = asyncio.Lock()
        self._inflight: set[str] = set()  # hashes being loaded: never pruned

    # -- serving -------------------------------------------------------------------------

    def lease(self, name: str, version: int | None = None) -> Lease:
        """Hold a model version for the duration of one request (``with`` it)."""
        return Lease(self, self._resolve(name, version))

    def _resolve(self, name: str, version: int | None) -> LiveVersion:
        entry = self.models.get(name)
        first_load = entry is not None and entry.state == "loading"
        if (
            entry is None
            or entry.state == "unloaded"
            or (entry.active is None and name not in self.records and not first_load)
        ):
            known = ", ".join(sorted(n for n, e in self.models.items() if e.active)) or "none"
            raise NotFound(f'unknown model "{name}"; models served here: {known} (GET /v2/models)')
        live = entry.active
        if live is None:
            raise Unavailable(
                f'model "{name}" is {entry.state}; no version is serving right now'
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
        """True when every model that should serve has a serving version.

        A model being loaded, or whose every version was refused ("failed" with nothing
        serving), does not make the whole agent unready: it is reported in
        ``GET /v1/models`` instead, and its own ready route answers 503.
        """
        return all(
            e.active is not None for e in self.models.values() if e.state not in _NOT_SERVING
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def restore(self) -> None:
        """Load what was served before the restart, from the store."""
        try:
            self.records = await asyncio.to_thread(self.store.load_state)
        except ModelLoadError as exc:
            log.error("registry_state_unreadable", reason=exc.message)  # noqa: TRY400 -- the reason says it all
            self.records = {}
        for name, record in self.records.items():
            if record.active is not None and record.active in record.versions:
                await self._restore_one(self._entry(name), record, record.active)

    async def _restore_one(self, entry: ModelEntry, record: ModelRecord, version: int) -> None:
        sha = record.versions[version].sha256
        async with entry.lock:
            try:
                bundle = await asyncio.to_thread(self.store.bundle, sha)
                await self._go_live(entry, bundle, version, "restored", probation=False)
            except AgentError as exc:
                await self._failed(entry, sha, exc, mark_bad=False)

    async def deploy(self, candidate: Candidate) -> LiveVersion | None:
        """Validate a dropped file and make it the active version; None if nothing to do."""
        entry = self._entry(candidate.name)
        async with entry.lock:
            try:
                async with self._store_lock:
                    bundle = await asyncio.to_thread(self.store.ingest, candidate)
            except StillWriting as exc:
                log.info("model_file_still_writing", model=candidate.name, reason=exc.message)
                return None
            except AgentError as exc:
                await self._failed(entry, None, exc, mark_bad=False)
                return None
            self._inflight.add(bundle.sha256)  # before the next await: never pruned mid-load
            try:
                return await self._deploy_bundle(entry, candidate, bundle)
            finally:
                self._inflight.discard(bundle.sha256)

    async def _deploy_bundle(
        self, entry: ModelEntry, candidate: Candidate, bundle: Bundle
    ) -> LiveVersion | None:
        record = self.records.setdefault(candidate.name, ModelRecord())
        known = record.version_of(bundle.sha256)
        if bundle.sha256 in record.bad:
            self._refused_before(entry, record, bundle.sha256)
            return None
        if known is not None:
            return await self._known_bytes(entry, bundle, known)
        if self._superseded(entry, candidate, record):
            return None
        try:
            manifest_version = bundle.manifest.version if bundle.manifest else None
            version = record.explicit_version(entry.name, candidate.version or manifest_version)
            return await self._go_live(entry, bundle, version, "deployed")
        except AgentError as exc:
            await self._failed(entry, bundle.sha256, exc, mark_bad=True)
            return None

    def _refused_before(self, entry: ModelEntry, record: ModelRecord, sha: str) -> None:
        """The same bad bytes again: never retried, only noted."""
        reason = record.bad[sha]
        log.info("model_bytes_refused_before", model=entry.name, sha256=sha[:12], reason=reason)
        if entry.active is None:
            entry.state = "failed"
            entry.last_error = f"these bytes (sha256 {sha[:12]}) were refused before: {reason}"

    async def _known_bytes(
        self, entry: ModelEntry, bundle: Bundle, version: int
    ) -> LiveVersion | None:
        """Bytes stored as ``version``: a no-op while something serves, else activate them."""
        if entry.active is not None:
            log.info(
                "model_bytes_already_stored",
                model=entry.name,
                version=version,
                active=entry.active.version,
                hint="activate a stored version with `edge-agent rollback NAME --to V`",
            )
            return None
        try:
            return await self._go_live(entry, bundle, version, "redeployed", probation=False)
        except AgentError as exc:
            await self._failed(entry, bundle.sha256, exc, mark_bad=False)
            return None

    def _superseded(self, entry: ModelEntry, candidate: Candidate, record: ModelRecord) -> bool:
        """A versioned-layout directory below the newest stored version: never activated.

        After a restart (or with ``keep_versions`` pruning) old ``<name>/<v>/`` folders
        must not take over from what serves; ``rollback`` activates stored versions.
        """
        v = candidate.version
        newest = max(record.versions, default=0)
        if v is None or entry.active is None or v in record.versions or v > newest:
            return False  # a taken number with new bytes is refused by explicit_version
        log.info(
            "model_version_superseded",
            model=entry.name,
            version=v,
            active=entry.active.version,
            newest=newest,
        )
        return True

    async def rollback(self, name: str, to: int | None = None, *, reason: str = "") -> LiveVersion:
        """Reactivate a stored version (default: the previous one) and mark the current bad."""
        entry = self.models.get(name)
        record = self.records.get(name)
        if entry is None or record is None:
            raise NotFound(f'unknown model "{name}"; see GET /v1/models')
        async with entry.lock:
            return await self._rollback_locked(entry, record, to, reason or "operator rollback")

    async def _rollback_locked(
        self, entry: ModelEntry, record: ModelRecord, to: int | None, reason: str
    ) -> LiveVersion:
        current = entry.active
        active = current.version if current is not None else None
        target = to if to is not None else record.previous_good(active, entry.previous)
        if target is None:
            raise NotFound(
                f'model "{entry.name}" has no earlier good version to roll back to; stored: '
                f"{sorted(record.versions)} (bad ones are skipped; name one with --to V)"
            )
        if target not in record.versions:
            raise NotFound(
                f'model "{entry.name}" has no stored version {target}; stored: '
                f"{sorted(record.versions)}"
            )
        record.pinned = to is not None
        if current is not None and current.version == target:
            await self._save()
            return current
        sha = record.versions[target].sha256
        # Marks and note before the swap: whoever sees the new version sees why.
        bad_before, error_before = dict(record.bad), entry.last_error
        if current is not None:
            record.mark_bad(current.bundle.sha256, reason)
            entry.last_error = f"version {current.version} rolled back: {reason}"
        record.bad.pop(sha, None)  # chosen again on purpose: no longer bad
        try:
            bundle = await asyncio.to_thread(self.store.bundle, sha)
            live = await self._go_live(
                entry, bundle, target, "rolled_back", probation=False, check_signature=False
            )
        except AgentError as exc:
            record.bad, entry.last_error = bad_before, error_before
            await self._failed(entry, None, exc, mark_bad=False)
            raise
        self._rolled_back(entry, current, target, reason)
        return live

    def _rolled_back(
        self, entry: ModelEntry, current: LiveVersion | None, target: int, reason: str
    ) -> None:
        previous = current.version if current else None
        log.warning(
            "model_rolled_back", model=entry.name, version=target, previous=previous, reason=reason
        )
        self._emit("rolled_back", entry.name, target, {"from": previous, "reason": reason})

    async def unload(self, name: str) -> None:
        """Stop serving a model (its files left the drop dir); in-flight requests finish."""
        entry = self.models.get(name)
        if entry is None:
            return
        async with entry.lock:
            live, entry.active = entry.active, None
            entry.state, entry.probation_until = "unloaded", None
            if name in self.records:
                self.records[name].active = None  # a restart must not bring it back
            await self._save()
            if live is not None:
                self._retire(live)
            log.info("model_unloaded", model=name, version=live.version if live else None)
            self._emit("unloaded", name, live.version if live else None, {})

    async def close(self) -> None:
        """Retire every version and wait for their batchers to stop."""
        for entry in self.models.values():
            if entry.active is not None:
                self._retire(entry.active)
                entry.active = None
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
        for pool in self._own_executors:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- the pipeline --------------------------------------------------------------------

    async def _go_live(
        self,
        entry: ModelEntry,
        bundle: Bundle,
        version: int | None,
        how: str,
        *,
        probation: bool = True,
        check_signature: bool = True,
    ) -> LiveVersion:
        old = entry.active
        memory = old is not None and self.settings.swap == "memory"
        if old is not None and memory:
            await self._release_first(entry, old)
        entry.state = "loading"
        start = self._clock.monotonic()
        signature = old.runner.signature if old is not None and check_signature else None
        try:
            runner = await self._prepare(bundle, signature)
        except AgentError:
            if old is not None and memory:
                await self._reload_after_memory_swap(entry, old)
            entry.state = _resting_state(entry)
            raise
        if version is None:
            version = self.records.setdefault(entry.name, ModelRecord()).next_version(
                runner.model_version
            )
        live = self._make_live(entry.name, version, bundle, runner, self._clock.monotonic() - start)
        entry.active = live  # the swap: one assignment
        if old is not None and not old.retired:
            self._retire(old)
        await self._accept(entry, live, old, how, probation=probation)
        return live

    async def _prepare(self, bundle: Bundle, active: ModelSignature | None) -> OrtRunner:
        try:
            return await loader.prepare(bundle, self.settings.load, self._load_executor, active)
        except ModelLoadError as exc:
            if exc.step == "timeout":
                # The abandoned load may still hold the load thread (a thread cannot be
                # stopped): later loads get a fresh one, so one slow model never wedges them.
                pool = ThreadPoolExecutor(1, thread_name_prefix="load")
                self._own_executors.append(pool)
                self._load_executor = pool
            raise

    async def _release_first(self, entry: ModelEntry, old: LiveVersion) -> None:
        """``swap = "memory"``: stop admitting to ``old`` and wait for its requests."""
        entry.active = None
        entry.state = "loading"
        self._retire(old)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(old.closed.wait(), self.settings.load.max_load_s)

    async def _reload_after_memory_swap(self, entry: ModelEntry, old: LiveVersion) -> None:
        try:
            runner = await self._prepare(old.bundle, None)
        except AgentError as exc:
            log.error(  # noqa: TRY400 -- the reason says it all; no traceback wanted
                "model_reload_failed", model=entry.name, version=old.version, reason=exc.message
            )
            return
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
            busy=self._busy,
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
        if how == "deployed":
            record.pinned = False  # new bytes dropped on purpose win over an old pin
        entry.previous = old.version if old is not None else entry.previous
        if how in ("deployed", "redeployed"):
            entry.last_error = None  # a rollback's note and a restore's error stay visible
        self._start_probation(entry, live, old, enabled=probation and old is not None)
        record.prune(self.settings.keep_versions)
        record.remember(
            {
                "ts": self._clock.wall(),
                "version": live.version,
                "how": how,
                "from": old.version if old else None,
            }
        )
        await self._save()
        previous = old.version if old else None
        log.info(
            "model_swapped" if old else "model_loaded",
            model=entry.name,
            version=live.version,
            previous=previous,
            how=how,
            load_s=round(live.load_s, 3),
            run_us=_micros(live.runner.typical_run_s),
            sha256=live.bundle.sha256[:12],
        )
        detail = {"from": previous, "how": how, "load_s": live.load_s}
        self._emit("swapped" if old else "loaded", entry.name, live.version, detail)

    def _start_probation(
        self, entry: ModelEntry, live: LiveVersion, old: LiveVersion | None, *, enabled: bool
    ) -> None:
        policy = _policy(self.settings.probation, live)
        if not enabled or policy.probation_s <= 0 or old is None:
            entry.state, entry.probation_until = "ready", None
            return
        entry.state = "probation"
        entry.probation_until = self._clock.monotonic() + policy.probation_s
        entry.probation_baseline_p99 = old.stats.p99() if old.stats.requests >= 20 else None

    async def _failed(
        self, entry: ModelEntry, sha: str | None, exc: AgentError, *, mark_bad: bool
    ) -> None:
        entry.last_error = exc.message
        entry.state = _resting_state(entry)
        record = self.records.setdefault(entry.name, ModelRecord())
        if mark_bad and sha is not None:
            record.mark_bad(sha, exc.message)
        await self._save()
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
            policy = _policy(self.settings.probation, live)
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
            await self._probation_rollback(entry, live, decision.reason)

    async def _probation_rollback(self, entry: ModelEntry, live: LiveVersion, reason: str) -> None:
        log.warning("probation_failed", model=entry.name, version=live.version, reason=reason)
        async with entry.lock:
            if entry.active is not live:
                return  # superseded while we waited for the lock: judge the new one later
            try:
                await self._rollback_locked(
                    entry, self.records[entry.name], None, f"probation: {reason}"
                )
            except AgentError as exc:
                log.warning("probation_rollback_failed", model=entry.name, reason=exc.message)
                entry.state, entry.probation_until = _resting_state(entry), None

    # -- helpers -------------------------------------------------------------------------

    def _entry(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            entry = self.models[name] = ModelEntry(name)
        return entry

    def _retire(self, live: LiveVersion) -> None:
        live.retired = True
        if live.leases == 0:
            self._close(live)

    def _close(self, live: LiveVersion) -> None:
        async def close() -> None:
            try:
                await live.batcher.stop()
                live.runner.close()
            finally:
                live.closed.set()
            log.debug("version_released", model=live.name, version=live.version)

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _save(self) -> None:
        async with self._save_lock:  # one writer: the file always holds the newest state
            data = self.store.encode_state(self.records)  # on the loop: records are live
            await asyncio.to_thread(self.store.write_state, data)
        async with self._store_lock:
            keep = {v.sha256 for rec in self.records.values() for v in rec.versions.values()}
            await asyncio.to_thread(self.store.prune, keep | self._inflight)

    def _emit(
        self, kind: ModelEventKind, model: str, version: int | None, detail: dict[str, Any]
    ) -> None:
        self._on_event(ModelEvent(kind, model, version, self._clock.wall(), detail))


#: States that do not make the agent unready: a model being loaded (a new drop, or a
#: memory-mode swap) or refused is reported in GET /v1/models, and the others keep serving;
#: a load balancer must not take the node out on every deploy.
_NOT_SERVING: frozenset[State] = frozenset({"unloaded", "failed", "loading"})


def _resting_state(entry: ModelEntry) -> State:
    """The state after an attempt ends without a swap."""
    if entry.active is None:
        return "failed"
    return "probation" if entry.probation_until is not None else "ready"


def _policy(base: ProbationPolicy, live: LiveVersion) -> ProbationPolicy:
    m = live.manifest
    return base if m is None else base.overridden(m.probation_s, m.max_error_rate, m.max_p99_ratio)


def _micros(seconds: float | None) -> float | None:
    """A warm-up run time for the log (the batcher runs models under inline_max_us inline)."""
    return round(seconds * 1e6, 1) if seconds is not None else None
