"""The request path's lock-free counters and histograms expose exactly what
prometheus_client's own would, for any observations (hypothesis), including the
``_created`` series and label sets; replica snapshots see them like any other family."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import LoopCounter, LoopHistogram, Metrics

BUCKETS = (0.0002, 0.001, 0.5, 1, 2.5, 10)
LABELS = ("model", "version")
values = st.floats(min_value=0, max_value=1e4, allow_nan=False) | st.sampled_from(BUCKETS)
label_sets = st.sampled_from([("a", "1"), ("a", "2"), ("b", "1")])


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but the ``_created`` timestamps, by name and labels."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def _created(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.endswith("_created")
    }


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(label_sets, values), max_size=40))
def test_histogram_exposes_what_prometheus_client_does(
    observations: list[tuple[tuple[str, str], float]],
) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h_seconds", "doc", LABELS, buckets=BUCKETS, registry=theirs)
    loop = LoopHistogram("h_seconds", "doc", LABELS, ours, BUCKETS)
    for labels, value in observations:
        reference.labels(*labels).observe(value)
        loop.labels(*labels).observe(value)
    expected, got = _samples(theirs), _samples(ours)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-12), key
    assert _created(ours) == _created(theirs)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(label_sets, st.integers(min_value=0, max_value=5)), max_size=30))
def test_counter_exposes_what_prometheus_client_does(
    increments: list[tuple[tuple[str, str], int]],
) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Counter("c", "doc", LABELS, registry=theirs)
    loop = LoopCounter("c", "doc", LABELS, ours)
    for labels, amount in increments:
        reference.labels(*labels).inc(amount)
        loop.labels(*labels).inc(amount)
    assert _samples(ours) == _samples(theirs)
    assert _created(ours) == _created(theirs)


def test_a_value_on_a_bucket_bound_counts_in_that_bucket() -> None:
    registry = CollectorRegistry()
    loop = LoopHistogram("h", "doc", (), registry, (1, 2))
    loop.labels().observe(1.0)
    loop.labels().observe(2.0000001)
    samples = _samples(registry)
    assert samples[("h_bucket", (("le", "1.0"),))] == 1
    assert samples[("h_bucket", (("le", "2.0"),))] == 1
    assert samples[("h_bucket", (("le", "+Inf"),))] == 2


def test_wrong_label_count_is_refused_with_the_label_names() -> None:
    loop = LoopCounter("c", "doc", LABELS, CollectorRegistry())
    with pytest.raises(ValueError, match=r"takes labels \('model', 'version'\)"):
        loop.labels("a")


def test_a_counter_never_goes_down() -> None:
    loop = LoopCounter("c", "doc", (), CollectorRegistry())
    loop.labels().inc(2)
    with pytest.raises(ValueError, match="only go up"):
        loop.labels().inc(-1)
    assert loop.labels().sum == 2


def test_replica_snapshots_carry_the_loop_families() -> None:
    metrics = Metrics()
    metrics.requests.labels("m", "1", "200").inc()
    metrics.request_seconds.labels("m", "1").observe(0.003)
    families = dict(metrics.snapshot())
    assert (
        "edge_agent_requests_total",
        (("code", "200"), ("model", "m"), ("version", "1")),
        1.0,
    ) in (families["edge_agent_requests"])
    count = [
        value
        for name, _, value in families["edge_agent_request_duration_seconds"]
        if name.endswith("_count")
    ]
    assert count == [1.0]
