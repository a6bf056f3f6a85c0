"""The bounded prediction log: what each request id was answered, kept for feedback joins.

SQLite in ``[state] dir/predictions.db`` (WAL). Requests never wait for it: ``record``
appends to a bounded in-memory buffer (when full, the event is dropped and counted), and
one background task writes the buffer in a single transaction every ``flush_s`` or when it
holds ``flush_rows`` events (few large writes: flash storage wears out under many small
ones). Old rows go after ``ttl_s``; the oldest go first when the file's rows exceed
``max_bytes``. Inputs are kept for a sample of requests (``input_sample_rate``).

The log is a cache for joins, not a record of truth: with fsync off, a power cut may lose
the last unflushed second of predictions (their feedback is then counted as unknown).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import structlog

from agent.clock import Clock
from agent.db import Database, write_transaction
from agent.errors import Unavailable
from agent.events import PredictionEvent
from agent.tensors import Array

log = structlog.get_logger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    ts REAL NOT NULL,
    outputs BLOB NOT NULL,
    inputs BLOB,
    size INTEGER NOT NULL
);
-- (ts, size) covers the trim's scans: reading size from the table would walk every
-- row's overflow pages (the sampled inputs), the whole file, every trim.
CREATE INDEX IF NOT EXISTS predictions_ts_size ON predictions (ts, size);
DROP INDEX IF EXISTS predictions_ts;
"""


_TRIM_EVERY_S = 10.0
#: How long ``close`` waits for the writer's last transaction before cancelling it.
_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Prediction:
    """A logged prediction, as the join reads it back."""

    id: str
    model: str
    version: int
    ts: float
    outputs: dict[str, Array]
    inputs: dict[str, Array] | None


@dataclass(frozen=True, slots=True, kw_only=True)
class PredLogSettings:
    """Bounds of the log (``[feedback]`` in the config)."""

    ttl_s: float = 7 * 86400.0
    max_bytes: int = 256 << 20
    input_sample_rate: float = 0.1
    buffer: int = 10_000
    flush_rows: int = 512
    flush_s: float = 0.5


def pack_arrays(arrays: dict[str, Array]) -> bytes:
    """Named arrays as msgpack: dtype, shape and raw bytes (BYTES as a list of bytes)."""
    doc = {}
    for name, a in arrays.items():
        if a.dtype.kind in "OUS":
            items = [x.encode() if isinstance(x, str) else bytes(x) for x in a.ravel()]
            doc[name] = {"dtype": "bytes", "shape": list(a.shape), "data": items}
        else:
            doc[name] = {
                "dtype": a.dtype.str,
                "shape": list(a.shape),
                "data": np.ascontiguousarray(a).tobytes(),
            }
    body = msgpack.packb(doc, use_bin_type=True)
    assert isinstance(body, bytes)
    return body


def unpack_arrays(body: bytes) -> dict[str, Array]:
    """The inverse of ``pack_arrays``."""
    out: dict[str, Array] = {}
    for name, t in msgpack.unpackb(body, raw=False).items():
        if t["dtype"] == "bytes":
            arr = np.empty(len(t["data"]), dtype=object)
            arr[:] = t["data"]
            out[name] = arr.reshape(t["shape"])
        else:
            out[name] = np.frombuffer(t["data"], dtype=np.dtype(t["dtype"])).reshape(t["shape"])
    return out


class PredictionLog:
    """Buffered, bounded, SQLite-backed log of predictions by request id."""

    def __init__(
        self, path: Path, settings: PredLogSettings, clock: Clock, rng: random.Random | None = None
    ) -> None:
        self._db = Database(path, fsync=False)
        self.settings = settings
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 -- sampling, not security
        self._buffer: deque[PredictionEvent] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.dropped = 0
        self.written = 0
        self.writes = 0
        self._bytes = 0
        self._last_trim = 0.0

    async def open(self) -> None:
        """Create the table and start the writer task."""
        await self._db.open()
        self._bytes = await self._db.run(_init)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="predlog")

    async def close(self) -> None:
        """Stop the writer, write what is buffered, close the file.

        The writer is asked to stop rather than cancelled: a cancelled write would drop the
        events it had taken from the buffer, and their feedback would then count as unknown.
        """
        task, self._task = self._task, None
        if task is not None:
            self._stop.set()
            self._wakeup.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), _STOP_TIMEOUT_S)
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                log.warning("predlog_stop_timeout", timeout_s=_STOP_TIMEOUT_S)
            except Exception:  # logged; the buffer is still written below
                log.exception("predlog_writer_failed")
        await self.flush()
        await self._db.close()

    def record(self, event: PredictionEvent) -> None:
        """Remember a prediction; never blocks (drops and counts when the buffer is full)."""
        if len(self._buffer) >= self.settings.buffer:
            self.dropped += 1
            return
        self._buffer.append(event)
        if len(self._buffer) >= self.settings.flush_rows:
            self._wakeup.set()

    @property
    def bytes(self) -> int:
        """Bytes of logged rows (the figure bounded by ``max_bytes``)."""
        return self._bytes

    async def flush(self) -> None:
        """Write the buffer now (before a join, so just-answered ids are found)."""
        if not self._buffer:
            return
        events = list(self._buffer)
        self._buffer.clear()
        try:
            # Packing runs on the database thread too: the event loop only hands over.
            added, skipped = await self._db.run(lambda conn: self._write(conn, events))
        except sqlite3.Error as exc:
            self.dropped += len(events)
            log.warning("predlog_write_failed", rows=len(events), reason=str(exc))
            return
        self._bytes += added
        self.writes += 1
        self.written += len(events) - skipped
        self.dropped += skipped

    def _write(self, conn: sqlite3.Connection, events: list[PredictionEvent]) -> tuple[int, int]:
        """Insert the events in one transaction; returns (bytes added, events skipped)."""
        rows = []
        for e in events:
            try:
                rows.append(self._row(e))
            except (ValueError, TypeError, OverflowError) as exc:
                # One event that cannot be packed must not take its whole batch with it.
                log.warning("predlog_event_skipped", id=e.id, model=e.model, reason=repr(exc))
        return _insert(conn, rows), len(events) - len(rows)

    def _row(self, e: PredictionEvent) -> tuple[Any, ...]:
        outputs = pack_arrays(e.outputs)
        keep_inputs = self._rng.random() < self.settings.input_sample_rate
        inputs = pack_arrays(e.inputs) if keep_inputs else None
        size = len(outputs) + (len(inputs) if inputs else 0) + len(e.id) + 64
        return (e.id, e.model, e.version, e.ts, outputs, inputs, size)

    async def lookup(self, ids: list[str]) -> dict[str, Prediction]:
        """Predictions by id (unknown and expired ids are simply absent).

        Raises ``Unavailable`` (503, retry) when the log cannot be read, so a disk problem
        never answers feedback as if its ids were unknown.
        """
        await self.flush()
        horizon = self._clock.wall() - self.settings.ttl_s
        try:
            # Decoding runs on the database thread too: a request may name 10,000 ids.
            return await self._db.run(lambda conn: _predictions(_select(conn, ids, horizon)))
        except sqlite3.Error as exc:
            raise Unavailable(
                f"prediction log {self._db.path} cannot be read ({exc}); nothing was "
                "accepted, retry later (check the disk under [state] dir)",
                retry_after_s=5.0,
            ) from exc

    async def _run(self) -> None:
        while not self._stop.is_set():
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.settings.flush_s)
            await self.flush()
            if self._stop.is_set():
                return
            overdue = self._clock.monotonic() - self._last_trim > _TRIM_EVERY_S
            if overdue or self._bytes > self.settings.max_bytes:
                await self._trim()

    async def _trim(self) -> None:
        self._last_trim = self._clock.monotonic()
        horizon = self._clock.wall() - self.settings.ttl_s
        try:
            self._bytes = await self._db.run(
                lambda conn: _trim(conn, horizon, self.settings.max_bytes)
            )
        except sqlite3.Error as exc:
            log.warning("predlog_trim_failed", reason=str(exc))


def _init(conn: sqlite3.Connection) -> int:
    conn.executescript(_SCHEMA)
    return int(conn.execute("SELECT COALESCE(SUM(size), 0) FROM predictions").fetchone()[0])


def _insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
    with write_transaction(conn):
        conn.executemany("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    return sum(int(r[6]) for r in rows)


def _predictions(rows: list[tuple[Any, ...]]) -> dict[str, Prediction]:
    return {
        r[0]: Prediction(
            r[0], r[1], r[2], r[3], unpack_arrays(r[4]), unpack_arrays(r[5]) if r[5] else None
        )
        for r in rows
    }


def _select(conn: sqlite3.Connection, ids: list[str], horizon: float) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = []
    for start in range(0, len(ids), 500):  # SQLite's parameter limit
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found.extend(
            conn.execute(
                f"SELECT id, model, version, ts, outputs, inputs FROM predictions "  # noqa: S608 -- only placeholders
                f"WHERE id IN ({marks}) AND ts >= ?",
                [*chunk, horizon],
            ).fetchall()
        )
    return found


def _trim(conn: sqlite3.Connection, horizon: float, max_bytes: int) -> int:
    with write_transaction(conn):
        conn.execute("DELETE FROM predictions WHERE ts < ?", (horizon,))
        total = _total(conn)
        if total > max_bytes:
            # Delete the oldest rows until a tenth under the bound (room for the next writes).
            cutoff = _cutoff(conn, total - int(max_bytes * 0.9))
            conn.execute("DELETE FROM predictions WHERE ts <= ?", (cutoff,))
            total = _total(conn)
    return total


def _total(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(SUM(size), 0) FROM predictions").fetchone()[0])


def _cutoff(conn: sqlite3.Connection, excess: int) -> float:
    """The time of the newest row that must go for the oldest rows to free ``excess`` bytes
    (walks the covering index from the oldest row, and stops there)."""
    cursor = conn.execute("SELECT ts, size FROM predictions ORDER BY ts")
    freed, last = 0, float("-inf")
    try:
        for ts, size in cursor:
            freed, last = freed + size, ts
            if freed >= excess:
                break
    finally:
        cursor.close()
    return float(last)
