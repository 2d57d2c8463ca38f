"""`spend-guard store recover`: lift the lost-state marker after the store forgot local budgets.

The operator chooses what the budgets' current windows start from: nothing (accept the loss),
figures they give (`key:alice:day=0.30`), or the JSON access log lines of the window, summed per
budget the way the guard counts them (every line with a cost, by the key's own and its group's
budgets whose current window contains the line's time).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.guard.verdicts import budget_holds, budgets_for
from proxy.money import MoneyError, usd_to_micros
from proxy.policy.model import Budget, Policy
from proxy.store.records import BudgetHold
from proxy.store.redis import Store
from proxy.windows import parse_timestamp_ms


class RecoveryError(ValueError):
    """A seed or log line the operator must fix; nothing was written."""


@dataclass(frozen=True)
class Plan:
    counters: list[tuple[BudgetHold, int]]
    lines_used: int = 0


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
    return Plan(counters)


def from_access_log(policy: Policy, lines: Iterable[str], now_s: float) -> Plan:
    """Sum each budget's charges in its current window from the guard's JSON access log lines."""
    by_name = {key.name: key for key in policy.keys}
    totals: dict[str, tuple[BudgetHold, int]] = {}
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
        for hold in budget_holds(budgets_for(policy, key), now_s):
            in_window = hold.window_start_ms <= at_ms and (not hold.window_end_ms or at_ms < hold.window_end_ms)
            if in_window:
                previous = totals.get(hold.id, (hold, 0))[1]
                totals[hold.id] = (hold, previous + micros)
                counted = True
        used += counted
    return Plan(list(totals.values()), used)


async def recover(store: Store, plan: Plan) -> str | None:
    """Apply `plan` and lift the marker. Returns what the marker said (None: nothing was lost)."""
    lost = await store.state_lost()
    await store.recover(plan.counters)
    return lost
