"""Budget reports: what `/-/me` shows a caller and `spend-guard status` shows an operator.

The numbers come from the store's `levels` script, which shares reserve.lua's scope rules, so
they are what the guard enforces; many keys are read in one round trip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.errors import Rejected
from proxy.guard.callers import UNREGISTERED, identify_token
from proxy.guard.verdicts import budget_holds, budgets_for
from proxy.http.request import BEARER_RE, fingerprint
from proxy.money import format_usd
from proxy.policy.model import Budget, KeyPolicy, Policy
from proxy.store.contract import Ledger
from proxy.store.records import Levels, RowLevel, row_ref
from proxy.types import Period, as_period
from proxy.windows import format_ms, to_ms, window_end, window_starts_ms


def _reset(period: Period | None, now_s: float) -> str | None:
    end = window_end(period, now_s)
    return None if end is None else format_ms(to_ms(end))


@dataclass(frozen=True)
class ScopeLevel:
    """One scope's level in micro-dollars: what `/-/me`, `status` and the gauges show."""

    scope: str  # as /-/me spells it ("key:day" for the caller's own row, "budget:key:alice:day")
    limit_micros: int
    spent_micros: int
    held_micros: int
    period: Period | None = None  # None: no reset (lifetime, account)
    mode: str | None = None  # enforce or shadow; /-/me gives it for budgets only

    @property
    def remaining_micros(self) -> int:
        return max(0, self.limit_micros - self.spent_micros - self.held_micros)

    def as_json(self, now_s: float, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "scope": self.scope,
            "limit_usd": format_usd(self.limit_micros),
            "spent_usd": format_usd(self.spent_micros),
            "held_usd": format_usd(self.held_micros),
            "remaining_usd": format_usd(self.remaining_micros),
            "resets_at": _reset(self.period, now_s),
            **extra,
        }
        if self.mode is not None:
            body["mode"] = self.mode
        return body


def account_level(policy: Policy, levels: Levels) -> ScopeLevel:
    floor = policy.account.min_remaining_micros
    return ScopeLevel(
        "account", levels.remaining_micros - floor, levels.account.charged_micros, levels.account.held_micros
    )


def key_limit_level(level: RowLevel | str | None) -> ScopeLevel | None:
    """The key's ImageRouter spend limit, if its row has one."""
    if not isinstance(level, RowLevel) or level.limit_micros is None:
        return None
    name = f"key:{level.period or 'lifetime'}"
    return ScopeLevel(name, level.limit_micros, level.spent_micros, level.held_micros, as_period(level.period))


def budget_level(budget: Budget, levels: Levels, *, shadow_all: bool = False) -> ScopeLevel:
    """A budget's level; `mode` is shadow for a shadow budget, or for every budget when the whole
    policy is in shadow mode (`shadow_all`): nothing over it is refused."""
    used = levels.budgets[budget.counter]
    mode = "shadow" if budget.shadow or shadow_all else "enforce"
    return ScopeLevel(
        f"budget:{budget.id}", budget.limit_micros, used.charged_micros, used.held_micros, budget.period, mode
    )


async def read_levels(
    store: Ledger, policy: Policy, keys: Sequence[KeyPolicy | None], budgets: Sequence[Budget], now_s: float
) -> tuple[Levels, dict[str, str | None]]:
    """One round trip: the key rows of `keys` and every budget in `budgets`, in their windows."""
    refs = {key.name: row_ref(key.api_key_id, key.api_key_name) for key in keys if key is not None}
    holds = {hold.id: hold for hold in budget_holds(list(budgets), now_s)}
    rows = sorted({r for r in refs.values() if r})
    return await store.levels(rows, list(holds.values()), window_starts_ms(now_s)), refs


async def scopes_for(store: Ledger, policy: Policy, key: KeyPolicy | None, now_s: float) -> dict[str, Any]:
    """Every scope a call by `key` is checked against, with limit, spent, held, remaining, reset."""
    return (await scopes_for_many(store, policy, [key], now_s))[0]


async def scopes_for_many(
    store: Ledger, policy: Policy, keys: Sequence[KeyPolicy | None], now_s: float
) -> list[dict[str, Any]]:
    """`scopes_for` of each key, read in one round trip (the store's `levels`)."""
    budgets = {key.name if key else "": budgets_for(policy, key) for key in keys}
    every = [budget for each in budgets.values() for budget in each]
    levels, refs = await read_levels(store, policy, keys, every, now_s)
    return [
        key_report(policy, key, levels, refs.get(key.name) if key else None, budgets[key.name if key else ""], now_s)
        for key in keys
    ]


def key_report(
    policy: Policy, key: KeyPolicy | None, levels: Levels, ref: str | None, budgets: list[Budget], now_s: float
) -> dict[str, Any]:
    """The scopes a call by `key` is checked against, from levels already read (`read_levels`)."""
    scopes: list[dict[str, Any]] = []
    level = levels.rows.get(ref) if ref else None
    row = level if isinstance(level, RowLevel) else None
    if levels.fetched_ms is not None:
        floor = format_usd(policy.account.min_remaining_micros)
        scopes.append(
            account_level(policy, levels).as_json(now_s, floor_usd=floor, snapshot_at=format_ms(levels.fetched_ms))
        )
        if (limit := key_limit_level(row)) is not None:
            scopes.append(limit.as_json(now_s))
    scopes += [budget_level(budget, levels).as_json(now_s) for budget in budgets]
    result: dict[str, Any] = {
        "key": key.name if key else None,
        "policy_version": policy.version,
        "scopes": scopes,
        "snapshot": levels.fetched_ms is not None,
    }
    if row is not None:
        result["key_active"] = row.active
        result["key_expires_at"] = None if row.expires_ms is None else format_ms(row.expires_ms)
    return result


async def every_level(store: Ledger, policy: Policy, now_s: float) -> tuple[list[ScopeLevel], int | None]:
    """Every scope of the policy, spelled as refusals spell it (a key's ImageRouter limit as
    `key:<name>:<period>`), and the account's remaining credits (None: no snapshot): the gauges.
    Each has its `mode`: the account and key limits are enforced unless the whole policy is in
    shadow mode; a budget is shadow when it or the policy is."""
    budgets = {b.id: b for key in policy.keys for b in budgets_for(policy, key)}
    budgets.update({b.id: b for group in policy.groups.values() for b in group.budgets})
    levels, refs = await read_levels(store, policy, policy.keys, list(budgets.values()), now_s)
    shadow_all = policy.mode == "shadow"
    if levels.fetched_ms is None:
        return [budget_level(b, levels, shadow_all=shadow_all) for b in budgets.values()], None
    found = [dataclasses.replace(account_level(policy, levels), mode=policy.mode)]
    for key in policy.keys:
        ref = refs.get(key.name)
        if (limit := key_limit_level(levels.rows.get(ref) if ref else None)) is not None:
            found.append(
                ScopeLevel(
                    f"key:{key.name}:{limit.period or 'lifetime'}",
                    limit.limit_micros,
                    limit.spent_micros,
                    limit.held_micros,
                    limit.period,
                    policy.mode,
                )
            )
    found += [budget_level(b, levels, shadow_all=shadow_all) for b in budgets.values()]
    return found, levels.remaining_micros


async def me_report(runtime: Any, authorization: Sequence[str]) -> dict[str, Any]:
    """`/-/me`: the caller's own scopes, identified by its bearer token (never echoed)."""
    if len(authorization) != 1 or not (m := BEARER_RE.match(authorization[0])):
        raise Rejected(401, "unauthorized", "Authorization header must be provided as Bearer token.", scope="auth")
    policy = runtime.policy
    # 401 for an expired token, and for an unlisted one when any key is virtual.
    key = identify_token(policy, fingerprint(m.group(1)), runtime.clock())
    if key is None and policy.guard.unknown_keys == "reject":
        raise Rejected(401, "unauthorized", UNREGISTERED, scope="auth")
    if key is None and not policy.guard.show_account_to_unknown_keys:
        # Any made-up token gets here, so it must learn nothing about the account.
        return {
            "key": None,
            "scopes": [],
            "message": "This API key is not listed in the spend guard's policy: its calls are checked against the "
            "account's credits only, which are not shown to unlisted keys.",
        }
    try:
        return await scopes_for(runtime.ledger, policy, key, runtime.clock())
    except Exception as exc:
        raise Rejected(503, "guard_unavailable", "The spend guard's store is unavailable.", scope="store") from exc
