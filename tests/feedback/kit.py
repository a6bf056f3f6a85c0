"""Helpers shared by the feedback tests: the example model's files, predictions, feedback.

Not a test module: imported as ``feedback.kit`` (``tests`` is on the import path).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CLASSES = ("malignant", "benign")


def breast_cancer_files() -> dict[str, bytes | Path]:
    """The example breast cancer model with its manifest (class names) and test vectors."""
    models = EXAMPLES / "models"
    return {
        name: models / name
        for name in ("breast_cancer.onnx", "breast_cancer.toml", "breast_cancer_vectors.npz")
    }


def breast_cancer_data() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The example rows (float32 [114, 30]) and their true labels (0 malignant, 1 benign)."""
    data = EXAMPLES / "data"
    return np.load(data / "breast_cancer_rows.npy"), np.load(data / "breast_cancer_labels.npy")


def infer_doc(request_id: str, rows: npt.NDArray[Any], name: str = "float_input") -> dict[str, Any]:
    """A V2 JSON request carrying ``id`` and an FP32 batch."""
    return {
        "id": request_id,
        "inputs": [
            {
                "name": name,
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": rows.ravel().tolist(),
            }
        ],
    }


def output(body: dict[str, Any], name: str) -> list[Any]:
    """The flat data of one output of a V2 JSON response."""
    return next(o["data"] for o in body["outputs"] if o["name"] == name)


def outbox_records(path: Path, kind: str) -> list[dict[str, Any]]:
    """Records of ``kind`` in an outbox file, oldest first, read through a read-only connection."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        bodies = conn.execute("SELECT body FROM records WHERE kind = ? ORDER BY id", (kind,))
        return [msgpack.unpackb(b, raw=False) for (b,) in bodies]
