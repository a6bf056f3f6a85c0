"""One SQLite connection per file, on its own thread, with WAL and our pragmas set in one place.

Every statement against a database file runs through ``Database.run(fn)``, which executes
``fn(conn)`` on a dedicated single-thread executor: the event loop never blocks on disk, and the
connection is only ever touched by the thread that created it. This module knows nothing about
tables; the outbox and the prediction log bring their own schema.

Damaged files: ``open_checked`` opens a file and, when it is damaged (``PRAGMA quick_check``,
an open that fails, or an emptied file), moves it (and its WAL) aside and starts a fresh one;
``read_damaged_rows`` then copies out whatever rows of one table can still be read from the
moved copy, so the owner can refill the fresh file and report what was lost.

Durability: ``fsync=True`` sets ``synchronous=FULL`` (a commit survives a power cut);
``fsync=False`` sets ``synchronous=NORMAL`` (a commit survives a killed process, since WAL
frames are written before ``COMMIT`` returns, but not necessarily a power cut).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5_000
MAX_KEY = 2**63 - 1


def connect(path: Path, *, fsync: bool) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode with WAL and our pragmas (call on the owning thread).

    Raises ``sqlite3.DatabaseError`` when the file is not a database.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = " + ("FULL" if fsync else "NORMAL"))
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception (autocommit connections)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def is_disk_full(exc: sqlite3.Error) -> bool:
    """True when SQLite failed because the disk (or the page limit) is full."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


def is_corruption(exc: sqlite3.Error) -> bool:
    """True when SQLite says the file is damaged or not a database at all."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return True
    text = str(exc)
    return "malformed" in text or "not a database" in text


class Database:
    """A SQLite file reached through one connection living on one thread.

    The connection opens lazily on the first ``run`` (or explicitly with ``open``); ``close``
    closes it and stops the thread. A closed ``Database`` may be opened again.
    """

    def __init__(self, path: Path | str, *, fsync: bool) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Connect now, so a file that is not a database fails here (``sqlite3.DatabaseError``)."""
        await self.run(lambda _conn: None)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the database thread and return its result (or raise its error)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="sqlite-" + self.path.name
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    async def close(self) -> None:
        """Close the connection on its thread, then stop the thread; idempotent."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, self._disconnect)
        finally:
            # The close job was the last one queued, so this does not wait on the disk.
            executor.shutdown(wait=True)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = connect(self.path, fsync=self.fsync)
        return fn(self._conn)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def quick_check(conn: sqlite3.Connection) -> str | None:
    """``None`` when ``PRAGMA quick_check`` finds the file sound, else its first complaint."""
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
    return None if problems == ["ok"] else "; ".join(str(p) for p in problems)


@dataclass(frozen=True, slots=True)
class Damage:
    """A damaged file found by ``open_checked``: what was wrong, and where the file went."""

    problem: str
    moved_to: Path


async def open_checked(db: Database, *, stamp: int) -> Damage | None:
    """Open ``db``; if its file is damaged, move it aside, open a fresh file, and say so.

    Raises ``sqlite3.Error`` for failures that are not damage (permissions, a missing folder).
    """
    problem = await asyncio.to_thread(_emptied, db.path)
    if problem is None:
        try:
            problem = await db.run(quick_check)
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise
            problem = str(exc)
    if problem is None:
        return None
    await db.close()
    moved_to = await asyncio.to_thread(move_aside, db.path, stamp)
    await db.open()
    return Damage(problem=problem, moved_to=moved_to)


def _emptied(path: Path) -> str | None:
    """A problem when ``path`` exists with zero bytes and no WAL (a database has a header)."""
    wal = path.with_name(path.name + "-wal")
    try:
        empty = path.stat().st_size == 0 and (not wal.exists() or wal.stat().st_size == 0)
    except FileNotFoundError:
        return None
    return "the file exists but is empty: it was truncated" if empty else None


def move_aside(path: Path, stamp: int) -> Path:
    """Rename a damaged ``path`` (with its WAL) to ``<name>.corrupt-<stamp>``; return the new path.

    The WAL moves with the file under the name SQLite expects, so reading the moved copy still
    sees the committed frames. The shared-memory index is rebuilt from the WAL, so it is removed.
    """
    aside = path.with_name(path.name + ".corrupt-" + str(stamp))
    suffix = 0
    while aside.exists():
        suffix += 1
        aside = path.with_name(path.name + ".corrupt-" + str(stamp) + "." + str(suffix))
    path.rename(aside)
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        wal.rename(aside.with_name(aside.name + "-wal"))
    path.with_name(path.name + "-shm").unlink(missing_ok=True)
    return aside


@dataclass(frozen=True, slots=True)
class Salvage:
    """Rows read back from a damaged file, and how many were lost.

    ``lost`` is exact when the table (or the owner's own tally) could still be counted; otherwise
    it is an estimate from
    the span of keys that were read (``lost_exact`` is False), or ``None`` when nothing could
    be learned about the table at all.
    """

    rows: list[tuple[Any, ...]]
    lost: int | None
    lost_exact: bool


def read_damaged_rows(
    path: Path,
    table: str,
    columns: Sequence[str],
    *,
    expected_sql: str | None = None,
    max_probes: int = 256,
) -> Salvage:
    """Copy out every row of ``table`` that can still be read from the damaged file at ``path``.

    ``columns[0]`` must be the table's positive ``INTEGER PRIMARY KEY``. A forward scan stops at
    the first damaged page; we then seek past it with growing skips (at most ``max_probes``
    seeks), scan back from each landing point, and finally scan down from the top.
    ``expected_sql`` is a query for the row count the owner kept elsewhere in the file, used
    when the table itself can no longer be counted. ``table`` and ``columns`` are trusted names
    from our own schema, never user input.
    """
    reader = _DamagedReader(table, columns, expected_sql)
    try:
        conn = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error:
        return Salvage(rows=[], lost=None, lost_exact=False)
    with closing(conn):
        try:
            # Trust the file's real size over a damaged page count in its header.
            conn.execute("PRAGMA writable_schema = ON")
            conn.execute("PRAGMA query_only = ON")
        except sqlite3.Error:
            return Salvage(rows=[], lost=None, lost_exact=False)
        top = reader.max_key(conn)
        reader.scan_forward(conn, top, max_probes)
        reader.scan_down(conn, MAX_KEY)
        return reader.result(conn)


class _DamagedReader:
    """The scans behind ``read_damaged_rows``; collects rows by key."""

    def __init__(self, table: str, columns: Sequence[str], expected_sql: str | None) -> None:
        cols = ", ".join(columns)
        key = columns[0]
        self._table = table
        self._up = f"SELECT {cols} FROM {table} WHERE {key} > ? ORDER BY {key}"  # noqa: S608 - our schema
        self._down = f"SELECT {cols} FROM {table} WHERE {key} < ? ORDER BY {key} DESC"  # noqa: S608
        self._max = f"SELECT max({key}) FROM {table}"  # noqa: S608 - our own schema names
        self._counts = [f"SELECT count(*) FROM {table}"]  # noqa: S608 - our own schema names
        self._counts += [expected_sql] if expected_sql else []
        self.rows: dict[int, tuple[Any, ...]] = {}

    def max_key(self, conn: sqlite3.Connection) -> int | None:
        try:
            value = conn.execute(self._max).fetchone()[0]
        except sqlite3.Error:
            return None
        return value if isinstance(value, int) else None

    def scan_forward(self, conn: sqlite3.Connection, top: int | None, max_probes: int) -> None:
        base, skip, skipped = 0, 1, False
        for _ in range(max_probes):
            first, last, clean = self._scan_up(conn, base if not skipped else base + skip)
            if first is not None and skipped:
                self.scan_down(conn, first)
            if clean:
                return
            if last is not None:
                base, skip = last, 1
            elif skipped:
                skip *= 2
            skipped = True
            if (top is not None and base + skip > top) or skip > 2**48:
                return

    def scan_down(self, conn: sqlite3.Connection, below: int) -> None:
        try:
            for row in conn.execute(self._down, (below,)):
                if row[0] in self.rows:
                    return
                self.rows[row[0]] = tuple(row)
        except sqlite3.Error:
            return

    def _scan_up(self, conn: sqlite3.Connection, after: int) -> tuple[int | None, int | None, bool]:
        first: int | None = None
        last: int | None = None
        try:
            for row in conn.execute(self._up, (after,)):
                first = row[0] if first is None else first
                last = row[0]
                self.rows[row[0]] = tuple(row)
        except sqlite3.Error:
            return first, last, False
        return first, last, True

    def result(self, conn: sqlite3.Connection) -> Salvage:
        rows = [self.rows[k] for k in sorted(self.rows)]
        for sql in self._counts:
            try:
                total = int(conn.execute(sql).fetchone()[0])
            except (sqlite3.Error, TypeError, ValueError):
                continue
            return Salvage(rows=rows, lost=max(0, total - len(rows)), lost_exact=True)
        if not rows:
            return Salvage(rows=rows, lost=None, lost_exact=False)
        span = rows[-1][0] - rows[0][0] + 1
        return Salvage(rows=rows, lost=span - len(rows), lost_exact=False)
