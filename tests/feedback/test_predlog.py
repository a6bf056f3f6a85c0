"""The prediction log: TTL and byte bounds, sampled inputs, batched writes, clean close."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import wait_for

from agent.clock import ManualClock
from agent.events import PredictionEvent
from agent.feedback.predlog import PredictionLog, PredLogSettings, pack_arrays, unpack_arrays

MakeLog = Callable[..., Awaitable[PredictionLog]]


def event(clock: ManualClock, i: int, *, ts: float | None = None) -> PredictionEvent:
    """Prediction ``p<i>``: four features in, a label and two probabilities out."""
    x = np.full((1, 4), float(i), dtype=np.float32)
    outputs = {
        "label": np.array([i % 2], dtype=np.int64),
        "probabilities": np.array([[0.25, 0.75]], dtype=np.float32),
    }
    return PredictionEvent(
        f"p{i}", "iris", 1, clock.wall() if ts is None else ts, {"x": x}, outputs, 0.001
    )


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the log's file through a second, read-only connection."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
def clock() -> ManualClock:
    """A clock the test moves by hand (the writer task still runs on real time)."""
    return ManualClock()


@pytest.fixture
async def make_log(tmp_path: Path, clock: ManualClock) -> AsyncIterator[MakeLog]:
    """Open prediction logs on real files; each one still open is closed at teardown."""
    opened: list[PredictionLog] = []

    async def make(seed: int = 1, **settings: Any) -> PredictionLog:
        defaults: dict[str, Any] = {"flush_s": 0.05, "input_sample_rate": 0.0}
        plog = PredictionLog(
            tmp_path / "predictions.db",
            PredLogSettings(**(defaults | settings)),
            clock,
            random.Random(seed),
        )
        await plog.open()
        opened.append(plog)
        return plog

    yield make
    for plog in opened:
        await plog.close()


class TestTTL:
    async def test_expired_predictions_are_not_found(
        self, make_log: MakeLog, clock: ManualClock
    ) -> None:
        """A prediction older than ttl_s is absent from lookups, a younger one is found."""
        plog = await make_log(ttl_s=60.0)
        plog.record(event(clock, 1))
        clock.advance(61.0)
        plog.record(event(clock, 2))
        found = await plog.lookup(["p1", "p2"])
        assert sorted(found) == ["p2"]

    async def test_expired_rows_leave_the_file(
        self, make_log: MakeLog, clock: ManualClock, tmp_path: Path
    ) -> None:
        """The writer's periodic trim deletes expired rows from the file."""
        plog = await make_log(ttl_s=60.0)
        for i in range(20):
            plog.record(event(clock, i))
        await plog.flush()
        assert rows(tmp_path / "predictions.db", "SELECT count(*) FROM predictions") == [(20,)]
        clock.advance(120.0)  # past the TTL and past the trim period
        plog.record(event(clock, 99))
        await wait_for(
            lambda: rows(tmp_path / "predictions.db", "SELECT id FROM predictions") == [("p99",)]
        )


class TestByteBound:
    async def test_log_stays_under_max_bytes_keeping_the_newest(
        self, make_log: MakeLog, clock: ManualClock, tmp_path: Path
    ) -> None:
        """Over max_bytes, the oldest predictions go first and the logged bytes fit the bound."""
        bound = 20_000
        plog = await make_log(max_bytes=bound)
        for i in range(1_000):
            clock.advance(0.01)
            plog.record(event(clock, i))
        await wait_for(lambda: plog.written == 1_000 and plog.bytes <= bound)
        db = tmp_path / "predictions.db"
        (total,) = rows(db, "SELECT sum(size) FROM predictions")[0]
        assert total <= bound
        kept = sorted(int(r[0][1:]) for r in rows(db, "SELECT id FROM predictions"))
        assert kept == list(range(1_000 - len(kept), 1_000))  # exactly the newest ones
        assert 0 < len(kept) < 1_000

    async def test_an_older_log_is_migrated_to_the_covering_index(
        self, make_log: MakeLog, clock: ManualClock, tmp_path: Path
    ) -> None:
        """A log written by an older agent (index on ts alone) keeps its rows and gets the
        (ts, size) index, so the trim's byte counts never read the rows' blobs."""
        db = tmp_path / "predictions.db"
        with sqlite3.connect(db) as old:
            old.executescript(
                "CREATE TABLE predictions (id TEXT PRIMARY KEY, model TEXT NOT NULL, "
                "version INTEGER NOT NULL, ts REAL NOT NULL, outputs BLOB NOT NULL, "
                "inputs BLOB, size INTEGER NOT NULL);"
                "CREATE INDEX predictions_ts ON predictions (ts);"
            )
            outputs = pack_arrays({"label": np.array([1], dtype=np.int64)})
            old.execute(
                "INSERT INTO predictions VALUES ('old', 'iris', 1, ?, ?, NULL, 70)",
                (clock.wall(), outputs),
            )
        old.close()
        plog = await make_log(max_bytes=1_000_000)
        assert plog.bytes == 70
        indexes = rows(db, "SELECT name FROM sqlite_master WHERE type = 'index'")
        assert ("predictions_ts_size",) in indexes
        assert ("predictions_ts",) not in indexes
        plan = rows(db, "EXPLAIN QUERY PLAN SELECT COALESCE(SUM(size), 0) FROM predictions")
        assert "COVERING INDEX predictions_ts_size" in plan[0][-1]
        plan = rows(db, "EXPLAIN QUERY PLAN SELECT ts, size FROM predictions ORDER BY ts")
        assert "COVERING INDEX predictions_ts_size" in plan[0][-1]
        assert "old" in await plog.lookup(["old"])


class TestInputs:
    @pytest.mark.parametrize(
        ("rate", "low", "high"), [(0.0, 0, 0), (0.25, 60, 140), (1.0, 400, 400)]
    )
    async def test_inputs_are_kept_for_the_configured_sample(
        self,
        make_log: MakeLog,
        clock: ManualClock,
        tmp_path: Path,
        rate: float,
        low: int,
        high: int,
    ) -> None:
        """About input_sample_rate of the logged predictions keep their inputs."""
        plog = await make_log(input_sample_rate=rate, seed=7)
        for i in range(400):
            plog.record(event(clock, i))
        await plog.flush()
        db = tmp_path / "predictions.db"
        (with_inputs,) = rows(db, "SELECT count(*) FROM predictions WHERE inputs IS NOT NULL")[0]
        assert low <= with_inputs <= high

    async def test_kept_inputs_and_outputs_round_trip(
        self, make_log: MakeLog, clock: ManualClock
    ) -> None:
        """A lookup returns the very arrays that were logged."""
        plog = await make_log(input_sample_rate=1.0)
        original = event(clock, 5)
        plog.record(original)
        found = (await plog.lookup(["p5"]))["p5"]
        assert found.inputs is not None
        np.testing.assert_array_equal(found.inputs["x"], original.inputs["x"])
        np.testing.assert_array_equal(found.outputs["label"], original.outputs["label"])
        assert found.outputs["probabilities"].dtype == np.float32

    def test_bytes_tensors_round_trip(self) -> None:
        """BYTES tensors (object arrays) survive packing as bytes elements."""
        arr = np.empty((2, 1), dtype=object)
        arr[:] = [[b"good"], [b"bad"]]
        back = unpack_arrays(pack_arrays({"text": arr}))["text"]
        assert back.shape == (2, 1)
        assert back.ravel().tolist() == [b"good", b"bad"]


class TestWrites:
    async def test_many_predictions_take_few_transactions(
        self, make_log: MakeLog, clock: ManualClock
    ) -> None:
        """A burst of 2000 predictions is written in a handful of transactions."""
        plog = await make_log(flush_rows=512)
        for i in range(2_000):
            plog.record(event(clock, i))
        await wait_for(lambda: plog.written == 2_000)
        assert plog.writes <= 4

    async def test_a_trickle_of_predictions_is_batched(
        self, make_log: MakeLog, clock: ManualClock
    ) -> None:
        """Predictions arriving one by one are still written many per transaction."""
        plog = await make_log(flush_rows=512, flush_s=0.2)
        for i in range(600):
            plog.record(event(clock, i))
            if i % 20 == 0:
                await asyncio.sleep(0.001)  # let the event loop (and the writer) run
        await wait_for(lambda: plog.written == 600)
        assert plog.writes <= 60  # at least ten predictions per transaction

    async def test_a_full_buffer_drops_and_counts(
        self, make_log: MakeLog, clock: ManualClock
    ) -> None:
        """Beyond the buffer bound, record() drops the event and counts it, never blocking."""
        plog = await make_log(buffer=100, flush_rows=1_000, flush_s=60.0)
        for i in range(150):
            plog.record(event(clock, i))
        assert plog.dropped == 50
        await plog.flush()
        assert plog.written == 100

    async def test_close_writes_the_buffer(
        self, make_log: MakeLog, clock: ManualClock, tmp_path: Path
    ) -> None:
        """Closing writes what was still buffered, so a restarted agent can join it."""
        plog = await make_log(flush_s=60.0, flush_rows=10_000)
        for i in range(30):
            plog.record(event(clock, i))
        await plog.close()
        assert rows(tmp_path / "predictions.db", "SELECT count(*) FROM predictions") == [(30,)]
        reopened = await make_log()
        assert len(await reopened.lookup([f"p{i}" for i in range(30)])) == 30

    async def test_an_unpackable_event_skips_only_itself(
        self, make_log: MakeLog, clock: ManualClock
    ) -> None:
        """An event whose arrays cannot be packed is dropped and counted; its batch is written."""
        plog = await make_log(flush_s=60.0, flush_rows=10_000)
        bad = np.empty(1, dtype=object)
        bad[0] = -1  # bytes(-1) raises: not a BYTES element
        plog.record(event(clock, 1))
        plog.record(PredictionEvent("bad", "iris", 1, clock.wall(), {}, {"y": bad}, 0.0))
        plog.record(event(clock, 2))
        found = await plog.lookup(["p1", "p2", "bad"])
        assert sorted(found) == ["p1", "p2"]
        assert plog.dropped == 1
