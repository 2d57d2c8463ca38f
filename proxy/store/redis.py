"""`Store`: the store's operations on one account's state, each one round trip (mostly a Lua
script: proxy/store/scripts.py sends them and reads their replies). `Store` meets every Protocol of
proxy/store/contract.py.

Key names come from proxy/store/keyspace.py (one builder; every script receives each key it
touches in KEYS). Amounts are integer micro-dollars. What identifies the store and restores its
state is `Identity` (proxy/store/identity.py); how each operation reaches Redis, and how its
driver errors become `StoreError`, is `Connection` (proxy/store/connection.py). `Store` builds
on both.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from proxy.errors import HoldQuarantined, StoreScriptError
from proxy.prices import PriceTable
from proxy.store.identity import Identity
from proxy.store.keyspace import spec
from proxy.store.learned import Learned, Window, learned_of, observe_args
from proxy.store.records import (
    BudgetHold,
    Decision,
    Levels,
    MarkRequest,
    Marks,
    Reclaimed,
    ReserveRequest,
    RowState,
    ScopeUsage,
    Snapshot,
    counters_of,
)
from proxy.store.scripts import (
    RESERVE_RECLAIM_FIRST,
    SETTLE_QUARANTINED,
    as_text,
    budget_level_of,
    counters_named,
    decision_of,
    ledger_script,
    lone_script,
    row_level_of,
    settle_of,
)

# How a ledger operation's script reaches the store: its name, the keys it receives after its
# fixed ones, its ARGV; answers the script's reply. `Store.run_ledger_script` sends it alone;
# proxy/store/batch.py sends it with others.
Send = Callable[[str, Sequence[str | bytes], Sequence[Any]], Awaitable[Any]]
LOCK_REFRESH = "lock:refresh"
# What the snapshot keeps for a key row it could not read (reserve.lua refuses `row_unreadable`).
UNREADABLE_ROW = "!"
LOCK_MODELS = "lock:models"

# A call the upstream answered this long before a credits fetch began is in that snapshot: the
# upstream pre-charges a call before it answers it (docs/imagerouter-api.md). The margin covers
# what is left of clock differences between instances once each measures its offset to the
# store's clock.
CONTAIN_MARGIN_MS = 250
# A snapshot contains a charge only once its figures have risen by it (apply_snapshot.lua). A
# charge they have not shown this long after it passed the timing test leaves by timing alone, so
# what the guard keeps stays bounded when the figures never rise (a charge the upstream never
# billed, a refund, a credits endpoint that lags longer than this). It leaves within a tenth more.
CONTAIN_HORIZON_MS = 300_000


class Store(Identity):
    """Reserve, settle and snapshot operations on one account's state."""

    def __init__(self, client: aioredis.Redis, account: str) -> None:
        super().__init__(client, account)
        self.lua_reserve = ledger_script(client, "reserve")
        self.lua_reclaim = ledger_script(client, "reclaim")
        self.lua_settle = ledger_script(client, "settle")
        self.lua_mark_started = ledger_script(client, "mark_started")
        self.lua_apply_snapshot = ledger_script(client, "apply_snapshot")
        self.lua_levels = ledger_script(client, "levels")
        self.lua_alert_marks = lone_script(client, "alert_marks")
        self.lua_observe = lone_script(client, "observe")
        self._ledger_scripts = {
            "reserve": self.lua_reserve,
            "settle": self.lua_settle,
            "mark_started": self.lua_mark_started,
        }

    async def time_s(self) -> float:
        """The store's clock (Redis TIME), in seconds since the epoch."""
        seconds, micros = await self._call(self.client.time)
        return float(seconds) + float(micros) / 1e6

    async def run_ledger_script(self, name: str, own_keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        """Run ledger script `name` alone: its fixed keys, then `own_keys`, and `args`."""
        return await self.run(self._ledger_scripts[name], [*self.keys.fixed(name), *own_keys], args)

    async def reserve(self, req: ReserveRequest, send: Send | None = None) -> Decision:
        """Hold `amount_micros` against account, key row and budgets in one round trip, or refuse.
        Expired leases are reclaimed first (two more round trips, only when some expired).
        `send` runs the script (default: alone, `run_ledger_script`)."""
        send = send or self.run_ledger_script
        reply = await send("reserve", *self.reserve_call(req, reclaim_first=True))
        reclaimed = Reclaimed()
        if reply[0] == RESERVE_RECLAIM_FIRST:
            _, expired_counters = reply
            reclaimed = await self.reclaim(req.now_ms, counters_named(expired_counters))
            reply = await send("reserve", *self.reserve_call(req, reclaim_first=False))
        return decision_of(reply, reclaimed)

    def reserve_call(self, req: ReserveRequest, *, reclaim_first: bool) -> tuple[list[str | bytes], list[Any]]:
        """reserve.lua's own keys (after its fixed ones) and ARGV for `req`."""
        keys: list[str | bytes] = [self.keys.tomb(req.hold_id), *self.keys.budgets(counters_of(req.budgets))]
        return keys, _reserve_args(req, self.epoch, reclaim_first)

    async def reclaim(self, now_ms: int, counters: Sequence[tuple[str, int]] = ()) -> Reclaimed:
        """Charge the holds whose lease expired by `now_ms` (their instance died mid-request),
        up to 100 a call (reclaim.lua). `counters` are the budget counters they charge; one that
        needs others is charged on a second run given those."""
        found = Reclaimed()
        for _ in range(2):
            keys: list[str | bytes] = [*self.keys.fixed("reclaim"), *self.keys.budgets(counters)]
            args = [now_ms, *(spec(*c) for c in counters)]
            run = functools.partial(self.lua_reclaim, keys=keys, args=args)
            count, micros, quarantined, missing = await self._call(run)
            found = Reclaimed(
                found.count + int(count),
                found.micros + int(micros),
                found.quarantined + tuple(as_text(v) for v in quarantined),
            )
            if not missing:
                break
            counters = counters_named(missing)
        return found

    async def settle(
        self,
        hold_id: str,
        cost_micros: int | None,
        now_ms: int,
        started_ms: int = 0,
        counters: Sequence[tuple[str, int]] = (),
        send: Send | None = None,
    ) -> int | None:
        """Charge `cost_micros` (None: the whole hold; 0: release). Returns the charge, or None if
        the hold no longer exists (settled already, or reclaimed after its lease). `started_ms`
        is when the upstream answered (0: it did not), so the next snapshot knows it holds the
        charge. `counters` are the hold's budget counters, `(budget id, window start ms)`; a
        charge that needs counters not given is run again with them (one more round trip). An
        unreadable hold record is quarantined and raises `HoldQuarantined`. `send` runs the
        script (default: alone)."""
        send = send or self.run_ledger_script
        cost = -1 if cost_micros is None else cost_micros
        for _ in range(2):
            reply = await send("settle", *self.settle_call(hold_id, cost, now_ms, started_ms, counters))
            if not isinstance(reply, list):
                break
            counters = counters_named(reply)  # the counters it needs: nothing changed yet
        else:
            raise StoreScriptError(f"settle of hold {hold_id} still needs budget counters {counters}")
        return self.settled(hold_id, reply)

    def settle_call(
        self, hold_id: str, cost: int, now_ms: int, started_ms: int, counters: Sequence[tuple[str, int]]
    ) -> tuple[list[str | bytes], list[Any]]:
        """settle.lua's own keys (after its fixed ones) and ARGV: six fixed fields, then one spec
        per budget counter (its header)."""
        keys: list[str | bytes] = [self.keys.tomb(hold_id), *self.keys.budgets(counters)]
        args = [hold_id, cost, now_ms, started_ms, self.instance, self.settles_seen, *(spec(*c) for c in counters)]
        return keys, args

    def settled(self, hold_id: str, reply: int) -> int | None:
        """settle.lua's answer (other than the counters it needs): the charge, or None when the
        hold was gone. A hold it ended counts as one settle of this instance the store took."""
        if reply == SETTLE_QUARANTINED:
            raise HoldQuarantined(hold_id)
        charged = settle_of(reply)
        if charged is not None:
            self.settles_seen += 1
        return charged

    async def mark_started(self, started: Sequence[tuple[str, int]], send: Send | None = None) -> int:
        """Record when the upstream answered these holds' calls (see CONTAIN_MARGIN_MS)."""
        args: list[Any] = [CONTAIN_MARGIN_MS]
        for hold_id, started_ms in started:
            args += [hold_id, started_ms]
        return int(await (send or self.run_ledger_script)("mark_started", (), args))

    async def apply_snapshot(self, snapshot: Snapshot, now_ms: int | None = None) -> bool:
        """Store a snapshot unless a later-fetched one is stored (one stamped more than 5 s after
        `now_ms` is from a clock that ran ahead, and is replaced); drop the charges and in-flight
        holds it already contains."""
        now = snapshot.fetched_ms if now_ms is None else now_ms
        usage = "" if snapshot.usage_micros is None else snapshot.usage_micros
        args: list[Any] = [snapshot.fetched_ms, snapshot.remaining_micros, CONTAIN_MARGIN_MS, now, usage]
        args.append(CONTAIN_HORIZON_MS)
        for ref, row in snapshot.rows.items():
            args += [f"r:{ref}", row.encode()]
        for ref in snapshot.bad_rows:
            if not ref.startswith("#"):
                args += [f"r:{ref}", UNREADABLE_ROW]
        keys = self.keys.fixed("apply_snapshot")
        return bool(await self._call(lambda: self.lua_apply_snapshot(keys=keys, args=args)))

    async def read_snapshot(self) -> Snapshot | None:
        raw = await self._call(lambda: self.client.hgetall(self.key("snap")))
        if not raw:
            return None
        data = {as_text(k): as_text(v) for k, v in raw.items()}
        rows = {k[2:]: RowState.decode(v) for k, v in data.items() if k.startswith("r:") and v != UNREADABLE_ROW}
        bad = {k[2:]: "unreadable" for k, v in data.items() if k.startswith("r:") and v == UNREADABLE_ROW}
        usage = int(data["usage"]) if "usage" in data else None
        return Snapshot(int(data["fetched_ms"]), int(data["remaining"]), rows, bad, usage)

    async def snapshot_fetched_ms(self) -> int | None:
        raw = await self._call(lambda: self.client.hget(self.key("snap"), "fetched_ms"))
        return None if raw is None else int(raw)

    async def usage(self, fields: Sequence[str], budgets: Sequence[BudgetHold]) -> dict[str, ScopeUsage]:
        """Charged and held amounts for upstream scope fields (`acct`, `row:<ref>:<win>`) and budgets."""

        async def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for f in fields:
                pipe.hget(self.key("chsum"), f)
                pipe.hget(self.key("held"), f.rsplit(":", 1)[0] if f.startswith("row:") else f)
            for b in budgets:
                pipe.get(self.budget_key(b.id, b.window_start_ms))
                pipe.hget(self.key("held"), f"b:{b.id}")
            return list(await pipe.execute())

        values = [int(v or 0) for v in await self._call(read)]
        names = list(fields) + [f"b:{b.id}" for b in budgets]
        return {n: ScopeUsage(values[2 * i], values[2 * i + 1]) for i, n in enumerate(names)}

    async def levels(
        self, row_refs: Sequence[str], budgets: Sequence[BudgetHold], windows_ms: tuple[int, int, int]
    ) -> Levels:
        """Limit, spent and held of the account, of key rows and of budgets in their current
        windows, read in one round trip by the rules reserve.lua enforces (`levels.lua`)."""
        keys: list[str | bytes] = [
            *self.keys.fixed("levels"),
            *self.keys.budgets(counters_of(budgets)),
        ]
        args: list[Any] = [*windows_ms, len(row_refs), *row_refs, *(b.id for b in budgets)]
        reply = await self._call(lambda: self.lua_levels(keys=keys, args=args))
        fetched, remaining, acct_charged, acct_held, rows_in, budgets_in = reply
        fetched_ms = int(fetched)
        return Levels(
            None if fetched_ms < 0 else fetched_ms,
            int(remaining),
            ScopeUsage(int(acct_charged), int(acct_held)),
            {ref: row_level_of(row) for ref, row in zip(row_refs, rows_in, strict=True)},
            {b.id: budget_level_of(level) for b, level in zip(budgets, budgets_in, strict=True)},
        )

    async def alerts_sent(self, scopes: Sequence[tuple[str, int]]) -> dict[str, dict[str, int]]:
        """The alert marks claimed so far in each `(scope, window start ms)`: mark -> when (ms).
        A hash that belongs to another window says nothing about this one."""

        async def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for scope, _ in scopes:
                pipe.hgetall(self.keys.alert(scope))
            return list(await pipe.execute())

        found: dict[str, dict[str, int]] = {}
        for (scope, window_ms), raw in zip(scopes, await self._call(read), strict=True):
            marks = {as_text(k): as_text(v) for k, v in raw.items()}
            if marks.pop("win", None) != str(window_ms):
                continue
            sent = {name: int(at) for name, at in marks.items() if at.lstrip("-").isdigit()}
            if sent:
                found[scope] = sent
        return found

    async def alert_marks(self, scope: str, req: MarkRequest) -> Marks:
        """Claim (HSETNX) and release alert marks of `scope` in its window, exactly once across
        every instance; also samples its spend and claims "projected" (alert_marks.lua)."""
        keys = [self.keys.alert(scope), self.keys.alert_rate(scope)]
        args: list[Any] = [
            req.window_start_ms,
            req.expire_at_ms,
            req.now_ms,
            req.spent_micros,
            req.limit_micros,
            req.window_end_ms,
            *req.rate_span_ms,
            len(req.claim),
            *req.claim,  # the marks to claim, then (the rest of ARGV) the marks to release
            *req.release,
        ]
        claimed, released, recovered = await self._call(lambda: self.lua_alert_marks(keys=keys, args=args))
        return Marks(tuple(as_text(v) for v in claimed), tuple(as_text(v) for v in released), bool(recovered))

    async def learned(self, digest: str, window: Window, now_ms: int) -> Learned:
        """What the price signature `digest` has been charged within `window` (proxy/store/learned.py)."""
        fields = await self._call(lambda: self.client.hgetall(self.keys.learned(digest)))
        return learned_of(fields, window, now_ms)

    async def observe(
        self, digest: str, text: str, cost_micros: int, window: Window, now_ms: int, max_signatures: int
    ) -> Learned:
        """Record one call of signature `digest` charged `cost_micros` (observe.lua); returns what it
        has now been charged within the window (`full`: not recorded, the table is full)."""
        keys = [self.keys.learned(digest), self.keys.learned_index]
        args = observe_args(window, now_ms, cost_micros, max_signatures, digest, text)
        highest, count = await self._call(lambda: self.lua_observe(keys=keys, args=args))
        return Learned(0, 0, True) if int(highest) < 0 else Learned(int(highest), int(count))

    async def open_holds(self) -> int:
        return int(await self._call(lambda: self.client.hlen(self.key("holds"))))

    async def acquire_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        return bool(await self._call(lambda: self.client.set(self.key(name), owner, nx=True, px=ttl_ms)))

    async def release_lock(self, name: str, owner: str) -> None:
        # Only the owner may drop it early (after a failed fetch, so another instance can retry).
        async def drop() -> None:
            if (await self.client.get(self.key(name))) == owner.encode():
                await self.client.delete(self.key(name))

        await self._call(drop)

    async def save_prices(self, table: PriceTable) -> None:
        await self._call(lambda: self.client.set(self.key("prices"), table.to_json()))

    async def load_prices(self) -> PriceTable | None:
        raw = await self._call(lambda: self.client.get(self.key("prices")))
        return None if raw is None else PriceTable.from_json(raw)

    async def set_status(self, **values: str | int) -> None:
        """Refresher facts every instance can read (last good fetch time)."""
        await self._call(lambda: self.client.hset(self.key("status"), mapping=values))  # type: ignore[arg-type]


def _reserve_args(req: ReserveRequest, epoch: str, reclaim_first: bool) -> list[Any]:
    """reserve.lua's ARGV: thirteen fixed fields, then five per budget (its header names each)."""
    args: list[Any] = [
        req.now_ms,  # ARGV[1]
        req.hold_id,
        req.amount_micros,
        req.lease_expiry_ms,
        req.floor_micros,  # ARGV[5]
        req.max_staleness_ms,
        req.row_ref or "",
        *req.windows_ms,  # ARGV[8..10]
        1 if req.shadow else 0,
        epoch,  # ARGV[12]
        1 if reclaim_first else 0,
    ]
    for b in req.budgets:  # ARGV[14..]
        args += [b.id, b.limit_micros, 1 if b.shadow else 0, b.window_start_ms, b.window_end_ms]
    return args
