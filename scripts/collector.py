"""Reference collector: receives edge-agent batches, de-duplicates them by key, keeps them.

Run it::

    python scripts/collector.py --host 127.0.0.1 --port 8099 --db collector.db --token T

It prints ``collector listening on http://HOST:PORT`` once bound (``--port 0`` picks a free port).
Import it (tests, demo): ``build_collector_app(db_path, tokens)`` returns the aiohttp app and
``start_collector(...)`` runs it on an ephemeral port.

Routes (every one needs ``Authorization: Bearer <token>`` when tokens are given, else 401):

    POST /v1/batches          a batch (SPEC section 10): msgpack or JSON by Content-Type,
                              optionally gzip; de-duplicated by Idempotency-Key (a resent key
                              answers 200 {"duplicate": true} and stores nothing twice)
    GET  /v1/agents           per agent: first and last seen, batches, records by kind
    GET  /v1/agents/{agent}   last seen, model versions seen, latest drift status per model
                              (``drift`` records, or ``event`` records whose ``event`` names
                              drift, carrying ``status``), quality from ``feedback`` records
                              carrying ``label`` and ``predicted`` (accuracy)
    GET  /v1/records          ?kind=&agent=&after=&limit= (ascending; ``seq`` pages with after)
    POST /v1/_fail            test hook: {"status": 503, "count": 3, "retry_after": 1,
                              "after_store": false} makes the next ``count`` batch POSTs answer
                              ``status`` (after storing the batch when ``after_store``, which
                              simulates a reply lost on the way back)

This script is standalone on purpose (aiohttp, msgpack, orjson): copy it anywhere to start.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import signal
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import orjson
from aiohttp import web

T = TypeVar("T")

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_LIMIT = 10_000
MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    key      TEXT PRIMARY KEY,
    agent    TEXT NOT NULL,
    sent_at  REAL,
    received REAL NOT NULL,
    records  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    seq      INTEGER PRIMARY KEY,
    agent    TEXT NOT NULL,
    batch    TEXT NOT NULL,
    kind     TEXT NOT NULL,
    ts       REAL,
    model    TEXT,
    version,
    received REAL NOT NULL,
    body     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_agent ON records (agent, kind, seq);
CREATE INDEX IF NOT EXISTS records_by_kind ON records (kind, seq);
CREATE TABLE IF NOT EXISTS agents (
    agent      TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL,
    batches    INTEGER NOT NULL
);
"""

_DRIFT_SQL = """
SELECT model, version, kind, ts, json_extract(body, '$.status') FROM records
WHERE agent = ? AND model IS NOT NULL AND json_extract(body, '$.status') IS NOT NULL
  AND (kind = 'drift' OR (kind = 'event' AND json_extract(body, '$.event') LIKE '%drift%'))
ORDER BY ts, seq
"""

_QUALITY_SQL = """
SELECT model, version, count(*),
       sum(json_extract(body, '$.label') = json_extract(body, '$.predicted'))
FROM records
WHERE agent = ? AND kind = 'feedback' AND model IS NOT NULL
  AND json_extract(body, '$.label') IS NOT NULL AND json_extract(body, '$.predicted') IS NOT NULL
GROUP BY model, version
"""


class BadBatch(Exception):
    """A batch the collector cannot accept; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Incoming:
    """A decoded, checked batch."""

    agent: str
    key: str
    sent_at: float | None
    records: list[dict[str, Any]]


class Store:
    """The collector's SQLite file, reached through one connection on one thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collector-db")
        self._conn: sqlite3.Connection | None = None

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return fn(self._conn)

    async def close(self) -> None:
        """Close the connection and stop the thread."""

        def shut(_conn: sqlite3.Connection) -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if self._conn is not None:
            await self.run(shut)
        self._executor.shutdown(wait=True)


def ingest(conn: sqlite3.Connection, batch: Incoming, now: float) -> bool:
    """Store a batch once; False (and nothing stored) when its key was seen before."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        fresh = conn.execute(
            "INSERT OR IGNORE INTO batches (key, agent, sent_at, received, records) "
            "VALUES (?, ?, ?, ?, ?)",
            (batch.key, batch.agent, batch.sent_at, now, len(batch.records)),
        ).rowcount
        if fresh:
            conn.executemany(
                "INSERT INTO records (agent, batch, kind, ts, model, version, received, body) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [_record_row(batch, r, now) for r in batch.records],
            )
        conn.execute(
            "INSERT INTO agents (agent, first_seen, last_seen, batches) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (agent) DO UPDATE SET last_seen = excluded.last_seen, "
            "batches = batches + excluded.batches",
            (batch.agent, now, now, 1 if fresh else 0),
        )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return bool(fresh)


def _record_row(batch: Incoming, record: dict[str, Any], now: float) -> tuple[Any, ...]:
    version = record.get("version")
    if not isinstance(version, int | str | None):
        version = str(version)
    ts = record.get("ts")
    return (
        batch.agent,
        batch.key,
        str(record["kind"]),
        float(ts) if isinstance(ts, int | float) else None,
        None if record.get("model") is None else str(record["model"]),
        version,
        now,
        _dumps(record).decode(),
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode("ascii")
    raise TypeError("cannot store " + type(obj).__name__)


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, default=_json_default, option=orjson.OPT_NON_STR_KEYS)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_dumps(data), status=status, headers=headers, content_type="application/json"
    )


# -- decoding a batch --------------------------------------------------------------------


def decode(body: bytes, content_type: str) -> Any:
    """msgpack or JSON by Content-Type."""
    try:
        if content_type in MSGPACK_TYPES:
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        if content_type == "application/json":
            return orjson.loads(body)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BadBatch(400, "cannot decode " + content_type + " body: " + str(exc)) from exc
    raise BadBatch(415, "Content-Type " + repr(content_type) + " unsupported; send msgpack or json")


def check(doc: Any, header_key: str | None) -> Incoming:
    """The batch document's shape: agent, batch, sent_at, records with a kind each."""
    if not isinstance(doc, dict):
        raise BadBatch(400, "batch must be a map with agent, batch, sent_at, records")
    agent, key, records = doc.get("agent"), doc.get("batch"), doc.get("records")
    if not isinstance(agent, str) or not agent:
        raise BadBatch(400, "batch.agent must be a non-empty string")
    if not isinstance(key, str) or not key:
        raise BadBatch(400, "batch.batch (the key) must be a non-empty string")
    if header_key is not None and header_key != key:
        raise BadBatch(400, "Idempotency-Key " + repr(header_key) + " differs from " + repr(key))
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get("kind"), str) for r in records
    ):
        raise BadBatch(400, "batch.records must be a list of maps, each with a string kind")
    sent_at = doc.get("sent_at")
    return Incoming(
        agent, key, float(sent_at) if isinstance(sent_at, int | float) else None, records
    )


# -- the app -----------------------------------------------------------------------------


@dataclass(slots=True)
class FailPlan:
    """Answers injected by POST /v1/_fail (test hook)."""

    status: int = 503
    count: int = 0
    retry_after: str | None = None
    after_store: bool = False

    def take(self) -> FailPlan | None:
        """Use up one injected failure, if any are left."""
        if self.count <= 0:
            return None
        self.count -= 1
        return FailPlan(self.status, 1, self.retry_after, self.after_store)

    def response(self) -> web.Response:
        headers = {} if self.retry_after is None else {"Retry-After": self.retry_after}
        return _json({"error": "injected failure " + str(self.status)}, self.status, headers)


STORE = web.AppKey("store", Store)
TOKENS = web.AppKey("tokens", tuple)
FAIL = web.AppKey("fail", FailPlan)


@web.middleware
async def _auth(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    tokens: tuple[str, ...] = request.app[TOKENS]
    if tokens:
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and any(
            hmac.compare_digest(token.strip().encode(), t.encode()) for t in tokens
        )
        if not ok:
            headers = {"WWW-Authenticate": 'Bearer realm="collector"'}
            return _json({"error": "missing or wrong bearer token"}, 401, headers)
    response: web.StreamResponse = await handler(request)
    return response


async def post_batch(request: web.Request) -> web.Response:
    """Receive one batch; store it unless its key was seen before."""
    plan = request.app[FAIL].take()
    if plan is not None and not plan.after_store:
        return plan.response()
    try:
        # aiohttp inflates gzip/deflate bodies as it reads them, within client_max_size.
        body = await request.read()
        batch = check(decode(body, request.content_type), request.headers.get("Idempotency-Key"))
    except BadBatch as exc:
        return _json({"error": str(exc)}, exc.status)
    fresh = await request.app[STORE].run(lambda conn: ingest(conn, batch, time.time()))
    if plan is not None:
        return plan.response()
    return _json({"accepted": len(batch.records) if fresh else 0, "duplicate": not fresh})


async def post_fail(request: web.Request) -> web.Response:
    """Test hook: make the next ``count`` batch POSTs answer ``status``."""
    try:
        spec = orjson.loads(await request.read())
        status, count = int(spec.get("status", 503)), int(spec.get("count", 1))
    except (ValueError, TypeError, AttributeError) as exc:
        return _json({"error": "send {status, count, retry_after, after_store}: " + str(exc)}, 400)
    retry_after = spec.get("retry_after")
    plan = request.app[FAIL]
    plan.status, plan.count = status, max(0, count)
    plan.retry_after = None if retry_after is None else str(retry_after)
    plan.after_store = bool(spec.get("after_store", False))
    return _json({"status": plan.status, "count": plan.count})


def _agents(conn: sqlite3.Connection, agent: str | None = None) -> list[dict[str, Any]]:
    where, args = ("WHERE agent = ?", (agent,)) if agent is not None else ("", ())
    out = {
        row[0]: dict(agent=row[0], first_seen=row[1], last_seen=row[2], batches=row[3], records={})
        for row in conn.execute(
            "SELECT agent, first_seen, last_seen, batches FROM agents " + where + " ORDER BY agent",
            args,
        )
    }
    for name, kind, count in conn.execute(
        "SELECT agent, kind, count(*) FROM records " + where + " GROUP BY agent, kind", args
    ):
        if name in out:
            out[name]["records"][kind] = count
    return list(out.values())


async def get_agents(request: web.Request) -> web.Response:
    """Every agent seen: first and last seen, batches, records by kind."""
    return _json({"agents": await request.app[STORE].run(_agents)})


def _models(conn: sqlite3.Connection, agent: str) -> dict[str, dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {}

    def model(name: str) -> dict[str, Any]:
        fresh: dict[str, Any] = {"versions": [], "drift": None, "quality": None}
        return models.setdefault(name, {**fresh, "quality_by_version": {}})

    for name, version in conn.execute(
        "SELECT model, version FROM records WHERE agent = ? AND model IS NOT NULL "
        "GROUP BY model, version ORDER BY model, version",
        (agent,),
    ):
        model(name)["versions"].append(version)
    for name, version, kind, ts, status in conn.execute(_DRIFT_SQL, (agent,)):
        model(name)["drift"] = {"status": status, "version": version, "kind": kind, "ts": ts}
    for name, version, labelled, correct in conn.execute(_QUALITY_SQL, (agent,)):
        entry = model(name)
        entry["quality_by_version"][str(version)] = _quality(labelled, correct or 0)
        total = entry["quality"] or {"labelled": 0, "correct": 0}
        entry["quality"] = _quality(total["labelled"] + labelled, total["correct"] + (correct or 0))
    return models


def _quality(labelled: int, correct: int) -> dict[str, Any]:
    return {"labelled": labelled, "correct": correct, "accuracy": correct / labelled}


async def get_agent(request: web.Request) -> web.Response:
    """One agent: last seen, model versions, latest drift status and quality per model."""
    name = request.match_info["agent"]

    def read(conn: sqlite3.Connection) -> dict[str, Any] | None:
        found = _agents(conn, name)
        return None if not found else {**found[0], "models": _models(conn, name)}

    report = await request.app[STORE].run(read)
    if report is None:
        return _json(
            {"error": "agent " + repr(name) + " has sent nothing; see GET /v1/agents"}, 404
        )
    return _json(report)


async def get_records(request: web.Request) -> web.Response:
    """Stored records, oldest first, filtered by kind and agent."""
    query = request.query
    try:
        limit = min(MAX_LIMIT, max(1, int(query.get("limit", "100"))))
        after = int(query.get("after", "0"))
    except ValueError:
        return _json({"error": "limit and after must be integers"}, 400)
    clauses: list[str] = ["seq > ?"]
    args: list[Any] = [after]
    for column in ("kind", "agent"):
        if query.get(column):
            clauses.append(column + " = ?")
            args.append(query[column])

    def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        rows = conn.execute(
            "SELECT seq, agent, batch, received, body FROM records WHERE "
            + " AND ".join(clauses)
            + " ORDER BY seq LIMIT ?",
            (*args, limit),
        )
        return [
            {"seq": s, "agent": a, "batch": b, "received": r, "record": orjson.loads(body)}
            for s, a, b, r, body in rows
        ]

    return _json({"records": await request.app[STORE].run(read)})


def build_collector_app(
    db_path: Path | str, tokens: Sequence[str] = (), *, test_hooks: bool = True
) -> web.Application:
    """The collector as an aiohttp app storing into ``db_path``; ``tokens`` empty means no auth."""
    app = web.Application(middlewares=[_auth], client_max_size=MAX_BODY_BYTES)
    app[TOKENS] = tuple(tokens)
    app[FAIL] = FailPlan()

    async def store_ctx(app: web.Application) -> Any:
        app[STORE] = Store(Path(db_path))
        await app[STORE].run(lambda _conn: None)
        yield
        await app[STORE].close()

    app.cleanup_ctx.append(store_ctx)
    app.router.add_post("/v1/batches", post_batch)
    app.router.add_get("/v1/agents", get_agents)
    app.router.add_get("/v1/agents/{agent}", get_agent)
    app.router.add_get("/v1/records", get_records)
    if test_hooks:
        app.router.add_post("/v1/_fail", post_fail)
    return app


async def start_collector(
    db_path: Path | str, tokens: Sequence[str] = (), *, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Run the collector on ``host:port``; returns the runner (call ``cleanup()``) and its URL."""
    runner = web.AppRunner(build_collector_app(db_path, tokens), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, "http://" + str(bound_host) + ":" + str(bound_port)


async def _serve(args: argparse.Namespace) -> None:
    runner, url = await start_collector(args.db, args.token or (), host=args.host, port=args.port)
    print("collector listening on " + url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(description="edge-agent reference collector")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--db", default="collector.db", help="SQLite file to store batches in")
    parser.add_argument("--token", action="append", help="accepted bearer token (repeatable)")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
