"""`spend-guard status`: every configured key and group with limit, spent, held, remaining, reset.

It says which store it read and fails (`StatusError`, one line) rather than print an empty table
when that store cannot be read or holds nothing for the policy's account: an unreachable Redis, a
wrong DB number, or an embedded store whose proxy is not running all look alike otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import click

from proxy.commands.exits import POLICY_INVALID, STARTUP_FAILURE
from proxy.errors import PolicyError, StoreError
from proxy.guard.verdicts import budgets_for
from proxy.money import format_usd
from proxy.ops.levels import budget_level, key_report, read_levels
from proxy.policy.load import load_policy
from proxy.policy.model import Budget, Policy, default_policy
from proxy.store.backends import describe_url, redis_client
from proxy.store.embedded import default_state_dir, socket_path, socket_url
from proxy.store.records import Levels
from proxy.store.redis import Store
from proxy.types import SystemClock

COLUMNS = ("owner", "scope", "mode", "limit_usd", "spent_usd", "held_usd", "remaining_usd", "over_usd", "resets_at")


class StatusError(Exception):
    """The store could not be read, or holds nothing for the account: one line for the operator."""


@dataclass
class Status:
    store: str  # the store that was read, with any password masked
    account: str
    policy: str
    snapshot_at: str | None
    holds_in_flight: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "account": self.account,
            "policy": self.policy,
            "snapshot_at": self.snapshot_at,
            "holds_in_flight": self.holds_in_flight,
            "rows": self.rows,
        }


def store_url(redis_url: str | None, state_dir: str) -> str:
    """The store `status` reads: `redis_url`, else the running embedded store of `state_dir`."""
    if redis_url:
        return redis_url
    if not os.path.exists(socket_path(state_dir)):
        raise StatusError(
            f"no embedded store is running in {state_dir} (no socket {socket_path(state_dir)}): start the proxy, "
            "or give the --state-dir it runs with, or the --redis-url the proxies share"
        )
    return socket_url(state_dir)


async def collect(
    policy: Policy, url: str, *, policy_label: str = "default", store: Store | None = None, now_s: float | None = None
) -> Status:
    """Read every scope of every configured key and group from the store at `url`."""
    own = store is None
    store = store or Store(redis_client(url), policy.account.name)
    now = SystemClock()() if now_s is None else now_s
    shown = describe_url(url)
    try:
        # Two round trips: the open holds, and every scope's level by the rules the guard enforces.
        holds = await store.open_holds()
        budgets = _all_budgets(policy)
        levels, refs = await read_levels(store, policy, policy.keys, budgets, now)
        counted = any(u.charged_micros or u.held_micros for u in levels.budgets.values())
        if levels.fetched_ms is None and holds == 0 and not counted:
            raise StatusError(
                f"the store at {shown} holds nothing for account '{policy.account.name}' "
                "(no credits snapshot, no holds, no budget spend): a wrong URL or DB number, "
                "a different account.name, or no proxy has run against it yet"
            )
        status = Status(shown, policy.account.name, policy_label, None, holds)
        _rows(status, policy, levels, refs, now)
        if levels.fetched_ms is not None:
            status.snapshot_at = next((r["snapshot_at"] for r in status.rows if r["scope"] == "account"), None)
    except StoreError as exc:
        raise StatusError(f"cannot read the store at {shown}: {exc}") from exc
    finally:
        if own:
            await store.aclose()
    return status


def _all_budgets(policy: Policy) -> list[Budget]:
    """Every budget a key or group is checked against (the policy's defaults included)."""
    found = {b.counter: b for key in policy.keys for b in budgets_for(policy, key)}
    found.update({b.counter: b for group in policy.groups.values() for b in group.budgets})
    return list(found.values())


def _rows(status: Status, policy: Policy, levels: Levels, refs: dict[str, str | None], now_s: float) -> None:
    rows = status.rows
    report = key_report(policy, None, levels, None, [], now_s)
    rows += [_row(f"account {policy.account.name}", s) for s in report["scopes"] if s["scope"] == "account"]
    if not rows:
        rows.append(_blank(f"account {policy.account.name}", "account", "no credits snapshot fetched yet"))
    for key in policy.keys:
        report = key_report(policy, key, levels, refs.get(key.name), budgets_for(policy, key), now_s)
        own = [s for s in report["scopes"] if s["scope"] != "account" and not s["scope"].startswith("budget:group:")]
        rows += [_row(f"key {key.name}", s) for s in own]
        if not own:
            covered = f"group {key.group}" if key.group else "the account only"
            rows.append(_blank(f"key {key.name}", "-", f"limited by {covered}"))
    for group in policy.groups.values():
        for budget in group.budgets:
            rows.append(_row(f"group {group.name}", budget_level(budget, levels).as_json(now_s)))
        if not group.budgets:
            rows.append(_blank(f"group {group.name}", "-", "no budgets"))


def _row(owner: str, scope: dict[str, Any]) -> dict[str, Any]:
    row = {"owner": owner, "mode": scope.get("mode", "enforce"), **scope}
    limit, spent, held = (_micros(scope[k]) for k in ("limit_usd", "spent_usd", "held_usd"))
    over = spent + held - limit
    # A shadow budget is never enforced, so it can run past its limit: say by how much.
    row["over_usd"] = format_usd(over) if over > 0 else None
    return row


def _blank(owner: str, scope: str, note: str) -> dict[str, Any]:
    return {
        "owner": owner,
        "scope": scope,
        "mode": "-",
        "limit_usd": None,
        "spent_usd": None,
        "held_usd": None,
        "remaining_usd": None,
        "over_usd": None,
        "resets_at": None,
        "note": note,
    }


def _micros(usd: str) -> int:
    whole, _, frac = usd.partition(".")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole)) * 1_000_000 + int((frac + "000000")[:6]))


def render(status: Status) -> str:
    """The status as a heading (what was read) and a table."""
    heading = [
        f"store: {status.store}",
        f"account: {status.account}; policy: {status.policy}; credits snapshot: {status.snapshot_at or 'none yet'}; "
        f"holds in flight: {status.holds_in_flight}",
        "",
    ]
    return "\n".join([*heading, render_table(status.rows)])


def render_table(rows: list[dict[str, Any]]) -> str:
    cells = [[str(row.get(c) if row.get(c) is not None else "-") for c in COLUMNS] for row in rows]
    notes = [row.get("note") for row in rows]
    header = [c.replace("_usd", " $").replace("_", " ") for c in COLUMNS]
    widths = [
        max(len(header[i]), *(len(r[i]) for r in cells)) if cells else len(header[i]) for i in range(len(COLUMNS))
    ]
    numeric = {3, 4, 5, 6, 7}

    def line(values: list[str], note: str | None = None) -> str:
        text = "  ".join(v.rjust(widths[i]) if i in numeric else v.ljust(widths[i]) for i, v in enumerate(values))
        return (text + (f"  ({note})" if note else "")).rstrip()

    body = [line(r, n) for r, n in zip(cells, notes, strict=True)]
    return "\n".join([line(header), line(["-" * w for w in widths]), *body])


def _load(path: str | None) -> Policy:
    return load_policy(path) if path else default_policy()


def main(policy_path: str | None, redis_url: str | None, state_dir: str | None, as_json: bool) -> None:
    """Budgets and holds of every configured key and group, read from the store.

    Exits 3 with one line when the store cannot be read or holds nothing for the account."""
    try:
        policy = _load(policy_path)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(POLICY_INVALID)
    label = f"{policy_path} (version {policy.version})" if policy_path else "none given (defaults: no keys)"
    try:
        url = store_url(redis_url, os.path.abspath(state_dir or default_state_dir()))
        result = asyncio.run(collect(policy, url, policy_label=label))
    except (StatusError, ValueError) as exc:
        click.echo(f"spend-guard status: {exc}", err=True)
        sys.exit(STARTUP_FAILURE)
    click.echo(json.dumps(result.as_json(), indent=2) if as_json else render(result))
