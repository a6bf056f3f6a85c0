"""The last step of the demo: the same examples served by two processes on one port.

Run by scripts/demo.sh against an agent it started with ``[server] processes = 2``.
urllib opens a fresh connection per request, so the kernel spreads them over the
primary and its replica; ``/metrics`` (merged over both) then shows how many
predictions the replica handed to the primary's taps.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REQUESTS = 60


def metric(url: str, name: str) -> float:
    """The sum of one metric's samples in /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    pattern = re.compile(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


def infer(url: str, rows: np.ndarray) -> str:
    doc = {
        "inputs": [
            {
                "name": "float_input",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": rows.ravel().tolist(),
            }
        ]
    }
    req = urllib.request.Request(
        f"{url}/v2/models/breast_cancer/infer",
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # a new connection each time
        return str(json.loads(resp.read())["model_version"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    url = parser.parse_args().url
    print("=== Two serving processes ([server] processes = 2)")
    deadline = time.monotonic() + 30
    while metric(url, "edge_agent_replicas_ready") < 1:
        if time.monotonic() > deadline:
            print("the replica did not become ready within 30 s")
            return 1
        time.sleep(0.2)
    print("replica ready: the primary and one replica listen on the same port")
    rows = np.load(EXAMPLES / "data" / "breast_cancer_rows.npy")[:1].astype(np.float32)
    before = metric(url, "edge_agent_requests_total")
    versions = {infer(url, rows) for _ in range(REQUESTS)}
    time.sleep(1.2)  # replicas send their counters every second
    shipped = metric(url, "edge_agent_replica_events_total")
    counted = metric(url, "edge_agent_requests_total") - before
    print(
        f"{REQUESTS} requests on fresh connections, all answered by version(s) {sorted(versions)}"
    )
    print(
        f"/metrics (merged over both processes) counts {counted:.0f} of them; "
        f"the replica answered {shipped:.0f} and handed them to the primary's taps"
    )
    ok = counted == REQUESTS and 0 < shipped <= REQUESTS
    print("Processes step complete." if ok else "UNEXPECTED: see the counts above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
