"""The typed values that cross the store's boundary: what a reserve asks and is told, snapshot
rows, levels, alert marks. proxy/store/scripts.py turns the scripts' raw replies into these, so
nothing above the store sees Redis."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

_SAFE_REF = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")


def row_ref(api_key_id: str | None, api_key_name: str | None) -> str | None:
    """Redis-safe reference to an upstream key row: `id:<uuid>`, or a hash of its name."""
    if api_key_id is not None:
        if _SAFE_REF.match(api_key_id):
            return f"id:{api_key_id}"
        return "id#" + hashlib.sha256(api_key_id.encode()).hexdigest()[:24]
    if api_key_name is not None:
        return "name#" + hashlib.sha256(api_key_name.encode()).hexdigest()[:24]
    return None


@dataclass(frozen=True)
class BudgetHold:
    """A local budget a reservation counts against, in its current window."""

    id: str
    limit_micros: int
    shadow: bool
    window_start_ms: int  # 0 for a lifetime budget
    window_end_ms: int  # 0 for a lifetime budget


def counters_of(budgets: Sequence[BudgetHold]) -> tuple[tuple[str, int], ...]:
    """The store counters budget holds count in: (budget id, window start ms)."""
    return tuple((b.id, b.window_start_ms) for b in budgets)


@dataclass(frozen=True)
class ReserveRequest:
    hold_id: str
    amount_micros: int
    now_ms: int
    lease_expiry_ms: int
    floor_micros: int
    max_staleness_ms: int
    row_ref: str | None
    windows_ms: tuple[int, int, int]  # day, week, month starts
    shadow: bool = False
    budgets: Sequence[BudgetHold] = ()


# What reserve.lua refuses for (`ScopeRefusal.code`); its header lists the same codes.
RESERVE_REFUSAL_CODES = frozenset(
    {
        "no_snapshot",  # no credits snapshot is stored yet
        "stale",  # the snapshot is older than max_staleness_ms (held: its age, ms)
        "key_inactive",  # the key row is disabled upstream
        "key_expired",  # the key row's expiry has passed
        "key_limit",  # the key row's upstream spend limit would be exceeded
        "credits",  # the account's credits (less the floor) would be exceeded
        "budget",  # a local budget would be exceeded
        "cancelled",  # the proxy released this hold before its reserve ran (a tombstone)
        "row_unreadable",  # the snapshot had the key row but could not read it
        "state_lost",  # the store lost its local budget state (only calls that touch a local budget)
    }
)


@dataclass(frozen=True)
class ScopeRefusal:
    code: str  # one of RESERVE_REFUSAL_CODES
    scope: str  # "key", "account", "key:<period>", "budget:<id>"
    limit_micros: int
    spent_micros: int
    held_micros: int
    # The scope as values, read once from the script's answer (ScopeRefusal.of), never parsed again:
    period: str | None = None  # key_limit: the key row's period ("day", "week", "month", "lifetime")
    budget: str | None = None  # budget: the budget's counter id

    @classmethod
    def of(cls, code: str, scope: str, limit: int, spent: int, held: int) -> ScopeRefusal:
        """A refusal as reserve.lua spells it (`key:<period>`, `budget:<counter>`), typed."""
        kind, _, rest = scope.partition(":")
        period = rest if code == "key_limit" and kind == "key" else None
        budget = rest if code == "budget" and kind == "budget" else None
        return cls(code, scope, limit, spent, held, period, budget)


@dataclass(frozen=True)
class Reclaimed:
    """What a reserve did on the side: expired leases it charged, unreadable holds it moved aside."""

    count: int = 0
    micros: int = 0
    quarantined: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    refusal: ScopeRefusal | None = None  # when allowed, a shadow refusal ("would refuse") or None
    tight_scope: str = ""
    tight_remaining_micros: int = -1
    reclaimed: Reclaimed = Reclaimed()

    def renamed(self, names: dict[str, str]) -> Decision:
        """The same decision with scopes spelled for people (`budget:<counter>` -> `budget:<id>`)."""
        refusal = self.refusal
        if refusal is not None and refusal.scope in names:
            refusal = dataclasses.replace(refusal, scope=names[refusal.scope])
        return dataclasses.replace(self, refusal=refusal, tight_scope=names.get(self.tight_scope, self.tight_scope))


@dataclass(frozen=True)
class RowState:
    active: bool
    expires_ms: int | None
    limit_micros: int | None
    period: str | None
    spend_micros: int
    period_start_ms: int | None

    def encode(self) -> str:
        return "|".join(
            [
                "1" if self.active else "0",
                str(-1 if self.expires_ms is None else self.expires_ms),
                str(-1 if self.limit_micros is None else self.limit_micros),
                self.period or "-",
                str(self.spend_micros),
                str(-1 if self.period_start_ms is None else self.period_start_ms),
            ]
        )

    @classmethod
    def decode(cls, text: str) -> RowState:
        active, expires, limit, period, spend, start = text.split("|")
        return cls(
            active == "1",
            None if int(expires) < 0 else int(expires),
            None if int(limit) < 0 else int(limit),
            None if period == "-" else period,
            int(spend),
            None if int(start) < 0 else int(start),
        )


@dataclass(frozen=True)
class Snapshot:
    """One `/v1/credits?by_api_key=true` answer, converted; `fetched_ms` is when the fetch began."""

    fetched_ms: int
    remaining_micros: int
    rows: dict[str, RowState] = field(default_factory=dict)
    # Rows the proxy could not read, by row ref (or "#<index>" when not even the key is known),
    # with the reason. A policy key on such a row gets no upstream-limit check: its calls are
    # refused 503 (or forwarded unguarded under on_store_error: open) until the row reads again.
    bad_rows: dict[str, str] = field(default_factory=dict)
    # The account's `credit_usage` (None: not given). A snapshot takes a charge off the account
    # only once this has risen by it since the call was admitted (docs/state.md).
    usage_micros: int | None = None


@dataclass(frozen=True)
class RowLevel:
    """A key row's upstream spend limit as reserve.lua sees it (levels.lua, row_level)."""

    active: bool
    expires_ms: int | None
    limit_micros: int | None
    period: str | None  # None: lifetime
    window_start_ms: int  # 0: lifetime
    spent_micros: int  # the period spend that counts in this window, plus charges since
    held_micros: int


@dataclass(frozen=True)
class Levels:
    """Every scope's level in one read: the account, key rows (None: no row; "unreadable"), budgets."""

    fetched_ms: int | None
    remaining_micros: int
    account: ScopeUsage
    rows: dict[str, RowLevel | str | None]
    budgets: dict[str, ScopeUsage]


@dataclass(frozen=True)
class ScopeUsage:
    """What `/-/me` and `status` show for one scope."""

    charged_micros: int  # charges since the snapshot (upstream scopes) or in the window (budgets)
    held_micros: int


@dataclass(frozen=True)
class MarkRequest:
    """One scope's alert marks to claim or release (alert_marks.lua), with what it has spent now."""

    window_start_ms: int  # 0: lifetime, or a scope without windows
    expire_at_ms: int  # 0: the marks never expire
    now_ms: int
    spent_micros: int = 0
    limit_micros: int = 0  # 0: no projection
    window_end_ms: int = 0  # 0: no projection
    claim: Sequence[str] = ()
    release: Sequence[str] = ()
    rate_span_ms: tuple[int, int, int] = (600_000, 3_600_000, 60_000)  # minimum span, horizon, sample spacing


@dataclass(frozen=True)
class Marks:
    claimed: tuple[str, ...]
    released: tuple[str, ...]
    recovered: bool  # a newer window cleared marks that included a threshold
