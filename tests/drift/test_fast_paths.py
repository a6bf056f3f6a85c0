"""The drift hot path against straightforward references: image statistics (float32 blocks,
integer counts, stacked batches), the per-version batching of prediction events, and the
numeric sketch's vectorised update.

Tolerances pinned here (the image statistics are computed in float32 for float32, float16
and 8/16-bit integer pixels):

- mean: within 1e-6 * max|pixel| of numpy's float64 mean (exact for 8/16-bit integers);
- std: within 1e-5 * std + 1e-6 * max|pixel| of numpy's float64 std, and within 1e-5
  relative on realistic images (also 512 x 512, where an unpaired float32 sum would not be);
- saturated share, constant channels (std exactly 0, mean exactly the value): exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.clock import ManualClock
from agent.drift import features
from agent.drift.features import Stacked, channels_first, extract_features, infer_kind
from agent.drift.profile import BaselineError, build_profile
from agent.drift.sketches import NumericSketch
from agent.drift.versions import DriftConfig, Watched, make_plan
from agent.drift.window import ModelDriftState
from agent.events import PredictionEvent
from agent.tensors import TensorSpec

Array = npt.NDArray[Any]


def reference(images: Array, saturation: tuple[float, float] | None = None) -> Array:
    """The image features as plain numpy computes them, all in float64 (the old code)."""
    x = images[:, None] if images.ndim == 3 else images
    if saturation is None:
        if x.dtype.kind in "iu":
            info = np.iinfo(x.dtype)
            saturation = (float(info.min), float(info.max))
        else:
            saturation = (0.0, 1.0)
    dark, bright = saturation
    rows = x.shape[0]
    if channels_first(x.shape):
        pixels, axis = x.reshape(rows, x.shape[1], -1), 2
    else:
        pixels, axis = x.reshape(rows, -1, x.shape[3]), 1
    with np.errstate(invalid="ignore", over="ignore"):
        mean = pixels.mean(axis=axis, dtype=np.float64)
        std = pixels.std(axis=axis, dtype=np.float64)
    saturated = ((pixels <= dark) | (pixels >= bright)).mean(axis=axis)
    return np.stack([mean, std, saturated], axis=2)


def stats(images: Array, saturation: tuple[float, float] | None = None) -> Array:
    """extract_features' image features as (rows, channels, [mean, std, saturated])."""
    found = extract_features(images, "image", saturation=saturation)
    return found.numeric.reshape(found.rows, -1, 3)


def largest(images: Array) -> Array:
    """max |pixel| per (row, channel), in the layout of ``stats``."""
    x = np.abs(images.astype(np.float64))
    x = x[:, None] if x.ndim == 3 else x
    axes = (2, 3) if channels_first(x.shape) else (1, 2)
    return x.max(axis=axes)


def assert_matches_reference(images: Array, saturation: tuple[float, float] | None = None) -> None:
    found, expected = stats(images, saturation), reference(images, saturation)
    scale = largest(images)
    np.testing.assert_array_less(np.abs(found[..., 0] - expected[..., 0]), 1e-6 * scale + 1e-300)
    std_error = np.abs(found[..., 1] - expected[..., 1])
    np.testing.assert_array_less(std_error, 1e-5 * expected[..., 1] + 1e-6 * scale + 1e-300)
    np.testing.assert_array_equal(found[..., 2], expected[..., 2])


def realistic(rng: np.random.Generator, shape: tuple[int, ...]) -> Array:
    """Photos in [0, 1]: a per-image brightness, noise, some clipped pixels."""
    rows, channels = shape[0], shape[1]
    base = rng.normal(0.5, 0.1, size=(rows, channels, 1, 1))
    noisy = base + rng.normal(0.0, 0.25, size=shape)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


@st.composite
def image_batches(draw: st.DrawFn) -> Array:
    """Random images of any layout, dtype and value distribution, some NaN or infinite."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = draw(st.integers(1, 5))
    channels = draw(st.sampled_from([1, 3, 4]))
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    layout = draw(st.sampled_from(["nchw", "nhwc", "nhw"]))
    dtype = np.dtype(draw(st.sampled_from(["f4", "f2", "f8", "u1", "i1", "u2", "i2", "i4"])))
    if dtype.kind == "f":
        scale = draw(st.sampled_from([1.0, 1e-3, 255.0, 1e4, 1e-30, 1e30]))
        offset = draw(st.sampled_from([0.0, 0.5, -3.0, 1000.0]))
        spread = draw(st.sampled_from([1.0, 1e-3, 0.0]))
        values = (offset + spread * rng.normal(size=(rows, channels, height, width))) * scale
        values = np.where(rng.random(values.shape) < 0.1, np.round(values), values)
        if draw(st.booleans()):  # saturate some pixels of float images in [0, 1]
            values = np.clip(values, 0.0, 1.0)
        with np.errstate(over="ignore"):
            images = values.astype(dtype)
        if draw(st.integers(0, 9)) == 0:
            images.flat[rng.integers(images.size)] = draw(st.sampled_from([np.nan, np.inf]))
    else:
        info = np.iinfo(dtype)
        low = draw(st.sampled_from([int(info.min), 0, 3]))
        high = draw(st.sampled_from([int(info.max), 100]))
        low, high = min(low, high), max(low, high)
        images = rng.integers(low, high, size=(rows, channels, height, width), endpoint=True)
        images = images.astype(dtype)
    if layout == "nhwc":
        return np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    return images[:, 0] if layout == "nhw" else images


class TestImageStatistics:
    @settings(max_examples=300, deadline=None)
    @given(image_batches())
    def test_any_image_batch_matches_float64_numpy(self, images: Array) -> None:
        """Every layout and dtype, NaN and infinities included, within the stated tolerance."""
        found, expected = stats(images), reference(images)
        np.testing.assert_array_equal(np.isnan(found), np.isnan(expected))
        np.testing.assert_array_equal(np.isinf(found), np.isinf(expected))
        finite = np.isfinite(expected)
        found, expected = np.where(finite, found, 0.0), np.where(finite, expected, 0.0)
        with np.errstate(invalid="ignore"):
            scale = np.nan_to_num(largest(images), posinf=0.0)
        assert np.all(np.abs(found[..., 0] - expected[..., 0]) <= 1e-6 * scale)
        tolerance = 1e-5 * expected[..., 1] + 1e-6 * scale
        assert np.all(np.abs(found[..., 1] - expected[..., 1]) <= tolerance)
        np.testing.assert_array_equal(found[..., 2], expected[..., 2])

    @pytest.mark.parametrize("side", [64, 224, 512])
    def test_realistic_images_keep_std_to_1e_5_relative(self, side: int) -> None:
        """Pairwise float32 sums: the error does not grow with the pixel count."""
        images = realistic(np.random.default_rng(side), (3, 3, side, side))
        found, expected = stats(images), reference(images)
        np.testing.assert_allclose(found[..., 1], expected[..., 1], rtol=1e-5)
        np.testing.assert_allclose(found[..., 0], expected[..., 0], rtol=1e-6)
        np.testing.assert_array_equal(found[..., 2], expected[..., 2])

    def test_low_contrast_on_a_large_offset_does_not_cancel(self) -> None:
        """std << mean: a two-pass variance keeps it; E[x^2] - mean^2 in float32 would not."""
        rng = np.random.default_rng(3)
        images = (1000.0 + 0.01 * rng.normal(size=(4, 3, 32, 32))).astype(np.float32)
        np.testing.assert_allclose(stats(images)[..., 1], reference(images)[..., 1], rtol=1e-4)

    @pytest.mark.parametrize("noise", ["uniform", "normal"])
    def test_a_spread_of_a_few_ulps_keeps_its_std(self, noise: str) -> None:
        """Pixels within a few float32 ulps of a large value: the rounding of the mean must
        not dominate the spread (a float32 mean gave 46 % too much here)."""
        rng = np.random.default_rng(11)
        shape = (4, 3, 32, 32)
        spread = rng.uniform(0, 1e-3, shape) if noise == "uniform" else rng.normal(0, 2e-3, shape)
        images = (1e4 + spread).astype(np.float32)
        np.testing.assert_allclose(stats(images)[..., 1], reference(images)[..., 1], rtol=1e-6)
        np.testing.assert_allclose(stats(images)[..., 0], reference(images)[..., 0], rtol=1e-9)

    @pytest.mark.parametrize(
        ("value", "dtype"),
        [(0.1, "f4"), (0.3, "f4"), (1e-30, "f4"), (-5.5, "f4"), (1e20, "f4"), (0.1, "f8"),
         (0.7, "f2"), (0, "f4"), (7, "u1"), (-3, "i2")],
    )  # fmt: skip
    def test_constant_images_have_exactly_zero_std(self, value: float, dtype: str) -> None:
        """The mean is the value itself and the std exactly 0: no rounding noise, no NaN."""
        images = np.full((2, 3, 64, 64), value, dtype=dtype)
        found = stats(images)
        assert np.all(found[..., 0] == float(images.flat[0]))
        assert np.all(found[..., 1] == 0.0)

    def test_nan_and_infinite_channels_are_as_numpy_has_them(self) -> None:
        """NaN or inf statistics where numpy has them; saturated pixels still counted."""
        images = np.zeros((1, 3, 4, 4), dtype=np.float32)
        images[0, 0, 0, :3] = [np.nan, 1.0, 0.5]
        images[0, 1] = np.inf
        images[0, 2, 0, :2] = [np.inf, 0.5]
        found, expected = stats(images), reference(images)
        np.testing.assert_array_equal(found, expected)
        assert np.isnan(found[0, 0, :2]).all()
        assert found[0, 0, 2] == 14 / 16  # 13 zeros and a 1.0
        assert found[0, 1, 0] == np.inf
        assert np.isnan(found[0, 1, 1])

    def test_pixels_too_small_or_large_for_float32_squares_are_redone(self) -> None:
        """Squared deviations of 1e-30 underflow float32, of 1e30 overflow it: those
        channels are recomputed in float64 (a mean of exactly 0 hides nothing either)."""
        rng = np.random.default_rng(9)
        images = np.empty((2, 3, 16, 16), dtype=np.float32)
        images[:, 0] = np.resize([1e-30, -1e-30], (16, 16))
        images[:, 1] = 1e30 * (1 + 0.1 * rng.normal(size=(2, 16, 16)))
        images[:, 2] = 1e-20 * rng.random((2, 16, 16))
        found, expected = stats(images), reference(images)
        np.testing.assert_allclose(found[..., :2], expected[..., :2], rtol=1e-5)
        assert found[0, 0, 1] == pytest.approx(1e-30, rel=1e-6)

    def test_pixels_at_and_beyond_the_bounds_are_saturated(self) -> None:
        """<= dark or >= bright counts; the nearest values inside do not."""
        inside = [np.nextafter(np.float32(0), np.float32(1)), np.nextafter(np.float32(1), 0)]
        row = np.array([0.0, 1.0, -0.5, 1.5, *inside, 0.5, 0.25], dtype=np.float32)
        images = np.stack([row, np.full(8, 0.5, np.float32), row[::-1]]).reshape(1, 3, 1, 8)
        found = stats(images)
        assert found[0, :, 2].tolist() == [0.5, 0.0, 0.5]
        assert_matches_reference(images)

    @pytest.mark.parametrize("dtype", ["u1", "i1", "u2", "i2", "i4", "u4", "?"])
    def test_integer_images_saturate_at_the_dtype_range(self, dtype: str) -> None:
        """Integer pixels at the dtype's min or max are saturated; means are exact."""
        kind = np.dtype(dtype)
        low, high = (0, 1) if kind.kind == "b" else (np.iinfo(kind).min, np.iinfo(kind).max)
        images = np.random.default_rng(5).integers(low, high, (3, 3, 16, 16), endpoint=True)
        images = images.astype(kind)
        images[0, 0, 0, :4] = [low, high, low, high]
        found, expected = stats(images), reference(images)
        np.testing.assert_array_equal(found[..., 0], expected[..., 0])
        np.testing.assert_array_equal(found[..., 2], expected[..., 2])
        np.testing.assert_allclose(found[..., 1], expected[..., 1], rtol=1e-6)

    def test_uint8_nhwc_and_nchw_agree_exactly(self) -> None:
        nchw = np.random.default_rng(6).integers(0, 256, (5, 3, 24, 20), dtype=np.uint8)
        nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(stats(nchw), stats(nhwc))
        assert_matches_reference(nhwc)

    @pytest.mark.parametrize(
        ("dtype", "saturation", "pixels"),
        [
            # float32 pixels compare with the bound rounded to float32, as numpy does:
            # float32(0.1) is just above 0.1, so a pixel of float32(0.1) is saturated.
            ("f4", (0.1, 0.9), [0.1, 0.9, 0.5, 0.0999]),
            ("f2", (0.1, 0.9), [0.1, 0.9, 0.5, 0.0999]),
            # Integers compare exactly: 10 is not <= 9.9999999999 (whose float32 is 10.0).
            ("u1", (9.9999999999, 250.00000001), [10, 250, 251, 9]),
            ("i2", (-0.5, 100.5), [0, -1, 100, 101]),
        ],
    )
    def test_given_bounds_classify_as_comparing_the_original_array(
        self, dtype: str, saturation: tuple[float, float], pixels: list[float]
    ) -> None:
        images = np.array(pixels, dtype=dtype).reshape(1, 1, 2, 2)
        np.testing.assert_array_equal(
            stats(images, saturation)[..., 2], reference(images, saturation)[..., 2]
        )

    def test_blocks_of_rows_do_not_change_the_result(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Rows are reduced a block at a time; the block size changes nothing."""
        images = realistic(np.random.default_rng(7), (13, 3, 16, 16))
        whole = stats(images)
        monkeypatch.setattr(features, "_IMAGE_BLOCK_VALUES", 3 * 16 * 16 * 2)
        np.testing.assert_array_equal(stats(images), whole)

    def test_more_saturated_pixels_than_a_uint16_holds_are_counted(self) -> None:
        """Counts are summed in uint16 slices: 90 000 saturated pixels must not wrap."""
        images = np.zeros((1, 1, 300, 300), dtype=np.float32)
        images[0, 0, 0, :7] = 0.5
        assert stats(images)[0, 0, 2] == (90_000 - 7) / 90_000

    def test_an_empty_batch_has_no_rows(self) -> None:
        found = extract_features(np.zeros((0, 3, 8, 8), np.float32), "image")
        assert found.rows == 0
        assert found.numeric.shape == (0, 9)


class TestStacked:
    @pytest.mark.parametrize("layout", ["nchw", "nhwc"])
    @pytest.mark.parametrize("dtype", ["f4", "u1"])
    def test_stacked_parts_equal_their_concatenation(
        self, layout: str, dtype: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Parts of 1 to 7 rows, blocks of 3 rows: runs join parts and split them."""
        monkeypatch.setattr(features, "_IMAGE_BLOCK_VALUES", 3 * 3 * 8 * 8)
        images = (realistic(np.random.default_rng(8), (20, 3, 8, 8)) * 255).astype(dtype)
        if layout == "nhwc":
            images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        cuts = [1, 2, 3, 7, 8, 9, 16, 20]
        parts = tuple(np.split(images, cuts[:-1]))
        stacked = extract_features(Stacked(parts), "image")
        whole = extract_features(images, "image")
        assert stacked.rows == 20
        assert stacked.numeric_names == whole.numeric_names
        np.testing.assert_array_equal(stacked.numeric, whole.numeric)

    def test_other_kinds_read_the_concatenation(self) -> None:
        parts = (np.arange(6.0).reshape(2, 3), np.arange(3.0).reshape(1, 3))
        stacked = Stacked(parts)
        assert stacked.shape == (3, 3)
        assert infer_kind(stacked, output=False) == "tabular"
        found = extract_features(stacked, "tabular")
        np.testing.assert_array_equal(found.numeric, np.concatenate(parts))


# --- the per-version batching of prediction events ------------------------------------------

INPUTS = (TensorSpec("x", "FP32", (-1, 4)),)
OUTPUTS = (TensorSpec("label", "INT64", (-1,)), TensorSpec("p", "FP32", (-1, 2)))
CONFIG = DriftConfig(
    window_s=60, reference_rows=10, psi_warn=0.1, psi_alert=0.25, min_rows=10, alert_share=0.2
)


def event(
    i: int,
    inputs: dict[str, Any],
    outputs: dict[str, Any],
    *,
    version: int = 1,
) -> PredictionEvent:
    return PredictionEvent(f"r{i}", "m", version, 0.0, inputs, outputs, 0.001)


def tabular_event(rng: np.random.Generator, i: int, rows: int = 1, version: int = 1) -> Any:
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    p = rng.random((rows, 2)).astype(np.float32)
    return event(i, {"x": x}, {"label": (x[:, 0] > 0).astype(np.int64), "p": p}, version=version)


def reference_batches(events: list[PredictionEvent]) -> list[tuple[dict[str, Array], ...]]:
    """The grouping Watched.update must reproduce: per event, the declared batched arrays,
    grouped by version and the set of (name, dtype, row shape), in order of first
    appearance; a batch lists its tensors in the order of its first event."""
    wanted = ({s.name for s in INPUTS}, {s.name for s in OUTPUTS})
    groups: dict[Any, list[tuple[dict[str, Array], dict[str, Array]]]] = {}
    for e in events:
        if e.version != 1:
            continue
        tensors = tuple(
            {
                name: a
                for name, a in arrays.items()
                if name in names and isinstance(a, np.ndarray) and a.ndim >= 1
            }
            for arrays, names in ((e.inputs, wanted[0]), (e.outputs, wanted[1]))
        )
        key = tuple(
            sorted(
                (role, name, a.dtype.str, a.shape[1:])
                for role, arrays in enumerate(tensors)
                for name, a in arrays.items()
            )
        )
        groups.setdefault(key, []).append((tensors[0], tensors[1]))
    return [
        tuple({n: np.concatenate([g[r][n] for g in group]) for n in group[0][r]} for r in (0, 1))
        for group in groups.values()
    ]


def spy_batches(watched: Watched, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record the batches Watched.update hands the version's state: per role, the tensor
    names in order with each one's dtype and values (Stacked parts concatenated)."""
    state = watched._entries[("m", 1)].state
    seen: list[Any] = []
    update = state.update

    def record(inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        seen.append(tuple(described(arrays) for arrays in (inputs, outputs)))
        update(inputs, outputs)

    monkeypatch.setattr(state, "update", record)
    return seen


def described(arrays: dict[str, Any]) -> list[tuple[str, str, list[Any]]]:
    def whole(a: Any) -> Array:
        return a.concatenate() if isinstance(a, Stacked) else a

    return [(name, whole(a).dtype.str, whole(a).tolist()) for name, a in arrays.items()]


def window_of(watched: Watched) -> list[dict[str, Any]]:
    """The closed window's features and outputs without the (randomised) KLL bytes."""
    (record,) = watched.roll_all()
    window = record.payload["window"]
    return [
        {k: v for k, v in feature.items() if k != "kll"}
        for feature in window["features"] + window["outputs"]
    ]


def watched_with_baseline(tmp_path: Path) -> Watched:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4)).astype(np.float32)
    outputs = {"label": (x[:, 0] > 0).astype(np.int64), "p": rng.random((500, 2), np.float32)}
    kinds: Any = {"x": "tabular", "label": "label", "p": "score"}
    path = tmp_path / "baseline.msgpack"
    path.write_bytes(build_profile("m", {"x": x}, outputs, kinds=kinds).dumps())
    plan = make_plan(
        CONFIG,
        inputs=INPUTS,
        outputs=OUTPUTS,
        baseline=path,
        features={},
        psi_warn=None,
        psi_alert=None,
    )
    watched = Watched(ManualClock())
    watched.install(("m", 1), plan, 0.0)
    return watched


def expected_window(tmp_path: Path, events: list[PredictionEvent]) -> list[dict[str, Any]]:
    """The same version fed the reference batches directly."""
    watched = watched_with_baseline(tmp_path)
    state: ModelDriftState = watched._entries[("m", 1)].state
    for inputs, outputs in reference_batches(events):
        try:
            state.update(inputs, outputs)
        except (BaselineError, ValueError):
            watched.refused += 1
    return window_of(watched)


def assert_same_windows(found: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert len(found) == len(expected)
    for a, b in zip(found, expected, strict=True):
        for key in ("mean", "variance", "m2"):
            found_value, expected_value = a.pop(key, None), b.pop(key, None)
            if expected_value is None:
                assert found_value is None
            else:
                assert found_value == pytest.approx(expected_value, rel=1e-9, abs=1e-9)
        assert a == b


class TestEventBatching:
    def test_uniform_events_become_one_batch(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        rng = np.random.default_rng(1)
        events = [tabular_event(rng, i) for i in range(50)]
        watched = watched_with_baseline(tmp_path)
        seen = spy_batches(watched, monkeypatch)
        watched.update(events)
        assert seen == [tuple(described(arrays) for arrays in b) for b in reference_batches(events)]
        assert len(seen) == 1
        assert_same_windows(window_of(watched), expected_window(tmp_path, events))

    def test_tensors_keep_the_order_of_the_events(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Outputs listed (p, label) in every event reach the state in that order."""
        rng = np.random.default_rng(5)
        events = []
        for i in range(10):
            e = tabular_event(rng, i)
            events.append(event(i, e.inputs, {"p": e.outputs["p"], "label": e.outputs["label"]}))
        watched = watched_with_baseline(tmp_path)
        seen = spy_batches(watched, monkeypatch)
        watched.update(events)
        assert [name for name, _, _ in seen[0][1]] == ["p", "label"]

    @pytest.mark.parametrize(
        "odd",
        [
            "missing_output",
            "other_dtype",
            "scalar",
            "scalar_label",
            "not_an_array",
            "undeclared",
            "reordered",
            "other_version",
            "more_rows",
        ],
    )
    def test_mixed_events_are_grouped_as_per_event(
        self, odd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """One odd event among uniform ones gives exactly the per-event grouping."""
        rng = np.random.default_rng(2)
        events = [tabular_event(rng, i) for i in range(30)]
        e = events[7]
        inputs, outputs = dict(e.inputs), dict(e.outputs)
        version = 1
        if odd == "missing_output":
            del outputs["p"]
        elif odd == "other_dtype":
            inputs["x"] = inputs["x"].astype(np.float64)
        elif odd == "scalar":
            outputs["p"] = np.array(0.5, dtype=np.float32)
        elif odd == "scalar_label":
            outputs["label"] = np.array(1, dtype=np.int64)
        elif odd == "not_an_array":
            outputs["p"] = [[0.1, 0.9]]
        elif odd == "undeclared":
            inputs["extra"] = np.zeros((1, 9))
        elif odd == "reordered":
            outputs = {"p": outputs["p"], "label": outputs["label"]}
        elif odd == "other_version":
            version = 2
        else:
            events[9] = tabular_event(rng, 9, rows=3)
        events[7] = event(7, inputs, outputs, version=version)
        watched = watched_with_baseline(tmp_path)
        seen = spy_batches(watched, monkeypatch)
        watched.update(events)
        assert seen == [tuple(described(arrays) for arrays in b) for b in reference_batches(events)]
        one = ("undeclared", "reordered", "other_version", "more_rows")
        assert len(seen) == (1 if odd in one else 2)
        assert_same_windows(window_of(watched), expected_window(tmp_path, events))

    def test_a_misfit_group_is_refused_and_the_rest_applied(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(3)
        events = [tabular_event(rng, i) for i in range(20)]
        events[4] = event(4, {"x": np.zeros((1, 5), np.float32)}, dict(events[4].outputs))
        watched = watched_with_baseline(tmp_path)
        watched.update(events)
        assert watched.refused == 1
        assert_same_windows(window_of(watched), expected_window(tmp_path, events))

    def test_image_events_are_stacked_not_concatenated(self) -> None:
        """Image tensors reach the features as Stacked parts, with the same result."""
        rng = np.random.default_rng(4)
        specs = (TensorSpec("image", "FP32", (-1, 3, 8, 8)),)
        outs = (TensorSpec("score", "FP32", (-1, 2)),)
        plan = make_plan(
            CONFIG,
            inputs=specs,
            outputs=outs,
            baseline=None,
            features={},
            psi_warn=None,
            psi_alert=None,
        )
        images = realistic(rng, (40, 3, 8, 8))
        scores = rng.random((40, 2)).astype(np.float32)
        events = [
            event(i, {"image": images[i : i + 1]}, {"score": scores[i : i + 1]}) for i in range(40)
        ]
        seen: list[Any] = []
        original = features._image

        def spy(batch: Any, saturation: Any) -> Any:
            seen.append(batch)
            return original(batch, saturation)

        watched = Watched(ManualClock())
        watched.install(("m", 1), plan, 0.0)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(features, "_image", spy)
            watched.update(events[:20])  # the live reference (10 rows) freezes here
            watched.update(events[20:])
        assert seen
        assert all(isinstance(batch, Stacked) for batch in seen)
        direct = ModelDriftState(
            model="m",
            version="1",
            start=0.0,
            settings=plan.settings,
            kinds=plan.kinds,
            names=plan.names,
        )
        direct.update({"image": images[:20]}, {"score": scores[:20]})
        direct.update({"image": images[20:]}, {"score": scores[20:]})
        found = watched.report(("m", 1), "current")
        assert found is not None
        expected = direct.report("current", 0.0)
        assert found["features"] == expected["features"]


# --- the numeric sketch's vectorised update --------------------------------------------------

EDGES = [[-1.0, 0.0, 1.0], [10.0, 20.0], [], [0.5]]
BOUNDS: list[tuple[float, float] | None] = [(-2.0, 2.0), (0.0, 30.0), None, (0.0, 1.0)]


class TestNumericSketchReference:
    @settings(max_examples=100, deadline=None)
    @given(
        st.integers(0, 2**32 - 1),
        st.integers(1, 600),
        st.floats(0.0, 0.3),
    )
    def test_update_matches_a_column_by_column_reference(
        self, seed: int, rows: int, missing: float
    ) -> None:
        """Counts, missing, out of range and extremes exactly; moments to 1e-9."""
        rng = np.random.default_rng(seed)
        data = rng.normal(scale=15, size=(rows, 4))
        # Values on the edges and bounds, where < and <= differ.
        on_edges = rng.random(data.shape) < 0.2
        special = [-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 10.0, 20.0, 30.0]
        data[on_edges] = rng.choice(special, size=int(on_edges.sum()))
        holes = rng.random(data.shape) < missing
        data[holes] = rng.choice([np.nan, np.inf, -np.inf], size=int(holes.sum()))
        sketch = NumericSketch(EDGES, BOUNDS, k=100)
        sketch.update(data[: rows // 2])
        sketch.update(data[rows // 2 :])
        for j, edges in enumerate(EDGES):
            column = data[:, j]
            finite = column[np.isfinite(column)]
            index = np.searchsorted(edges, finite, side="right")
            assert (
                sketch.counts(j).tolist() == np.bincount(index, minlength=len(edges) + 1).tolist()
            )
            assert sketch.count(j) == finite.size
            assert sketch.missing(j) == rows - finite.size
            bounds = BOUNDS[j]
            outside = (
                0 if bounds is None else int(np.sum((finite < bounds[0]) | (finite > bounds[1])))
            )
            assert sketch.out_of_range(j) == outside
            if finite.size == 0:
                assert sketch.extremes(j) is None
                continue
            assert sketch.extremes(j) == (finite.min(), finite.max())
            assert sketch.mean(j) == pytest.approx(finite.mean(), rel=1e-9, abs=1e-9)
            assert sketch.variance(j) == pytest.approx(finite.var(), rel=1e-9, abs=1e-9)
