"""The model factory builds models that onnxruntime loads, with the documented signatures."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import modelgen
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

Array = npt.NDArray[Any]
Signature = dict[str, tuple[str, list[Any]]]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ALL_V2_DATATYPES = list(modelgen.V2_TO_ONNX)


def _session(model: bytes | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the tests read the exception; keep ORT's own log quiet
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _inputs(session: ort.InferenceSession) -> Signature:
    return {i.name: (i.type, list(i.shape)) for i in session.get_inputs()}


def _outputs(session: ort.InferenceSession) -> Signature:
    return {o.name: (o.type, list(o.shape)) for o in session.get_outputs()}


def _run(session: ort.InferenceSession, feeds: dict[str, Array]) -> dict[str, Array]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


@pytest.fixture(scope="module")
def tabular() -> ort.InferenceSession:
    return _session(modelgen.tabular_classifier())


@pytest.fixture(scope="module")
def image() -> ort.InferenceSession:
    return _session(modelgen.image_classifier())


@pytest.fixture(scope="module")
def text() -> ort.InferenceSession:
    return _session(modelgen.text_classifier())


class TestTabularClassifier:
    def test_signature(self, tabular: ort.InferenceSession) -> None:
        """The tabular model maps float_input [N, 30] to label [N] and probabilities [N, 2]."""
        assert _inputs(tabular) == {"float_input": ("tensor(float)", [None, 30])}
        assert _outputs(tabular) == {
            "label": ("tensor(int64)", [None]),
            "probabilities": ("tensor(float)", [None, 2]),
        }

    def test_accuracy(self, tabular: ort.InferenceSession) -> None:
        """The tabular model classifies its held-out rows with accuracy above 0.9."""
        x, y = modelgen.tabular_data("test")
        assert x.dtype == np.float32
        assert (_run(tabular, {"float_input": x})["label"] == y).mean() > 0.9

    def test_model_version(self) -> None:
        """The tabular model carries model_version 1 and its second version carries 2."""
        assert onnx.load_from_string(modelgen.tabular_classifier()).model_version == 1
        assert onnx.load_from_string(modelgen.tabular_classifier_v2()).model_version == 2

    def test_v2_same_signature_other_outputs(self, tabular: ort.InferenceSession) -> None:
        """Version 2 has version 1's signature but answers with different probabilities."""
        v2 = _session(modelgen.tabular_classifier_v2())
        assert (_inputs(v2), _outputs(v2)) == (_inputs(tabular), _outputs(tabular))
        x, _ = modelgen.tabular_data("test")
        p1 = _run(tabular, {"float_input": x})["probabilities"]
        assert not np.allclose(_run(v2, {"float_input": x})["probabilities"], p1)

    def test_deterministic(self) -> None:
        """Building the tabular model twice gives identical bytes."""
        assert modelgen.tabular_classifier() == modelgen.tabular_classifier()

    def test_feature_names(self) -> None:
        """The feature names are 30 unique snake_case identifiers."""
        names = modelgen.tabular_feature_names()
        assert len(set(names)) == 30
        assert all(n.isidentifier() and n == n.lower() for n in names)


class TestImageClassifier:
    def test_signature(self, image: ort.InferenceSession) -> None:
        """The image model maps image [N, 1, 8, 8] to label [N] and probabilities [N, 10]."""
        assert _inputs(image) == {"image": ("tensor(float)", [None, 1, 8, 8])}
        assert _outputs(image) == {
            "label": ("tensor(int64)", [None]),
            "probabilities": ("tensor(float)", [None, 10]),
        }

    def test_accuracy(self, image: ort.InferenceSession) -> None:
        """The image model classifies its held-out digits with accuracy above 0.9."""
        x, y = modelgen.image_data("test")
        assert x.shape[1:] == (1, 8, 8)
        assert (_run(image, {"image": x})["label"] == y).mean() > 0.9


class TestTextClassifier:
    def test_signature(self, text: ort.InferenceSession) -> None:
        """The text model takes a string vector [N] and gives label [N] and probabilities [N, 2]."""
        assert _inputs(text) == {"text": ("tensor(string)", [None])}
        assert _outputs(text) == {
            "label": ("tensor(int64)", [None]),
            "probabilities": ("tensor(float)", [None, 2]),
        }

    def test_accuracy(self, text: ort.InferenceSession) -> None:
        """The text model classifies its held-out reviews with accuracy above 0.8."""
        x, y = modelgen.text_data("test")
        assert (_run(text, {"text": x})["label"] == y).mean() > 0.8

    def test_lowercases(self, text: ort.InferenceSession) -> None:
        """The text model gives the same answer for a review in upper and lower case."""
        review = "the kettle is excellent"
        lower = _run(text, {"text": np.array([review])})["probabilities"]
        upper = _run(text, {"text": np.array([review.upper()])})["probabilities"]
        np.testing.assert_allclose(upper, lower)

    def test_missing_locale_fails_at_session_creation(self) -> None:
        """A text model whose locale is not installed fails when its session is created."""
        model = modelgen.text_model_with_locale("xx_XX.UTF-8")
        with pytest.raises(Exception, match=r"Failed to construct locale with name:xx_XX\.UTF-8"):
            _session(model)


class TestAffineModel:
    def test_computes_scale_and_offset(self) -> None:
        """The affine model returns x * scale + offset."""
        session = _session(modelgen.affine_model(2.0, 3.0))
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        np.testing.assert_allclose(_run(session, {"x": x})["y"], x * 2 + 3)

    def test_signature(self) -> None:
        """The affine model has a dynamic batch dimension and the requested feature count."""
        session = _session(modelgen.affine_model(1.0, 0.0, features=6))
        assert _inputs(session) == {"x": ("tensor(float)", [None, 6])}
        assert _outputs(session) == {"y": ("tensor(float)", [None, 6])}

    def test_model_version_default_unset(self) -> None:
        """The affine model leaves model_version at 0 unless asked."""
        assert onnx.load_from_string(modelgen.affine_model(1.0, 0.0)).model_version == 0
        model = modelgen.affine_model(1.0, 0.0, model_version=4)
        assert onnx.load_from_string(model).model_version == 4


class TestFixedBatchModel:
    def test_signature(self) -> None:
        """The fixed-batch model declares a first dimension of exactly 1."""
        session = _session(modelgen.fixed_batch_model())
        assert _inputs(session) == {"x": ("tensor(float)", [1, 4])}
        assert _outputs(session) == {"y": ("tensor(float)", [1, 4])}

    def test_refuses_two_rows(self) -> None:
        """onnxruntime refuses two rows for the fixed-batch model."""
        session = _session(modelgen.fixed_batch_model())
        with pytest.raises(Exception, match="dimensions"):
            session.run(None, {"x": np.zeros((2, 4), dtype=np.float32)})


class TestMultiIoModel:
    def test_outputs(self) -> None:
        """The multi-io model returns sum = a + b and prod = a * 2."""
        session = _session(modelgen.multi_io_model())
        a = np.arange(6, dtype=np.float32).reshape(2, 3)
        b = np.array([[1], [10]], dtype=np.int64)
        out = _run(session, {"a": a, "b": b})
        np.testing.assert_allclose(out["sum"], a + b)
        np.testing.assert_allclose(out["prod"], a * 2)

    def test_signature(self) -> None:
        """The multi-io model declares two inputs and two FP32 [N, 3] outputs."""
        session = _session(modelgen.multi_io_model())
        assert _inputs(session) == {
            "a": ("tensor(float)", [None, 3]),
            "b": ("tensor(int64)", [None, 1]),
        }
        assert _outputs(session) == {
            "sum": ("tensor(float)", [None, 3]),
            "prod": ("tensor(float)", [None, 3]),
        }


def _sample(datatype: str) -> Array:
    if datatype == "BYTES":
        return np.array([["a", "é", ""], ["xyz", "0", " "]], dtype=object)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(modelgen.V2_TO_ONNX[datatype])
    return np.arange(6).reshape(2, 3).astype(dtype)


class TestIdentityModel:
    @pytest.mark.parametrize("datatype", ALL_V2_DATATYPES)
    def test_round_trips(self, datatype: str) -> None:
        """The identity model returns its input unchanged for every V2 datatype."""
        session = _session(modelgen.identity_model(datatype, [None, 3]))
        x = _sample(datatype)
        np.testing.assert_array_equal(_run(session, {"x": x})["y"], x)

    def test_fixed_shape(self) -> None:
        """The identity model declares exactly the shape it was given."""
        session = _session(modelgen.identity_model("INT32", [2, None, 5]))
        assert _inputs(session) == {"x": ("tensor(int32)", [2, None, 5])}

    def test_unknown_datatype(self) -> None:
        """The identity model builder refuses a datatype V2 does not define."""
        with pytest.raises(ValueError, match="FP8"):
            modelgen.identity_model("FP8", [None])


def _manifests() -> list[Path]:
    return sorted(p for p in EXAMPLES.rglob("*.toml"))


class TestCommittedExamples:
    @pytest.mark.parametrize("manifest", _manifests(), ids=lambda p: str(p.relative_to(EXAMPLES)))
    def test_model_passes_its_vectors(self, manifest: Path) -> None:
        """Each committed example model reproduces its manifest's test vectors."""
        config = tomllib.loads(manifest.read_text(encoding="utf-8"))
        model = manifest.with_suffix(".onnx")
        if manifest.name == "manifest.toml":
            model = manifest.parent / "model.onnx"
        validation = config["validation"]
        with np.load(manifest.parent / validation["test_vectors"]) as vectors:
            arrays = {k: vectors[k] for k in vectors.files}
        session = _session(str(model))
        got = _run(session, {k: v for k, v in arrays.items() if not k.startswith("expected/")})
        for name, value in got.items():
            expected = arrays["expected/" + name]
            np.testing.assert_allclose(value, expected, validation["rtol"], validation["atol"])

    def test_bad_model_is_refused(self) -> None:
        """The committed half-copied model cannot be loaded."""
        with pytest.raises(Exception, match="Protobuf parsing failed"):
            _session(str(EXAMPLES / "models_bad" / "breast_cancer.onnx"))

    def test_sample_texts_match_labels(self) -> None:
        """The example model labels the bundled sample texts as their labels file says."""
        texts = json.loads((EXAMPLES / "data" / "sentiment_texts.json").read_text("utf-8"))
        labels = json.loads((EXAMPLES / "data" / "sentiment_labels.json").read_text("utf-8"))
        session = _session(str(EXAMPLES / "models" / "sentiment.onnx"))
        assert _run(session, {"text": np.array(texts)})["label"].tolist() == labels
