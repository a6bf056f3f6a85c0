"""Prometheus metrics: one ``CollectorRegistry`` per app, every metric defined here.

Names start with ``edge_agent_`` and use the labels ``model`` and ``version`` the way
Triton's users already graph them. Components receive this object; none creates
metrics of its own, and there is no global registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LOAD = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

MV = ("model", "version")
GaugeSource = Callable[[], Iterable[tuple[tuple[str, ...], float]]]


class _CallbackGauges(Collector):
    """Gauges read at scrape time from the components that own the numbers."""

    def __init__(self) -> None:
        self._sources: list[tuple[str, str, tuple[str, ...], GaugeSource]] = []

    def add(self, name: str, doc: str, labels: tuple[str, ...], source: GaugeSource) -> None:
        self._sources.append((name, doc, labels, source))

    def collect(self) -> Iterable[Metric]:
        for name, doc, labels, source in self._sources:
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            for values, value in source():
                family.add_metric(list(values), value)
            yield family


class Metrics:
    """Every metric edge-agent exports, on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(namespace="edge_agent", registry=r)
        self.requests = Counter(
            "edge_agent_requests", "Inference requests by outcome.", (*MV, "code"), registry=r
        )
        self.request_seconds = Histogram(
            "edge_agent_request_duration_seconds",
            "End-to-end inference request latency.",
            MV,
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "edge_agent_queue_duration_seconds",
            "Time a request waited for its batch to run.",
            MV,
            buckets=_LATENCY,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "edge_agent_compute_duration_seconds",
            "onnxruntime time per batch.",
            MV,
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_rows = Histogram(
            "edge_agent_batch_rows", "Rows per executed batch.", MV, buckets=_ROWS, registry=r
        )
        self.batch_requests = Histogram(
            "edge_agent_batch_requests",
            "Requests merged per executed batch.",
            MV,
            buckets=_ROWS,
            registry=r,
        )
        self.inflight = Gauge(
            "edge_agent_inflight_requests", "Inference requests being served now.", registry=r
        )
        self.loads = Counter(
            "edge_agent_model_loads",
            "Model version loads by result.",
            ("model", "result"),
            registry=r,
        )
        self.load_seconds = Histogram(
            "edge_agent_model_load_duration_seconds",
            "Load, QA and warm-up time of a version.",
            ("model",),
            buckets=_LOAD,
            registry=r,
        )
        self.swaps = Counter(
            "edge_agent_model_swaps", "Active version changes.", ("model",), registry=r
        )
        self.rollbacks = Counter(
            "edge_agent_model_rollbacks", "Rollbacks by cause.", ("model", "cause"), registry=r
        )
        self.label_delay = Histogram(
            "edge_agent_label_delay_seconds",
            "Feedback time minus prediction time.",
            buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400),
            registry=r,
        )
        self.callbacks = _CallbackGauges()
        r.register(self.callbacks)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...], source: GaugeSource) -> None:
        """Export a gauge whose values a component computes at scrape time."""
        self.callbacks.add(name, doc, labels, source)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
