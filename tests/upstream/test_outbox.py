"""The outbox: durability across reopen, byte bound and drop order, batch keys, corruption."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.clock import ManualClock
from agent.db import Database
from agent.errors import Unavailable
from agent.upstream.outbox import KINDS, Kind, Outbox, OutboxRecord

MakeOutbox = Callable[..., Awaitable[Outbox]]
ROOT = Path(__file__).resolve().parents[2]

# Put 50 records, say so, then die without closing anything.
KILLED_WRITER = """
import asyncio, os, signal, sys
from agent.clock import SystemClock
from agent.upstream.outbox import Outbox, OutboxRecord

async def main():
    box = Outbox(sys.argv[1], max_bytes=10_000_000, clock=SystemClock())
    await box.open()
    await box.put_many([OutboxRecord("feedback", 1.0, "m", 1, {"seq": i}) for i in range(50)])
    print("acknowledged", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def record(kind: Kind, seq: int, pad: int = 100) -> OutboxRecord:
    """A record whose payload carries its sequence number and ``pad`` bytes of filler."""
    return OutboxRecord(kind, 1_800_000_000.0 + seq, "iris", 1, {"seq": seq, "pad": "x" * pad})


@pytest.fixture
async def make_outbox(tmp_path: Path) -> AsyncIterator[MakeOutbox]:
    """Open outboxes on real files; every one still open is closed at teardown."""
    opened: list[Outbox] = []

    async def make(
        path: Path | Database | None = None, *, max_bytes: int = 10_000_000, **kw: Any
    ) -> Outbox:
        outbox = Outbox(
            path or tmp_path / "outbox.db", max_bytes=max_bytes, clock=ManualClock(), **kw
        )
        await outbox.open()
        opened.append(outbox)
        return outbox

    yield make
    for outbox in opened:
        await outbox.close()


async def drain(outbox: Outbox) -> list[dict[str, Any]]:
    """Lease and ack every batch (bounded), returning the records in order."""
    out: list[dict[str, Any]] = []
    for _ in range(1_000):
        batch = await outbox.lease_batch(50, 1_000_000)
        if batch is None:
            return out
        out.extend(batch.records)
        await outbox.ack(batch.key)
    raise AssertionError("outbox did not drain in 1000 batches")


class TestDurability:
    async def test_records_survive_reopen(self, make_outbox: MakeOutbox, tmp_path: Path) -> None:
        """Records put before close are all there, in order, after reopening the file."""
        first = await make_outbox()
        await first.put_many([record("feedback", i) for i in range(20)])
        await first.close()
        second = await make_outbox()
        assert second.stats().records["feedback"] == 20
        assert [r["seq"] for r in await drain(second)] == list(range(20))

    async def test_put_many_is_committed_on_return(
        self, make_outbox: MakeOutbox, tmp_path: Path
    ) -> None:
        """Once put_many returns, another connection to the file already sees the records."""
        outbox = await make_outbox()
        await outbox.put_many([record("event", i) for i in range(3)])
        with sqlite3.connect(tmp_path / "outbox.db") as other:
            assert other.execute("SELECT count(*) FROM records").fetchone()[0] == 3

    async def test_kill_9_after_put_loses_nothing(
        self, make_outbox: MakeOutbox, tmp_path: Path
    ) -> None:
        """A process killed with SIGKILL right after put_many returned keeps every record."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            KILLED_WRITER,
            str(tmp_path / "outbox.db"),
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60.0)
        assert out.strip() == b"acknowledged"
        assert proc.returncode == -signal.SIGKILL
        outbox = await make_outbox()
        assert [r["seq"] for r in await drain(outbox)] == list(range(50))

    async def test_record_keeps_its_fields(self, make_outbox: MakeOutbox) -> None:
        """A leased record carries kind, ts, model, version and the payload fields."""
        outbox = await make_outbox()
        await outbox.put_many([OutboxRecord("feedback", 5.0, "iris", 3, {"id": "r1", "label": 2})])
        batch = await outbox.lease_batch(10, 10_000)
        assert batch is not None
        assert batch.records == (
            {"kind": "feedback", "ts": 5.0, "model": "iris", "version": 3, "id": "r1", "label": 2},
        )

    async def test_payload_may_not_repeat_reserved_fields(self) -> None:
        """A payload that repeats kind/ts/model/version is refused with a clear message."""
        with pytest.raises(ValueError, match="reserved fields"):
            OutboxRecord("event", 1.0, None, None, {"kind": "x"})


class TestBatches:
    async def test_lease_returns_the_same_batch_until_acked(self, make_outbox: MakeOutbox) -> None:
        """Leasing again without an ack gives the same key and records."""
        outbox = await make_outbox()
        await outbox.put_many([record("feedback", i) for i in range(5)])
        first = await outbox.lease_batch(3, 1_000_000)
        again = await outbox.lease_batch(3, 1_000_000)
        assert first is not None
        assert again is not None
        assert (first.key, first.records) == (again.key, again.records)
        assert [r["seq"] for r in first.records] == [0, 1, 2]

    async def test_ack_moves_on_to_the_next_records(self, make_outbox: MakeOutbox) -> None:
        """After an ack the next lease is a new key with the following records."""
        outbox = await make_outbox()
        await outbox.put_many([record("feedback", i) for i in range(5)])
        first = await outbox.lease_batch(3, 1_000_000)
        assert first is not None
        await outbox.ack(first.key)
        second = await outbox.lease_batch(3, 1_000_000)
        assert second is not None
        assert second.key != first.key
        assert [r["seq"] for r in second.records] == [3, 4]
        assert outbox.stats().total_records == 2

    async def test_lease_respects_byte_limit_but_takes_one(self, make_outbox: MakeOutbox) -> None:
        """A batch stays under max_bytes, except a single record larger than the limit."""
        outbox = await make_outbox()
        await outbox.put_many([record("feedback", i, pad=500) for i in range(4)])
        batch = await outbox.lease_batch(100, 1_200)
        assert batch is not None
        assert len(batch.records) == 2
        await outbox.ack(batch.key)
        lone = await outbox.lease_batch(100, 10)
        assert lone is not None
        assert len(lone.records) == 1

    async def test_batch_key_survives_a_crash_mid_batch(self, make_outbox: MakeOutbox) -> None:
        """A batch leased but never acked comes back after reopen with the same key and records."""
        first = await make_outbox()
        await first.put_many([record("drift", i) for i in range(4)])
        leased = await first.lease_batch(10, 1_000_000)
        assert leased is not None
        await first.close()  # the process "dies" before the ack
        second = await make_outbox()
        again = await second.lease_batch(10, 1_000_000)
        assert again is not None
        assert (again.key, again.records) == (leased.key, leased.records)

    async def test_dead_letter_keeps_status_and_reason(self, make_outbox: MakeOutbox) -> None:
        """A dead-lettered batch leaves the queue and is kept with its status and reason."""
        outbox = await make_outbox()
        await outbox.put_many([record("feedback", 0), record("feedback", 1)])
        batch = await outbox.lease_batch(1, 1_000_000)
        assert batch is not None
        await outbox.dead_letter(batch.key, 400, "bad label")
        letters = await outbox.dead_letters()
        assert [(d["batch"], d["status"], d["reason"]) for d in letters] == [
            (batch.key, 400, "bad label")
        ]
        assert letters[0]["record"]["seq"] == 0
        stats = outbox.stats()
        assert (stats.total_records, stats.dead_letter_batches, stats.dead_letter_records) == (
            1,
            1,
            1,
        )


class TestBound:
    async def test_drop_order_captures_metrics_drift_then_feedback_and_events(
        self, make_outbox: MakeOutbox
    ) -> None:
        """Over max_bytes, captures go first, then metrics, then drift, then feedback and events."""
        size = len(record("metrics", 0).encode())
        outbox = await make_outbox(max_bytes=10 * size)
        kinds: list[Kind] = ["capture", "metrics", "drift", "feedback", "event"]
        await outbox.put_many([record(k, i) for i, k in enumerate(kinds * 2)])
        for step in range(10):
            await outbox.put_many([record("feedback", 100 + step)])
            stats = outbox.stats()
            assert stats.total_bytes <= 10 * size
            order_kept = [stats.dropped[k] > 0 for k in ("capture", "metrics", "drift")]
            # a kind is dropped from only once every cheaper kind is gone
            if stats.dropped["metrics"]:
                assert stats.records["capture"] == 0
            if stats.dropped["drift"]:
                assert stats.records["metrics"] == 0
                assert order_kept[:2] == [True, True]
            if stats.dropped["feedback"] or stats.dropped["event"]:
                assert stats.records["drift"] == 0
                assert all(order_kept)
        assert {k: outbox.stats().dropped[k] for k in ("capture", "metrics", "drift")} == {
            "capture": 2,
            "metrics": 2,
            "drift": 2,
        }

    async def test_drops_the_oldest_first_and_counts_them(self, make_outbox: MakeOutbox) -> None:
        """Within one kind the oldest records go, and every drop is counted by kind."""
        size = len(record("feedback", 0).encode())
        outbox = await make_outbox(max_bytes=5 * size)
        for i in range(12):
            await outbox.put_many([record("feedback", i)])
        stats = outbox.stats()
        assert stats.dropped["feedback"] == 7
        assert stats.dropped_bytes["feedback"] == 7 * size
        assert [r["seq"] for r in await drain(outbox)] == [7, 8, 9, 10, 11]

    async def test_bound_holds_for_one_large_put(self, make_outbox: MakeOutbox) -> None:
        """A single put larger than the bound keeps only its newest records that fit."""
        size = len(record("capture", 0).encode())
        outbox = await make_outbox(max_bytes=3 * size)
        with capture_logs() as logs:
            await outbox.put_many([record("capture", i) for i in range(10)])
        assert outbox.stats().total_records == 3
        assert outbox.stats().dropped["capture"] == 7
        assert any(e["event"] == "outbox_dropped" for e in logs)

    async def test_counters_are_rebuilt_on_reopen(self, make_outbox: MakeOutbox) -> None:
        """Records and bytes by kind after reopen equal those before close."""
        first = await make_outbox()
        await first.put_many([record(k, i) for i, k in enumerate(KINDS)])
        before = first.stats()
        await first.close()
        after = (await make_outbox()).stats()
        assert (after.records, after.bytes) == (before.records, before.bytes)


class TestDiskFull:
    async def test_full_disk_is_unavailable_not_a_crash(
        self, make_outbox: MakeOutbox, tmp_path: Path
    ) -> None:
        """When SQLite reports a full disk, put_many raises Unavailable and nothing is counted."""
        db = Database(tmp_path / "outbox.db", fsync=True)
        outbox = await make_outbox(db)
        await outbox.put_many([record("feedback", 0)])

        def cap(conn: sqlite3.Connection) -> None:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")

        await db.run(cap)
        with pytest.raises(Unavailable, match=r"disk full at .*outbox\.db; free space"):
            await outbox.put_many([record("feedback", i, pad=50_000) for i in range(1, 5)])
        assert outbox.stats().total_records == 1
        assert [r["seq"] for r in await drain(outbox)] == [0]


async def filled(make_outbox: MakeOutbox, tmp_path: Path) -> int:
    """Fill and close an outbox file; returns its size once checkpointed."""
    outbox = await make_outbox()
    for start in range(0, 2_000, 500):
        await outbox.put_many([record("feedback", i, pad=150) for i in range(start, start + 500)])
    assert await outbox.lease_batch(100, 10_000_000) is not None
    await outbox.close()
    path = tmp_path / "outbox.db"
    assert not (tmp_path / "outbox.db-wal").exists()  # the last close checkpointed the WAL
    return path.stat().st_size


def asides(folder: Path) -> list[Path]:
    """Damaged files moved aside by recovery."""
    return list(folder.glob("outbox.db.corrupt-*"))


def truncate(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.truncate(offset)


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        data = f.read(16)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


async def assert_usable(outbox: Outbox) -> None:
    """New records are accepted and everything left can be leased and acked."""
    await outbox.put_many([record("event", 9_999)])
    seqs = [r["seq"] for r in await drain(outbox)]
    assert seqs[-1] == 9_999
    assert outbox.stats().total_records == 0


class TestCorruption:
    @pytest.mark.parametrize("fraction", [0.0, 0.01, 0.25, 0.5, 0.9, 0.999])
    async def test_truncated_file_is_recovered(
        self, make_outbox: MakeOutbox, tmp_path: Path, fraction: float
    ) -> None:
        """A truncated file opens without error, keeps what is readable and reports the rest."""
        size = await filled(make_outbox, tmp_path)
        truncate(tmp_path / "outbox.db", int(size * fraction))
        with capture_logs() as logs:
            outbox = await make_outbox()
        stats = outbox.stats()
        recovered = [e for e in logs if e["event"] == "outbox_corrupt_recovered"]
        if stats.corrupt_files:
            assert len(recovered) == 1
            assert recovered[0]["salvaged"] == stats.salvaged_records
            assert asides(tmp_path)
            assert stats.total_records == stats.salvaged_records
        else:  # the truncation only cut unused space
            assert stats.total_records == 2_000
        if stats.corrupt_files and not stats.corrupt_files_uncounted:
            assert stats.salvaged_records + stats.corrupt_records == 2_000
        if fraction == 0.0:
            assert (stats.corrupt_files, stats.corrupt_files_uncounted) == (1, 1)
        if 0.25 <= fraction <= 0.9:
            assert stats.corrupt_files == 1
            assert 0 < stats.salvaged_records < 2_000
        await assert_usable(outbox)

    @pytest.mark.parametrize("offset", [20, 28, 100, 4_104, "middle", "end"])
    async def test_flipped_bytes_are_recovered(
        self, make_outbox: MakeOutbox, tmp_path: Path, offset: int | str
    ) -> None:
        """Flipped bytes anywhere never crash open or lease; damaged records are counted."""
        size = await filled(make_outbox, tmp_path)
        where = {"middle": size // 2 + 100, "end": size - 2_000}.get(str(offset), offset)
        assert isinstance(where, int)
        flip(tmp_path / "outbox.db", where)
        outbox = await make_outbox()
        seqs = [r["seq"] for r in await drain(outbox)]
        stats = outbox.stats()
        assert len(set(seqs)) == len(seqs)
        assert set(seqs) <= set(range(2_000))
        if not stats.corrupt_files_uncounted:
            assert len(seqs) + stats.corrupt_records == 2_000
        await assert_usable(outbox)

    async def test_garbage_file_is_moved_aside(
        self, make_outbox: MakeOutbox, tmp_path: Path
    ) -> None:
        """A file that is not a database is moved aside and a fresh outbox starts."""
        (tmp_path / "outbox.db").write_bytes(b"not a database at all" * 500)
        outbox = await make_outbox()
        stats = outbox.stats()
        assert (stats.corrupt_files, stats.salvaged_records, stats.total_records) == (1, 0, 0)
        assert len(asides(tmp_path)) == 1
        await assert_usable(outbox)
