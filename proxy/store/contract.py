"""What the rest of the proxy needs of a store, as Protocols (`store.Store` meets all three).

- `Ledger`: the money path and every reader of levels. The guard reserves through it, the one
  settle path (`Runtime.settle`) settles through it, `/-/me`, `spend-guard status`, the status
  page, the gauges and the alerts read levels through it. A layer that changes how reserves
  and settles reach the store (batching round trips, a degraded mode that leases budget slices
  during an outage) is a `Ledger` wrapping another, installed as `Runtime.ledger`.
- `SnapshotStore`: what the refresher writes and reads (the credits snapshot, prices, locks,
  the store's epoch and clock).
- `StatusStore`: a `Ledger` that also tells how many holds are open and when the snapshot was
  fetched (readiness, the status page, `spend-guard status`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from proxy.prices import PriceTable
from proxy.store.records import BudgetHold, Decision, Levels, ReserveRequest, Snapshot


@runtime_checkable
class Ledger(Protocol):
    async def reserve(self, req: ReserveRequest) -> Decision:
        """Hold the request's amount against every scope it touches, all or nothing, or refuse."""

    async def settle(
        self,
        hold_id: str,
        cost_micros: int | None,
        now_ms: int,
        started_ms: int = 0,
        counters: Sequence[tuple[str, int]] = (),
    ) -> int | None:
        """End a hold once: charge `cost_micros` (None: the hold; 0: release). None: no such hold."""

    async def mark_started(self, started: Sequence[tuple[str, int]]) -> int:
        """Record when the upstream answered held calls (it pre-charged them by then)."""

    async def levels(
        self, row_refs: Sequence[str], budgets: Sequence[BudgetHold], windows_ms: tuple[int, int, int]
    ) -> Levels:
        """Every scope's limit, spent and held, by the rules `reserve` enforces, in one read."""

    async def aclose(self) -> None:
        """Release connections; idempotent."""


@runtime_checkable
class StatusStore(Ledger, Protocol):
    async def open_holds(self) -> int: ...

    async def snapshot_fetched_ms(self) -> int | None: ...

    async def state_lost(self) -> str | None: ...

    async def alerts_sent(self, scopes: Sequence[tuple[str, int]]) -> dict[str, dict[str, int]]: ...


@runtime_checkable
class SnapshotStore(Protocol):
    epoch: str

    async def check_identity(self, now_ms: int, *, new_is_safe: bool, not_new_why: str = ...) -> str | None: ...

    async def claim_account(self, account_key: str) -> str | None: ...

    async def eviction_policy(self) -> str | None: ...

    async def state_lost(self) -> str | None: ...

    async def time_s(self) -> float: ...

    async def acquire_lock(self, name: str, owner: str, ttl_ms: int) -> bool: ...

    async def release_lock(self, name: str, owner: str) -> None: ...

    async def apply_snapshot(self, snapshot: Snapshot, now_ms: int | None = None) -> bool: ...

    async def set_status(self, **values: str | int) -> None: ...

    async def save_prices(self, table: PriceTable) -> None: ...

    async def load_prices(self) -> PriceTable | None: ...
