"""The upstream pump: synchronous producers into the durable outbox."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.clock import SystemClock
from agent.events import UpstreamRecord
from agent.upstream.outbox import Outbox
from agent.upstream.pump import Pump


def record(kind: str, n: int) -> UpstreamRecord:
    """A small record of ``kind`` numbered ``n``."""
    return UpstreamRecord(kind, float(n), "m", 1, {"n": n})  # type: ignore[arg-type]


async def open_outbox(tmp_path: Path) -> Outbox:
    """A real outbox file."""
    outbox = Outbox(tmp_path / "outbox.db", max_bytes=1 << 20, clock=SystemClock())
    await outbox.open()
    return outbox


class TestPump:
    """Records pushed from synchronous code reach the outbox exactly once."""

    async def test_stop_during_a_write_writes_each_record_once(self, tmp_path: Path) -> None:
        """Stopping while the task is writing does not write the same records twice."""
        outbox = await open_outbox(tmp_path)
        pump = Pump(outbox, clock=SystemClock(), interval_s=0.01)
        pump.start()
        for n in range(50):
            pump.push(record("event", n))  # events wake the task at once
            if n % 10 == 0:
                await asyncio.sleep(0)
        await pump.stop()
        assert outbox.stats().total_records == 50
        await outbox.close()

    async def test_a_full_buffer_drops_captures_before_events(self, tmp_path: Path) -> None:
        """With the buffer full, the oldest capture makes room for an event; drops counted."""
        outbox = await open_outbox(tmp_path)
        pump = Pump(outbox, clock=SystemClock(), max_pending=3)
        pump.push(record("capture", 1))
        pump.push(record("event", 2))
        pump.push(record("capture", 3))
        pump.push(record("event", 4))  # full: capture 1 goes
        pump.push(record("event", 5))  # full: capture 3 goes
        pump.push(record("event", 6))  # full, nothing expendable: this event is dropped
        assert pump.dropped == {"capture": 2, "event": 1}
        await pump.flush()
        stats = outbox.stats()
        assert stats.records["event"] == 3
        assert stats.records["capture"] == 0
        await outbox.close()
