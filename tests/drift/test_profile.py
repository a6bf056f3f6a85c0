"""Baselines: frozen edges, per-feature reference statistics, the artifact, compatibility."""

from __future__ import annotations

from http import HTTPStatus

import msgpack
import numpy as np
import pytest

from agent.drift.profile import (
    BaselineError,
    Profile,
    ProfileOptions,
    build_profile,
    check_compatible,
    freeze_edges,
)
from agent.tensors import TensorSpec


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2000, 4))
    x[::10, 2] = np.nan
    return {"x": x, "label": rng.integers(0, 3, size=2000)}


@pytest.fixture(scope="module")
def profile(reference: dict[str, np.ndarray]) -> Profile:
    return build_profile(
        "iris",
        {"x": reference["x"]},
        {"label": reference["label"]},
        names={"x": ["a", "b", "c", "d"]},
    )


INPUTS = [TensorSpec("x", "FP32", (-1, 4))]
OUTPUTS = [TensorSpec("label", "INT64", (-1,))]


class TestEdges:
    def test_continuous_feature_gets_the_requested_bins(self) -> None:
        """Ten bins need nine inner edges at the reference deciles."""
        values = np.random.default_rng(6).normal(size=1000)
        edges, bounds = freeze_edges(values, 10)
        assert len(edges) == 9
        deciles = np.quantile(values, np.arange(1, 10) / 10, method="inverted_cdf")
        assert edges == deciles.tolist()
        assert bounds == (values.min(), values.max())

    def test_ties_are_merged(self) -> None:
        """A feature with three distinct values gets its values as edges, each once."""
        values = np.array([0.0] * 70 + [1.0] * 20 + [5.0] * 10)
        edges, _ = freeze_edges(values, 20)
        assert edges == [0.0, 1.0, 5.0]

    def test_no_finite_value_gives_one_open_bin(self) -> None:
        """An all-missing reference has no inner edge and no bounds."""
        assert freeze_edges(np.array([np.nan, np.inf]), 10) == ([], None)

    def test_bins_outside_ten_to_twenty_are_refused(self) -> None:
        """ProfileOptions refuses bins outside 10..20 and says the range."""
        with pytest.raises(ValueError, match="expected 10 to 20"):
            ProfileOptions(bins=5)


class TestBuildProfile:
    def test_feature_statistics_match_the_reference(
        self, profile: Profile, reference: dict[str, np.ndarray]
    ) -> None:
        """Each feature keeps count, missing, min, max, mean and variance of the reference."""
        column = reference["x"][:, 2]
        finite = column[np.isfinite(column)]
        sketch = profile.inputs[0].numeric
        assert (sketch.count(2), sketch.missing(2)) == (finite.size, column.size - finite.size)
        assert sketch.extremes(2) == (finite.min(), finite.max())
        assert sketch.mean(2) == pytest.approx(finite.mean())
        assert sketch.variance(2) == pytest.approx(finite.var())
        assert sketch.counts(2).sum() == finite.size

    def test_features_are_named_from_the_manifest(self, profile: Profile) -> None:
        """Names given for an input name its features."""
        assert profile.inputs[0].names() == ["a", "b", "c", "d"]

    def test_label_output_keeps_class_frequencies(
        self, profile: Profile, reference: dict[str, np.ndarray]
    ) -> None:
        """An INT64 label output becomes class frequencies over the seen classes."""
        (sketch,) = profile.outputs[0].categorical
        counts = dict(zip(sketch.vocabulary, sketch.counts().tolist(), strict=False))
        assert counts == {
            str(c): int(n)
            for c, n in zip(*np.unique(reference["label"], return_counts=True), strict=True)
        }

    def test_rows_are_the_reference_rows(self, profile: Profile) -> None:
        """The profile records how many rows it was built from."""
        assert profile.rows == 2000


class TestArtifact:
    def test_round_trip_keeps_everything(self, profile: Profile) -> None:
        """dumps then loads gives the same document."""
        again = Profile.loads(profile.dumps())
        assert again.to_document() == profile.to_document()

    def test_document_is_versioned(self, profile: Profile) -> None:
        """The artifact names its format, version and model, and lists features and outputs."""
        document = msgpack.unpackb(profile.dumps(), raw=False)
        assert (document["format"], document["version"], document["model"]) == (
            "edge-agent-baseline",
            1,
            "iris",
        )
        feature = document["features"][0]
        assert {"input", "name", "edges", "counts", "count", "missing", "min", "max"} <= set(
            feature
        )
        assert {"mean", "variance", "kll"} <= set(feature)
        assert document["outputs"][0]["type"] == "categorical"

    def test_corrupt_bytes_are_refused(self) -> None:
        """Bytes that are not msgpack raise BaselineError saying the file is corrupt."""
        with pytest.raises(BaselineError, match="corrupt or truncated"):
            Profile.loads(b"\xc1 not a baseline")

    def test_truncated_artifact_is_refused(self, profile: Profile) -> None:
        """A truncated file raises BaselineError, not a msgpack error."""
        with pytest.raises(BaselineError, match="corrupt or truncated"):
            Profile.loads(profile.dumps()[:-40])

    def test_other_format_is_refused(self) -> None:
        """A msgpack document of another kind is named as not a baseline."""
        with pytest.raises(BaselineError, match="not an edge-agent baseline"):
            Profile.loads(msgpack.packb({"format": "something-else", "version": 1}))

    def test_other_version_is_refused(self, profile: Profile) -> None:
        """A future version is refused with the version this agent reads."""
        document = profile.to_document()
        document["version"] = 2
        with pytest.raises(BaselineError, match=r"version 2 is not supported .*reads version 1"):
            Profile.loads(msgpack.packb(document))

    def test_damaged_feature_is_refused(self, profile: Profile) -> None:
        """A feature with a missing field raises BaselineError naming it."""
        document = profile.to_document()
        del document["features"][1]["edges"]
        with pytest.raises(BaselineError, match="'edges' is missing"):
            Profile.loads(msgpack.packb(document))

    def test_baseline_error_is_unprocessable(self) -> None:
        """BaselineError maps to HTTP 422."""
        assert BaselineError.status == HTTPStatus.UNPROCESSABLE_ENTITY


class TestCompatibility:
    def test_matching_signature_passes(self, profile: Profile) -> None:
        """A baseline of this model's inputs and outputs is accepted."""
        check_compatible(profile, model="iris", inputs=INPUTS, outputs=OUTPUTS)

    def test_another_models_baseline_is_refused(self, profile: Profile) -> None:
        """A baseline built for another model names both models."""
        with pytest.raises(BaselineError, match='baseline is for model "iris", not "wine"'):
            check_compatible(profile, model="wine", inputs=INPUTS, outputs=OUTPUTS)

    def test_wrong_feature_count_is_refused(self, profile: Profile) -> None:
        """A baseline with 4 features for a 5-column input says both counts."""
        inputs = [TensorSpec("x", "FP32", (-1, 5))]
        with pytest.raises(BaselineError, match=r"4 numeric features for \"x\".*\[-1, 5\] gives 5"):
            check_compatible(profile, model="iris", inputs=inputs, outputs=OUTPUTS)

    def test_unknown_input_is_refused(self, profile: Profile) -> None:
        """A baseline profiling an input the model lacks lists the model's inputs."""
        inputs = [TensorSpec("float_input", "FP32", (-1, 4))]
        with pytest.raises(BaselineError, match=r'input "x".*its inputs: float_input'):
            check_compatible(profile, model="iris", inputs=inputs, outputs=OUTPUTS)

    def test_renamed_features_are_refused(self, profile: Profile) -> None:
        """Manifest feature names that differ from the baseline's are reported."""
        with pytest.raises(BaselineError, match="fix the manifest"):
            check_compatible(
                profile,
                model="iris",
                inputs=INPUTS,
                outputs=OUTPUTS,
                names={"x": ["a", "b", "d", "c"]},
            )

    def test_image_width_follows_the_channels(self) -> None:
        """An image baseline of 3 channels fits NCHW [-1, 3, 8, 8] and not 1 channel."""
        images = np.random.default_rng(7).integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)
        baseline = build_profile("cam", {"img": images})
        check_compatible(baseline, model="cam", inputs=[TensorSpec("img", "UINT8", (-1, 3, 8, 8))])
        with pytest.raises(BaselineError, match="gives 3"):
            check_compatible(
                baseline, model="cam", inputs=[TensorSpec("img", "UINT8", (-1, 1, 8, 8))]
            )
