"""`spend-guard store recover`: lift the lost-state marker after the store forgot local budgets.

The operator chooses what the budgets' current windows start from: nothing (accept the loss),
figures they give (`key:alice:day=0.30`), or the JSON access log lines of the window, summed per
budget the way the guard counts them (every line with a cost, by the key's own and its group's
budgets whose current window contains the line's time).

It acts only on a store that lost its state: on a healthy one it writes nothing unless forced, as
its figures would replace what the guard counted. Thresholds a seeded figure has reached are
marked as alerted, so a recovery does not send their alerts a second time (docs/alerts.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from proxy.guard.verdicts import budget_holds, budgets_for
from proxy.money import MoneyError, usd_to_micros
from proxy.policy.model import Budget, Policy
from proxy.store.records import BudgetHold, MarkRequest
from proxy.store.redis import Store
from proxy.windows import format_ms, parse_timestamp_ms

DAY_MS = 86_400_000
PPM = 1_000_000


class RecoveryError(ValueError):
    """A seed or log line the operator must fix; nothing was written."""


@dataclass(frozen=True)
class Plan:
    counters: list[tuple[BudgetHold, int]]
    lines_used: int = 0
    # The budget each counter belongs to, by counter id: what the operator reads and alerts name.
    budgets: dict[str, Budget] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """What was (or would be) written, by budget name and window date."""
        found = []
        for hold, micros in self.counters:
            budget = self.budgets.get(hold.id)
            name = f"budget:{budget.id}" if budget else f"budget counter {hold.id}"
            window = f"window from {format_ms(hold.window_start_ms)}" if hold.window_start_ms else "lifetime"
            found.append(f"{name} ({window}): spent ${micros / 1e6:.4f}")
        return found


@dataclass(frozen=True)
class Recovery:
    """What `recover` found and did."""

    lost: str | None  # the store's lost-state marker, "<why>|<ms>" (None: it had lost nothing)
    written: bool

    @property
    def why(self) -> str:
        why, _, at_ms = (self.lost or "").partition("|")
        return f"{why} (noticed {format_ms(int(at_ms))})" if at_ms.isdigit() else why


def all_budgets(policy: Policy) -> dict[str, Budget]:
    found: dict[str, Budget] = {}
    for key in policy.keys:
        for budget in budgets_for(policy, key):
            found[budget.id] = budget
    for group in policy.groups.values():
        for budget in group.budgets:
            found[budget.id] = budget
    return found


def from_seeds(policy: Policy, seeds: Iterable[str], now_s: float) -> Plan:
    """`key:alice:day=0.30` (a budget id as `status` and refusals name it, minus `budget:`)."""
    budgets = all_budgets(policy)
    counters = []
    for seed in seeds:
        name, eq, usd = seed.partition("=")
        name = name.strip().removeprefix("budget:")
        if not eq or name not in budgets:
            known = ", ".join(sorted(budgets)) or "none"
            raise RecoveryError(f"--seed {seed!r}: expected BUDGET=USD with BUDGET one of: {known}")
        try:
            micros = usd_to_micros(usd.strip())
        except MoneyError as exc:
            raise RecoveryError(f"--seed {seed!r}: {exc}") from exc
        counters.append((budget_holds([budgets[name]], now_s)[0], micros))
    return Plan(counters, budgets={budgets[name].counter: budgets[name] for name in budgets})


def from_access_log(policy: Policy, lines: Iterable[str], now_s: float) -> Plan:
    """Sum each budget's charges in its current window from the guard's JSON access log lines."""
    by_name = {key.name: key for key in policy.keys}
    totals: dict[str, tuple[BudgetHold, int]] = {}
    named: dict[str, Budget] = {}
    used = 0
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line.startswith("{"):
            continue  # other log lines share the stream
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise RecoveryError(f"access log line {number}: not JSON") from exc
        if not isinstance(record, dict):
            continue
        cost, key = record.get("cost_usd"), by_name.get(str(record.get("key")))
        if cost is None or key is None:
            continue
        try:
            at_ms = parse_timestamp_ms(record.get("time"))
            micros = usd_to_micros(cost)
        except (MoneyError, ValueError, TypeError) as exc:
            raise RecoveryError(f"access log line {number}: {exc}") from exc
        if at_ms is None:
            continue
        counted = False
        budgets = budgets_for(policy, key)
        for budget, hold in zip(budgets, budget_holds(budgets, now_s), strict=True):
            in_window = hold.window_start_ms <= at_ms and (not hold.window_end_ms or at_ms < hold.window_end_ms)
            if in_window:
                previous = totals.get(hold.id, (hold, 0))[1]
                totals[hold.id] = (hold, previous + micros)
                named[hold.id] = budget
                counted = True
        used += counted
    return Plan(list(totals.values()), used, named)


async def recover(store: Store, plan: Plan, *, force: bool = False, thresholds: Iterable[float] = ()) -> Recovery:
    """Apply `plan` and lift the marker, if the store lost its state (or `force`). Each budget
    seeded at or past a threshold has that threshold's alert marked as sent in its window."""
    lost = await store.state_lost()
    if lost is None and not force:
        return Recovery(None, False)
    await store.recover(plan.counters)
    await mark_alerted(store, plan, sorted(thresholds), now_ms=await _now_ms(store))
    return Recovery(lost, True)


async def mark_alerted(store: Store, plan: Plan, thresholds: list[float], now_ms: int) -> None:
    """Claim the alert marks of the thresholds each seeded figure reached (claiming sends nothing:
    the alert loop sends an event only for a mark it claims itself)."""
    for hold, micros in plan.counters:
        budget = plan.budgets.get(hold.id)
        if budget is None or budget.limit_micros <= 0:
            continue
        reached = [t for t in thresholds if micros * PPM >= round(t * PPM) * budget.limit_micros]
        if reached:
            expire_at = hold.window_end_ms + DAY_MS if hold.window_end_ms else 0
            request = MarkRequest(hold.window_start_ms, expire_at, now_ms, claim=[f"t:{t:g}" for t in reached])
            await store.alert_marks(f"budget:{budget.id}", request)


async def _now_ms(store: Store) -> int:
    return int(await store.time_s() * 1000)
