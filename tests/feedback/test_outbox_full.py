"""A full outbox in the real app: captures go first, then metrics, then drift; feedback last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import Agent, MakeAgent, wait_for
from feedback.kit import breast_cancer_data, breast_cancer_files, infer_doc, outbox_records

from agent.app import OUTBOX
from agent.upstream.outbox import OutboxRecord

MAX_BYTES = 65_536  # the smallest [outbox] max_bytes the config accepts
PREDICTIONS = 300
EXTRA = 5  # metrics and drift records put in before the captures


async def predict_all(agent: Agent) -> list[str]:
    """One prediction per example row (cycling), each captured (capture rate 1.0)."""
    rows, _ = breast_cancer_data()
    ids = [f"p{i:03d}" for i in range(PREDICTIONS)]
    for i, rid in enumerate(ids):
        row = rows[i % len(rows)][None, :]
        status, body = await agent.infer_json("breast_cancer", infer_doc(rid, row))
        assert status == 200, body
    return ids


def check_drop_order(stats: Any) -> None:
    """No kind is dropped while a less valuable kind is still stored."""
    order = ("capture", "metrics", "drift")
    for cheaper, dearer in zip(order, (*order[1:], "feedback"), strict=True):
        if stats.dropped[dearer] or (dearer == "feedback" and stats.dropped["event"]):
            assert stats.records[cheaper] == 0, (cheaper, dearer, stats)
    assert stats.total_bytes <= MAX_BYTES


class TestFullOutbox:
    async def test_drop_order_and_counters(self, make_agent: MakeAgent) -> None:
        """Captures, then metrics, then drift go first; the newest feedback stays; drops count."""
        overrides = {
            "outbox": {"max_bytes": MAX_BYTES},
            "capture": {"rate": 1.0},
            "feedback": {"input_sample_rate": 1.0},
        }
        agent = await make_agent(breast_cancer_files(), overrides)
        outbox = agent.app[OUTBOX]
        # Metrics snapshots and drift windows come from components on their own schedules
        # (minutes); put a few through the app's real outbox so every rank is present.
        await outbox.put_many(
            [OutboxRecord("metrics", 1.0, None, None, {"n": i}) for i in range(EXTRA)]
            + [OutboxRecord("drift", 1.0, "breast_cancer", 1, {"n": i}) for i in range(EXTRA)]
        )
        ids = await predict_all(agent)
        stats = outbox.stats
        await wait_for(
            lambda: stats().records["capture"] + stats().dropped["capture"] == PREDICTIONS
        )

        # Step 1: captures alone overflow the bound; only captures were dropped, oldest first.
        after_captures = stats()
        assert after_captures.dropped["capture"] > 0
        assert {
            k: after_captures.dropped[k] for k in ("metrics", "drift", "feedback", "event")
        } == {
            "metrics": 0,
            "drift": 0,
            "feedback": 0,
            "event": 0,
        }
        assert after_captures.total_bytes <= MAX_BYTES
        path = Path(agent.config.state.dir) / "outbox.db"
        kept = [r["id"] for r in outbox_records(path, "capture")]
        assert kept == ids[len(ids) - len(kept) :]  # the newest captures, in order

        # Step 2: feedback for every prediction pushes out the rest, rank by rank.
        for start in range(0, PREDICTIONS, 25):
            chunk = [{"id": rid, "label": 1} for rid in ids[start : start + 25]]
            async with agent.client.post(
                agent.url + "/v1/feedback", json={"feedback": chunk}
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["accepted"] == len(chunk)
            check_drop_order(stats())

        final = stats()
        assert final.dropped["capture"] == PREDICTIONS
        assert (final.dropped["metrics"], final.dropped["drift"]) == (EXTRA, EXTRA)
        feedback = [r["id"] for r in outbox_records(path, "feedback")]
        assert 0 < len(feedback) < PREDICTIONS
        assert feedback == ids[PREDICTIONS - len(feedback) :]  # the newest feedback is kept
        assert final.dropped["feedback"] == PREDICTIONS - len(feedback)
        assert final.records["feedback"] == len(feedback)

        # Step 3: the counters are exported as metrics.
        async with agent.client.get(agent.url + "/metrics") as resp:
            text = await resp.text()
        assert f'edge_agent_outbox{{kind="capture",measure="dropped"}} {PREDICTIONS}.0' in text
        assert f'edge_agent_outbox{{kind="metrics",measure="dropped"}} {EXTRA}.0' in text
