"""A replica process's registry: serves what the primary decided, and decides nothing.

The primary process owns the drop directory, the store and ``registry.json``; it
validates, swaps, rolls back and judges probation. A replica (``[server] processes`` >
1) loads the version the primary's persisted state names as active, from the same
content-addressed store, and swaps to it with the same one-assignment swap and leases:
each process switches atomically, and during a switch the processes may answer from
different versions for as long as a replica's load takes (every answer names its
version). ``sync`` is called when the primary says its state changed.
"""

from __future__ import annotations

import asyncio

import structlog

from agent.errors import AgentError, ModelLoadError
from agent.models.registry import Registry

log = structlog.get_logger(__name__)


class Follower(Registry):
    """A ``Registry`` that follows the persisted state and never writes it."""

    async def restore(self) -> None:
        """Load what the primary serves now."""
        await self.sync()

    async def sync(self) -> None:
        """Converge on the primary's persisted state: load, swap or unload."""
        try:
            records = await asyncio.to_thread(self.store.load_state)
        except ModelLoadError as exc:
            # Keep serving what we have; the primary's next save makes it readable again.
            log.warning("registry_state_unreadable", reason=exc.message, keeping="current")
            return
        self.records = records
        for name, record in records.items():
            want = record.active if record.active in record.versions else None
            if want is None:
                await self._stop_serving(name)
                continue
            entry = self._entry(name)
            sha = record.versions[want].sha256
            async with entry.lock:
                live = entry.active
                if live is not None and live.version == want and live.bundle.sha256 == sha:
                    continue
                try:
                    bundle = await asyncio.to_thread(self.store.bundle, sha)
                    await self._go_live(
                        entry, bundle, want, "followed", probation=False, check_signature=False
                    )
                except AgentError as exc:
                    await self._failed(entry, sha, exc, mark_bad=False)
        for name in [n for n in self.models if n not in records]:
            await self._stop_serving(name)

    async def _stop_serving(self, name: str) -> None:
        entry = self.models.get(name)
        if entry is None or entry.active is None:
            return
        await self.unload(name)

    async def _save(self) -> None:
        """The primary owns ``registry.json`` and prunes the store: nothing to write."""

    async def check_probation(self) -> None:
        """Probation is judged by the primary, on every process's requests."""
