"""Carry records produced in synchronous code (model events, captures, metric snapshots)
into the durable outbox, from one background task.

``push`` never blocks: a bounded buffer takes the record or drops and counts it. The task
writes the buffer to the outbox every ``interval_s`` in one transaction, and adds a metrics
snapshot every ``snapshot_every_s``. Records whose producer must know they are durable
(feedback, drift windows) go to ``Outbox.put_many`` directly instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

import structlog

from agent.clock import Clock
from agent.errors import AgentError
from agent.events import UpstreamRecord
from agent.upstream.outbox import Outbox, OutboxRecord

log = structlog.get_logger(__name__)

#: What goes first when the buffer is full (the outbox's own drop order starts the same way).
_EXPENDABLE = frozenset({"capture", "metrics"})

Snapshot = Callable[[], list[UpstreamRecord]]


def to_outbox(record: UpstreamRecord) -> OutboxRecord:
    """The outbox's record for an upstream record (the same fields)."""
    return OutboxRecord(record.kind, record.ts, record.model, record.version, record.payload)


class Pump:
    """A bounded buffer in front of the outbox, flushed by one owned task."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        clock: Clock,
        interval_s: float = 1.0,
        max_pending: int = 10_000,
        snapshot: Snapshot | None = None,
        snapshot_every_s: float = 60.0,
    ) -> None:
        self._outbox = outbox
        self._clock = clock
        self._interval_s = interval_s
        self._pending: deque[UpstreamRecord] = deque()
        self._max_pending = max_pending
        self._snapshot = snapshot
        self._snapshot_every_s = snapshot_every_s
        self._next_snapshot = 0.0
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self.dropped: dict[str, int] = {}
        self._stopping = False

    def push(self, record: UpstreamRecord) -> None:
        """Queue a record for the outbox; when the buffer is full (the outbox refuses writes,
        e.g. a full disk), the oldest capture or metrics snapshot makes room, else the new
        record is dropped; every drop is counted by kind."""
        if len(self._pending) >= self._max_pending and not self._make_room():
            self.dropped[record.kind] = self.dropped.get(record.kind, 0) + 1
            return
        self._pending.append(record)
        if record.kind == "event":
            self._wakeup.set()  # events are rare and matter: write them promptly

    def _stop_requested(self) -> bool:
        return self._stopping

    def _make_room(self) -> bool:
        for i, queued in enumerate(self._pending):
            if queued.kind in _EXPENDABLE:
                del self._pending[i]
                self.dropped[queued.kind] = self.dropped.get(queued.kind, 0) + 1
                return True
        return False

    def start(self) -> None:
        """Start the flushing task."""
        self._next_snapshot = self._clock.monotonic() + self._snapshot_every_s
        self._task = asyncio.get_running_loop().create_task(self._run(), name="upstream-pump")

    async def stop(self) -> None:
        """Let the task finish its current write, then write what is still buffered.

        The task is asked to stop, not cancelled: a write cancelled while SQLite commits it
        on its own thread would stay in the buffer and be written a second time.
        """
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()

    async def flush(self) -> None:
        """Write the buffer to the outbox now (kept in the buffer if the outbox refuses)."""
        if not self._pending:
            return
        batch = list(self._pending)
        try:
            await self._outbox.put_many([to_outbox(r) for r in batch])
        except AgentError as exc:
            log.warning("upstream_pump_failed", records=len(batch), reason=exc.message)
            return
        # By identity: while the write ran, push may have made room by dropping one of them.
        sent = {id(r) for r in batch}
        self._pending = deque(r for r in self._pending if id(r) not in sent)

    async def _run(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._interval_s)
            if self._stop_requested():
                return
            if self._snapshot is not None and self._clock.monotonic() >= self._next_snapshot:
                self._next_snapshot = self._clock.monotonic() + self._snapshot_every_s
                for record in self._snapshot():
                    self.push(record)
            await self.flush()
