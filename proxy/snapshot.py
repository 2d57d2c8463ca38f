"""The credits snapshot from `GET /v1/credits?by_api_key=true`: the account's remaining credits and
usage, and each API key's row (whether it is active, its ImageRouter spend limit and window, its
spend, its expiry), read into a `Snapshot` (proxy/store/records.py) that the refresher
(proxy/credits.py) stores.

A bad account-level field rejects the whole answer (`CreditsError`); a row that cannot be read is
kept as unreadable, so only that key's upstream scope is disabled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

from proxy.money import MoneyError, usd_to_micros
from proxy.store.records import RowState, Snapshot, row_ref
from proxy.types import is_period
from proxy.windows import parse_timestamp_ms

T = TypeVar("T")


class CreditsError(ValueError):
    """A credits answer we will not store (nothing of it is stored)."""


def parse_credits(document: bytes, fetched_ms: int) -> Snapshot:
    """`/v1/credits?by_api_key=true` -> Snapshot, or `CreditsError` naming the first bad
    account-level field. Rows are read one by one: a row that cannot be understood is kept as
    unreadable (its key's upstream scope is disabled, see `Snapshot.bad_rows`), never the reason
    the whole snapshot is thrown away; fields the proxy does not know are ignored."""
    try:
        data = json.loads(document)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CreditsError("credits answer is not JSON") from exc
    if not isinstance(data, dict):
        raise CreditsError("credits answer is not an object")
    try:
        remaining = usd_to_micros(data.get("remaining_credits"), allow_negative=True)
    except MoneyError as exc:
        raise CreditsError(f"remaining_credits: {exc}") from exc
    try:
        usage = None if data.get("credit_usage") is None else usd_to_micros(data.get("credit_usage"))
    except MoneyError as exc:
        raise CreditsError(f"credit_usage: {exc}") from exc
    rows_in = data.get("usage_by_api_key", [])
    if not isinstance(rows_in, list):
        raise CreditsError("usage_by_api_key is not a list")
    rows: dict[str, RowState] = {}
    bad: dict[str, str] = {}
    names_seen: dict[str, int] = {}
    for i, raw in enumerate(rows_in):
        if not isinstance(raw, dict):
            bad[f"#{i}"] = f"usage_by_api_key[{i}] is not an object"
            continue
        refs = []
        key_id, name = raw.get("api_key_id"), raw.get("api_key_name")
        if isinstance(key_id, str) and key_id:
            refs.append(row_ref(key_id, None) or "")
        if isinstance(name, str) and name:
            names_seen[name] = names_seen.get(name, 0) + 1
            refs.append(row_ref(None, name) or "")
        try:
            row = _row_state(raw)
        except (MoneyError, ValueError, TypeError) as exc:
            for ref in refs or [f"#{i}"]:
                bad[ref] = f"usage_by_api_key[{i}]: {exc}"
            continue
        for ref in refs:
            rows[ref] = row
    for name, count in names_seen.items():
        if count > 1:
            # Two rows share a name ("Deleted Key"): a policy entry by that name cannot be trusted.
            rows.pop(row_ref(None, name) or "", None)
            bad.pop(row_ref(None, name) or "", None)
    for ref in bad:
        rows.pop(ref, None)
    return Snapshot(fetched_ms, remaining, rows, bad, usage)


def _row_state(raw: dict[str, object]) -> RowState:
    period = raw.get("spend_limit_period")
    if period is not None and not is_period(period):
        raise ValueError(f"unknown spend_limit_period {period!r}")
    limit = raw.get("spend_limit")
    active = raw.get("is_active", True)
    if not isinstance(active, bool):
        raise ValueError(f"is_active is {active!r}")
    spend = raw.get("period_spend")
    if spend is None:
        spend = raw.get("credit_usage") if period is None else "0"

    def field(name: str, convert: Callable[[object], T], value: object) -> T:
        try:
            return convert(value)
        except (MoneyError, ValueError, TypeError) as exc:
            raise ValueError(f"{name}: {exc}") from exc

    return RowState(
        active=active,
        expires_ms=field("expires_at", parse_timestamp_ms, raw.get("expires_at")),
        limit_micros=None if limit is None else field("spend_limit", usd_to_micros, limit),
        period=period if isinstance(period, str) else None,
        spend_micros=field("period_spend", usd_to_micros, spend if spend is not None else "0"),
        period_start_ms=field("period_start", parse_timestamp_ms, raw.get("period_start")),
    )
