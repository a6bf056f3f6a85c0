"""The reference collector (scripts/collector.py): auth, dedup, queries, failure injection."""

from __future__ import annotations

import asyncio
import gzip
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest
from conftest import load_collector

TOKEN = "tok-1"
ROOT = Path(__file__).resolve().parents[2]


class Client:
    """Talks to one running collector."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http
        self.auth = {"Authorization": "Bearer " + TOKEN}

    async def send(
        self,
        doc: dict[str, Any],
        *,
        fmt: str = "msgpack",
        zipped: bool = True,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any], Any]:
        """POST a batch document; returns status, JSON answer and headers."""
        body = msgpack.packb(doc) if fmt == "msgpack" else orjson.dumps(doc)
        sent = {
            "Content-Type": "application/" + fmt,
            "Idempotency-Key": doc["batch"],
            **self.auth,
            **(headers or {}),
        }
        if zipped:
            body, sent["Content-Encoding"] = gzip.compress(body), "gzip"
        async with self.http.post(self.url + "/v1/batches", data=body, headers=sent) as r:
            return r.status, await r.json(), r.headers

    async def get(self, path: str, **params: str) -> tuple[int, Any]:
        async with self.http.get(self.url + path, params=params, headers=self.auth) as r:
            return r.status, await r.json()


def batch(key: str, records: list[dict[str, Any]], agent: str = "a1") -> dict[str, Any]:
    return {"agent": agent, "batch": key, "sent_at": 1_800_000_000.0, "records": records}


def rec(
    kind: str, ts: float, model: str = "iris", version: int = 1, **payload: Any
) -> dict[str, Any]:
    return {"kind": kind, "ts": ts, "model": model, "version": version, **payload}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    """A collector on an ephemeral port with one token, and a client for it."""
    runner, url = await load_collector().start_collector(tmp_path / "c.db", [TOKEN])
    try:
        async with aiohttp.ClientSession() as http:
            yield Client(url, http)
    finally:
        await runner.cleanup()


class TestAuth:
    @pytest.mark.parametrize("given", [None, "Bearer wrong", "Basic dG9rLTE=", "Bearer"])
    async def test_bad_or_missing_token_is_401(self, client: Client, given: str | None) -> None:
        """Without the right bearer token a batch is refused with 401 and nothing stored."""
        headers = {"Authorization": given} if given else {}
        client.auth = {}
        status, answer, _ = await client.send(batch("k1", [rec("event", 1.0)]), headers=headers)
        assert status == 401
        assert "token" in answer["error"]
        client.auth = {"Authorization": "Bearer " + TOKEN}
        assert (await client.get("/v1/agents"))[1] == {"agents": []}

    async def test_queries_need_the_token_too(self, client: Client) -> None:
        """The query API answers 401 without the token."""
        async with client.http.get(client.url + "/v1/agents") as r:
            assert r.status == 401


class TestIngest:
    @pytest.mark.parametrize(
        ("fmt", "zipped"), [("msgpack", True), ("msgpack", False), ("json", True)]
    )
    async def test_accepts_msgpack_and_json_plain_or_gzip(
        self, client: Client, fmt: str, zipped: bool
    ) -> None:
        """A batch in either format, gzipped or not, is stored record by record."""
        status, answer, _ = await client.send(
            batch("k1", [rec("feedback", 1.0, id="p1", label=1)]), fmt=fmt, zipped=zipped
        )
        assert (status, answer) == (200, {"accepted": 1, "duplicate": False})
        _, found = await client.get("/v1/records")
        assert [r["record"] for r in found["records"]] == [
            {"kind": "feedback", "ts": 1.0, "model": "iris", "version": 1, "id": "p1", "label": 1}
        ]

    async def test_resent_key_is_a_duplicate_stored_once(self, client: Client) -> None:
        """The same Idempotency-Key twice answers duplicate and stores the records once."""
        doc = batch("k1", [rec("event", 1.0), rec("event", 2.0)])
        first = await client.send(doc)
        again = await client.send(doc)
        assert (first[0], first[1]) == (200, {"accepted": 2, "duplicate": False})
        assert (again[0], again[1]) == (200, {"accepted": 0, "duplicate": True})
        _, found = await client.get("/v1/records")
        assert len(found["records"]) == 2
        _, agents = await client.get("/v1/agents")
        assert agents["agents"][0]["batches"] == 1

    async def test_unknown_content_type_is_415(self, client: Client) -> None:
        """A body that is neither msgpack nor JSON is refused with 415."""
        async with client.http.post(
            client.url + "/v1/batches",
            data=b"x",
            headers={**client.auth, "Content-Type": "text/csv"},
        ) as r:
            assert r.status == 415

    @pytest.mark.parametrize(
        "doc",
        [
            [1, 2],
            {"agent": "", "batch": "k", "records": []},
            {"agent": "a", "batch": "k", "records": [{"ts": 1}]},
            {"agent": "a", "records": []},
        ],
    )
    async def test_malformed_batch_is_400(self, client: Client, doc: Any) -> None:
        """A document without agent, key, or kinds on its records is refused with 400."""
        body = msgpack.packb(doc)
        headers = {**client.auth, "Content-Type": "application/msgpack"}
        async with client.http.post(client.url + "/v1/batches", data=body, headers=headers) as r:
            assert r.status == 400

    async def test_key_header_must_match_document(self, client: Client) -> None:
        """An Idempotency-Key that differs from the document's batch key is a 400."""
        status, answer, _ = await client.send(batch("k1", []), headers={"Idempotency-Key": "other"})
        assert status == 400
        assert "differs" in answer["error"]


class TestQueries:
    async def test_agents_lists_records_by_kind(self, client: Client) -> None:
        """GET /v1/agents gives each agent's batches and records by kind."""
        await client.send(batch("k1", [rec("event", 1.0), rec("drift", 2.0)], agent="a1"))
        await client.send(batch("k2", [rec("event", 3.0)], agent="a1"))
        await client.send(batch("k3", [rec("capture", 4.0)], agent="b2"))
        _, found = await client.get("/v1/agents")
        summary = {a["agent"]: (a["batches"], a["records"]) for a in found["agents"]}
        assert summary == {"a1": (2, {"event": 2, "drift": 1}), "b2": (1, {"capture": 1})}
        assert all(a["last_seen"] >= a["first_seen"] > 0 for a in found["agents"])

    async def test_records_filter_by_kind_agent_and_limit(self, client: Client) -> None:
        """GET /v1/records filters by kind and agent and honours limit and after."""
        await client.send(batch("k1", [rec("event", float(i)) for i in range(5)], agent="a1"))
        await client.send(batch("k2", [rec("event", 9.0), rec("drift", 10.0)], agent="b2"))
        _, b2 = await client.get("/v1/records", kind="event", agent="b2")
        assert [r["record"]["ts"] for r in b2["records"]] == [9.0]
        _, page = await client.get("/v1/records", agent="a1", limit="2")
        _, rest = await client.get("/v1/records", agent="a1", after=str(page["records"][-1]["seq"]))
        assert [r["record"]["ts"] for r in page["records"] + rest["records"]] == [0, 1, 2, 3, 4]

    async def test_agent_detail_has_versions_drift_and_quality(self, client: Client) -> None:
        """GET /v1/agents/{agent} shows versions, the latest drift status, and accuracy."""
        records = [
            rec("drift", 1.0, version=1, status="ok"),
            rec("event", 2.0, version=2, event="drift_status_changed", status="alert"),
            rec("event", 3.0, version=2, event="model_swapped", status="active"),
            rec("feedback", 4.0, version=2, id="p1", label=1, predicted=1),
            rec("feedback", 5.0, version=2, id="p2", label=0, predicted=1),
            rec("feedback", 6.0, version=2, id="p3", label=2, predicted=2),
            rec("feedback", 7.0, version=1, id="p4", label="cat", predicted="cat"),
            rec("feedback", 8.0, version=2, id="p5", value=3.5),
            rec("drift", 9.0, model="other", status="warn"),
        ]
        await client.send(batch("k1", records))
        status, found = await client.get("/v1/agents/a1")
        assert status == 200
        iris = found["models"]["iris"]
        assert iris["versions"] == [1, 2]
        assert (iris["drift"]["status"], iris["drift"]["version"]) == ("alert", 2)
        assert iris["quality"] == {"labelled": 4, "correct": 3, "accuracy": 0.75}
        assert iris["quality_by_version"]["2"]["accuracy"] == pytest.approx(2 / 3)
        assert found["models"]["other"]["drift"]["status"] == "warn"

    async def test_unknown_agent_is_404(self, client: Client) -> None:
        """An agent that never sent anything is a 404 with a hint."""
        status, answer = await client.get("/v1/agents/nobody")
        assert status == 404
        assert "/v1/agents" in answer["error"]


class TestFailureInjection:
    async def test_next_posts_fail_then_recover(self, client: Client) -> None:
        """POST /v1/_fail makes the next N batch POSTs answer the status, with Retry-After."""
        body = {"status": 503, "count": 2, "retry_after": 1}
        async with client.http.post(client.url + "/v1/_fail", json=body, headers=client.auth) as r:
            assert r.status == 200
        answers = [await client.send(batch("k" + str(i), [rec("event", 1.0)])) for i in range(3)]
        assert [a[0] for a in answers] == [503, 503, 200]
        assert answers[0][2]["Retry-After"] == "1"
        _, found = await client.get("/v1/records")
        assert len(found["records"]) == 1

    async def test_after_store_keeps_the_batch(self, client: Client) -> None:
        """With after_store the batch is stored although the answer is a failure."""
        body = {"status": 503, "count": 1, "after_store": True}
        async with client.http.post(client.url + "/v1/_fail", json=body, headers=client.auth) as r:
            assert r.status == 200
        doc = batch("k1", [rec("event", 1.0)])
        assert (await client.send(doc))[0] == 503
        assert (await client.send(doc))[1] == {"accepted": 0, "duplicate": True}


class TestCommandLine:
    async def test_prints_its_port_and_serves(self, tmp_path: Path) -> None:
        """Run as a script, it prints the bound URL on one line and answers queries."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "scripts/collector.py"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--db",
            str(tmp_path / "cli.db"),
            "--token",
            TOKEN,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 20.0)).decode().strip()
            assert line.startswith("collector listening on http://127.0.0.1:")
            url = line.rsplit(" ", 1)[1]
            async with aiohttp.ClientSession() as http:
                headers = {"Authorization": "Bearer " + TOKEN}
                async with http.get(url + "/v1/agents", headers=headers) as r:
                    assert (r.status, await r.json()) == (200, {"agents": []})
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 20.0)
        assert code == 0
