"""A replica process's registry: serves what the primary decided, and decides nothing.

The primary process owns the drop directory, the store and ``registry.json``; it
validates, swaps, rolls back and judges probation. A replica (``[server] processes`` >
1) loads the version the primary's persisted state names as active, from the same
content-addressed store, and swaps to it with the same one-assignment swap and leases:
each process switches atomically, and during a switch the processes may answer from
different versions for as long as a replica's load takes (every answer names its
version). ``sync`` is called when the primary says its state changed.

A replica whose load of the active version fails (the stored file was damaged after
the primary loaded it, the load raised, ...) must not go on answering from another
version: it retires what it had, lists the model in ``lagging`` (the replica then hands
that model's requests to the primary) and retries the load with a backoff (1 s doubling
to 30 s; a new active version is tried at once), until a load succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import structlog

from agent.errors import AgentError, ModelLoadError
from agent.models.registry import LiveVersion, ModelEntry, Registry, RegistrySettings
from agent.models.store import Store

log = structlog.get_logger(__name__)

#: The first retry of a failed follow; each failure doubles it, up to ``RETRY_MAX_S``.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0


@dataclass(slots=True)
class Lag:
    """A model whose active version this process could not load (yet)."""

    model: str
    version: int
    sha256: str
    reason: str
    attempts: int
    #: ``Clock.monotonic()`` time of the next attempt for the same version.
    due: float

    @property
    def retry_in_s(self) -> float:
        """The wait after the last failed attempt."""
        return retry_delay_s(self.attempts)


def retry_delay_s(attempts: int) -> float:
    """1 s after the first failure, doubling after each further one, at most 30 s."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * float(2 ** min(attempts - 1, 16)))


class Follower(Registry):
    """A ``Registry`` that follows the persisted state and never writes it."""

    def __init__(self, store: Store, settings: RegistrySettings, **kwargs: Any) -> None:
        super().__init__(store, settings, **kwargs)
        #: Models whose active version failed to load here: their requests go to the primary.
        self.lagging: dict[str, Lag] = {}
        self._wanted = asyncio.Event()

    async def restore(self) -> None:
        """Load what the primary serves now."""
        await self.sync()

    def request_sync(self) -> None:
        """The primary says its state changed: ``follow`` syncs as soon as it can."""
        self._wanted.set()

    async def follow(self) -> None:
        """Sync when asked, and retry failed loads when they are due; runs until cancelled.

        One task runs every sync: two never overlap, and requests made while one runs
        become one more afterwards.
        """
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), self.retry_in_s())
            self._wanted.clear()
            try:
                await self.sync()
            except Exception:  # a bug must not end following for good
                log.exception("replica_sync_failed")
                await asyncio.sleep(RETRY_FIRST_S)  # nor spin on it

    def retry_in_s(self) -> float | None:
        """Seconds until the next due retry of a lagging model; None when none lags."""
        if not self.lagging:
            return None
        now = self._clock.monotonic()
        return max(0.0, min(lag.due for lag in self.lagging.values()) - now)

    async def sync(self) -> None:
        """Converge on the primary's persisted state: load, swap or unload."""
        try:
            records = await asyncio.to_thread(self.store.load_state)
        except ModelLoadError as exc:
            # Keep serving what we have; the primary's next save makes it readable again.
            log.warning("registry_state_unreadable", reason=exc.message, keeping="current")
            now = self._clock.monotonic()
            for lag in self.lagging.values():  # not retried now: due again after a wait
                lag.due = max(lag.due, now + lag.retry_in_s)
            return
        self.records = records
        for name, record in records.items():
            want = record.active if record.active in record.versions else None
            if want is None:
                await self._stop_serving(name)
            else:
                await self._follow_one(name, want, record.versions[want].sha256)
        for name in [n for n in self.models if n not in records]:
            await self._stop_serving(name)

    async def _follow_one(self, name: str, want: int, sha: str) -> None:
        """Serve version ``want`` (bytes ``sha``) of ``name``, or lag behind it."""
        lag = self.lagging.get(name)
        if (
            lag is not None
            and (lag.version, lag.sha256) == (want, sha)
            and self._clock.monotonic() < lag.due
        ):
            return  # the same version failed a moment ago: retried when due
        entry = self._entry(name)
        async with entry.lock:
            live = entry.active
            if live is not None and live.version == want and live.bundle.sha256 == sha:
                return
            try:
                bundle = await asyncio.to_thread(self.store.bundle, sha)
                live = await self._go_live(
                    entry, bundle, want, "followed", probation=False, check_signature=False
                )
            except AgentError as exc:
                self._lag(entry, want, sha, exc.message)
                return
            except Exception as exc:  # whatever it was, this version does not serve here
                log.exception("replica_follow_crashed", model=name, version=want)
                self._lag(entry, want, sha, f"unexpected {exc.__class__.__name__}: {exc}")
                return
            self._caught_up(live)

    def _lag(self, entry: ModelEntry, version: int, sha: str, reason: str) -> None:
        """The load failed: stop answering from any version, retry later."""
        before = self.lagging.get(entry.name)
        same = before is not None and (before.version, before.sha256) == (version, sha)
        attempts = before.attempts + 1 if same and before is not None else 1
        delay = retry_delay_s(attempts)
        self.lagging[entry.name] = Lag(
            entry.name, version, sha, reason, attempts, self._clock.monotonic() + delay
        )
        old, entry.active = entry.active, None
        if old is not None:
            self._retire(old)  # requests already admitted finish on it; no new ones
        entry.state, entry.probation_until = "failed", None
        entry.last_error = (
            f"this replica process could not load version {version}: {reason}; its "
            "requests go to the primary process meanwhile"
        )
        log.warning(
            "replica_follow_failed",
            model=entry.name,
            version=version,
            reason=reason,
            retry_in_s=delay,
            attempts=attempts,
            retired=old.version if old is not None else None,
            store_file=str(self.store.root / sha / "model.onnx"),
            hint="the primary answers this model's requests meanwhile; check that "
            "store_file holds the bytes of that sha256 (if it was damaged, delete it and drop "
            "the model file again: the store copies it anew) or deploy a new version",
        )

    def _caught_up(self, live: LiveVersion) -> None:
        lag = self.lagging.pop(live.name, None)
        if lag is not None:
            log.info(
                "replica_follow_recovered",
                model=live.name,
                version=live.version,
                failed_version=lag.version,
                attempts=lag.attempts,
            )

    async def _reload_after_memory_swap(self, entry: ModelEntry, old: LiveVersion) -> None:
        """``swap = "memory"``: a follower that cannot load the new version serves neither."""

    async def _stop_serving(self, name: str) -> None:
        self.lagging.pop(name, None)
        entry = self.models.get(name)
        if entry is None or (entry.active is None and entry.state == "unloaded"):
            return
        await self.unload(name)

    async def _save(self) -> None:
        """The primary owns ``registry.json`` and prunes the store: nothing to write."""

    async def check_probation(self) -> None:
        """Probation is judged by the primary, on every process's requests."""
