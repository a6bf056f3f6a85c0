"""Build the bundled example deployment: small real ONNX models, manifests, test vectors and data.

Run as ``python examples/build_examples.py [OUT_DIR]`` (default: the folder of this file). The
builder functions are importable: ``tests/modelgen.py`` loads this file by path, so the test suite
and the demo serve the same models. This module must not import the ``agent`` package: the examples
are what an operator produces with ordinary tools (scikit-learn, skl2onnx, onnx, numpy).

Output is deterministic: fixed seeds, fixed opsets, and ``.npz`` zip entries with a fixed
timestamp, so re-running the script rewrites identical bytes (given the same library versions).
"""

from __future__ import annotations

import io
import json
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

Array = npt.NDArray[Any]

#: Opsets every example model targets: old enough for onnxruntime >= 1.17 (IR version 8).
OPSETS: Final[dict[str, int]] = {"": 17, "ai.onnx.ml": 3}
#: The locale given to the text model's StringNormalizer. onnxruntime's default, en_US.UTF-8, is
#: missing on many servers and containers, and then the session cannot be created. C.UTF-8 is
#: installed on current Debian, Ubuntu and Fedora images and lowercases all of Unicode;
#: "C" exists everywhere but lowercases ASCII only.
TEXT_LOCALE: Final = "C.UTF-8"
SEED: Final = 7
_ZIP_EPOCH: Final = (1980, 1, 1, 0, 0, 0)
_VECTOR_ROWS: Final = 8
_TOML_WIDTH: Final = 80


@dataclass(frozen=True, slots=True)
class Dataset:
    """A fixed train/test split: features as the model's input takes them, labels as int64."""

    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array


# --- data ------------------------------------------------------------------------------------


def _split(x: Array, y: Array) -> Dataset:
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=SEED, stratify=y
    )
    return Dataset(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


def breast_cancer_data() -> Dataset:
    """scikit-learn's breast cancer set (30 features, float32); label 0 malignant, 1 benign."""
    bunch = load_breast_cancer()
    return _split(bunch.data.astype(np.float32), bunch.target)


def breast_cancer_feature_names() -> list[str]:
    """The 30 feature names in snake_case ("mean concave points" -> "mean_concave_points")."""
    return [
        re.sub(r"[^0-9a-z]+", "_", str(n).lower()).strip("_")
        for n in load_breast_cancer().feature_names
    ]


def digits_data() -> Dataset:
    """scikit-learn's 8x8 digits as float32 images [N, 1, 8, 8] scaled to [0, 1]; label 0..9."""
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return _split(images, bunch.target)


_PRODUCTS: Final = (
    "headphones", "blender", "backpack", "phone case", "desk lamp",
    "kettle", "keyboard", "charger", "water bottle", "running shoes",
)  # fmt: skip
_PRAISE: Final = (
    "works perfectly", "is excellent", "exceeded my expectations", "is great value for money",
    "feels solid and well made", "is exactly as described", "arrived quickly and works great",
    "is the best thing I bought this year",
)  # fmt: skip
_COMPLAINTS: Final = (
    "stopped working after a week", "is terrible", "broke on the first day",
    "is a waste of money", "feels cheap and flimsy", "was not as described",
    "arrived damaged and late", "is the worst thing I bought this year",
)  # fmt: skip
_OPENERS: Final = {
    1: ("", "Love it!", "Highly recommend.", "Five stars.", "Happy customer."),
    0: ("", "Very disappointed.", "Do not buy.", "One star.", "Returned it."),
}


def _reviews(phrases: Sequence[str], label: int, rng: np.random.Generator) -> list[str]:
    """Every product x phrase pair once, each with a randomly drawn opener."""
    openers = _OPENERS[label]
    texts = []
    for product in _PRODUCTS:
        for phrase in phrases:
            opener = openers[int(rng.integers(len(openers)))]
            texts.append(f"{opener} The {product} {phrase}.".strip())
    return texts


def sentiment_data() -> Dataset:
    """160 templated product reviews (str arrays, shape [N]); label 0 negative, 1 positive."""
    rng = np.random.default_rng(SEED)
    positive = _reviews(_PRAISE, 1, rng)
    negative = _reviews(_COMPLAINTS, 0, rng)
    texts = np.array(positive + negative, dtype=np.str_)
    labels = np.array([1] * len(positive) + [0] * len(negative), dtype=np.int64)
    return _split(texts, labels)


#: Reviews the model never saw, for the demo and the README.
SENTIMENT_SAMPLES: Final = (
    "The kettle is excellent, highly recommend.",
    "Broke on the first day. Very disappointed.",
    "My new keyboard works perfectly and arrived quickly.",
    "Cheap and flimsy charger, a waste of money.",
    "Great value for money, five stars!",
    "The backpack arrived damaged. Do not buy.",
)
SENTIMENT_SAMPLE_LABELS: Final = (1, 0, 1, 0, 1, 0)


# --- models ----------------------------------------------------------------------------------


def _convert(
    estimator: Any,
    initial_types: list[tuple[str, Any]],
    *,
    name: str,
    version: int,
    doc: str,
    options: Mapping[Any, Mapping[str, Any]] | None = None,
) -> onnx.ModelProto:
    """skl2onnx conversion with fixed opsets, no ZipMap, and our name/version/description."""
    all_options: dict[Any, dict[str, Any]] = {id(estimator): {"zipmap": False}}
    if isinstance(estimator, Pipeline):
        all_options = {id(estimator.steps[-1][1]): {"zipmap": False}}
    for key, value in (options or {}).items():
        all_options[key] = dict(value)
    model: onnx.ModelProto = convert_sklearn(
        estimator, name, initial_types=initial_types, options=all_options, target_opset=OPSETS
    )
    # skl2onnx lists opsets in set order, sometimes twice: keep one per domain, sorted, so the
    # same model always gives the same bytes.
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        versions[opset.domain] = max(opset.version, versions.get(opset.domain, 0))
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(versions.items()))
    model.model_version = version
    model.doc_string = doc
    model.graph.name = name
    model.domain = "org.edge-agent.examples"
    return model


def breast_cancer_model() -> bytes:
    """Version 1 of the tabular example: StandardScaler + LogisticRegression.

    Input ``float_input`` FP32 [N, 30]; outputs ``label`` INT64 [N], ``probabilities`` FP32 [N, 2].
    """
    data = breast_cancer_data()
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    pipe.fit(data.x_train, data.y_train)
    model = _convert(
        pipe,
        [("float_input", FloatTensorType([None, 30]))],
        name="breast_cancer",
        version=1,
        doc="Breast cancer diagnosis (0 malignant, 1 benign): StandardScaler + LogisticRegression.",
    )
    return bytes(model.SerializeToString())


def breast_cancer_model_v2() -> bytes:
    """Version 2 of the tabular example: gradient-boosted trees, same signature as version 1."""
    data = breast_cancer_data()
    gbm = GradientBoostingClassifier(n_estimators=40, max_depth=2, random_state=SEED)
    gbm.fit(data.x_train, data.y_train)
    model = _convert(
        gbm,
        [("float_input", FloatTensorType([None, 30]))],
        name="breast_cancer",
        version=2,
        doc="Breast cancer diagnosis (0 malignant, 1 benign): 40 gradient-boosted trees.",
    )
    return bytes(model.SerializeToString())


def digits_model() -> bytes:
    """The image example: Flatten + LogisticRegression on 8x8 digits.

    Input ``image`` FP32 [N, 1, 8, 8]; outputs ``label`` INT64 [N], ``probabilities`` FP32 [N, 10].
    """
    data = digits_data()
    clf = LogisticRegression(C=5.0, max_iter=2000)
    clf.fit(data.x_train.reshape(-1, 64), data.y_train)
    model = _convert(
        clf,
        [("pixels", FloatTensorType([None, 64]))],
        name="digits",
        version=1,
        doc="Handwritten digit 0-9 from an 8x8 grey image in [0, 1]: Flatten + LogisticRegression.",
    )
    graph = model.graph
    graph.node.insert(0, helper.make_node("Flatten", ["image"], ["pixels"], axis=1, name="Flatten"))
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 1, 8, 8]))
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def sentiment_model(locale: str = TEXT_LOCALE) -> bytes:
    """The text example: TF-IDF (unigrams and bigrams) + LogisticRegression.

    Input ``text`` BYTES (tensor(string)) [N], one review per row; outputs ``label`` INT64 [N],
    ``probabilities`` FP32 [N, 2]. ``locale`` goes to the StringNormalizer that lowercases the
    text; onnxruntime refuses to create the session when that locale is not installed.
    """
    data = sentiment_data()
    pipe = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2), LogisticRegression(C=10.0, max_iter=1000)
    )
    pipe.fit(list(data.x_train), data.y_train)
    model = _convert(
        pipe,
        [("text", StringTensorType([None]))],
        name="sentiment",
        version=1,
        doc="Product review sentiment (0 negative, 1 positive): TF-IDF + LogisticRegression.",
        options={id(pipe.steps[0][1]): {"locale": locale}},
    )
    return bytes(model.SerializeToString())


def run_model(model: bytes, inputs: Mapping[str, Array]) -> dict[str, Array]:
    """Run a serialized model once on CPU and return its outputs by name."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(inputs)), strict=True))


# --- files -----------------------------------------------------------------------------------


def write_npz(path: Path, arrays: Mapping[str, Array]) -> None:
    """Write an ``.npz`` that ``np.load`` reads, byte-identical for identical arrays.

    ``np.savez`` stamps each zip entry with the current time; this writes a fixed one.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def make_test_vectors(model: bytes, input_name: str, rows: Array) -> dict[str, Array]:
    """Inputs under their input name, the model's outputs under ``expected/<output name>``."""
    outputs = run_model(model, {input_name: rows})
    return {input_name: rows} | {"expected/" + name: value for name, value in outputs.items()}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(value, list):
        inline = "[" + ", ".join(_toml_value(v) for v in value) + "]"
        if len(inline) <= _TOML_WIDTH:
            return inline
        return "[\n" + "".join("    " + _toml_value(v) + ",\n" for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML: use bool, int, float, str or a list")


def manifest_toml(sections: Mapping[str, Mapping[str, object]]) -> str:
    """Render a manifest: one ``[section]`` table per key, scalars and lists as values."""
    blocks = []
    for section, values in sections.items():
        lines = [f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _validation(vectors_file: str) -> dict[str, object]:
    return {"test_vectors": vectors_file, "rtol": 1e-4, "atol": 1e-5, "warmup_runs": 3}


def _json_floats(rows: Array) -> list[float]:
    """The shortest decimals that parse back to the same float32 values, flattened."""
    return [float(text) for text in rows.ravel().astype(np.str_)]


def v2_request(input_name: str, datatype: str, rows: Array) -> dict[str, Any]:
    """A KServe V2 JSON request body for ``rows`` (``data`` flattened in row-major order)."""
    data = [str(t) for t in rows.ravel()] if datatype == "BYTES" else _json_floats(rows)
    return {
        "inputs": [
            {"name": input_name, "shape": list(rows.shape), "datatype": datatype, "data": data}
        ]
    }


def _write_json(path: Path, document: object) -> None:
    path.write_text(json.dumps(document, ensure_ascii=False) + "\n", encoding="utf-8")


# --- the deployment --------------------------------------------------------------------------


def _write_breast_cancer(out: Path, model: bytes, version: int, description: str) -> None:
    """``<out>/breast_cancer.onnx`` + ``.toml`` + ``_vectors.npz`` (flat layout)."""
    data = breast_cancer_data()
    out.mkdir(parents=True, exist_ok=True)
    (out / "breast_cancer.onnx").write_bytes(model)
    write_npz(
        out / "breast_cancer_vectors.npz",
        make_test_vectors(model, "float_input", data.x_test[:_VECTOR_ROWS]),
    )
    manifest: dict[str, dict[str, object]] = {
        "model": {
            "name": "breast_cancer",
            "version": version,
            "description": description,
            "labels": ["malignant", "benign"],
        },
        "inputs": {"float_input": breast_cancer_feature_names()},
        "validation": _validation("breast_cancer_vectors.npz"),
    }
    (out / "breast_cancer.toml").write_text(manifest_toml(manifest), encoding="utf-8")


def _write_digits(models: Path) -> None:
    """``<models>/digits/1/model.onnx`` + ``manifest.toml`` + ``vectors.npz`` (versioned layout)."""
    data = digits_data()
    model = digits_model()
    folder = models / "digits" / "1"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model)
    write_npz(folder / "vectors.npz", make_test_vectors(model, "image", data.x_test[:_VECTOR_ROWS]))
    manifest: dict[str, dict[str, object]] = {
        "model": {
            "name": "digits",
            "version": 1,
            "description": "Handwritten digit from an 8x8 grey image (pixels in [0, 1]).",
            "labels": [str(d) for d in range(10)],
        },
        "validation": _validation("vectors.npz"),
    }
    (folder / "manifest.toml").write_text(manifest_toml(manifest), encoding="utf-8")


def _write_sentiment(models: Path) -> None:
    """``<models>/sentiment.onnx`` + ``.toml`` + ``_vectors.npz`` (flat layout)."""
    model = sentiment_model()
    texts = np.array(SENTIMENT_SAMPLES, dtype=np.str_)
    write_npz(models / "sentiment_vectors.npz", make_test_vectors(model, "text", texts))
    (models / "sentiment.onnx").write_bytes(model)
    manifest: dict[str, dict[str, object]] = {
        "model": {
            "name": "sentiment",
            "version": 1,
            "description": "Product review sentiment from free text (English, lowercased).",
            "labels": ["negative", "positive"],
        },
        "validation": _validation("sentiment_vectors.npz"),
    }
    (models / "sentiment.toml").write_text(manifest_toml(manifest), encoding="utf-8")


def _write_data(data_dir: Path) -> None:
    """Rows, images and texts to send, plus ready-made V2 JSON request bodies."""
    data_dir.mkdir(parents=True, exist_ok=True)
    cancer, digits = breast_cancer_data(), digits_data()
    np.save(data_dir / "breast_cancer_rows.npy", cancer.x_test)
    np.save(data_dir / "breast_cancer_labels.npy", cancer.y_test)
    np.save(data_dir / "breast_cancer_train.npy", cancer.x_train)
    np.save(data_dir / "digits_images.npy", digits.x_test[:32])
    np.save(data_dir / "digits_labels.npy", digits.y_test[:32])
    _write_json(data_dir / "sentiment_texts.json", list(SENTIMENT_SAMPLES))
    _write_json(data_dir / "sentiment_labels.json", list(SENTIMENT_SAMPLE_LABELS))
    texts = np.array(SENTIMENT_SAMPLES[:2], dtype=np.str_)
    _write_json(
        data_dir / "breast_cancer_request.json",
        v2_request("float_input", "FP32", cancer.x_test[:2]),
    )
    _write_json(data_dir / "digits_request.json", v2_request("image", "FP32", digits.x_test[:1]))
    _write_json(data_dir / "sentiment_request.json", v2_request("text", "BYTES", texts))


def build(out: Path) -> None:
    """Write the whole example deployment under ``out`` (see examples/README.md)."""
    models = out / "models"
    v1 = breast_cancer_model()
    _write_breast_cancer(
        models, v1, 1, "Breast cancer diagnosis from 30 cell-nucleus measurements."
    )
    _write_digits(models)
    _write_sentiment(models)
    _write_breast_cancer(
        out / "models_v2", breast_cancer_model_v2(), 2, "Version 2: gradient-boosted trees."
    )
    bad = out / "models_bad"
    bad.mkdir(parents=True, exist_ok=True)
    # A half-copied file, as an interrupted scp leaves it: the first half of the real model
    # (at most 1000 bytes), which onnxruntime refuses to parse.
    (bad / "breast_cancer.onnx").write_bytes(v1[: min(1000, len(v1) // 2)])
    _write_data(out / "data")


def main(argv: Sequence[str]) -> int:
    """Entry point: ``python examples/build_examples.py [OUT_DIR]``."""
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    build(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
