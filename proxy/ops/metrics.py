"""Prometheus metrics, one registry per app (tests build many apps in one process).

No secret and no fingerprint is ever a label: keys appear by their policy name, or `unknown`.
With `--workers N` a scrape reaches one worker, so `serve` points prometheus_client's multiprocess
mode at a directory the workers share (`PROMETHEUS_MULTIPROC_DIR`) and every scrape reports the
sum over all workers.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from proxy.settings import MULTIPROCESS_DIR_ENV

OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900)
# Charged / held at a settle: 0 is a release, 1 a hold charged in full, above 1 an underheld call.
RATIO_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 5.0)
# Held / charged at a settle with a cost: below 1 an underheld call, 1.1 the default observed margin.
HOLD_TO_COST_BUCKETS = (0.5, 0.9, 1.0, 1.05, 1.1, 1.2, 1.5, 2.0, 3.0, 5.0, 10.0, 25.0, 100.0)
# Labelled children `Metrics.child` keeps looked up at most.
MAX_CACHED_CHILDREN = 4096
M = TypeVar("M", Counter, Gauge, Histogram)


class Computed(Collector):
    """Gauges (and counters kept outside this process) computed when scraped, by the process
    answering the scrape (never stored in files)."""

    def __init__(self) -> None:
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}

    def add(self, name: str, documentation: str, value: Callable[[], float]) -> None:
        self.gauges[name] = (documentation, value)

    def add_counter(self, name: str, documentation: str, value: Callable[[], float]) -> None:
        """A counter another process keeps (exposed as `<name>_total`)."""
        self.counters[name] = (documentation, value)

    def describe(self) -> list[Metric]:
        return []  # registering must not call the functions (the app is not started yet)

    def collect(self) -> Iterator[Metric]:
        for name, (documentation, value) in self.gauges.items():
            yield GaugeMetricFamily(name, documentation, value=value())
        for name, (documentation, value) in self.counters.items():
            yield CounterMetricFamily(name, documentation, value=value())


class Metrics:
    def __init__(self) -> None:
        # Set by `serve` for several workers; read here, as prometheus_client read it on import.
        self.multiprocess_dir = os.environ.get(MULTIPROCESS_DIR_ENV) or None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.computed = Computed()
        r.register(self.computed)
        self.computed_collectors: list[Collector] = []  # see add_collector
        self.decisions = Counter(
            "spend_guard_decisions",
            "Guarded requests by outcome (allowed, refused, would_refuse, unguarded, invalid), scope and key name.",
            ["outcome", "scope", "key"],
            registry=r,
        )
        self.usd = Counter("spend_guard_usd", "Money held, charged and released, in USD.", ["kind", "key"], registry=r)
        self.unguarded = Counter(
            "spend_guard_unguarded",
            "Calls forwarded without a hold: the guard failed open (store, snapshot, no_prices), or a route the "
            "policy does not list passed under guard.unknown_routes: pass (unknown_route).",
            ["reason"],
            registry=r,
        )
        self.free_routes = Counter(
            "spend_guard_free_route_requests",
            "POSTs to routes the policy lists as kind: free, forwarded without a hold, by route.",
            ["route"],
            registry=r,
        )
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}  # see child
        self.refresh_failures = Counter("spend_guard_refresh_failures", "Failed credits refreshes.", registry=r)
        self.policy_reloads = Counter("spend_guard_policy_reloads", "Policy reloads by result.", ["result"], registry=r)
        self.settle_retries = Counter(
            "spend_guard_settle_retries", "Settles that failed against the store and were retried.", registry=r
        )
        self.settle_failures = Counter(
            "spend_guard_settle_failures",
            "Deferred settles dropped because the store refused them (its hold falls to its lease).",
            registry=r,
        )
        self.quarantined = Counter(
            "spend_guard_quarantined_holds",
            "Hold records the store could not read and moved to its quarantine hash.",
            registry=r,
        )
        self.reclaimed = Counter(
            "spend_guard_reclaimed_holds",
            "Holds whose lease expired and that a reserve charged in full.",
            registry=r,
        )
        self.held_ratio = Histogram(
            "spend_guard_charged_to_held_ratio",
            "At each settle, the amount charged divided by the hold, by route kind "
            "(above 1: the call cost more than its hold).",
            ["kind"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.hold_to_cost = Histogram(
            "spend_guard_hold_to_cost_ratio",
            "At each settle with a reported cost above 0, the hold divided by the cost, by route kind and model "
            "(1 is a hold that fit exactly; below 1 an underheld call).",
            ["kind", "model"],
            buckets=HOLD_TO_COST_BUCKETS,
            registry=r,
        )
        self.learned_full = Counter(
            "spend_guard_learned_table_full",
            "Costs not learned because the learned holds table had no room for a new signature "
            "(models.observed.max_signatures).",
            registry=r,
        )
        self.charged_by_model = Counter(
            "spend_guard_charged_usd",
            "Money charged, by model (a label appears only once the upstream billed that model).",
            ["model"],
            registry=r,
        )
        self.underheld = Counter(
            "spend_guard_underheld",
            "Calls whose real cost exceeded their hold, by model: its text rate or hold is too low.",
            ["model"],
            registry=r,
        )
        self.underheld_usd = Counter(
            "spend_guard_underheld_usd",
            "What calls cost beyond their hold, by model (the overspend a budget may have taken).",
            ["model"],
            registry=r,
        )
        self.alerts = Counter(
            "spend_guard_alerts",
            "Alert events decided (each once per scope, window and threshold across every instance), by type.",
            ["type"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "spend_guard_webhook_deliveries",
            "Alert webhook deliveries by result: sent (2xx), retried, failed (gave up), dropped (queue full).",
            ["result"],
            registry=r,
        )
        self.outside_spend = Counter(
            "spend_guard_outside_spend_usd",
            "Money ImageRouter charged a guarded key that did not pass through the guard, by key name "
            "(found at each credits refresh; docs/alerts.md#spend-outside-the-guard).",
            ["key"],
            registry=r,
        )
        self.account_outside_spend = Counter(
            "spend_guard_account_outside_spend_usd",
            "Money ImageRouter charged the account beyond what passed through the guard.",
            registry=r,
        )
        self.background_errors = Counter(
            "spend_guard_background_errors",
            "Unexpected exceptions in a background loop (it logs the traceback and continues).",
            ["task"],
            registry=r,
        )
        self.inflight = Gauge(
            "spend_guard_inflight_holds",
            "Reservations open in this instance (all its workers).",
            registry=r,
            multiprocess_mode="livesum",
        )
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

    def count_free_route(self, route: str) -> None:
        """One more request to `route`, a route the policy lists as free."""
        self.child(self.free_routes, route).inc()

    def child(self, metric: M, *values: str) -> M:
        """`metric.labels(*values)`, looked up once: prometheus_client validates the labels and
        takes a lock on every call (~1.5 us), several times per guarded call. At most
        MAX_CACHED_CHILDREN are kept (client-chosen model names among the values), then the cache
        starts again; prometheus_client keeps every child itself, so this holds none it does not."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            if len(self._children) >= MAX_CACHED_CHILDREN:
                self._children.clear()
            found = self._children[key] = metric.labels(*values)
        return found

    def add_collector(self, collector: Collector) -> None:
        """A collector read when scraped, by whichever process answers (never summed over workers)."""
        self.registry.register(collector)
        self.computed_collectors.append(collector)

    def set_snapshot_age(self, fn: Callable[[], float]) -> None:
        self.computed.add("spend_guard_snapshot_age_seconds", "Age of the credits snapshot this instance last saw.", fn)

    def set_policy_reload_failures(self, fn: Callable[[], float]) -> None:
        self.computed.add(
            "spend_guard_policy_reload_failures",
            "Policy reloads that failed validation since start (the old policy kept serving).",
            fn,
        )

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's registry, or the sum over every worker."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        forget_dead_workers(self.multiprocess_dir)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, self.multiprocess_dir)  # type: ignore[no-untyped-call]
        merged.register(self.computed)
        for collector in self.computed_collectors:
            merged.register(collector)
        return generate_latest(merged)

    def close(self) -> None:
        """On a worker's shutdown: its live gauges (holds in flight) stop counting."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]


def forget_dead_workers(directory: str) -> None:
    """A worker that was killed never ran its shutdown: drop its live gauges (holds in flight)
    so they stop counting. Its counters stay: what it counted happened."""
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        try:
            pid = int(path.rsplit("_", 1)[1].removesuffix(".db"))
        except ValueError:
            continue
        if not _alive(pid):
            mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
