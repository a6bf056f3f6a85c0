"""Drift end to end: a real agent, baselines built from training data, shifted live traffic."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import modelgen
import numpy as np
import pytest
from conftest import Agent, MakeAgent

from agent.drift.baseline import build_baseline
from agent.drift.profile import build_profile

BATCH = 32
FEATURES = modelgen.tabular_feature_names()
#: Three tabular features the live traffic moves; every other one is sent as trained.
SHIFTED = ("mean_texture", "worst_radius", "worst_concave_points")
DRIFT = {"drift": {"min_rows": 100, "window_s": 3600.0}}


def shifted(x: np.ndarray, names: tuple[str, ...], by: float = 1.5) -> np.ndarray:
    """The rows with the named features moved by ``by`` of their standard deviations."""
    moved = x.copy()
    for name in names:
        j = FEATURES.index(name)
        moved[:, j] += by * x[:, j].std()
    return moved


def v2_document(name: str, datatype: str, rows: np.ndarray) -> dict[str, Any]:
    data = [str(v) for v in rows.tolist()] if datatype == "BYTES" else rows.reshape(-1).tolist()
    return {
        "inputs": [{"name": name, "shape": list(rows.shape), "datatype": datatype, "data": data}]
    }


async def send(agent: Agent, model: str, name: str, datatype: str, x: np.ndarray) -> None:
    """Predict every row, BATCH rows per request."""
    for start in range(0, len(x), BATCH):
        status, body = await agent.infer_json(
            model, v2_document(name, datatype, x[start : start + BATCH])
        )
        assert status == 200, body


async def drift_report(agent: Agent, model: str, window: str = "deploy") -> dict[str, Any]:
    url = f"{agent.url}/v1/models/{model}/drift"
    async with agent.client.get(url, params={"window": window}) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body


async def report_until(agent: Agent, model: str, done: Callable[[Any], bool]) -> Any:
    """Poll the drift report until ``done(report)`` (the drift tap is asynchronous)."""
    report: dict[str, Any] = {}
    for _ in range(200):
        report = await drift_report(agent, model)
        if done(report):
            return report
        await asyncio.sleep(0.05)
    raise AssertionError(f"the drift report never got there: {report}")


async def report_when(agent: Agent, model: str, rows: int) -> Any:
    """The report once it covers ``rows`` rows."""
    return await report_until(agent, model, lambda r: r["window"]["rows"] >= rows)


def statuses(features: list[dict[str, Any]]) -> dict[str, str]:
    return {f["name"]: f["status"] for f in features}


def manifest(name: str, *, inputs: dict[str, list[str]] | None = None) -> str:
    lines = ["[drift]", f'baseline = "{name}_baseline.msgpack"', ""]
    if inputs:
        lines.append("[inputs]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in inputs.items()]  # JSON lists are TOML
    return "\n".join(lines) + "\n"


def with_baseline(
    tmp: Path, name: str, model: bytes, data: np.ndarray, text: str, *, as_name: str | None = None
) -> dict[str, bytes | Path]:
    """Drop-dir files: the model, its manifest, and a baseline built from ``data``."""
    build = tmp / "build"
    build.mkdir(exist_ok=True)
    (build / f"{name}.onnx").write_bytes(model)
    (build / f"{name}.toml").write_text(text)
    np.save(build / f"{name}.npy", data)
    out = build / f"{name}_baseline.msgpack"
    build_baseline(
        build / f"{name}.onnx",
        build / f"{name}.npy",
        features=None,
        manifest=build / f"{name}.toml",
        out=out,
        name=as_name,
    )
    return {f"{name}.onnx": model, f"{name}.toml": text.encode(), out.name: out}


class TestAgainstABaseline:
    async def test_exactly_the_shifted_tabular_features_alert(
        self, make_agent: MakeAgent, models: dict[str, bytes], tmp_path: Path
    ) -> None:
        """Three features moved by 1.5 std alert, the other 27 stay ok, the outputs drift."""
        x, _ = modelgen.tabular_data("train")
        text = manifest("tabular", inputs={"float_input": FEATURES})
        files = with_baseline(tmp_path, "tabular", models["tabular"], x, text)
        agent = await make_agent(files, DRIFT)
        await send(agent, "tabular", "float_input", "FP32", shifted(x, SHIFTED))
        report = await report_when(agent, "tabular", len(x))
        assert report["reference"] == "baseline"
        assert statuses(report["features"]) == {
            name: "alert" if name in SHIFTED else "ok" for name in FEATURES
        }
        assert {"warn", "alert"} & set(statuses(report["outputs"]).values())
        assert report["status"] == "alert"

    async def test_brighter_images_alert(
        self, make_agent: MakeAgent, models: dict[str, bytes], tmp_path: Path
    ) -> None:
        """Digits brightened by a quarter of the range alert on the channel mean."""
        x, _ = modelgen.image_data("train")
        files = with_baseline(tmp_path, "digits", models["image"], x, manifest("digits"))
        agent = await make_agent(files, DRIFT)
        live = np.clip(x[:320] + 0.25, 0.0, 1.0).astype(np.float32)
        await send(agent, "digits", "image", "FP32", live)
        report = await report_when(agent, "digits", len(live))
        assert report["reference"] == "baseline"
        assert statuses(report["features"])["channel0.mean"] == "alert"
        assert report["status"] == "alert"

    async def test_another_vocabulary_alerts(
        self, make_agent: MakeAgent, models: dict[str, bytes], tmp_path: Path
    ) -> None:
        """Reviews in words the training texts never used alert on the tokens."""
        texts, _ = modelgen.text_data("train")
        files = with_baseline(tmp_path, "reviews", models["text"], texts, manifest("reviews"))
        agent = await make_agent(files, DRIFT)
        words = ["lieferung", "kaputt", "preis", "zufrieden", "schnell", "qualität", "paket"]
        rng = np.random.default_rng(3)
        live = np.array([" ".join(rng.choice(words, size=6)) for _ in range(128)], dtype=str)
        await send(agent, "reviews", "text", "BYTES", live)
        report = await report_when(agent, "reviews", len(live))
        assert statuses(report["features"])["tokens"] == "alert"
        assert report["status"] == "alert"


class TestWithoutABaseline:
    async def test_the_first_rows_are_the_reference_and_a_shift_alerts(
        self, make_agent: MakeAgent, models: dict[str, bytes]
    ) -> None:
        """The first reference_rows predictions become the reference; shifted ones alert."""
        x, _ = modelgen.tabular_data("train")
        overrides = {"drift": {**DRIFT["drift"], "reference_rows": len(x)}}
        agent = await make_agent({"tabular.onnx": models["tabular"]}, overrides)
        await send(agent, "tabular", "float_input", "FP32", x)
        await report_until(agent, "tabular", lambda r: bool(r["features"]))
        await send(agent, "tabular", "float_input", "FP32", shifted(x, SHIFTED[:1], by=2.0))
        report = await report_when(agent, "tabular", len(x))
        assert (report["reference"], report["reference_rows"]) == ("live", len(x))
        alerts = {
            name for name, status in statuses(report["features"]).items() if status == "alert"
        }
        assert alerts == {f"f{FEATURES.index(SHIFTED[0])}"}


def bad_baseline(fault: str, tmp: Path, model: bytes, x: np.ndarray) -> bytes:
    """Baseline bytes with one fault: corrupt, built for another model, or 10 of 30 features."""
    if fault == "corrupt":
        return b"\x00 this is not a baseline"
    if fault == "other-model":
        files = with_baseline(tmp, "tabular", model, x, manifest("tabular"), as_name="other")
        return Path(files["tabular_baseline.msgpack"]).read_bytes()
    narrow = build_profile("tabular", {"float_input": x[:, :10]}, kinds={"float_input": "tabular"})
    return narrow.dumps()


class TestABadBaseline:
    @pytest.mark.parametrize(
        ("fault", "reason"),
        [
            ("corrupt", "corrupt"),
            ("other-model", 'baseline is for model "other", not "tabular"'),
            ("wrong-feature-count", "10 numeric features"),
        ],
    )
    async def test_the_model_serves_and_the_report_says_why(
        self,
        make_agent: MakeAgent,
        models: dict[str, bytes],
        tmp_path: Path,
        fault: str,
        reason: str,
    ) -> None:
        """A baseline that cannot be used leaves the model serving; the report names the fault."""
        x, _ = modelgen.tabular_data("train")
        files: dict[str, bytes | Path] = {
            "tabular.onnx": models["tabular"],
            "tabular.toml": manifest("tabular").encode(),
            "tabular_baseline.msgpack": bad_baseline(fault, tmp_path, models["tabular"], x),
        }
        agent = await make_agent(files, DRIFT)
        await send(agent, "tabular", "float_input", "FP32", x[:BATCH])
        report = await report_until(agent, "tabular", lambda r: "baseline_error" in r)
        assert report["reference"] == "live"
        assert reason in report["baseline_error"]

    async def test_a_missing_baseline_file_does_not_refuse_the_model(
        self, make_agent: MakeAgent, models: dict[str, bytes]
    ) -> None:
        """A manifest naming a baseline that is not there: the model serves, drift says why."""
        x, _ = modelgen.tabular_data("train")
        files: dict[str, bytes | Path] = {
            "tabular.onnx": models["tabular"],
            "tabular.toml": manifest("tabular").encode(),
        }
        agent = await make_agent(files, DRIFT)
        await send(agent, "tabular", "float_input", "FP32", x[:BATCH])
        report = await report_until(agent, "tabular", lambda r: "baseline_error" in r)
        assert report["reference"] == "live"
        assert "tabular_baseline.msgpack" in report["baseline_error"]
