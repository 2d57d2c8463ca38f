"""The alert events' payloads (docs/alerts.md): the fields every event shares, the scopes that
can cross thresholds, and what each kind of event says once its mark is claimed (the claiming and
the sending are proxy/ops/alerts.py's)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from proxy.money import format_usd
from proxy.ops.levels import ScopeLevel, budget_level
from proxy.ops.outside import OutsideSpend
from proxy.policy.model import Budget, KeyPolicy, Policy
from proxy.runtime import Underheld
from proxy.store.records import Levels, Marks, RowLevel
from proxy.types import as_period
from proxy.windows import format_ms, to_ms

PPM = 1_000_000


def alert_event(
    policy: Policy,
    kind: str,
    level: ScopeLevel,
    threshold: float | None,
    now_s: float,
    window: dict[str, Any],
    message: str,
    **extra: Any,
) -> dict[str, Any]:
    """The payload every event shares (docs/alerts.md), `extra` fields added or overriding it."""
    event: dict[str, Any] = {
        "id": "msg_" + uuid.uuid4().hex,
        "type": kind,
        "timestamp": format_ms(int(now_s * 1000)),
        "account": policy.account.name,
        "scope": level.scope,
        "threshold": threshold,
        "limit_usd": format_usd(level.limit_micros),
        "spent_usd": format_usd(level.spent_micros),
        "held_usd": format_usd(level.held_micros),
        "remaining_usd": format_usd(level.remaining_micros),
        "mode": level.mode or "enforce",
        "policy_version": policy.version,
        "message": message,
        **window,
    }
    event.update(extra)
    if event["limit_usd"] is None:
        event["remaining_usd"] = None
    return event


def threshold_scopes(
    policy: Policy, keys: list[KeyPolicy], refs: dict[str, str | None], levels: Levels, budgets: Iterable[Budget]
) -> list[ScopeLevel]:
    """The scopes that can cross thresholds: each key's ImageRouter limit and each local budget,
    with its mode (a key limit is shadow only while the whole policy is)."""
    found = []
    for key in keys:
        row = levels.rows.get(refs.get(key.name) or "")
        if isinstance(row, RowLevel) and row.limit_micros is not None and levels.fetched_ms is not None:
            scope = f"key:{key.name}:{row.period or 'lifetime'}"
            period = as_period(row.period)
            found.append(ScopeLevel(scope, row.limit_micros, row.spent_micros, row.held_micros, period, policy.mode))
    found += [budget_level(budget, levels, shadow_all=policy.mode == "shadow") for budget in budgets]
    return found


def scope_events(
    policy: Policy, level: ScopeLevel, marks: Marks, now_s: float, window: dict[str, Any]
) -> list[dict[str, Any]]:
    """The events of the marks claimed for one scope in its window: a new window's
    `budget.recovered`, `budget.projected`, each `budget.threshold`."""
    events = []
    if marks.recovered:
        events.append(
            alert_event(
                policy,
                "budget.recovered",
                level,
                None,
                now_s,
                window,
                f"{level.scope}: a new window started, ${format_usd(level.limit_micros)} available again",
            )
        )
    for name in marks.claimed:
        if name == "projected":
            message = f"{level.scope}: at the last hour's rate it runs out before it resets at {window['resets_at']}"
            events.append(alert_event(policy, "budget.projected", level, 1.0, now_s, window, message))
        else:
            t = float(name[2:])
            message = (
                f"{level.scope} has spent {t:.0%} of its ${format_usd(level.limit_micros)} limit "
                f"(${format_usd(level.spent_micros)})"
            )
            if level.mode == "shadow" and t >= 1:
                message += "; shadow mode: calls over it would be refused, none is"
            events.append(
                alert_event(
                    policy,
                    "budget.threshold",
                    level,
                    t,
                    now_s,
                    window,
                    message,
                    threshold_usd=format_usd(-(-round(t * PPM) * level.limit_micros // PPM)),
                )
            )
    return events


def underheld_event(policy: Policy, call: Underheld, now_s: float) -> dict[str, Any]:
    """`call.underheld` for a call charged more than its hold."""
    excess = call.cost_micros - call.hold_micros
    message = (
        f"A {call.kind} call to model {call.model} by key {call.key_name} cost ${format_usd(call.cost_micros)}, "
        f"${format_usd(excess)} above its hold of ${format_usd(call.hold_micros)}; the model's next calls hold at "
        "least that cost"
    )
    level = ScopeLevel(f"key:{call.key_name}", 0, call.cost_micros, 0, None, policy.mode)
    return alert_event(
        policy,
        "call.underheld",
        level,
        None,
        now_s,
        {"window_start": None, "resets_at": None},
        message,
        limit_usd=None,
        model=call.model,
        hold_id=call.hold_id,
        hold_usd=format_usd(call.hold_micros),
        cost_usd=format_usd(call.cost_micros),
        underheld_usd=format_usd(excess),
    )


def outside_event(policy: Policy, item: OutsideSpend, scope: str, now_s: float, end: datetime | None) -> dict[str, Any]:
    """`key.spend_outside_guard` for a key (or the account: `scope`) ImageRouter charged beyond
    what passed through the guard; `end`: the end of the window its mark was claimed in."""
    whom = "the account" if item.key is None else f"key {item.key}"
    figure = "spent this window" if item.key is not None else "of credits left"
    message = (
        f"ImageRouter charged {whom} ${format_usd(item.micros)} that did not pass through the guard "
        f"(it reports ${format_usd(item.reported_micros)} {figure}; the guard accounted for "
        f"${format_usd(item.bound_micros)})"
    )
    level = ScopeLevel(scope, 0, item.reported_micros, 0, as_period(item.period), policy.mode)
    window = {
        "window_start": format_ms(item.window_start_ms) if item.window_start_ms else None,
        "resets_at": None if end is None or item.key is None else format_ms(to_ms(end)),
    }
    return alert_event(
        policy,
        "key.spend_outside_guard",
        level,
        None,
        now_s,
        window,
        message,
        limit_usd=None,
        outside_usd=format_usd(item.micros),
        guard_usd=format_usd(item.bound_micros),
    )
