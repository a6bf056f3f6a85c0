"""The outbox: one durable, bounded SQLite (WAL) queue for every record bound upstream.

Responsibilities: keep records until the upstream acknowledged them (``ack``) or refused them
for good (``dead_letter``); stay under ``max_bytes`` by dropping the oldest records of the
least valuable kind first (captures, then metrics, then drift windows; feedback and events
last), counting every drop; give every batch a key that is persisted before its first send, so
a batch resent after a crash carries the same ``Idempotency-Key``; recover from a damaged file
at ``open`` (keep what can be read, move the file aside, count and report the rest).

It must not send anything, sleep, or block the event loop: all SQL runs on the ``Database``
thread. Once ``put_many`` returns, the records are committed (and fsynced when the database
was opened with ``fsync=True``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import msgpack
import numpy as np
import structlog

from agent.clock import Clock
from agent.db import (
    Damage,
    Database,
    is_corruption,
    is_disk_full,
    open_checked,
    read_damaged_rows,
    write_transaction,
)
from agent.errors import Unavailable

log = structlog.get_logger(__name__)

Kind = Literal["feedback", "capture", "drift", "metrics", "event"]
KINDS: tuple[Kind, ...] = get_args(Kind)
# Drop rank: lower goes first when the outbox is full; equal ranks go oldest first.
DROP_RANK: Mapping[str, int] = {"capture": 0, "metrics": 1, "drift": 2, "feedback": 3, "event": 3}
_RESERVED = frozenset({"kind", "ts", "model", "version"})
_COLUMNS = ("id", "kind", "rank", "ts", "created", "size", "crc", "body", "batch")
_TALLY_SQL = "SELECT records FROM tally"

# ``tally`` comes first so it sits on an early page: when a damaged file cannot be counted,
# it still says how many records there were, so the loss can be reported.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tally (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    records INTEGER NOT NULL
);
INSERT OR IGNORE INTO tally (id, records) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS records (
    id      INTEGER PRIMARY KEY,
    kind    TEXT    NOT NULL,
    rank    INTEGER NOT NULL,
    ts      REAL    NOT NULL,
    created REAL    NOT NULL,
    size    INTEGER NOT NULL,
    crc     INTEGER NOT NULL,
    body    BLOB    NOT NULL,
    batch   TEXT
);
CREATE INDEX IF NOT EXISTS records_by_batch ON records (batch, id);
CREATE INDEX IF NOT EXISTS records_by_rank ON records (rank, id);
CREATE TRIGGER IF NOT EXISTS tally_insert AFTER INSERT ON records
    BEGIN UPDATE tally SET records = records + 1; END;
CREATE TRIGGER IF NOT EXISTS tally_delete AFTER DELETE ON records
    BEGIN UPDATE tally SET records = records - 1; END;
CREATE TABLE IF NOT EXISTS batches (
    seq     INTEGER PRIMARY KEY,
    key     TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id      INTEGER PRIMARY KEY,
    batch   TEXT    NOT NULL,
    status  INTEGER NOT NULL,
    reason  TEXT    NOT NULL,
    at      REAL    NOT NULL,
    kind    TEXT    NOT NULL,
    ts      REAL    NOT NULL,
    body    BLOB    NOT NULL
);
"""


def _default(obj: Any) -> Any:
    """msgpack fallback for numpy values found in payloads."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError("cannot encode " + type(obj).__name__ + " in an outbox record")


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One record bound upstream; ``payload`` holds the kind-specific fields."""

    kind: Kind
    ts: float
    model: str | None
    version: int | None
    payload: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"outbox record kind {self.kind!r} is unknown; use one of {KINDS}")
        clash = _RESERVED.intersection(self.payload)
        if clash:
            raise ValueError(f"outbox payload repeats reserved fields {sorted(clash)}; drop them")

    def to_wire(self) -> dict[str, Any]:
        """The record as it appears in an upstream batch."""
        fixed = {"kind": self.kind, "ts": self.ts, "model": self.model, "version": self.version}
        return {**fixed, **self.payload}

    def encode(self) -> bytes:
        """msgpack bytes of ``to_wire()``; their length counts toward ``max_bytes``."""
        body = msgpack.packb(self.to_wire(), default=_default, use_bin_type=True)
        assert isinstance(body, bytes)
        return body


@dataclass(frozen=True, slots=True)
class Batch:
    """Records leased for one send under one key (the ``Idempotency-Key``)."""

    key: str
    records: tuple[dict[str, Any], ...]
    size: int


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot of the outbox for metrics and status."""

    records: Mapping[str, int]
    bytes: Mapping[str, int]
    total_records: int
    total_bytes: int
    max_bytes: int
    oldest_age_s: float
    pending_batches: int
    dropped: Mapping[str, int]
    dropped_bytes: Mapping[str, int]
    corrupt_records: int
    corrupt_files: int
    corrupt_files_uncounted: int
    salvaged_records: int
    dead_letter_batches: int
    dead_letter_records: int


class _Counts:
    """Mutable counters, changed only on the database thread after a commit, read under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.bytes: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.dropped: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.dropped_bytes: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.oldest_created: float | None = None
        self.pending_batches = 0
        self.corrupt_records = 0
        self.corrupt_files = 0
        self.corrupt_files_uncounted = 0
        self.salvaged_records = 0
        self.dead_letter_batches = 0
        self.dead_letter_records = 0

    def add(self, kind: str, count: int, size: int) -> None:
        self.records[kind] = self.records.get(kind, 0) + count
        self.bytes[kind] = self.bytes.get(kind, 0) + size

    def drop(self, kind: str, count: int, size: int) -> None:
        self.add(kind, -count, -size)
        self.dropped[kind] = self.dropped.get(kind, 0) + count
        self.dropped_bytes[kind] = self.dropped_bytes.get(kind, 0) + size


def _tally(rows: Sequence[tuple[str, int, int]]) -> dict[str, tuple[int, int]]:
    """Sum ``(kind, count, bytes)`` rows by kind."""
    out: dict[str, tuple[int, int]] = {}
    for kind, count, size in rows:
        n, b = out.get(kind, (0, 0))
        out[kind] = (n + count, b + size)
    return out


class Outbox:
    """Durable queue of ``OutboxRecord`` with a byte bound, batch leases and dead letters."""

    def __init__(
        self,
        db: Database | Path | str,
        *,
        max_bytes: int,
        clock: Clock,
        fsync: bool = True,
        max_dead_letters: int = 10_000,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(
                f"outbox max_bytes must be > 0, got {max_bytes}; set [outbox] max_bytes"
            )
        self._db = db if isinstance(db, Database) else Database(db, fsync=fsync)
        self._max_bytes = max_bytes
        self._max_dead_letters = max_dead_letters
        self._clock = clock
        self._counts = _Counts()
        self._put_event = asyncio.Event()

    @property
    def path(self) -> Path:
        """The SQLite file behind this outbox."""
        return self._db.path

    @property
    def put_event(self) -> asyncio.Event:
        """Set after every successful ``put_many`` (the shipper clears it and waits on it)."""
        return self._put_event

    async def open(self) -> None:
        """Open the file, recovering it first if it is damaged; then load the counters."""
        try:
            damage = await open_checked(self._db, stamp=int(self._clock.wall()))
            if damage is not None:
                await self._recover(damage)
            await self._db.run(self._load)
        except sqlite3.Error as exc:
            raise Unavailable(
                f"outbox: cannot open {self.path}: {exc}; check that the [state] dir exists "
                "and is writable by the agent"
            ) from exc

    async def _recover(self, damage: Damage) -> None:
        """Refill the fresh file with what the damaged one still holds; count the rest."""
        salvage = await asyncio.to_thread(
            read_damaged_rows, damage.moved_to, "records", _COLUMNS, expected_sql=_TALLY_SQL
        )
        kept, bad = await self._db.run(lambda conn: self._rebuild(conn, salvage.rows))
        lost = None if salvage.lost is None else salvage.lost + bad
        with self._counts.lock:
            self._counts.corrupt_files += 1
            self._counts.corrupt_files_uncounted += salvage.lost is None
            self._counts.corrupt_records += bad + (salvage.lost or 0)
            self._counts.salvaged_records += kept
        log.error(
            "outbox_corrupt_recovered",
            path=str(self.path),
            moved_to=str(damage.moved_to),
            problem=damage.problem,
            salvaged=kept,
            lost=lost,
            lost_exact=salvage.lost_exact,
        )

    def _rebuild(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> tuple[int, int]:
        """Create a fresh schema and insert the salvaged rows whose checksum still holds."""
        conn.executescript(_SCHEMA)
        good = [r for r in rows if _row_is_sound(r)]
        with write_transaction(conn):
            conn.executemany(
                "INSERT INTO records (id, kind, rank, ts, created, size, crc, body, batch) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                good,
            )
            conn.execute(
                "INSERT INTO batches (key, created) SELECT batch, ? FROM records "
                "WHERE batch IS NOT NULL GROUP BY batch ORDER BY min(id)",
                (self._clock.wall(),),
            )
        return len(good), len(rows) - len(good)

    def _load(self, conn: sqlite3.Connection) -> None:
        conn.executescript(_SCHEMA)
        conn.execute("UPDATE tally SET records = (SELECT count(*) FROM records)")
        rows = conn.execute(
            "SELECT kind, count(*), sum(size) FROM records GROUP BY kind"
        ).fetchall()
        pending = conn.execute("SELECT count(*) FROM batches").fetchone()[0]
        with self._counts.lock:
            for kind, count, size in rows:
                self._counts.add(kind, count, size)
            self._counts.pending_batches = pending
            self._counts.oldest_created = _oldest(conn)

    async def put_many(self, records: Sequence[OutboxRecord]) -> None:
        """Store ``records`` durably; on return they are committed.

        Raises ``Unavailable`` when the disk is full or the file cannot be written, so callers
        can answer 503 instead of acknowledging.
        """
        if not records:
            return
        now = self._clock.wall()
        try:
            # Encoding runs on the database thread with the insert: the loop only hands over.
            await self._db.run(lambda conn: self._insert(conn, [_row(r, now) for r in records]))
        except sqlite3.Error as exc:
            raise self._write_error(exc) from exc
        self._put_event.set()

    def _write_error(self, exc: sqlite3.Error) -> Unavailable:
        if is_disk_full(exc):
            return Unavailable(
                f"outbox: disk full at {self.path}; free space on that filesystem or lower "
                "[outbox] max_bytes",
                retry_after_s=5.0,
            )
        hint = "restart the agent to recover the file" if is_corruption(exc) else "check the disk"
        return Unavailable(f"outbox: cannot write {self.path}: {exc}; {hint}", retry_after_s=5.0)

    def _insert(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        added = sum(r[4] for r in rows)
        with write_transaction(conn):
            conn.executemany(
                "INSERT INTO records (kind, rank, ts, created, size, crc, body) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            excess = self.stats().total_bytes + added - self._max_bytes
            dropped = self._drop(conn, excess) if excess > 0 else {}
            oldest = _oldest(conn)
        with self._counts.lock:
            for r in rows:
                self._counts.add(r[0], 1, r[4])
            for kind, (count, size) in dropped.items():
                self._counts.drop(kind, count, size)
            self._counts.oldest_created = oldest
        if dropped:
            counts = {kind: n for kind, (n, _) in dropped.items()}
            log.warning("outbox_dropped", max_bytes=self._max_bytes, dropped=counts)

    def _drop(self, conn: sqlite3.Connection, excess: int) -> dict[str, tuple[int, int]]:
        """Delete the oldest records, least valuable rank first, until ``excess`` bytes are free."""
        freed: list[tuple[str, int, int]] = []
        need = excess
        for rank in sorted(set(DROP_RANK.values())):
            cutoff = None
            for rid, kind, size in conn.execute(
                "SELECT id, kind, size FROM records WHERE rank = ? ORDER BY id", (rank,)
            ):
                freed.append((kind, 1, size))
                need -= size
                cutoff = rid
                if need <= 0:
                    break
            if cutoff is not None:
                conn.execute("DELETE FROM records WHERE rank = ? AND id <= ?", (rank, cutoff))
            if need <= 0:
                break
        return _tally(freed)

    async def lease_batch(self, max_records: int, max_bytes: int) -> Batch | None:
        """The oldest batch not yet acknowledged, else a new batch of the oldest free records.

        A new batch's key is persisted before this returns, so a resend after a crash reuses
        it. Returns ``None`` when there is nothing to send.
        """
        batch, corrupt = await self._db.run(lambda conn: self._lease(conn, max_records, max_bytes))
        if corrupt:
            log.error("outbox_corrupt_record", path=str(self.path), records=corrupt)
        return batch

    def _lease(
        self, conn: sqlite3.Connection, max_records: int, max_bytes: int
    ) -> tuple[Batch | None, int]:
        corrupt = 0
        # Bounded: every round either returns or removes one batch row.
        for _ in range(2 + self.stats().pending_batches):
            row = conn.execute("SELECT key FROM batches ORDER BY seq LIMIT 1").fetchone()
            key = row[0] if row is not None else self._assign(conn, max_records, max_bytes)
            if key is None:
                return None, corrupt
            batch, bad = self._read_batch(conn, key)
            corrupt += bad
            if batch is not None:
                return batch, corrupt
        return None, corrupt

    def _assign(self, conn: sqlite3.Connection, max_records: int, max_bytes: int) -> str | None:
        last, total, count = None, 0, 0
        for rid, size in conn.execute(
            "SELECT id, size FROM records WHERE batch IS NULL ORDER BY id"
        ):
            if count and (count >= max_records or total + size > max_bytes):
                break
            last, total, count = rid, total + size, count + 1
        if last is None:
            return None
        key = uuid.uuid4().hex
        with write_transaction(conn):
            conn.execute(
                "INSERT INTO batches (key, created) VALUES (?, ?)", (key, self._clock.wall())
            )
            conn.execute(
                "UPDATE records SET batch = ? WHERE batch IS NULL AND id <= ?", (key, last)
            )
        with self._counts.lock:
            self._counts.pending_batches += 1
        return key

    def _read_batch(self, conn: sqlite3.Connection, key: str) -> tuple[Batch | None, int]:
        """Decode a batch's records; drop (and count) any whose bytes no longer check out."""
        rows = conn.execute(
            "SELECT id, kind, size, crc, body FROM records WHERE batch = ? ORDER BY id", (key,)
        ).fetchall()
        records, bad, size = [], [], 0
        for rid, kind, rsize, crc, body in rows:
            decoded = _decode(body, crc)
            if decoded is None:
                bad.append((rid, kind, rsize))
            else:
                records.append(decoded)
                size += rsize
        if bad:
            self._remove_corrupt(conn, bad)
        if not records:
            self._finish(conn, key)
            return None, len(bad)
        return Batch(key=key, records=tuple(records), size=size), len(bad)

    def _remove_corrupt(self, conn: sqlite3.Connection, bad: list[tuple[int, str, int]]) -> None:
        with write_transaction(conn):
            conn.executemany("DELETE FROM records WHERE id = ?", [(rid,) for rid, _, _ in bad])
        with self._counts.lock:
            for _, kind, size in bad:
                self._counts.add(kind, -1, -size)
            self._counts.corrupt_records += len(bad)

    async def ack(self, batch_key: str) -> None:
        """The upstream answered 2xx: delete the batch and its records."""
        await self._db.run(lambda conn: self._finish(conn, batch_key))

    async def dead_letter(self, batch_key: str, status: int, reason: str) -> None:
        """The upstream refused the batch for good: move it to the dead-letter table."""
        await self._db.run(lambda conn: self._finish(conn, batch_key, (status, reason)))

    def _finish(
        self, conn: sqlite3.Connection, key: str, refused: tuple[int, str] | None = None
    ) -> None:
        tally = _tally(
            conn.execute(
                "SELECT kind, count(*), sum(size) FROM records WHERE batch = ? GROUP BY kind",
                (key,),
            ).fetchall()
        )
        with write_transaction(conn):
            if refused is not None:
                self._bury(conn, key, refused)
            conn.execute("DELETE FROM records WHERE batch = ?", (key,))
            gone = conn.execute("DELETE FROM batches WHERE key = ?", (key,)).rowcount
            oldest = _oldest(conn)
        with self._counts.lock:
            for kind, (count, size) in tally.items():
                self._counts.add(kind, -count, -size)
            self._counts.pending_batches -= gone
            self._counts.oldest_created = oldest
            if refused is not None:
                self._counts.dead_letter_batches += 1
                self._counts.dead_letter_records += sum(n for n, _ in tally.values())

    def _bury(self, conn: sqlite3.Connection, key: str, refused: tuple[int, str]) -> None:
        status, reason = refused
        conn.execute(
            "INSERT INTO dead_letters (batch, status, reason, at, kind, ts, body) "
            "SELECT batch, ?, ?, ?, kind, ts, body FROM records WHERE batch = ? ORDER BY id",
            (status, reason, self._clock.wall(), key),
        )
        conn.execute(
            "DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?",
            (self._max_dead_letters,),
        )

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent dead letters: batch, status, reason, kind, and the record itself."""

        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT batch, status, reason, at, body FROM dead_letters ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [
                {"batch": b, "status": s, "reason": r, "at": at, "record": _decode(body, None)}
                for b, s, r, at, body in rows
            ]

        return await self._db.run(read)

    def stats(self) -> OutboxStats:
        """Counters and gauges for metrics (safe to call from any thread)."""
        c = self._counts
        with c.lock:
            oldest = c.oldest_created
            age = 0.0 if oldest is None else max(0.0, self._clock.wall() - oldest)
            return OutboxStats(
                records=dict(c.records),
                bytes=dict(c.bytes),
                total_records=sum(c.records.values()),
                total_bytes=sum(c.bytes.values()),
                max_bytes=self._max_bytes,
                oldest_age_s=age,
                pending_batches=c.pending_batches,
                dropped=dict(c.dropped),
                dropped_bytes=dict(c.dropped_bytes),
                corrupt_records=c.corrupt_records,
                corrupt_files=c.corrupt_files,
                corrupt_files_uncounted=c.corrupt_files_uncounted,
                salvaged_records=c.salvaged_records,
                dead_letter_batches=c.dead_letter_batches,
                dead_letter_records=c.dead_letter_records,
            )

    async def close(self) -> None:
        """Close the database (everything acknowledged is already on disk)."""
        await self._db.close()


def _row(record: OutboxRecord, now: float) -> tuple[Any, ...]:
    body = record.encode()
    return (record.kind, DROP_RANK[record.kind], record.ts, now, len(body), zlib.crc32(body), body)


def _oldest(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT created FROM records ORDER BY id LIMIT 1").fetchone()
    return None if row is None else float(row[0])


def _decode(body: object, crc: int | None) -> dict[str, Any] | None:
    """The record dict, or ``None`` when the bytes fail their checksum or do not decode."""
    if not isinstance(body, bytes) or (crc is not None and zlib.crc32(body) != crc):
        return None
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    return value if isinstance(value, dict) else None


def _row_is_sound(row: tuple[Any, ...]) -> bool:
    """A salvaged row keeps its column types and its body still matches its checksum."""
    _, kind, rank, _, _, size, crc, body, _ = row
    return (
        kind in DROP_RANK
        and rank == DROP_RANK[kind]
        and isinstance(body, bytes)
        and size == len(body)
        and _decode(body, crc) is not None
    )
