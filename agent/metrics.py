"""Prometheus metrics: one ``CollectorRegistry`` per app, every metric defined here.

Names start with ``edge_agent_`` and use the labels ``model`` and ``version`` the way
Triton's users already graph them. Components receive this object; none creates
metrics of its own, and there is no global registry.

With replica processes (``[server] processes`` > 1) each replica ships a ``snapshot`` of
its counters and histograms to the primary, whose ``render`` adds them to its own: one
scrape shows every process's requests. Gauges stay the primary's own.
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
from prometheus_client.samples import Sample

_LATENCY = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LOAD = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

MV = ("model", "version")
GaugeSource = Callable[[], Iterable[tuple[tuple[str, ...], float]]]
#: A process's cumulative counters and histograms: (family, [(sample, labels, value)]).
SampleKey = tuple[str, tuple[tuple[str, str], ...]]
Snapshot = list[tuple[str, list[tuple[str, tuple[tuple[str, str], ...], float]]]]
_SUMMED = frozenset({"counter", "histogram"})


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
        self.replica_events = Counter(
            "edge_agent_replica_events",
            "Predictions a replica process handed to the primary's side taps, by outcome "
            "(shipped, or dropped because the primary fell behind).",
            ("outcome",),
            registry=r,
        )
        self.callbacks = _CallbackGauges()
        r.register(self.callbacks)
        #: Snapshots of the other processes, added at render time (set by the primary).
        self.peers: Callable[[], list[Snapshot]] | None = None

    def gauge(self, name: str, doc: str, labels: tuple[str, ...], source: GaugeSource) -> None:
        """Export a gauge whose values a component computes at scrape time."""
        self.callbacks.add(name, doc, labels, source)

    def render(self) -> bytes:
        """The text exposition format (with the replicas' counters, when there are any)."""
        peers = self.peers() if self.peers is not None else []
        if not peers:
            return generate_latest(self.registry)
        return generate_latest(_Merged(self.registry, peers))

    def snapshot(self) -> Snapshot:
        """This process's counters and histograms, cumulative (``_created`` left out)."""
        out: Snapshot = []
        for family in self.registry.collect():
            if family.type not in _SUMMED:
                continue
            samples = [
                (s.name, tuple(sorted(s.labels.items())), float(s.value))
                for s in family.samples
                if not s.name.endswith("_created")
            ]
            if samples:
                out.append((family.name, samples))
        return out


def add_snapshots(snapshots: Iterable[Snapshot]) -> dict[str, dict[SampleKey, float]]:
    """Sum snapshots sample by sample (first-seen order kept: histogram buckets stay
    together)."""
    total: dict[str, dict[SampleKey, float]] = {}
    for snapshot in snapshots:
        for family, samples in snapshot:
            into = total.setdefault(family, {})
            for name, labels, value in samples:
                into[name, labels] = into.get((name, labels), 0.0) + value
    return total


class _Merged:
    """A registry view: the primary's families with the replicas' samples added."""

    def __init__(self, registry: CollectorRegistry, peers: list[Snapshot]) -> None:
        self._registry = registry
        self._extra = add_snapshots(peers)

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            extra = self._extra.get(family.name)
            if extra and family.type in _SUMMED:
                extra = dict(extra)
                samples: list[Sample] = []
                for s in family.samples:
                    more = extra.pop((s.name, tuple(sorted(s.labels.items()))), None)
                    samples.append(s._replace(value=s.value + more) if more is not None else s)
                samples.extend(
                    Sample(name, dict(labels), value) for (name, labels), value in extra.items()
                )
                family.samples = samples
            yield family
