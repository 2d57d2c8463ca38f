"""Budget levels as Prometheus gauges, read from the store when scraped (docs/monitoring.md).

Every instance reports the same numbers `/-/me` and the guard use: one `levels` read of the
whole policy per scrape. Scope labels are spelled as refusals spell them (`account`,
`budget:key:<name>:<period>`, `budget:group:<name>:<period>`) and a key's ImageRouter limit as
`key:<name>:<period>`; `mode` says whether going over it refuses calls (`enforce`) or is only
counted (`shadow`), so alert rules never page for a shadow budget. Never a secret or a fingerprint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.errors import StoreError
from proxy.ops.levels import ScopeLevel, every_level
from proxy.policy.model import Policy
from proxy.store.contract import Ledger

log = logging.getLogger("spend_guard.gauges")
LEVELS = (
    (
        "spend_guard_scope_limit_usd",
        "limit_micros",
        "A scope's limit (the account's: remaining credits above the floor), USD.",
    ),
    ("spend_guard_scope_spent_usd", "spent_micros", "Spent in a scope's current window, USD."),
    ("spend_guard_scope_held_usd", "held_micros", "Held by calls in flight against a scope, USD."),
    ("spend_guard_scope_remaining_usd", "remaining_micros", "Left in a scope: limit - spent - held, at least 0, USD."),
)


class LevelGauges(Collector):
    """The levels of the latest scrape's read; absent while the store cannot be read."""

    def __init__(self) -> None:
        self.levels: list[ScopeLevel] = []
        self.credits_micros: int | None = None

    async def refresh(self, store: Ledger, policy: Policy, now_s: float) -> None:
        try:
            self.levels, self.credits_micros = await every_level(store, policy, now_s)
        except StoreError as exc:
            # No numbers rather than stale ones: the guard-unavailable alert covers this.
            self.levels, self.credits_micros = [], None
            log.debug("levels not read for a scrape: %s", exc)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for name, field, documentation in LEVELS:
            family = GaugeMetricFamily(name, documentation, labels=["scope", "mode"])
            for level in self.levels:
                family.add_metric([level.scope, level.mode or "enforce"], getattr(level, field) / 1e6)
            yield family
        credits = GaugeMetricFamily(
            "spend_guard_account_credits_usd", "The account's remaining credits (last snapshot), USD."
        )
        if self.credits_micros is not None:
            credits.add_metric([], self.credits_micros / 1e6)
        yield credits
        info = GaugeMetricFamily(
            "spend_guard_build_info", "The running spend guard's version (value 1).", labels=["version"]
        )
        info.add_metric([__version__], 1.0)
        yield info
