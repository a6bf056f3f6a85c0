"""The drift monitor: baselines good and bad, the bounded tap, windows, status events, flush."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import modelgen
import msgpack
import numpy as np
import onnxruntime as ort
import pytest
from structlog.testing import capture_logs

from agent.clock import ManualClock
from agent.drift.monitor import DriftMonitor
from agent.drift.profile import Profile, build_profile
from agent.errors import AgentError, NotFound
from agent.events import PredictionEvent, UpstreamRecord
from agent.tensors import TensorSpec

INPUTS = (TensorSpec("float_input", "FP32", (-1, 30)),)
OUTPUTS = (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2)))
KINDS: Any = {"float_input": "tabular", "label": "label", "probabilities": "score"}
WINDOW_S = 60.0


@dataclass
class Tabular:
    """The tabular classifier in-process, and its training rows."""

    session: ort.InferenceSession
    x: np.ndarray

    def outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, {"float_input": x}), strict=True))

    def shifted(self, columns: tuple[int, ...], by: float = 1.5) -> np.ndarray:
        """The training rows with ``columns`` moved by ``by`` standard deviations."""
        x = self.x.copy()
        for j in columns:
            x[:, j] += by * self.x[:, j].std()
        return x

    def events(self, x: np.ndarray, model: str = "m", version: int = 1) -> Iterator[Any]:
        """Predictions of 32 rows each, as the API would emit them."""
        for start in range(0, len(x), 32):
            rows = x[start : start + 32]
            yield PredictionEvent(
                f"r{start}", model, version, 0.0, {"float_input": rows}, self.outputs(rows), 0.001
            )

    def baseline(self, path: Path, *, model: str = "m", columns: int = 30) -> Path:
        x = self.x[:, :columns]
        outputs = self.outputs(self.x)
        profile = build_profile(model, {"float_input": x}, outputs, kinds=KINDS)
        path.write_bytes(profile.dumps())
        return path


@pytest.fixture(scope="session")
def tabular() -> Tabular:
    x, _ = modelgen.tabular_data("train")
    return Tabular(ort.InferenceSession(modelgen.tabular_classifier()), x)


@dataclass
class Harness:
    monitor: DriftMonitor
    clock: ManualClock
    sent: list[UpstreamRecord] = field(default_factory=list)

    def attach(self, baseline: Path | None = None, **kwargs: Any) -> None:
        options: dict[str, Any] = {"features": {}, "psi_warn": None, "psi_alert": None}
        options.update(kwargs)
        self.monitor.attach("m", 1, inputs=INPUTS, outputs=OUTPUTS, baseline=baseline, **options)

    async def feed(self, events: Iterator[PredictionEvent]) -> None:
        for event in events:
            self.monitor.record(event)
        await self.monitor.drain()

    def kinds(self, kind: str) -> list[UpstreamRecord]:
        return [r for r in self.sent if r.kind == kind]


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness() -> AsyncIterator[MakeHarness]:
    """Monitors on a manual clock; each is stopped when the test ends."""
    monitors: list[DriftMonitor] = []

    async def make(
        *, start: bool = True, emit: Callable[..., Awaitable[None]] | None = None, **settings: Any
    ) -> Harness:
        options: dict[str, Any] = {
            "window_s": WINDOW_S,
            "reference_rows": 200,
            "psi_warn": 0.1,
            "psi_alert": 0.25,
            "min_rows": 100,
            "alert_share": 0.0,
            "queue_size": 1000,
        }
        options.update(settings)
        clock = ManualClock()
        harness: Harness

        async def collect(records: list[UpstreamRecord]) -> None:
            harness.sent.extend(records)

        monitor = DriftMonitor(clock=clock, emit=emit or collect, **options)
        harness = Harness(monitor, clock)
        monitors.append(monitor)
        if start:
            await monitor.start()
        return harness

    yield make
    for monitor in monitors:
        await monitor.stop()


class TestAttach:
    async def test_a_good_baseline_is_the_reference(
        self, make_harness: MakeHarness, tabular: Tabular, tmp_path: Path
    ) -> None:
        """A compatible baseline file becomes the reference, with no error."""
        h = await make_harness()
        h.attach(tabular.baseline(tmp_path / "baseline.msgpack"))
        await h.monitor.drain()
        report = h.monitor.report("m")
        assert (report["reference"], report["reference_rows"]) == ("baseline", len(tabular.x))
        assert "baseline_error" not in report
        assert [f["name"] for f in report["features"]][:2] == ["f0", "f1"]

    async def test_wrong_feature_count_keeps_serving_on_a_live_reference(
        self, make_harness: MakeHarness, tabular: Tabular, tmp_path: Path
    ) -> None:
        """A baseline of 10 features for a 30-column input is refused, plainly, not raised."""
        h = await make_harness()
        h.attach(tabular.baseline(tmp_path / "b.msgpack", columns=10))
        await h.monitor.drain()
        report = h.monitor.report("m")
        assert report["reference"] == "live"
        assert "10 numeric features" in report["baseline_error"]
        assert "edge-agent baseline" in report["baseline_error"]

    async def test_corrupt_bytes_are_refused(
        self, make_harness: MakeHarness, tmp_path: Path
    ) -> None:
        """Bytes that are not a baseline give a report that says the file is corrupt."""
        path = tmp_path / "b.msgpack"
        path.write_bytes(b"\xc1not msgpack at all")
        h = await make_harness()
        h.attach(path)
        await h.monitor.drain()
        assert "corrupt" in h.monitor.report("m")["baseline_error"]

    async def test_another_models_baseline_is_refused(
        self, make_harness: MakeHarness, tabular: Tabular, tmp_path: Path
    ) -> None:
        """A baseline built for another model name is refused, naming both models."""
        h = await make_harness()
        h.attach(tabular.baseline(tmp_path / "b.msgpack", model="other"))
        await h.monitor.drain()
        assert 'baseline is for model "other", not "m"' in h.monitor.report("m")["baseline_error"]

    async def test_a_missing_file_is_refused_and_logged(
        self, make_harness: MakeHarness, tmp_path: Path
    ) -> None:
        """A baseline path that does not exist is reported and logged as refused."""
        h = await make_harness()
        with capture_logs() as logs:
            h.attach(tmp_path / "absent.msgpack")
            await h.monitor.drain()
        assert "cannot read the baseline" in h.monitor.report("m")["baseline_error"]
        assert [e["model"] for e in logs if e["event"] == "drift_baseline_refused"] == ["m"]

    async def test_manifest_feature_names_name_the_features(
        self, make_harness: MakeHarness, tabular: Tabular
    ) -> None:
        """Without a baseline, the manifest's [inputs] names label the live reference."""
        names = tuple(modelgen.tabular_feature_names())
        h = await make_harness()
        h.attach(features={"float_input": names})
        await h.feed(tabular.events(tabular.x))
        report = h.monitor.report("m")
        assert [f["name"] for f in report["features"]] == list(names)

    async def test_names_of_the_wrong_count_are_reported_and_ignored(
        self, make_harness: MakeHarness
    ) -> None:
        """Manifest names that do not fit the input are a settings_error, not a failure."""
        h = await make_harness()
        h.attach(features={"float_input": ("a", "b")})
        await h.monitor.drain()
        assert "lists 2 names for 30 columns" in h.monitor.report("m")["settings_error"]

    async def test_inconsistent_manifest_thresholds_fall_back_to_the_config(
        self, make_harness: MakeHarness
    ) -> None:
        """psi_warn above psi_alert in a manifest is reported; the config's thresholds apply."""
        h = await make_harness()
        h.attach(psi_warn=0.5, psi_alert=0.2)
        await h.monitor.drain()
        assert "thresholds refused" in h.monitor.report("m")["settings_error"]

    def test_an_unknown_model_is_not_found(self) -> None:
        """Asking for a model that was never attached names it and how to find models."""
        monitor = DriftMonitor(
            window_s=1.0,
            reference_rows=100,
            psi_warn=0.1,
            psi_alert=0.25,
            min_rows=100,
            alert_share=0.0,
            queue_size=10,
            clock=ManualClock(),
            emit=_discard,
        )
        with pytest.raises(NotFound, match=r'model "nope".*GET /v1/models'):
            monitor.report("nope")


async def _discard(records: list[UpstreamRecord]) -> None:
    del records


class TestReference:
    async def test_exactly_the_shifted_features_alert(
        self, make_harness: MakeHarness, tabular: Tabular, tmp_path: Path
    ) -> None:
        """Against the baseline, features 0 and 7 moved by 1.5 std alert; the others are ok."""
        h = await make_harness()
        h.attach(tabular.baseline(tmp_path / "b.msgpack"))
        await h.feed(tabular.events(tabular.shifted((0, 7))))
        statuses = {f["name"]: f["status"] for f in h.monitor.report("m")["features"]}
        assert statuses == {f"f{j}": "alert" if j in (0, 7) else "ok" for j in range(30)}

    async def test_without_a_baseline_the_first_rows_are_the_reference(
        self, make_harness: MakeHarness, tabular: Tabular
    ) -> None:
        """The first reference_rows live rows become the reference; a later shift alerts."""
        h = await make_harness(reference_rows=len(tabular.x))
        h.attach()
        await h.feed(tabular.events(tabular.x))
        assert h.monitor.report("m")["reference_rows"] == len(tabular.x)
        await h.feed(tabular.events(tabular.shifted((3,), by=2.0)))
        report = h.monitor.report("m", "current")
        assert report["reference"] == "live"
        assert {f["name"] for f in report["features"] if f["status"] == "alert"} == {"f3"}


class TestTap:
    async def test_a_full_queue_drops_and_counts(
        self, make_harness: MakeHarness, tabular: Tabular
    ) -> None:
        """With nobody draining, record returns at once and drops what the queue cannot hold."""
        h = await make_harness(start=False, queue_size=3)
        h.attach()
        for event in tabular.events(tabular.x[:160]):
            h.monitor.record(event)
        assert h.monitor.dropped == 2

    async def test_sampling_sketches_only_a_share_of_predictions(
        self, make_harness: MakeHarness, tabular: Tabular
    ) -> None:
        """With sample_rate 0.25, about a quarter of the events are queued, none dropped."""
        import random

        h = await make_harness(start=False, sample_rate=0.25, rng=random.Random(5))
        h.attach()
        events = list(tabular.events(tabular.x[:320])) * 40  # 400 events
        for event in events:
            h.monitor.record(event)
        queued = sum(isinstance(i, PredictionEvent) for i in h.monitor._items)
        assert 0.15 * len(events) < queued < 0.35 * len(events)
        assert h.monitor.dropped == 0

    async def test_events_of_unattached_versions_are_ignored(
        self, make_harness: MakeHarness, tabular: Tabular
    ) -> None:
        """Predictions of a version nobody attached change nothing and raise nothing."""
        h = await make_harness()
        h.attach()
        await h.feed(tabular.events(tabular.x, version=7))
        assert h.monitor.report("m")["window"]["rows"] == 0
        assert h.monitor.errors == 0

    async def test_a_batch_that_does_not_fit_is_counted_not_raised(
        self, make_harness: MakeHarness, tabular: Tabular, tmp_path: Path
    ) -> None:
        """An input with fewer columns than the baseline is refused per batch and counted."""
        h = await make_harness()
        h.attach(tabular.baseline(tmp_path / "b.msgpack"))
        outputs = tabular.outputs(tabular.x[:32])
        narrow = PredictionEvent(
            "r", "m", 1, 0.0, {"float_input": tabular.x[:32, :10]}, outputs, 0.0
        )
        with capture_logs() as logs:
            await h.feed(iter([narrow, narrow]))
        assert h.monitor.errors == 1
        assert [e["event"] for e in logs].count("drift_update_refused") == 1


class TestWindows:
    async def test_a_closed_window_is_emitted_as_a_drift_record(
        self, make_harness: MakeHarness, tabular: Tabular, tmp_path: Path
    ) -> None:
        """After window_s, the window closes and ships with its rows, sketches and report."""
        h = await make_harness()
        h.attach(tabular.baseline(tmp_path / "b.msgpack"))
        await h.feed(tabular.events(tabular.x))
        h.clock.advance(WINDOW_S)
        await h.monitor.drain()
        [record] = h.kinds("drift")
        window = msgpack.unpackb(msgpack.packb(record.payload["window"]), raw=False)
        assert (record.model, record.version) == ("m", 1)
        assert window["rows"] == len(tabular.x)
        assert window["report"]["window"]["kind"] == "tumbling"
        assert Profile.from_document(window).rows == len(tabular.x)

    async def test_a_window_without_rows_is_not_emitted(self, make_harness: MakeHarness) -> None:
        """An idle window closes silently."""
        h = await make_harness()
        h.attach()
        h.clock.advance(WINDOW_S)
        await h.monitor.drain()
        assert h.kinds("drift") == []

    async def test_detach_emits_the_current_window_and_forgets_the_version(
        self, make_harness: MakeHarness, tabular: Tabular, tmp_path: Path
    ) -> None:
        """A retired version ships its open window; its model then has no report."""
        h = await make_harness()
        h.attach(tabular.baseline(tmp_path / "b.msgpack"))
        await h.feed(tabular.events(tabular.x))
        h.monitor.detach("m", 1)
        await h.monitor.drain()
        [record] = h.kinds("drift")
        assert record.payload["window"]["rows"] == len(tabular.x)
        with pytest.raises(NotFound):
            h.monitor.report("m")

    async def test_stop_flushes_the_current_windows(
        self, make_harness: MakeHarness, tabular: Tabular, tmp_path: Path
    ) -> None:
        """Stopping applies what is queued and emits every open window."""
        h = await make_harness()
        h.attach(tabular.baseline(tmp_path / "b.msgpack"))
        for event in tabular.events(tabular.x):
            h.monitor.record(event)
        await h.monitor.stop()
        [record] = h.kinds("drift")
        assert record.payload["window"]["rows"] == len(tabular.x)

    async def test_a_failing_emit_is_logged_and_the_worker_goes_on(
        self, make_harness: MakeHarness, tabular: Tabular, tmp_path: Path
    ) -> None:
        """An emit that raises (disk full) is logged and counted; the next window still ships."""
        sent: list[UpstreamRecord] = []
        failures = [AgentError("outbox full: 0 bytes left")]

        async def emit(records: list[UpstreamRecord]) -> None:
            if failures:
                raise failures.pop()
            sent.extend(records)

        h = await make_harness(emit=emit)
        h.attach(tabular.baseline(tmp_path / "b.msgpack"))
        with capture_logs() as logs:
            for _ in range(2):
                await h.feed(tabular.events(tabular.x))
                h.clock.advance(WINDOW_S)
                await h.monitor.drain()
        assert "drift_emit_failed" in [e["event"] for e in logs]
        assert h.monitor.errors == 1
        assert [r.kind for r in sent] == ["drift"]


class TestStatus:
    async def test_a_status_change_is_an_event(
        self, make_harness: MakeHarness, tabular: Tabular, tmp_path: Path
    ) -> None:
        """Going from ok to alert emits a drift_status event and logs it."""
        h = await make_harness()
        h.attach(tabular.baseline(tmp_path / "b.msgpack"))
        await h.feed(tabular.events(tabular.x))
        assert h.monitor.status("m") == "ok"
        with capture_logs() as logs:
            await h.feed(tabular.events(tabular.shifted((0, 1, 2, 3), by=2.0)))
        [event] = h.kinds("event")
        assert event.payload == {"event": "drift_status", "from": "ok", "to": "alert"}
        assert h.monitor.status("m") == "alert"
        assert "drift_status_changed" in [e["event"] for e in logs]

    async def test_a_first_ok_is_not_news(
        self, make_harness: MakeHarness, tabular: Tabular, tmp_path: Path
    ) -> None:
        """From insufficient data to ok emits nothing."""
        h = await make_harness()
        h.attach(tabular.baseline(tmp_path / "b.msgpack"))
        await h.feed(tabular.events(tabular.x))
        assert h.kinds("event") == []

    async def test_gauges_carry_scores_and_status(
        self, make_harness: MakeHarness, tabular: Tabular, tmp_path: Path
    ) -> None:
        """Scores are labelled by io and feature (tensor.feature for several outputs)."""
        h = await make_harness()
        h.attach(tabular.baseline(tmp_path / "b.msgpack"))
        await h.feed(tabular.events(tabular.shifted((0,), by=2.0)))
        scores = dict(h.monitor.gauges())
        assert scores[("m", "1", "input", "f0", "psi")] >= 0.25
        assert ("m", "1", "output", "probabilities.f1", "js") in scores
        assert ("m", "1", "output", "label.class", "ks") not in scores  # categories: no KS
        assert h.monitor.status_gauges() == [(("m", "1"), 2.0)]

    async def test_reconfigured_thresholds_apply_at_once(
        self, make_harness: MakeHarness, tabular: Tabular, tmp_path: Path
    ) -> None:
        """Raising psi_alert through configure turns an alert into ok at the next refresh."""
        h = await make_harness()
        h.attach(tabular.baseline(tmp_path / "b.msgpack"))
        await h.feed(tabular.events(tabular.shifted((0,), by=2.0)))
        h.monitor.configure(
            window_s=WINDOW_S,
            reference_rows=200,
            psi_warn=50.0,
            psi_alert=100.0,
            min_rows=100,
            alert_share=0.0,
        )
        await h.monitor.drain()
        assert h.monitor.status("m") == "ok"
