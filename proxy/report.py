"""Budget reports: what `/-/me` shows a caller and `spend-guard status` shows an operator.

The numbers are computed exactly as reserve.lua computes them, from the same store state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.decisions import budget_holds, budgets_for
from proxy.errors import Rejected
from proxy.money import format_usd
from proxy.policy import KeyPolicy, Policy
from proxy.request import BEARER_RE, fingerprint
from proxy.store import RowState, Snapshot, Store, row_ref
from proxy.windows import format_ms, to_ms, window_end, window_start_ms

PERIOD_NAMES = ("day", "week", "month")


def counted_spend(row: RowState, window_ms: int, fetched_ms: int) -> int:
    """The snapshot's period spend that still counts in the current window (reserve.lua's rule)."""
    if window_ms > 0:
        if row.period_start_ms is not None:
            if row.period_start_ms < window_ms:
                return 0
        elif fetched_ms < window_ms:
            return 0
    return row.spend_micros


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
    snapshot: Snapshot | None = await store.read_snapshot()
    ref = row_ref(key.api_key_id, key.api_key_name) if key else None
    row = snapshot.rows.get(ref) if snapshot and ref else None
    row_win = window_start_ms(row.period, now_s) if row and row.period in PERIOD_NAMES else 0  # type: ignore[arg-type]
    fields = ["acct"] + ([f"row:{ref}:{row_win}"] if row else [])
    budgets = budgets_for(policy, key)
    holds = budget_holds(budgets, now_s)
    usage = await store.usage(fields, holds)
    scopes: list[dict[str, Any]] = []
    if snapshot is not None:
        acct = usage["acct"]
        floor = policy.account.min_remaining_micros
        scopes.append(
            _scope(
                "account",
                snapshot.remaining_micros - floor,
                acct.charged_micros,
                acct.held_micros,
                None,
                floor_usd=format_usd(floor),
                snapshot_at=format_ms(snapshot.fetched_ms),
            )
        )
        if row is not None and row.limit_micros is not None:
            used = usage[f"row:{ref}:{row_win}"]
            spent = counted_spend(row, row_win, snapshot.fetched_ms) + used.charged_micros
            scopes.append(
                _scope(f"key:{row.period or 'lifetime'}", row.limit_micros, spent, used.held_micros, _reset(row.period, now_s))
            )
    for budget in budgets:
        used = usage[f"b:{budget.counter}"]
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
        "snapshot": snapshot is not None,
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
