"""Tensors to feature columns: tabular, image, text and label kinds, and kind inference."""

from __future__ import annotations

import numpy as np
import pytest

from agent.drift.features import extract_features, infer_kind


class TestExtractFeatures:
    def test_tabular_columns_become_features(self) -> None:
        """A 2-D tensor gives one feature per column, named f0, f1, ... by default."""
        features = extract_features(np.arange(6, dtype=np.float32).reshape(3, 2), "tabular")
        assert features.numeric_names == ("f0", "f1")
        assert features.numeric.dtype == np.float64
        assert features.numeric[:, 1].tolist() == [1.0, 3.0, 5.0]

    def test_tabular_uses_given_names(self) -> None:
        """Manifest names replace f0, f1, ..."""
        features = extract_features(np.zeros((2, 2)), "tabular", ["age", "income"])
        assert features.numeric_names == ("age", "income")

    def test_tabular_refuses_a_wrong_number_of_names(self) -> None:
        """Names must match the columns one to one."""
        with pytest.raises(ValueError, match="3 columns but 2 feature names"):
            extract_features(np.zeros((2, 3)), "tabular", ["a", "b"])

    def test_one_dimensional_tensor_is_one_feature(self) -> None:
        """A 1-D tensor is a single feature column."""
        features = extract_features(np.array([1, 2, 3]), "tabular")
        assert features.numeric.shape == (3, 1)

    def test_image_layouts_give_the_same_features(self) -> None:
        """NCHW and NHWC of the same pixels give the same per-channel statistics."""
        nchw = np.random.default_rng(2).integers(0, 256, size=(4, 3, 8, 6), dtype=np.uint8)
        first = extract_features(nchw, "image")
        last = extract_features(nchw.transpose(0, 2, 3, 1), "image")
        assert first.numeric_names[:3] == ("channel0.mean", "channel0.std", "channel0.saturated")
        assert len(first.numeric_names) == 9
        np.testing.assert_allclose(first.numeric, last.numeric)
        np.testing.assert_allclose(first.numeric[:, 0], nchw[:, 0].reshape(4, -1).mean(axis=1))

    def test_image_saturation_is_the_share_at_the_dtype_limits(self) -> None:
        """For uint8, pixels at 0 or 255 are saturated."""
        image = np.full((1, 1, 2, 2), 128, dtype=np.uint8)
        image[0, 0, 0, :] = [0, 255]
        features = extract_features(image, "image")
        assert features.numeric[0, 2] == 0.5

    def test_three_dimensional_image_is_one_channel(self) -> None:
        """An N x H x W tensor is read as one grey channel."""
        features = extract_features(np.ones((2, 4, 4), dtype=np.float32), "image")
        assert features.numeric_names == ("channel0.mean", "channel0.std", "channel0.saturated")

    def test_text_gives_length_and_tokens(self) -> None:
        """A BYTES column gives its length in characters and lower-cased word tokens."""
        docs = np.array([b"Hello, World", "naïve café".encode()], dtype=object)
        features = extract_features(docs, "text")
        assert features.numeric_names == ("length",)
        assert features.numeric[:, 0].tolist() == [12.0, 10.0]
        assert features.categorical == (("tokens", ["hello", "world", "naïve", "café"]),)

    def test_text_columns_are_named(self) -> None:
        """Several text columns are prefixed by their names."""
        table = np.array([["a b", "c"], ["d", "e f"]], dtype=object)
        features = extract_features(table, "text", ["title", "body"])
        assert features.numeric_names == ("title.length", "body.length")
        assert [name for name, _ in features.categorical] == ["title.tokens", "body.tokens"]

    def test_labels_become_categories(self) -> None:
        """Integer labels are categories named by their value."""
        features = extract_features(np.array([0, 2, 2], dtype=np.int64), "label")
        assert features.categorical == (("class", ["0", "2", "2"]),)
        assert features.numeric.shape == (3, 0)

    @pytest.mark.parametrize(
        ("array", "output", "kind"),
        [
            (np.zeros((2, 4), dtype=np.float32), False, "tabular"),
            (np.zeros((2, 3, 8, 8), dtype=np.uint8), False, "image"),
            (np.array([b"x"], dtype=object), False, "text"),
            (np.zeros(2, dtype=np.int64), True, "label"),
            (np.array([b"cat"], dtype=object), True, "label"),
            (np.zeros((2, 3), dtype=np.float32), True, "score"),
        ],
    )
    def test_kind_is_inferred_from_dtype_and_rank(
        self, array: np.ndarray, output: bool, kind: str
    ) -> None:
        """Strings, ranks and integer outputs decide how a tensor is read."""
        assert infer_kind(array, output=output) == kind
