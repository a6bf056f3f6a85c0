"""A scripted tour of a running edge-agent: predictions, hot swap, refusal, rollback.

Run by scripts/demo.sh against an agent it started on the bundled examples; each step
prints what it does and what came back, so the output reads as a walkthrough.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def call(
    url: str, method: str = "GET", body: bytes | None = None, ctype: str = "application/json"
) -> tuple[int, Any]:
    """One HTTP call; returns status and the decoded body (JSON or msgpack)."""
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, raw, rtype = resp.status, resp.read(), resp.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, raw, rtype = exc.code, exc.read(), exc.headers.get_content_type()
    if rtype == "application/msgpack":
        return status, msgpack.unpackb(raw)
    return status, json.loads(raw or b"{}")


def step(title: str) -> None:
    """Print a step header."""
    print(f"\n=== {title}")


def cli(*args: str) -> None:
    """Run an edge-agent command and echo it (the operator's view)."""
    print("$ edge-agent " + " ".join(args))
    subprocess.run([sys.executable, "-m", "agent", *args], check=True)


def predict_tabular(base: str, rows: np.ndarray, request_id: str) -> dict[str, Any]:
    """JSON request to the tabular model; returns the response."""
    doc = {
        "id": request_id,
        "inputs": [
            {
                "name": "float_input",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": rows.ravel().tolist(),
            }
        ],
    }
    status, body = call(f"{base}/v2/models/breast_cancer/infer", "POST", json.dumps(doc).encode())
    if status != 200:
        raise SystemExit(f"prediction failed: {status} {body}")
    return body


def tour_predictions(base: str) -> None:
    """Predictions on all three models, JSON and msgpack."""
    labels = ["malignant", "benign"]
    rows = np.load(EXAMPLES / "data" / "breast_cancer_rows.npy")[:3]
    step("Tabular model over JSON: breast_cancer, 3 rows")
    body = predict_tabular(base, rows, "demo-tabular-1")
    outs = {o["name"]: o for o in body["outputs"]}
    print(
        f"id={body['id']} version={body['model_version']} "
        f"labels={[labels[i] for i in outs['label']['data']]}"
    )

    step("Image model over msgpack (raw little-endian tensor bytes): digits, 4 images")
    images = np.load(EXAMPLES / "data" / "digits_images.npy")[:4].astype("<f4")
    want = np.load(EXAMPLES / "data" / "digits_labels.npy")[:4]
    doc = {
        "inputs": [
            {
                "name": "image",
                "shape": list(images.shape),
                "datatype": "FP32",
                "data": images.tobytes(),
            }
        ]
    }
    status, body = call(
        f"{base}/v2/models/digits/infer", "POST", msgpack.packb(doc), "application/msgpack"
    )
    label = next(o for o in body["outputs"] if o["name"] == "label")
    got = np.frombuffer(label["data"], dtype="<i8")
    print(f"status={status} predicted={got.tolist()} true={want.tolist()}")

    step("Text model over JSON (BYTES tensor): sentiment")
    texts = json.loads((EXAMPLES / "data" / "sentiment_texts.json").read_text())[:4]
    doc = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
    status, body = call(f"{base}/v2/models/sentiment/infer", "POST", json.dumps(doc).encode())
    label = next(o for o in body["outputs"] if o["name"] == "label")
    for text, value in zip(texts, label["data"], strict=True):
        print(f"  {['negative', 'positive'][value]:>8}  {text}")

    step("A bad request gets a clear error")
    doc = {
        "inputs": [
            {"name": "float_input", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}
        ]
    }
    status, body = call(f"{base}/v2/models/breast_cancer/infer", "POST", json.dumps(doc).encode())
    print(f"status={status} error={body['error']}")


def send_rows(base: str, rows: np.ndarray, batch: int = 20) -> None:
    """Predict ``rows`` in requests of ``batch`` rows (JSON)."""
    for start in range(0, len(rows), batch):
        predict_tabular(base, rows[start : start + batch], f"demo-drift-{start}")


def drift_summary(base: str) -> dict[str, Any]:
    """The deploy-window drift report, once the monitor has seen every row sent."""
    time.sleep(1.5)  # the monitor folds events in off the request path, about once a second
    _, report = call(f"{base}/v1/models/breast_cancer/drift?window=deploy")
    return report


def tour_drift(base: str) -> None:
    """In-distribution traffic reports ok; a shift in a few features alerts."""
    train = np.load(EXAMPLES / "data" / "breast_cancer_train.npy").astype(np.float32)
    rng = np.random.default_rng(7)
    step("Drift: 300 rows like the training data (baseline from `edge-agent baseline`)")
    send_rows(base, train[rng.choice(len(train), 300)])
    report = drift_summary(base)
    alerts = [f["name"] for f in report["features"] if f["status"] == "alert"]
    print(
        f"model status={report['status']} reference={report.get('reference')} "
        f"rows={report['window']['rows']} alerting features={alerts or 'none'}"
    )

    step("Drift: 600 rows where mean_radius and mean_texture are shifted by 2 std")
    shifted = train[rng.choice(len(train), 600)].copy()
    shifted[:, :2] += 2.0 * train[:, :2].std(axis=0)
    send_rows(base, shifted)
    report = drift_summary(base)
    print(f"model status={report['status']} rows={report['window']['rows']}")
    for f in report["features"]:
        if f["status"] != "ok":
            print(
                f"  {f['name']:<24} {f['status']:<6} psi={f['psi']:.3f} "
                f"mean_shift={f['mean_shift']:+.2f} std"
            )
    outs = [o for o in report["outputs"] if o["status"] != "ok"]
    for o in outs:
        print(f"  output {o['input']}/{o['name']}: {o['status']} psi={o['psi']:.3f}")


def wait_version(base: str, version: int, timeout: float = 20.0) -> None:
    """Poll until the tabular model serves ``version``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, doc = call(f"{base}/v1/models/breast_cancer")
        if doc.get("active_version") == version:
            return
        time.sleep(0.2)
    raise SystemExit(f"version {version} did not go live within {timeout} s")


def tour_release(base: str, drop: Path) -> None:
    """Hot swap, a refused corrupt file, rollback."""
    rows = np.load(EXAMPLES / "data" / "breast_cancer_rows.npy")[:1]
    step("Hot swap: deploy version 2 of breast_cancer (gradient boosting) while serving")
    cli(
        "deploy",
        str(EXAMPLES / "models_v2" / "breast_cancer.onnx"),
        "--name",
        "breast_cancer",
        "--manifest",
        str(EXAMPLES / "models_v2" / "breast_cancer.toml"),
        "--dir",
        str(drop),
    )
    wait_version(base, 2)
    body = predict_tabular(base, rows, "demo-after-swap")
    print(f"now answering: version {body['model_version']}")

    step("A half-copied model is refused; version 2 keeps serving")
    cli(
        "deploy",
        str(EXAMPLES / "models_bad" / "breast_cancer.onnx"),
        "--name",
        "breast_cancer",
        "--version",
        "3",
        "--dir",
        str(drop),
    )
    deadline = time.monotonic() + 20
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        _, doc = call(f"{base}/v1/models/breast_cancer")
        if doc.get("last_error"):
            break
        time.sleep(0.2)
    print(f"active_version={doc.get('active_version')} last_error={doc.get('last_error')}")

    step("Rollback to version 1 (the CLI calls POST /v1/models/breast_cancer/rollback)")
    cli("rollback", "breast_cancer", "--to", "1", "--url", base)
    body = predict_tabular(base, rows, "demo-after-rollback")
    print(f"now answering: version {body['model_version']}")

    step("Status")
    cli("status", "--url", base)


def tour_feedback(base: str, collector: str, token: str | None) -> None:
    """Ground truth comes back, joins its predictions, and reaches the collector."""
    step("Feedback: predictions with ids, then their true labels; shipped to the collector")
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo_feedback import feedback_demo  # a sibling script, not a package

    result = feedback_demo(base, collector, collector_token=token, timeout_s=30.0)
    if result["delivered"] != result["expected"]:
        raise SystemExit(f"feedback did not reach the collector: {result}")


def main() -> int:
    """Run the tour."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--drop", type=Path, required=True)
    parser.add_argument("--collector", help="reference collector URL (enables the feedback step)")
    parser.add_argument("--collector-token")
    args = parser.parse_args()
    tour_predictions(args.url)
    tour_drift(args.url)
    tour_release(args.url, args.drop)
    if args.collector:
        tour_feedback(args.url, args.collector, args.collector_token)
    print("\nTour complete.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
