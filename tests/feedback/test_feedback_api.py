"""POST /v1/feedback answers once durable; the agent serves on with its upstream down."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from conftest import Agent, MakeAgent, wait_for
from feedback.kit import breast_cancer_data, breast_cancer_files, infer_doc, outbox_records

from agent.app import SHIPPER


async def predict_many(agent: Agent, prefix: str, count: int) -> list[str]:
    """``count`` one-row predictions with ids ``<prefix><i>``; returns the ids."""
    rows, _ = breast_cancer_data()
    ids = [f"{prefix}{i}" for i in range(count)]
    for i, rid in enumerate(ids):
        status, body = await agent.infer_json("breast_cancer", infer_doc(rid, rows[i : i + 1]))
        assert status == 200, body
    return ids


async def post_feedback(agent: Agent, doc: object) -> dict[str, Any]:
    """POST /v1/feedback, expecting 200; the decoded body."""
    async with agent.client.post(agent.url + "/v1/feedback", json=doc) as resp:
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
    return answer


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class TestDurable:
    async def test_acknowledged_feedback_is_in_the_outbox_file(self, make_agent: MakeAgent) -> None:
        """Right after the 200, a separate read-only connection finds every record in the file."""
        agent = await make_agent(breast_cancer_files())
        ids = await predict_many(agent, "d", 12)
        answer = await post_feedback(
            agent, {"feedback": [{"id": rid, "label": i % 2} for i, rid in enumerate(ids)]}
        )
        assert answer["accepted"] == 12
        stored = outbox_records(Path(agent.config.state.dir) / "outbox.db", "feedback")
        assert sorted(r["id"] for r in stored) == sorted(ids)
        assert all(r["model"] == "breast_cancer" and r["version"] == 1 for r in stored)

    async def test_each_request_is_durable_on_its_own(self, make_agent: MakeAgent) -> None:
        """Feedback sent one record per request is in the file after each answer."""
        agent = await make_agent(breast_cancer_files())
        ids = await predict_many(agent, "one", 5)
        outbox = Path(agent.config.state.dir) / "outbox.db"
        for n, rid in enumerate(ids, start=1):
            await post_feedback(agent, {"id": rid, "label": "benign"})
            assert len(outbox_records(outbox, "feedback")) == n


class TestUpstreamDown:
    async def test_agent_serves_and_stays_ready_with_upstream_down(
        self, make_agent: MakeAgent
    ) -> None:
        """With the upstream refusing connections the agent stays ready, serves and keeps data."""
        url = f"http://127.0.0.1:{closed_port()}/v1/batches"
        overrides = {
            "upstream": {"url": url, "flush_interval_s": 0.1, "max_backoff_s": 0.2},
            # The last flush at shutdown tries for min(5 s, drain timeout): keep teardown short.
            "server": {"drain_timeout_s": 0.5},
        }
        agent = await make_agent(breast_cancer_files(), overrides)
        async with agent.client.get(agent.url + "/v2/health/ready") as resp:
            assert resp.status == 200
        ids = await predict_many(agent, "down", 4)
        answer = await post_feedback(agent, {"feedback": [{"id": i, "label": 0} for i in ids]})
        assert answer["accepted"] == 4
        shipper = agent.app[SHIPPER]
        await wait_for(lambda: shipper.stats().outcomes["connection_error"] >= 3)
        async with agent.client.get(agent.url + "/v2/health/ready") as resp:
            assert resp.status == 200
        await predict_many(agent, "still", 2)
        stored = outbox_records(Path(agent.config.state.dir) / "outbox.db", "feedback")
        assert sorted(r["id"] for r in stored) == sorted(ids)
        async with agent.client.get(agent.url + "/v1/models") as resp:
            upstream = (await resp.json())["upstream"]
        assert upstream["consecutive_failures"] >= 3
        assert upstream["outbox_records"] >= 4


class TestFullDisk:
    async def test_a_full_disk_refuses_feedback_with_503(self, make_agent: MakeAgent) -> None:
        """When the outbox cannot write, feedback is 503 + Retry-After and nothing is accepted."""
        from agent.app import OUTBOX

        agent = await make_agent(breast_cancer_files())
        ids = await predict_many(agent, "full", 4)
        outbox = agent.app[OUTBOX]

        def cap(conn: Any) -> None:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")  # the "disk" is now full

        await outbox._db.run(cap)  # simulate a full disk on the real file
        before = outbox.stats().records["feedback"]
        big = [{"id": rid, "label": 1} for rid in ids] * 200  # enough to need new pages
        async with agent.client.post(agent.url + "/v1/feedback", json={"feedback": big}) as r:
            assert r.status == 503
            assert int(r.headers["Retry-After"]) >= 1
            assert "disk full" in (await r.json())["error"]
        assert outbox.stats().records["feedback"] == before
        status, _ = await agent.infer_json(
            "breast_cancer", infer_doc("after", breast_cancer_data()[0][:1])
        )
        assert status == 200  # serving goes on
