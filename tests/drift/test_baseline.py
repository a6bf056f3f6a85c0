"""Building a baseline file from training data: npy, npz and csv inputs, names, and errors."""

from __future__ import annotations

from pathlib import Path

import modelgen
import numpy as np
import pytest

from agent.drift.baseline import build_baseline
from agent.drift.profile import BaselineError, Profile
from agent.errors import AgentError

FEATURES = modelgen.tabular_feature_names()


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three example classifiers as files."""
    folder = tmp_path_factory.mktemp("models")
    files = {
        "tabular": modelgen.tabular_classifier(),
        "digits": modelgen.image_classifier(),
        "reviews": modelgen.text_classifier(),
    }
    for name, content in files.items():
        (folder / f"{name}.onnx").write_bytes(content)
    return {name: folder / f"{name}.onnx" for name in files}


@pytest.fixture(scope="module")
def train() -> np.ndarray:
    x, _ = modelgen.tabular_data("train")
    return x


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def csv_of(path: Path, x: np.ndarray, header: list[str]) -> Path:
    return write_csv(path, header, [[repr(float(v)) for v in row] for row in x])


def build(
    model: Path, data: Path, tmp: Path, **options: object
) -> tuple[dict[str, object], Profile]:
    out = tmp / "baseline.msgpack"
    settings: dict[str, object] = {"features": None, "manifest": None}
    settings.update(options)
    summary = build_baseline(model, data, out=out, **settings)  # type: ignore[arg-type]
    return summary, Profile.loads(out.read_bytes())


class TestInputs:
    def test_npy_profiles_the_input_and_the_outputs(
        self, onnx_files: dict[str, Path], train: np.ndarray, tmp_path: Path
    ) -> None:
        """An .npy of the one input gives 30 features and the model's outputs on them."""
        np.save(tmp_path / "x.npy", train)
        summary, profile = build(onnx_files["tabular"], tmp_path / "x.npy", tmp_path)
        assert (summary["model"], summary["rows"], summary["features"]) == (
            "tabular",
            len(train),
            30,
        )
        assert [t.tensor for t in profile.outputs] == ["label", "probabilities"]
        assert profile.inputs[0].names()[:2] == ["f0", "f1"]
        assert summary["bytes"] == (tmp_path / "baseline.msgpack").stat().st_size

    def test_csv_header_names_the_features(
        self, onnx_files: dict[str, Path], train: np.ndarray, tmp_path: Path
    ) -> None:
        """A csv's header gives the feature names."""
        data = csv_of(tmp_path / "x.csv", train, FEATURES)
        _, profile = build(onnx_files["tabular"], data, tmp_path)
        assert profile.inputs[0].names() == FEATURES
        assert profile.rows == len(train)

    def test_empty_csv_cells_are_missing_values(
        self, onnx_files: dict[str, Path], train: np.ndarray, tmp_path: Path
    ) -> None:
        """An empty cell is a missing value, counted as such in the baseline."""
        rows = [[repr(float(v)) for v in row] for row in train[:50]]
        rows[0][0] = ""
        _, profile = build(
            onnx_files["tabular"], write_csv(tmp_path / "x.csv", FEATURES, rows), tmp_path
        )
        assert profile.inputs[0].numeric.missing(0) == 1

    def test_npz_gives_one_array_per_input(
        self, onnx_files: dict[str, Path], tmp_path: Path
    ) -> None:
        """An .npz named by input profiles images as per-channel statistics."""
        x, _ = modelgen.image_data("train")
        np.savez(tmp_path / "x.npz", image=x, labels=np.zeros(len(x)))
        _, profile = build(onnx_files["digits"], tmp_path / "x.npz", tmp_path)
        assert profile.inputs[0].kind == "image"
        assert profile.inputs[0].names() == ["channel0.mean", "channel0.std", "channel0.saturated"]

    def test_texts_give_lengths_and_tokens(
        self, onnx_files: dict[str, Path], tmp_path: Path
    ) -> None:
        """A str array for a BYTES input is profiled as text through the real model."""
        texts, _ = modelgen.text_data("train")
        np.save(tmp_path / "texts.npy", texts)
        _, profile = build(onnx_files["reviews"], tmp_path / "texts.npy", tmp_path)
        assert profile.inputs[0].names() == ["length", "tokens"]
        assert profile.outputs[0].categorical[0].counts().sum() == len(texts)


class TestNames:
    def test_the_manifest_names_the_model_and_its_features(
        self, onnx_files: dict[str, Path], train: np.ndarray, tmp_path: Path
    ) -> None:
        """[model] name and [inputs] from the manifest go into the baseline."""
        manifest = tmp_path / "manifest.toml"
        names = ", ".join(f'"{n}"' for n in FEATURES)
        manifest.write_text(f'[model]\nname = "cancer"\n\n[inputs]\nfloat_input = [{names}]\n')
        np.save(tmp_path / "x.npy", train)
        _, profile = build(onnx_files["tabular"], tmp_path / "x.npy", tmp_path, manifest=manifest)
        assert (profile.model, profile.inputs[0].names()) == ("cancer", FEATURES)

    def test_features_option_names_the_columns(
        self, onnx_files: dict[str, Path], train: np.ndarray, tmp_path: Path
    ) -> None:
        """--features names the one input's columns."""
        np.save(tmp_path / "x.npy", train)
        names = [f"c{j}" for j in range(30)]
        _, profile = build(onnx_files["tabular"], tmp_path / "x.npy", tmp_path, features=names)
        assert profile.inputs[0].names() == names

    def test_a_versioned_layout_is_named_by_its_folder(
        self, onnx_files: dict[str, Path], train: np.ndarray, tmp_path: Path
    ) -> None:
        """NAME/3/model.onnx builds a baseline for model NAME."""
        model = tmp_path / "cancer" / "3" / "model.onnx"
        model.parent.mkdir(parents=True)
        model.write_bytes(onnx_files["tabular"].read_bytes())
        np.save(tmp_path / "x.npy", train)
        _, profile = build(model, tmp_path / "x.npy", tmp_path)
        assert profile.model == "cancer"


class TestErrors:
    def test_a_csv_with_the_wrong_column_count_is_refused(
        self, onnx_files: dict[str, Path], train: np.ndarray, tmp_path: Path
    ) -> None:
        """29 columns for a 30-column input say what the model takes."""
        data = csv_of(tmp_path / "x.csv", train[:, :29], FEATURES[:29])
        with pytest.raises(BaselineError, match=r"takes \[-1, 30\].*give 30 columns"):
            build(onnx_files["tabular"], data, tmp_path)

    def test_a_ragged_csv_line_is_refused_with_its_number(
        self, onnx_files: dict[str, Path], tmp_path: Path
    ) -> None:
        """A line with fewer values than the header is named by its line number."""
        data = write_csv(tmp_path / "x.csv", FEATURES, [["1.0"] * 30, ["1.0"] * 2])
        with pytest.raises(BaselineError, match="line 3: 2 values, but the header names 30"):
            build(onnx_files["tabular"], data, tmp_path)

    def test_a_cell_that_is_not_a_number_is_named(
        self, onnx_files: dict[str, Path], tmp_path: Path
    ) -> None:
        """A text cell in a numeric csv names its line and column."""
        row = ["1.0"] * 30
        row[4] = "big"
        data = write_csv(tmp_path / "x.csv", FEATURES, [["1.0"] * 30, row])
        with pytest.raises(BaselineError, match=r'line 3, column "mean_smoothness": .big.'):
            build(onnx_files["tabular"], data, tmp_path)

    def test_feature_names_of_the_wrong_count_are_refused(
        self, onnx_files: dict[str, Path], train: np.ndarray, tmp_path: Path
    ) -> None:
        """--features must give one name per column."""
        np.save(tmp_path / "x.npy", train)
        with pytest.raises(BaselineError, match=r"--features gives 3 feature names.*30 columns"):
            build(onnx_files["tabular"], tmp_path / "x.npy", tmp_path, features=["a", "b", "c"])

    def test_names_that_disagree_with_the_manifest_are_refused(
        self, onnx_files: dict[str, Path], train: np.ndarray, tmp_path: Path
    ) -> None:
        """A csv header that differs from the manifest's [inputs] would be refused live."""
        manifest = tmp_path / "manifest.toml"
        names = ", ".join(f'"{n}"' for n in FEATURES)
        manifest.write_text(f"[inputs]\nfloat_input = [{names}]\n")
        data = csv_of(tmp_path / "x.csv", train, [f"c{j}" for j in range(30)])
        with pytest.raises(BaselineError, match="make them agree"):
            build(onnx_files["tabular"], data, tmp_path, manifest=manifest)

    def test_an_npz_without_the_input_is_refused(
        self, onnx_files: dict[str, Path], train: np.ndarray, tmp_path: Path
    ) -> None:
        """The npz's arrays must be named after the inputs."""
        np.savez(tmp_path / "x.npz", x=train)
        with pytest.raises(BaselineError, match="has arrays x but no array for input float_input"):
            build(onnx_files["tabular"], tmp_path / "x.npz", tmp_path)

    def test_texts_for_a_numeric_input_are_refused(
        self, onnx_files: dict[str, Path], tmp_path: Path
    ) -> None:
        """Strings cannot feed an FP32 input."""
        np.save(tmp_path / "x.npy", np.full((4, 30), "x"))
        with pytest.raises(BaselineError, match="takes FP32, the data is <U1; give numbers"):
            build(onnx_files["tabular"], tmp_path / "x.npy", tmp_path)

    @pytest.mark.parametrize("suffix", [".npy", ".npz"])
    def test_an_unreadable_data_file_is_refused(
        self, onnx_files: dict[str, Path], tmp_path: Path, suffix: str
    ) -> None:
        """Bytes that are not numpy data say which file and how to save it."""
        data = tmp_path / f"x{suffix}"
        data.write_bytes(b"not numpy")
        with pytest.raises(BaselineError, match=f"cannot read .*x\\{suffix}"):
            build(onnx_files["tabular"], data, tmp_path)

    def test_an_unknown_data_format_is_refused(
        self, onnx_files: dict[str, Path], tmp_path: Path
    ) -> None:
        """Only npy, npz and csv are read."""
        (tmp_path / "x.parquet").write_bytes(b"")
        with pytest.raises(BaselineError, match=r"unknown data format '\.parquet'"):
            build(onnx_files["tabular"], tmp_path / "x.parquet", tmp_path)

    def test_an_unreadable_model_is_refused(self, train: np.ndarray, tmp_path: Path) -> None:
        """A model file onnxruntime cannot load is an error, not a crash."""
        (tmp_path / "m.onnx").write_bytes(b"not onnx")
        np.save(tmp_path / "x.npy", train)
        with pytest.raises(BaselineError, match="cannot load the model"):
            build(tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path)

    def test_errors_are_agent_errors_and_leave_no_file(
        self, onnx_files: dict[str, Path], tmp_path: Path
    ) -> None:
        """A refused build is an AgentError (422) and writes nothing."""
        (tmp_path / "x.npy").write_bytes(b"not numpy")
        with pytest.raises(AgentError) as caught:
            build(onnx_files["tabular"], tmp_path / "x.npy", tmp_path)
        assert caught.value.status == 422
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


class TestWriting:
    def test_the_file_is_replaced_whole(
        self, onnx_files: dict[str, Path], train: np.ndarray, tmp_path: Path
    ) -> None:
        """Rebuilding replaces the old file and leaves no temp file behind."""
        np.save(tmp_path / "x.npy", train)
        (tmp_path / "baseline.msgpack").write_bytes(b"old")
        build(onnx_files["tabular"], tmp_path / "x.npy", tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline.msgpack", "x.npy"]

    def test_an_unwritable_destination_is_refused(
        self, onnx_files: dict[str, Path], train: np.ndarray, tmp_path: Path
    ) -> None:
        """A missing output folder is a clear error."""
        np.save(tmp_path / "x.npy", train)
        with pytest.raises(BaselineError, match="cannot write the baseline"):
            build_baseline(
                onnx_files["tabular"],
                tmp_path / "x.npy",
                features=None,
                manifest=None,
                out=tmp_path / "absent" / "b.msgpack",
            )
