"""The models and request rows ``scripts/bench.py`` serves: built here, written to a drop dir.

- ``tabular``: an MLP on 30 float features (Gemm 30->64, Relu, Gemm 64->64, Relu, Gemm
  64->2, Softmax -> ``probabilities``, ArgMax -> ``label``), fixed random weights. Its
  variants differ only in the last bias, so every variant is new bytes: a new version.
- ``cnn``: a small image classifier on ``image`` FP32 [N, 3, 64, 64] (Conv 3->8 3x3, Relu,
  MaxPool 2x2, Conv 8->16 3x3, Relu, GlobalAveragePool, Flatten, Gemm to 10 classes).
- ``sentiment``: the text example (TF-IDF + LogisticRegression, BYTES input), copied from
  ``examples/models`` with its manifest and test vectors.

Only onnx, numpy and the files under ``examples/`` are used; this module must not import
the ``agent`` package (the bench measures the agent from the outside).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from onnx import TensorProto, checker, helper, numpy_helper

Array = npt.NDArray[Any]

ROOT: Final = Path(__file__).resolve().parents[1]
EXAMPLES: Final = ROOT / "examples"
OPSET: Final = 17
IR_VERSION: Final = 8
FEATURES: Final = 30
IMAGE_SHAPE: Final = (3, 64, 64)
CLASSES: Final = 10
SEED: Final = 11


@dataclass(frozen=True, slots=True)
class BenchModel:
    """A model served in the bench: its name, input, and one request's rows."""

    name: str
    input_name: str
    rows: Array  # one request's worth (batch 1)


def _weights(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> Any:
    scale = 1.0 / np.sqrt(max(1, int(np.prod(shape[1:]))))
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _serialize(
    nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any], name: str
) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="edge-agent-bench",
    )
    checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def _classifier_head(logits: str) -> list[Any]:
    return [
        helper.make_node("Softmax", [logits], ["probabilities"], axis=1),
        helper.make_node("ArgMax", [logits], ["label"], axis=1, keepdims=0),
    ]


def _head_outputs(classes: int) -> list[Any]:
    return [
        helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, classes]),
    ]


def tabular_model(variant: int = 0) -> bytes:
    """The MLP on 30 features; ``variant`` shifts the last bias (new bytes, same answers' shape)."""
    rng = np.random.default_rng(SEED)
    inits = [
        _weights(rng, "w1", (FEATURES, 64)),
        _weights(rng, "b1", (64,)),
        _weights(rng, "w2", (64, 64)),
        _weights(rng, "b2", (64,)),
        _weights(rng, "w3", (64, 2)),
        numpy_helper.from_array(np.array([0.0, 1e-4 * variant], dtype=np.float32), "b3"),
    ]
    nodes = [
        helper.make_node("Gemm", ["float_input", "w1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["logits"]),
        *_classifier_head("logits"),
    ]
    inputs = [helper.make_tensor_value_info("float_input", TensorProto.FLOAT, [None, FEATURES])]
    return _serialize(nodes, inputs, _head_outputs(2), inits, "bench_tabular")


def cnn_model() -> bytes:
    """The small CNN on [N, 3, 64, 64] images, 10 classes."""
    rng = np.random.default_rng(SEED + 1)
    inits = [
        _weights(rng, "c1_w", (8, 3, 3, 3)),
        _weights(rng, "c1_b", (8,)),
        _weights(rng, "c2_w", (16, 8, 3, 3)),
        _weights(rng, "c2_b", (16,)),
        _weights(rng, "fc_w", (16, CLASSES)),
        _weights(rng, "fc_b", (CLASSES,)),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "c1_w", "c1_b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2_w", "c2_b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
        *_classifier_head("logits"),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, *IMAGE_SHAPE])]
    return _serialize(nodes, inputs, _head_outputs(CLASSES), inits, "bench_cnn")


def example_models_dir() -> Path:
    """``examples/models``, built first with ``examples/build_examples.py`` when missing."""
    models = EXAMPLES / "models"
    if not (models / "sentiment.onnx").is_file():
        subprocess.run([sys.executable, str(EXAMPLES / "build_examples.py")], check=True)
    return models


def write_drop_dir(target: Path) -> list[BenchModel]:
    """Write tabular, cnn and sentiment (flat layout) into ``target``; return their rows."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "tabular.onnx").write_bytes(tabular_model())
    (target / "cnn.onnx").write_bytes(cnn_model())
    examples = example_models_dir()
    for name in ("sentiment.toml", "sentiment_vectors.npz", "sentiment.onnx"):
        shutil.copyfile(examples / name, target / name)
    rng = np.random.default_rng(SEED + 2)
    return [
        BenchModel("tabular", "float_input", rng.standard_normal((1, FEATURES)).astype(np.float32)),
        BenchModel("cnn", "image", rng.random((1, *IMAGE_SHAPE)).astype(np.float32)),
        BenchModel(
            "sentiment",
            "text",
            np.array(["The kettle is excellent, highly recommend."], dtype=object),
        ),
    ]


def copy_examples(target: Path) -> None:
    """The three bundled example models (tabular, image, text) as an operator deploys them."""
    shutil.copytree(example_models_dir(), target, dirs_exist_ok=True)
