"""Prometheus metrics, one registry per app (tests build many apps in one process).

No secret and no fingerprint is ever a label: keys appear by their policy name, or `unknown`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "spend_guard_decisions",
            "Guarded requests by outcome (allowed, refused, would_refuse, unguarded, invalid), scope and key name.",
            ["outcome", "scope", "key"],
            registry=r,
        )
        self.usd = Counter(
            "spend_guard_usd", "Money held, charged and released, in USD.", ["kind", "key"], registry=r
        )
        self.unguarded = Counter(
            "spend_guard_unguarded",
            "Spending calls forwarded without a hold because the guard failed open.",
            ["reason"],
            registry=r,
        )
        self.refresh_failures = Counter(
            "spend_guard_refresh_failures", "Failed credits refreshes.", registry=r
        )
        self.policy_reloads = Counter(
            "spend_guard_policy_reloads", "Policy reloads by result.", ["result"], registry=r
        )
        self.policy_reload_failures = Gauge(
            "spend_guard_policy_reload_failures",
            "Policy reloads that failed validation since start (the old policy kept serving).",
            registry=r,
        )
        self.settle_retries = Counter(
            "spend_guard_settle_retries", "Settles that failed against the store and were retried.", registry=r
        )
        self.snapshot_age = Gauge(
            "spend_guard_snapshot_age_seconds", "Age of the credits snapshot this instance last saw.", registry=r
        )
        self.inflight = Gauge("spend_guard_inflight_holds", "Reservations open in this process.", registry=r)
        self.upstream_latency = Histogram(
            "spend_guard_upstream_latency_seconds",
            "Time from forwarding a guarded call to the end of its response.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "spend_guard_overhead_seconds",
            "Time the guard adds before forwarding (auth, body, pricing, reserve).",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )

    def set_snapshot_age(self, fn: Callable[[], float]) -> None:
        self.snapshot_age.set_function(fn)
