"""Labelled metrics looked up once (Metrics.child): a series counts the same whether its child
was cached, cached again after the cache started over, or looked up by prometheus_client."""

from __future__ import annotations

from proxy.ops.metrics import MAX_CACHED_CHILDREN, Metrics


def held(metrics: Metrics, key: str) -> float | None:
    return metrics.registry.get_sample_value("spend_guard_usd_total", {"kind": "held", "key": key})


def test_a_child_counts_on_its_series_across_the_cache_starting_over():
    metrics = Metrics()
    metrics.child(metrics.usd, "held", "k0").inc(1)
    for i in range(1, MAX_CACHED_CHILDREN + 10):  # past the bound: the cache starts over
        metrics.child(metrics.usd, "held", f"k{i}").inc(0.5)
    metrics.child(metrics.usd, "held", "k0").inc(2)
    metrics.usd.labels("held", "k0").inc(4)
    assert held(metrics, "k0") == 7
    assert held(metrics, f"k{MAX_CACHED_CHILDREN + 9}") == 0.5
    assert len(metrics._children) <= MAX_CACHED_CHILDREN


def test_the_same_values_on_two_metrics_are_two_series():
    metrics = Metrics()
    metrics.child(metrics.usd, "charged", "k").inc(1)
    metrics.child(metrics.decisions, "charged", "k", "x").inc()  # a different metric, not the cached child
    assert metrics.registry.get_sample_value("spend_guard_usd_total", {"kind": "charged", "key": "k"}) == 1
    assert metrics.child(metrics.usd, "charged", "k") is metrics.usd.labels("charged", "k")
