"""Spend outside the guard: money ImageRouter charged a guarded key (or the account) that never
passed through the proxy (docs/alerts.md#spend-outside-the-guard).

Each credits refresh brings ImageRouter's own figures. Just before a new snapshot is applied, the
store's levels say the most ImageRouter can have charged through the guard: the previous
snapshot's spend that counts in the current window, plus every charge the guard made since, plus
every hold still in flight (a call in flight may already be pre-charged upstream). That is the
guard's invariant, so a new figure above it, by more than `TOLERANCE_MICROS`, is money that went
around the guard: a client calling ImageRouter directly with a key the policy guards. Read after
the fetch, the bound only grows with calls that started meanwhile, so traffic that all passes the
guard never shows as outside spend; a top-up or a refund only lowers the figure.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy.errors import StoreError
from proxy.policy.model import Policy
from proxy.store.contract import Ledger
from proxy.store.records import Levels, RowLevel, RowState, Snapshot, row_ref
from proxy.types import Clock
from proxy.windows import window_starts_ms

log = logging.getLogger("spend_guard.outside")
# Differences up to a cent are rounding (ImageRouter's figures have four decimals), not spend.
TOLERANCE_MICROS = 10_000


@dataclass(frozen=True)
class OutsideSpend:
    """What ImageRouter charged beyond the guard's bound since the previous snapshot."""

    key: str | None  # the key's policy name; None: the account as a whole
    micros: int
    window_start_ms: int  # the window it belongs to (0: lifetime); the account uses the day's
    period: str | None
    reported_micros: int  # ImageRouter's figure (the key's spend in its window; the account's remaining credits)
    bound_micros: int  # the most the guard accounted for


Report = Callable[[list[OutsideSpend]], Awaitable[None]]


def counted(row: RowState, window_start_ms: int, fetched_ms: int) -> int:
    """A snapshot row's spend that counts in the window starting at `window_start_ms` (0:
    lifetime), by the rules of row_level in _common.lua."""
    if window_start_ms <= 0:
        return row.spend_micros
    started = row.period_start_ms if row.period_start_ms is not None else fetched_ms
    return row.spend_micros if started >= window_start_ms else 0


def compare(policy: Policy, before: Levels, snapshot: Snapshot, days_start_ms: int) -> list[OutsideSpend]:
    """Every policy key (by its ImageRouter row) and the account whose new figure exceeds the
    guard's bound in `before` (levels read after the fetch, before the snapshot is applied)."""
    if before.fetched_ms is None:
        return []  # the first snapshot: nothing to compare with
    found = []
    for key in policy.keys:
        ref = row_ref(key.api_key_id, key.api_key_name)
        level = before.rows.get(ref) if ref else None
        row = snapshot.rows.get(ref) if ref else None
        if not isinstance(level, RowLevel) or row is None or row.period != level.period:
            continue
        reported = counted(row, level.window_start_ms, snapshot.fetched_ms)
        bound = level.spent_micros + level.held_micros
        if reported - bound > TOLERANCE_MICROS:
            found.append(OutsideSpend(key.name, reported - bound, level.window_start_ms, level.period, reported, bound))
    # The account: the credits the guard expected at the least, against what ImageRouter reports.
    lowest = before.remaining_micros - before.account.charged_micros - before.account.held_micros
    if lowest - snapshot.remaining_micros > TOLERANCE_MICROS:
        micros = lowest - snapshot.remaining_micros
        found.append(OutsideSpend(None, micros, days_start_ms, None, snapshot.remaining_micros, lowest))
    return found


class OutsideWatch:
    """Compares each new snapshot with the guard's bound and reports what exceeds it. Used by the
    refresher: `before(snapshot)` reads the bound (one round trip), and the check it returns
    runs once the snapshot is applied. A store error skips one comparison, never the refresh."""

    def __init__(self, ledger: Ledger, policy: Callable[[], Policy], clock: Clock, report: Report) -> None:
        self.ledger = ledger
        self.policy = policy
        self.clock = clock
        self.report = report

    async def before(self, snapshot: Snapshot) -> Callable[[], Awaitable[None]] | None:
        policy = self.policy()
        windows = window_starts_ms(self.clock())
        refs = sorted({ref for key in policy.keys if (ref := row_ref(key.api_key_id, key.api_key_name))})
        try:
            levels = await self.ledger.levels(refs, [], windows)
        except StoreError as exc:
            log.debug("spend outside the guard not compared this round: %s", exc)
            return None

        async def check() -> None:
            found = compare(policy, levels, snapshot, windows[0])
            if found:
                await self.report(found)

        return check
