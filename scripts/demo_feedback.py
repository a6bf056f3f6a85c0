"""Feedback demo: predictions with ids, their ground truth, live quality, and the collector's view.

Against a running agent serving the example ``breast_cancer`` model, whose ``[upstream] url``
points at a running reference collector (scripts/collector.py)::

    python scripts/demo_feedback.py --agent http://127.0.0.1:8080 \\
        --collector http://127.0.0.1:8099 [--collector-token T] [--agent-token T]

It sends one prediction per row of examples/data/breast_cancer_rows.npy with its own id,
then the true labels (half by class index, half by class name, plus one id the agent never
saw), waits (bounded) until the collector holds every accepted record, and prints the
accepted/unknown counts, the live accuracy from ``GET /v1/models/breast_cancer`` and the
collector's ``GET /v1/agents/{agent}`` summary. ``scripts/demo_tour.py`` calls
``feedback_demo``; it returns the same figures as a dict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
MODEL = "breast_cancer"
CLASSES = ("malignant", "benign")


def _call(
    url: str, token: str | None = None, doc: object | None = None, timeout: float = 30.0
) -> tuple[int, Any]:
    """One JSON call (POST when ``doc`` is given); returns status and decoded body."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    body = None if doc is None else json.dumps(doc).encode()
    req = urllib.request.Request(
        url, data=body, headers=headers, method="GET" if doc is None else "POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _predict(agent: str, token: str | None, ids: list[str], rows: np.ndarray) -> list[int]:
    """One request per row, each with its id; returns the predicted class indices."""
    predicted = []
    for rid, row in zip(ids, rows, strict=True):
        doc = {
            "id": rid,
            "inputs": [
                {
                    "name": "float_input",
                    "shape": [1, row.size],
                    "datatype": "FP32",
                    "data": row.tolist(),
                }
            ],
        }
        status, body = _call(f"{agent}/v2/models/{MODEL}/infer", token, doc)
        if status != 200:
            raise SystemExit(f"prediction {rid} failed: {status} {body}")
        label = next(o for o in body["outputs"] if o["name"] == "label")
        predicted.append(int(label["data"][0]))
    return predicted


def _send_feedback(
    agent: str, token: str | None, ids: list[str], labels: np.ndarray, prefix: str
) -> dict[str, Any]:
    """The true labels (even rows by index, odd rows by class name) plus one unknown id."""
    records: list[dict[str, Any]] = [
        {"id": rid, "label": int(k) if i % 2 == 0 else CLASSES[int(k)]}
        for i, (rid, k) in enumerate(zip(ids, labels, strict=True))
    ]
    records.append({"id": prefix + "-never-predicted", "label": 0})
    status, answer = _call(f"{agent}/v1/feedback", token, {"feedback": records})
    if status != 200:
        raise SystemExit(f"feedback refused: {status} {answer}")
    return dict(answer)


def _live_quality(agent: str, token: str | None) -> dict[str, Any]:
    """Quality of the active version since start, from GET /v1/models/{model}."""
    status, model = _call(f"{agent}/v1/models/{MODEL}", token)
    if status != 200:
        raise SystemExit(f"GET /v1/models/{MODEL} failed: {status} {model}")
    version = str(model.get("active_version"))
    report = (model.get("quality") or {}).get(version, {})
    return {"version": version, **report.get("total", {})}


def _wait_collector(
    collector: str, token: str | None, wanted: set[str], timeout_s: float
) -> tuple[set[str], str | None]:
    """Poll the collector's feedback records until ``wanted`` all arrived (bounded).

    Returns the ids found and the agent id they came from.
    """
    found: set[str] = set()
    agent_id: str | None = None
    after = 0
    deadline = time.monotonic() + timeout_s
    while True:
        query = urllib.parse.urlencode({"kind": "feedback", "after": after, "limit": 10_000})
        status, page = _call(f"{collector}/v1/records?{query}", token)
        if status != 200:
            raise SystemExit(f"collector GET /v1/records failed: {status} {page}")
        for item in page["records"]:
            after = max(after, int(item["seq"]))
            if item["record"].get("id") in wanted:
                found.add(item["record"]["id"])
                agent_id = item["agent"]
        if found >= wanted or time.monotonic() > deadline:
            return found, agent_id
        if not page["records"]:
            time.sleep(0.25)


def feedback_demo(
    agent_url: str,
    collector_url: str,
    *,
    agent_token: str | None = None,
    collector_token: str | None = None,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Run the demo and print each step; returns the figures it printed."""
    agent, collector = agent_url.rstrip("/"), collector_url.rstrip("/")
    rows = np.load(DATA / "breast_cancer_rows.npy")
    labels = np.load(DATA / "breast_cancer_labels.npy")
    prefix = "demo-fb-" + uuid.uuid4().hex[:8]
    ids = [f"{prefix}-{i}" for i in range(len(rows))]

    print(f"\n=== Feedback: {len(ids)} predictions with ids {ids[0]} .. {ids[-1]}")
    predicted = _predict(agent, agent_token, ids, rows)
    offline = float(np.mean(np.array(predicted) == labels))

    print("=== Feedback: the true labels (half by index, half by class name, one unknown id)")
    answer = _send_feedback(agent, agent_token, ids, labels, prefix)
    print(
        f"accepted={answer['accepted']} unknown={answer['unknown']} "
        f"unknown_ids={answer.get('unknown_ids', [])}"
    )

    quality = _live_quality(agent, agent_token)
    print(
        f"live quality of {MODEL} v{quality['version']}: accuracy={quality.get('accuracy')} "
        f"labelled={quality.get('labelled')} (computed here from the answers: {offline:.4f})"
    )
    for name, counts in sorted(quality.get("per_class", {}).items()):
        print(f"  {name}: {counts['correct']}/{counts['count']} correct")

    print(f"=== Collector: waiting (up to {timeout_s:.0f} s) for the joined records")
    found, agent_id = _wait_collector(collector, collector_token, set(ids), timeout_s)
    print(f"collector holds {len(found)}/{len(ids)} of this run's feedback records")
    summary: dict[str, Any] = {}
    if agent_id is not None:
        _, summary = _call(f"{collector}/v1/agents/{urllib.parse.quote(agent_id)}", collector_token)
        model = (summary.get("models") or {}).get(MODEL, {})
        print(
            f"agent {agent_id!r}: records by kind {summary.get('records')}; "
            f"{MODEL} quality upstream {model.get('quality')}"
        )
    return {
        "accepted": answer["accepted"],
        "unknown": answer["unknown"],
        "live_quality": quality,
        "offline_accuracy": offline,
        "delivered": len(found),
        "expected": len(ids),
        "agent": agent_id,
        "collector_summary": summary,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: run the demo; exit 1 when the collector did not get every record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agent", default="http://127.0.0.1:8080", help="agent base URL")
    parser.add_argument("--collector", default="http://127.0.0.1:8099", help="collector base URL")
    parser.add_argument("--agent-token", help="bearer token for the agent (predict and admin)")
    parser.add_argument("--collector-token", help="bearer token for the collector's queries")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait upstream")
    args = parser.parse_args(argv)
    result = feedback_demo(
        args.agent,
        args.collector,
        agent_token=args.agent_token,
        collector_token=args.collector_token,
        timeout_s=args.timeout,
    )
    return 0 if result["delivered"] == result["expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
