"""Prometheus metrics: one ``CollectorRegistry`` per app, every metric defined here.

Names start with ``edge_agent_`` and use the labels ``model`` and ``version`` the way
Triton's users already graph them. Components receive this object; none creates
metrics of its own, and there is no global registry.

With replica processes (``[server] processes`` > 1) each replica ships a ``snapshot`` of
its counters and histograms to the primary, whose ``render`` adds them to its own: one
scrape shows every process's requests. Gauges stay the primary's own.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

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


class _LoopChild:
    """One label set of a loop metric: plain numbers, no lock."""

    __slots__ = ("counts", "created", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.sum = 0.0
        self.created = time.time()


class _LoopCounterChild(_LoopChild):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(0)

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount``; counters only go up (ValueError below 0, as prometheus_client)."""
        if amount < 0:
            raise ValueError(f"counters only go up; got an increment of {amount}")
        self.sum += amount


class _LoopHistogramChild(_LoopChild):
    __slots__ = ("_bounds",)

    def __init__(self, bounds: tuple[float, ...]) -> None:
        super().__init__(len(bounds))
        self._bounds = bounds

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose upper bound is >= it."""
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


class _LoopMetric(Collector):
    """A counter or histogram for the request path, updated on the event loop only.

    prometheus_client's own take a lock per bucket, sum and count (13 lock round trips
    per inference request with the batch histograms); these are plain numbers, which is
    safe because only the event loop thread touches them. Scrapes read them on the loop
    too. The exposition is the same as prometheus_client's (``_created`` included).
    """

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: tuple[str, ...],
        registry: CollectorRegistry,
        buckets: tuple[float, ...] | None = None,
    ) -> None:
        self._name = name
        self._doc = doc
        self._labelnames = labelnames
        self._bounds = None if buckets is None else (*map(float, buckets), float("inf"))
        #: Bucket labels as prometheus_client writes them (``0.5``, ``1.0``, ``+Inf``).
        self._les: tuple[str, ...] = tuple(
            floatToGoString(b)  # type: ignore[no-untyped-call]
            for b in self._bounds or ()
        )
        self._children: dict[tuple[str, ...], _LoopChild] = {}
        registry.register(self)

    def _child(self, values: tuple[str, ...]) -> _LoopChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
            child = (
                _LoopCounterChild() if self._bounds is None else _LoopHistogramChild(self._bounds)
            )
            self._children[values] = child
        return child

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[Metric]:
        created = f"{self._name}_created"
        if self._bounds is None:
            counter = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
            for values, child in list(self._children.items()):
                counter.add_metric(values, child.sum, created=child.created)
            return [counter]
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._les, child.counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(values, buckets, child.sum)
            labels = dict(zip(self._labelnames, values, strict=True))
            family.samples.append(Sample(created, labels, child.created))
        return [family]


class LoopCounter(_LoopMetric):
    """A counter family for the request path (see ``_LoopMetric``)."""

    def labels(self, *values: str) -> _LoopCounterChild:
        child = self._child(values)
        assert isinstance(child, _LoopCounterChild)
        return child


class LoopHistogram(_LoopMetric):
    """A histogram family for the request path (see ``_LoopMetric``)."""

    def labels(self, *values: str) -> _LoopHistogramChild:
        child = self._child(values)
        assert isinstance(child, _LoopHistogramChild)
        return child


class Metrics:
    """Every metric edge-agent exports, on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(namespace="edge_agent", registry=r)
        self.requests = LoopCounter(
            "edge_agent_requests", "Inference requests by outcome.", (*MV, "code"), r
        )
        self.request_seconds = LoopHistogram(
            "edge_agent_request_duration_seconds",
            "End-to-end inference request latency.",
            MV,
            r,
            _LATENCY,
        )
        self.queue_seconds = LoopHistogram(
            "edge_agent_queue_duration_seconds",
            "Time a request waited for its batch to run.",
            MV,
            r,
            _LATENCY,
        )
        self.compute_seconds = LoopHistogram(
            "edge_agent_compute_duration_seconds", "onnxruntime time per batch.", MV, r, _LATENCY
        )
        self.batch_rows = LoopHistogram(
            "edge_agent_batch_rows", "Rows per executed batch.", MV, r, _ROWS
        )
        self.batch_requests = LoopHistogram(
            "edge_agent_batch_requests", "Requests merged per executed batch.", MV, r, _ROWS
        )
        self.handovers = LoopCounter(
            "edge_agent_http_handovers",
            "Connections the fast path handed to aiohttp, by the first request it did not "
            "serve: request (another route or method, chunked or compressed body, a header "
            "it does not read), unauthorized, too_large, head_too_long, stopping, lagging "
            "(a replica).",
            ("reason",),
            r,
        )
        #: Inference requests being served now: a plain number the event loop updates on
        #: every request (prometheus_client's gauge takes a lock per change).
        self.inflight = 0
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
        self.gauge(
            "edge_agent_inflight_requests",
            "Inference requests being served now.",
            (),
            lambda: [((), float(self.inflight))],
        )
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
