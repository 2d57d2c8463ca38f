"""What the guard decided about one call: the call record, the budgets it counts against, the
refusal a reserve becomes, and the decision log line."""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass, field

from proxy.errors import Rejected
from proxy.guard.signature import Signature
from proxy.logs import access_line
from proxy.money import format_usd
from proxy.policy.model import Budget, KeyPolicy, ModelRules, Policy
from proxy.settings import Secret
from proxy.store.records import BudgetHold, ScopeRefusal
from proxy.types import as_period
from proxy.untrusted import excerpt
from proxy.windows import format_ms, to_ms, window_end, window_start

# What reserve.lua refuses for; anything else it says is treated as the store being unavailable.
REFUSAL_CODES = frozenset({"key_inactive", "key_expired", "key_limit", "credits", "budget"})


@dataclass
class Call:
    """One guarded request on its way through; the fields feed the decision log line."""

    request_id: str
    started: float
    route: str
    kind: str = ""  # the route's kind: image, video or text
    key: KeyPolicy | None = None
    key_name: str = "unknown"
    model: str | None = None
    hold_micros: int = 0
    # What the hold rests on (proxy.guard.observed.Priced.basis), and the price signature the
    # call is learned under (None: not learned from).
    hold_basis: str = ""
    signature: Signature | None = None
    decision: str = "refused"
    scope: str = ""
    cost_micros: int | None = None
    upstream_status: int | None = None
    outcome: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    client: str | None = None  # "host:port" of the connection (the proxy never trusts X-Forwarded-For)
    user_agent: str | None = None
    # A virtual key's call: the Authorization value sent upstream instead of the client's token.
    upstream_auth: Secret | None = None


def budgets_for(policy: Policy, key: KeyPolicy | None) -> list[Budget]:
    if key is None:
        return []
    group = policy.group_of(key)
    return list(key.budgets) + (list(group.budgets) if group else [])


def budget_holds(budgets: list[Budget], now_s: float) -> list[BudgetHold]:
    holds = []
    for b in budgets:
        start, end = window_start(b.period, now_s), window_end(b.period, now_s)
        holds.append(
            BudgetHold(
                b.counter,
                b.limit_micros,
                b.shadow,
                0 if start is None else to_ms(start),
                0 if end is None else to_ms(end),
            )
        )
    return holds


def stale_reason(refusal: ScopeRefusal, max_staleness_s: float) -> str:
    """Why a reserve could not decide: no snapshot yet, or one older than `max_staleness_s`."""
    if refusal.code == "no_snapshot":
        return "no credits snapshot has been fetched from ImageRouter yet"
    return f"the credits snapshot is {refusal.held_micros // 1000} s old (max_staleness_s={max_staleness_s:g})"


def rejection_for(r: ScopeRefusal, call: Call, budgets: list[Budget], now_s: float, floor_micros: int) -> Rejected:
    """The 402/403 a reserve refusal becomes: scope, limit, spent, held, reset, Retry-After."""
    spent, held, limit = format_usd(r.spent_micros), format_usd(r.held_micros), format_usd(r.limit_micros)
    this = format_usd(call.hold_micros) + (f" (hold basis: {call.hold_basis})" if call.hold_basis else "")
    key = f"Key '{call.key_name}'" if call.key else "This key"
    if r.code == "key_inactive":
        return Rejected(403, "key_inactive", f"{key} is inactive at ImageRouter.", scope="key")
    if r.code == "key_expired":
        return Rejected(403, "key_expired", f"{key} has expired at ImageRouter.", scope="key")
    if r.code == "credits":
        floor = floor_micros
        return Rejected(
            402,
            "insufficient_credits",
            f"Account credits would drop below the floor of ${format_usd(floor)}: available above the floor "
            f"${limit}, settled since the last snapshot ${spent}, held by calls in flight ${held}, "
            f"this call holds up to ${this}. Top up the ImageRouter account.",
            scope="account",
        )
    period: str | None = None
    if r.code == "key_limit":
        period = r.period or "lifetime"
        whose = f"The key '{call.key_name}'" if call.key else "This key"
        what = f"{whose} has an ImageRouter spend limit of ${limit} per {period}, which"
    else:
        budget = next((b for b in budgets if b.counter == r.budget), None)
        period = (budget.period if budget else None) or "lifetime"
        what = f"Budget '{budget.id if budget else r.budget}' of ${limit} per {period}"
    message = (
        f"{what} would be exceeded: spent ${spent}, held by calls in flight ${held}, this call holds up to ${this}."
    )
    headers = {}
    reset = window_end(as_period(period), now_s)
    if reset is not None:
        message += f" The window resets at {format_ms(to_ms(reset))}."
        headers["Retry-After"] = str(max(1, int(reset.timestamp() - now_s) + 1))
    else:
        message += " This is a lifetime limit; it does not reset."
    return Rejected(402, "spend_limit_exceeded", message, scope=r.scope, headers=headers)


# One encoder for every access line (json.dumps with an argument builds one each call).
_ACCESS_JSON = json.JSONEncoder(separators=(",", ":"))
_stamp: tuple[int, str] = (-1, "")


def _utc_now_text() -> str:
    """The current UTC second as the access line spells it, formatted once per second."""
    global _stamp
    second = int(time.time())
    if second != _stamp[0]:
        _stamp = (second, format_ms(second * 1000))
    return _stamp[1]


def log_decision(call: Call, policy: Policy, error: str | None = None) -> None:
    """One bare JSON object per guarded call on `spend_guard.access`; never a secret."""
    record = {
        "time": _utc_now_text(),
        "request_id": excerpt(call.request_id),
        "decision": call.decision,
        "scope": call.scope or None,
        "key": call.key_name,
        "route": excerpt(call.route),
        "model": None if call.model is None else excerpt(call.model),
        "hold_usd": format_usd(call.hold_micros) if call.hold_micros else None,
        "hold_basis": call.hold_basis or None,
        "cost_usd": None if call.cost_micros is None else format_usd(call.cost_micros),
        "outcome": call.outcome or None,
        "upstream_status": call.upstream_status,
        "latency_ms": round((time.perf_counter() - call.started) * 1000, 1),
        "policy_version": policy.version,
        "client": call.client,
        "user_agent": None if call.user_agent is None else excerpt(call.user_agent, 200),
    }
    if error:
        record["error"] = error
    access_line(_ACCESS_JSON.encode(record))


def permits(rules: ModelRules, names: set[str]) -> bool:
    """Deny wins if any spelling (alias or resolved id) matches; an allow list needs one match."""
    if any(fnmatch.fnmatchcase(n, g) for n in names for g in rules.deny):
        return False
    return not rules.allow or any(fnmatch.fnmatchcase(n, g) for n in names for g in rules.allow)


class Verdicts:
    """Policy refusals collected as the checks run, then enforced at a checkpoint (before the body
    is read, before the reserve): in global shadow mode they are recorded, never raised, and the
    first one is logged as would_refuse (Envoy ratelimit applies shadow mode once, at the end)."""

    def __init__(self, shadow: bool) -> None:
        self.shadow = shadow
        self.refusals: list[Rejected] = []

    def add(self, refusal: Rejected) -> None:
        self.refusals.append(refusal)

    def enforce(self) -> None:
        """Raise the first refusal, unless in shadow mode."""
        if self.refusals and not self.shadow:
            raise self.refusals[0]
