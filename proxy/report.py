"""Budget reports: what `/-/me` shows a caller and `spend-guard status` shows an operator.

The numbers come from the store's `levels` script, which shares reserve.lua's scope rules, so
they are what the guard enforces; many keys are read in one round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.decisions import budget_holds, budgets_for
from proxy.errors import Rejected
from proxy.money import format_usd
from proxy.policy import Budget, KeyPolicy, Policy
from proxy.request import BEARER_RE, fingerprint
from proxy.store import Levels, RowLevel, Store, row_ref
from proxy.windows import format_ms, to_ms, window_end, window_start_ms

PERIOD_NAMES = ("day", "week", "month")


def _reset(period: str | None, now_s: float) -> str | None:
    end = window_end(period if period in PERIOD_NAMES else None, now_s)  # type: ignore[arg-type]
    return None if end is None else format_ms(to_ms(end))


def _scope(name: str, limit: int, spent: int, held: int, resets_at: str | None, **extra: Any) -> dict[str, Any]:
    return {
        "scope": name,
        "limit_usd": format_usd(limit),
        "spent_usd": format_usd(spent),
        "held_usd": format_usd(held),
        "remaining_usd": format_usd(max(0, limit - spent - held)),
        "resets_at": resets_at,
        **extra,
    }


async def scopes_for(store: Store, policy: Policy, key: KeyPolicy | None, now_s: float) -> dict[str, Any]:
    """Every scope a call by `key` is checked against, with limit, spent, held, remaining, reset."""
    return (await scopes_for_many(store, policy, [key], now_s))[0]


async def scopes_for_many(
    store: Store, policy: Policy, keys: Sequence[KeyPolicy | None], now_s: float
) -> list[dict[str, Any]]:
    """`scopes_for` of each key, read in one round trip (the store's `levels`)."""
    refs = {key.name: row_ref(key.api_key_id, key.api_key_name) for key in keys if key is not None}
    budgets = {key.name if key else "": budgets_for(policy, key) for key in keys}
    holds = {hold.id: hold for each in budgets.values() for hold in budget_holds(each, now_s)}
    windows = (window_start_ms("day", now_s), window_start_ms("week", now_s), window_start_ms("month", now_s))
    levels = await store.levels(sorted({r for r in refs.values() if r}), list(holds.values()), windows)
    return [_report(policy, key, levels, refs.get(key.name) if key else None, budgets[key.name if key else ""], now_s)
            for key in keys]


def _report(
    policy: Policy, key: KeyPolicy | None, levels: Levels, ref: str | None, budgets: list[Budget], now_s: float
) -> dict[str, Any]:
    scopes: list[dict[str, Any]] = []
    level = levels.rows.get(ref) if ref else None
    row = level if isinstance(level, RowLevel) else None
    if levels.fetched_ms is not None:
        floor = policy.account.min_remaining_micros
        scopes.append(
            _scope(
                "account",
                levels.remaining_micros - floor,
                levels.account.charged_micros,
                levels.account.held_micros,
                None,
                floor_usd=format_usd(floor),
                snapshot_at=format_ms(levels.fetched_ms),
            )
        )
        if row is not None and row.limit_micros is not None:
            scopes.append(
                _scope(
                    f"key:{row.period or 'lifetime'}", row.limit_micros, row.spent_micros, row.held_micros, _reset(row.period, now_s)
                )
            )
    for budget in budgets:
        used = levels.budgets[budget.counter]
        scopes.append(
            _scope(
                f"budget:{budget.id}",
                budget.limit_micros,
                used.charged_micros,
                used.held_micros,
                _reset(budget.period, now_s),
                mode="shadow" if budget.shadow else "enforce",
            )
        )
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


async def me_report(runtime: Any, authorization: Sequence[str]) -> dict[str, Any]:
    """`/-/me`: the caller's own scopes, identified by its bearer token (never echoed)."""
    if len(authorization) != 1 or not (m := BEARER_RE.match(authorization[0])):
        raise Rejected(401, "unauthorized", "Authorization header must be provided as Bearer token.", scope="auth")
    policy = runtime.policy
    key = policy.key_for(fingerprint(m.group(1)))
    if key is None and policy.guard.unknown_keys == "reject":
        raise Rejected(401, "unauthorized", "This API key is not registered with the spend guard.", scope="auth")
    if key is None and not policy.guard.show_account_to_unknown_keys:
        # Any made-up token gets here: it learns nothing about the account (issue 16).
        return {
            "key": None,
            "scopes": [],
            "message": "This API key is not listed in the spend guard's policy: its calls are checked against the "
            "account's credits only, which are not shown to unlisted keys.",
        }
    try:
        return await scopes_for(runtime.store, policy, key, runtime.clock())
    except Exception as exc:
        raise Rejected(503, "guard_unavailable", "The spend guard's store is unavailable.", scope="store") from exc
