"""GET /metrics on the real daemon, parsed with prometheus_client's own parser.

The documented metrics exist, every name starts with ``edge_agent_``, and the counters
and histograms move after traffic, errors, a swap and a rollback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import modelgen
import orjson
import pytest
from ops.daemonproc import Daemon, call, infer_doc, running, scrape, wait_until
from prometheus_client.parser import text_string_to_metric_families

INFER = "/v2/models/aff/infer"

DOCUMENTED = (
    "edge_agent_requests",
    "edge_agent_request_duration_seconds",
    "edge_agent_queue_duration_seconds",
    "edge_agent_compute_duration_seconds",
    "edge_agent_batch_rows",
    "edge_agent_batch_requests",
    "edge_agent_inflight_requests",
    "edge_agent_http_requests_in_flight",
    "edge_agent_queue_depth",
    "edge_agent_model_loads",
    "edge_agent_model_load_duration_seconds",
    "edge_agent_model_swaps",
    "edge_agent_model_rollbacks",
    "edge_agent_model_state",
    "edge_agent_process_cpu_seconds",
    "edge_agent_process_resident_memory_bytes",
    "edge_agent_process_open_fds",
)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """An agent serving the affine model (version 1: y = x + 1)."""
    root = tmp_path_factory.mktemp("metrics")
    with running(root, models={"aff.onnx": modelgen.affine_model(1.0, 1.0)}) as daemon:
        yield daemon


def _families(agent: Daemon) -> dict[str, str]:
    """Family name -> type, from one scrape."""
    text = call(agent.url + "/metrics").body.decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def _active_version(agent: Daemon) -> str:
    models = call(agent.url + "/v1/models").json()["models"]
    return str(next(m["active_version"] for m in models if m["name"] == "aff"))


def _labels(version: str, **more: str) -> str:
    pairs = {"model": "aff", "version": version, **more}
    return ",".join(f'{k}="{v}"' for k, v in sorted(pairs.items()))


class TestNames:
    def test_documented_metrics_exist(self, agent: Daemon) -> None:
        """Every documented metric family is exported."""
        families = _families(agent)
        assert [name for name in DOCUMENTED if name not in families] == []

    def test_every_name_starts_with_edge_agent(self, agent: Daemon) -> None:
        """No family is exported without the edge_agent_ prefix."""
        assert [n for n in _families(agent) if not n.startswith("edge_agent_")] == []

    def test_kinds(self, agent: Daemon) -> None:
        """Requests are counters, latencies histograms, in-flight a gauge."""
        families = _families(agent)
        assert families["edge_agent_requests"] == "counter"
        assert families["edge_agent_request_duration_seconds"] == "histogram"
        assert families["edge_agent_queue_duration_seconds"] == "histogram"
        assert families["edge_agent_inflight_requests"] == "gauge"


class TestTraffic:
    def test_requests_and_latencies_move(self, agent: Daemon) -> None:
        """Five answered requests add five to the counter and to the latency histograms."""
        version = _active_version(agent)
        before = scrape(agent.url)
        for _ in range(5):
            assert call(agent.url + INFER, "POST", infer_doc([1, 2, 3, 4])).status == 200
        after = scrape(agent.url)
        moved = {
            name: after[key] - before.get(key, 0.0)
            for name, key in {
                "requests": f"edge_agent_requests_total{{{_labels(version, code='200')}}}",
                "e2e": f"edge_agent_request_duration_seconds_count{{{_labels(version)}}}",
                "queue": f"edge_agent_queue_duration_seconds_count{{{_labels(version)}}}",
            }.items()
        }
        assert moved == {"requests": 5, "e2e": 5, "queue": 5}

    def test_batches_are_observed(self, agent: Daemon) -> None:
        """Each executed batch adds to compute time, rows and requests per batch."""
        version = _active_version(agent)
        key = f"edge_agent_batch_rows_sum{{{_labels(version)}}}"
        before = scrape(agent.url)
        assert call(agent.url + INFER, "POST", infer_doc([1, 2, 3, 4])).status == 200
        after = scrape(agent.url)
        compute = f"edge_agent_compute_duration_seconds_count{{{_labels(version)}}}"
        assert after[key] - before.get(key, 0.0) == 1
        assert after[compute] > before.get(compute, 0.0)

    def test_errors_are_counted_by_code(self, agent: Daemon) -> None:
        """A request with the wrong shape is counted under code 400 for the model and version."""
        version = _active_version(agent)
        key = f"edge_agent_requests_total{{{_labels(version, code='400')}}}"
        before = scrape(agent.url).get(key, 0.0)
        doc = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
        assert call(agent.url + INFER, "POST", orjson.dumps(doc)).status == 400
        assert scrape(agent.url)[key] - before == 1

    def test_process_metrics_are_live(self, agent: Daemon) -> None:
        """Process metrics describe the agent process (resident memory, open fds)."""
        samples = scrape(agent.url)
        assert samples["edge_agent_process_resident_memory_bytes{}"] > 0
        assert samples["edge_agent_process_open_fds{}"] > 0


class TestLifecycle:
    def test_swap_and_rollback_are_counted(self, agent: Daemon) -> None:
        """A new version counts a load and a swap; an operator rollback counts a rollback."""
        before = scrape(agent.url)
        _drop(agent.root / "models", modelgen.affine_model(1.0, 2.0))
        wait_until(lambda: _active_version(agent) != "1")
        assert call(agent.url + "/v1/models/aff/rollback", "POST", b"{}").status == 200
        after = scrape(agent.url)

        def moved(key: str) -> float:
            return after.get(key, 0.0) - before.get(key, 0.0)

        assert moved('edge_agent_model_loads_total{model="aff",result="ok"}') >= 1
        assert moved('edge_agent_model_swaps_total{model="aff"}') >= 1
        assert moved('edge_agent_model_rollbacks_total{cause="operator",model="aff"}') == 1


def _drop(models_dir: Path, content: bytes) -> None:
    """Replace aff.onnx the way a deploy tool does: temp file, then rename."""
    tmp = models_dir / ".aff.onnx.tmp"
    tmp.write_bytes(content)
    os.replace(tmp, models_dir / "aff.onnx")
