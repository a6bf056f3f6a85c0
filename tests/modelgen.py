"""Build the real ONNX models the test suite serves, as serialized ``bytes``.

The three trained classifiers (tabular, image, text) come from ``examples/build_examples.py``,
loaded by path, so tests serve exactly what the demo serves. The small synthetic models used by
protocol, datatype and hot-swap tests (affine, identity, multi-input/output, fixed batch) are
built here with ``onnx.helper``. Every builder is deterministic and takes well under two seconds;
fixtures call each once per session. This module must not import the ``agent`` package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from onnx import ModelProto, TensorProto, checker, helper

Array = npt.NDArray[Any]
Split = Literal["all", "train", "test"]

#: Opset and IR version of the synthetic models (accepted by onnxruntime >= 1.17).
OPSET: Final = 17
IR_VERSION: Final = 8

#: V2 datatype name -> ONNX element type.
V2_TO_ONNX: Final[dict[str, int]] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}

_EXAMPLES_SCRIPT: Final = Path(__file__).resolve().parents[1] / "examples" / "build_examples.py"
_MODULE_NAME: Final = "edge_agent_examples_build"


def _load_examples() -> ModuleType:
    """Import examples/build_examples.py by path (it is a script, not a package module)."""
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, _EXAMPLES_SCRIPT)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {_EXAMPLES_SCRIPT}: the examples builder is missing")
    module = importlib.util.module_from_spec(spec)
    # Registered before exec so its dataclasses can resolve their own module.
    sys.modules[_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


examples: Final = _load_examples()


def _pick(dataset: Any, split: Split) -> tuple[Array, Array]:
    if split == "train":
        return dataset.x_train, dataset.y_train
    if split == "test":
        return dataset.x_test, dataset.y_test
    x = np.concatenate([dataset.x_train, dataset.x_test])
    return x, np.concatenate([dataset.y_train, dataset.y_test])


# --- trained classifiers (shared with the examples) ------------------------------------------


def tabular_classifier() -> bytes:
    """Breast cancer StandardScaler + LogisticRegression, model_version 1.

    Input ``float_input`` FP32 [N, 30]; outputs ``label`` INT64 [N], ``probabilities`` FP32 [N, 2].
    """
    return examples.breast_cancer_model()  # type: ignore[no-any-return]


def tabular_classifier_v2() -> bytes:
    """Breast cancer gradient-boosted trees, model_version 2, same signature as version 1."""
    return examples.breast_cancer_model_v2()  # type: ignore[no-any-return]


def tabular_data(split: Split = "all") -> tuple[Array, Array]:
    """Breast cancer rows (float32 [N, 30]) and labels (int64 [N]; 0 malignant, 1 benign)."""
    return _pick(examples.breast_cancer_data(), split)


def tabular_feature_names() -> list[str]:
    """The 30 breast cancer feature names in snake_case, in column order."""
    return examples.breast_cancer_feature_names()  # type: ignore[no-any-return]


def image_classifier() -> bytes:
    """Digits Flatten + LogisticRegression.

    Input ``image`` FP32 [N, 1, 8, 8]; outputs ``label`` INT64 [N], ``probabilities`` FP32 [N, 10].
    """
    return examples.digits_model()  # type: ignore[no-any-return]


def image_data(split: Split = "all") -> tuple[Array, Array]:
    """Digit images (float32 [N, 1, 8, 8] in [0, 1]) and labels (int64 [N], 0..9)."""
    return _pick(examples.digits_data(), split)


def text_classifier() -> bytes:
    """Review sentiment TF-IDF + LogisticRegression, with a locale this machine has (C.UTF-8).

    Input ``text`` tensor(string) (V2 BYTES) shape [N], one review per element; outputs
    ``label`` INT64 [N] (0 negative, 1 positive) and ``probabilities`` FP32 [N, 2].
    """
    return examples.sentiment_model()  # type: ignore[no-any-return]


def text_model_with_locale(locale: str) -> bytes:
    """The text classifier with another StringNormalizer locale.

    With a locale that is not installed (e.g. "en_US.UTF-8" on a C-only machine), creating the
    onnxruntime session raises ``onnxruntime...Fail`` whose text contains
    "Failed to construct locale with name:<locale>".
    """
    return examples.sentiment_model(locale)  # type: ignore[no-any-return]


def text_data(split: Split = "all") -> tuple[Array, Array]:
    """Review texts (numpy ``str`` array [N]) and labels (int64 [N]).

    onnxruntime takes ``str`` or object-of-``str`` arrays for tensor(string); an object array of
    ``bytes`` is silently turned into "b'...'" strings, so decode BYTES before running.
    """
    return _pick(examples.sentiment_data(), split)


# --- synthetic models ------------------------------------------------------------------------


def _model(
    nodes: list[Any],
    inputs: list[Any],
    outputs: list[Any],
    *,
    name: str,
    initializers: list[Any] | None = None,
    model_version: int = 0,
) -> bytes:
    """Wrap a graph in a checked model with our opset, IR version and producer."""
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers or [])
    model: ModelProto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="edge-agent-tests",
        producer_version="1",
        model_version=model_version,
    )
    checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def _scalar(name: str, value: float) -> Any:
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def affine_model(
    scale: float,
    offset: float,
    *,
    features: int = 4,
    dynamic_batch: bool = True,
    model_version: int = 0,
) -> bytes:
    """``y = x * scale + offset``: input ``x`` FP32 [N, features], output ``y`` FP32 same shape.

    Hot-swap tests set ``offset`` to the version number, so every answer names its version.
    ``dynamic_batch=False`` fixes the first dimension to 1. ``model_version`` 0 leaves the
    ONNX field unset, so the agent assigns the version.
    """
    batch = None if dynamic_batch else 1
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, features])],
        name="affine",
        initializers=[_scalar("scale", scale), _scalar("offset", offset)],
        model_version=model_version,
    )


def fixed_batch_model() -> bytes:
    """``y = x * 2 + 1`` with input ``x`` FP32 [1, 4]: a first dimension that is never batched."""
    return affine_model(2.0, 1.0, features=4, dynamic_batch=False)


def identity_model(datatype: str, shape: list[int | None]) -> bytes:
    """``y = Identity(x)`` for any V2 datatype; ``None`` in ``shape`` is a dynamic dimension.

    BYTES is tensor(string): feed ``str`` arrays (object-of-``bytes`` arrays come back as
    "b'...'" strings), and the output elements are ``str``.
    """
    if datatype not in V2_TO_ONNX:
        raise ValueError(f"unknown V2 datatype {datatype!r}; use one of {sorted(V2_TO_ONNX)}")
    element = V2_TO_ONNX[datatype]
    return _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", element, shape)],
        [helper.make_tensor_value_info("y", element, shape)],
        name="identity_" + datatype.lower(),
    )


def multi_io_model() -> bytes:
    """Inputs ``a`` FP32 [N, 3], ``b`` INT64 [N, 1]; outputs ``sum`` = a + float(b), ``prod`` = 2a.

    Both outputs are FP32 [N, 3] (``b`` broadcasts over the 3 columns).
    """
    nodes = [
        helper.make_node("Cast", ["b"], ["b_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "b_float"], ["sum"]),
        helper.make_node("Mul", ["a", "two"], ["prod"]),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 3]),
            helper.make_tensor_value_info("b", TensorProto.INT64, [None, 1]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, [None, 3]),
            helper.make_tensor_value_info("prod", TensorProto.FLOAT, [None, 3]),
        ],
        name="multi_io",
        initializers=[_scalar("two", 2.0)],
    )


def gather_model(rows: int = 10) -> bytes:
    """``y = table[idx]``: input ``idx`` INT64 [N, 1], output ``y`` FP32 [N, 1, 2].

    An index outside ``0..rows-1`` makes onnxruntime fail at run time: the model stands for
    a request that is well-formed but poisonous (the batcher must fail only that caller).
    """
    table = helper.make_tensor(
        "table", TensorProto.FLOAT, [rows, 2], [float(i) for i in range(rows * 2)]
    )
    return _model(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, 2])],
        name="gather",
        initializers=[table],
    )
