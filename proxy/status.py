"""`spend-guard status`: every configured key and group with limit, spent, held, remaining, reset."""

from __future__ import annotations

from typing import Any

from proxy.policy import Policy
from proxy.report import scopes_for
from proxy.store import Store, redis_client
from proxy.types import SystemClock

COLUMNS = ("owner", "scope", "mode", "limit_usd", "spent_usd", "held_usd", "remaining_usd", "resets_at")


async def collect(policy: Policy, redis_url: str | None, *, store: Store | None = None, now_s: float | None = None) -> list[dict[str, Any]]:
    own = store is None
    store = store or Store(redis_client(redis_url), policy.account.name)
    now = SystemClock()() if now_s is None else now_s
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        account_done = False
        for key in policy.keys:
            report = await scopes_for(store, policy, key, now)
            for scope in report["scopes"]:
                name = scope["scope"]
                if name == "account":
                    if account_done:
                        continue
                    account_done = True
                    owner = f"account {policy.account.name}"
                elif name.startswith("budget:group:"):
                    if name in seen:
                        continue
                    seen.add(name)
                    owner = "group " + name.split(":")[2]
                else:
                    owner = f"key {key.name}"
                rows.append({"owner": owner, "mode": scope.get("mode", "enforce"), **scope})
        if not account_done:
            report = await scopes_for(store, policy, None, now)
            for scope in report["scopes"]:
                rows.append({"owner": f"account {policy.account.name}", "mode": "enforce", **scope})
        holds = await store.open_holds()
        rows.append({"owner": "holds in flight", "scope": "-", "mode": "-", "limit_usd": "-", "spent_usd": "-",
                     "held_usd": str(holds), "remaining_usd": "-", "resets_at": None})
    finally:
        if own:
            await store.client.aclose()
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    cells = [[str(row.get(c) if row.get(c) is not None else "-") for c in COLUMNS] for row in rows]
    header = [c.replace("_usd", " $").replace("_", " ") for c in COLUMNS]
    widths = [max(len(header[i]), *(len(r[i]) for r in cells)) if cells else len(header[i]) for i in range(len(COLUMNS))]
    numeric = {3, 4, 5, 6}

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(widths[i]) if i in numeric else v.ljust(widths[i]) for i, v in enumerate(values)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells])
