"""The gauges the app computes from its parts when /-/metrics is scraped: policy reloads, the
store's clock offset and state, the snapshot's unreadable rows and the embedded store's restarts."""

from __future__ import annotations

from proxy.credits import Refresher
from proxy.ops.metrics import Metrics
from proxy.policy.reload import PolicyHolder
from proxy.settings import Settings
from proxy.store.embedded import restarts as embedded_restarts
from proxy.types import Clock


def add_computed_metrics(
    metrics: Metrics, holder: PolicyHolder, refresher: Refresher, clock: Clock, settings: Settings
) -> None:
    """Register the computed gauges and counters of one app's parts (the snapshot's age is the app's own)."""
    metrics.set_policy_reload_failures(lambda: holder.reloads_failed)
    metrics.computed.add(
        "spend_guard_policy_reload_failing",
        "1 while this instance's latest policy reload has failed (it enforces an older version than the files).",
        lambda: 1.0 if holder.last_failure is not None else 0.0,
    )
    metrics.computed.add(
        "spend_guard_clock_offset_seconds",
        "The store's clock minus this machine's (the proxy judges time on the store's clock).",
        lambda: float(getattr(clock, "offset_s", 0.0)),
    )
    metrics.computed.add(
        "spend_guard_store_state_lost",
        "1 while the store has lost its local budget state (calls touching a local budget get 503).",
        lambda: 1.0 if refresher.state_lost else 0.0,
    )
    metrics.computed.add(
        "spend_guard_store_can_evict",
        "1 while the store's maxmemory-policy can evict the guard's keys (budget counters, the loss marker).",
        lambda: 1.0 if refresher.evicting else 0.0,
    )
    metrics.computed.add(
        "spend_guard_snapshot_rows_unreadable",
        "Rows of the latest credits snapshot this proxy could not read (their keys' upstream limits are not checked).",
        lambda: len(refresher.bad_rows_logged),
    )
    if not settings.redis_url:
        metrics.computed.add_counter(
            "spend_guard_embedded_store_restarts",
            "Times the embedded store's server died and `serve` started it again on its append-only file.",
            lambda: float(embedded_restarts(settings.state_dir)),
        )
