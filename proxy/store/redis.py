"""The only module that talks to Redis: the store's operations, each one round trip (mostly a
Lua script: proxy/store/scripts.py sends them and reads their replies).

Key names come from proxy/store/keyspace.py (one builder; every script receives each key it
touches in KEYS). Amounts are integer micro-dollars. Driver errors leave this module as
`StoreError`, so the guard decides fail-open or fail-closed from one setting (`on_store_error`);
a script Redis ran and refused is `StoreScriptError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import hmac
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from proxy.deadlines import deadline
from proxy.errors import HoldQuarantined, StoreAuthError, StoreError, StoreScriptError
from proxy.prices import PriceTable
from proxy.store.keyspace import ACCOUNTS, Keys, spec
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
    Script,
    as_text,
    budget_level_of,
    counters_named,
    decision_of,
    ledger_script,
    lone_script,
    row_level_of,
    settle_of,
)

T = TypeVar("T")
# How a ledger operation's script reaches the store: its name, the keys it receives after its
# fixed ones, its ARGV; answers the script's reply. `Store.run_ledger_script` sends it alone;
# proxy/store/batch.py sends it with others.
Send = Callable[[str, Sequence[str | bytes], Sequence[Any]], Awaitable[Any]]
LOCK_REFRESH = "lock:refresh"
# What the snapshot keeps for a key row it could not read (reserve.lua refuses `row_unreadable`).
UNREADABLE_ROW = "!"
LOCK_MODELS = "lock:models"
# The reasons the lost marker records (LOST_* in lua/_common.lua spell them the same). A store found
# without an epoch that nothing showed to be new is LOST_UNKNOWN (`spend-guard store init` lifts
# it; any other loss needs `store recover`).
LOST_EMPTIED = "the store's state was emptied"
LOST_CHANGED = "the store's epoch changed"
LOST_UNKNOWN = "the store has no epoch and nothing shows it is new"
LOST_ROLLED_BACK = "the store went back to an earlier copy of itself, without charges it had taken"
LOST_VANISHED = "a budget counter vanished during its window (evicted?)"


# Every store operation, connection included, answers within this or fails as StoreError. One
# deadline per operation (proxy/deadlines.py), not redis-py's socket_timeout: that wraps each send in
# asyncio.wait_for, a task per command (~15 us of CPU each on the guarded path).
STORE_TIMEOUT_S = 2.0
# Store operations in flight at once per process; more wait their turn. Each takes ~20-100 us
# of Redis time, so 64 connections keep a Redis busy while staying under redis-py's pool limits
# (its cluster client allows 100 connections per node and raises past them).
MAX_CONCURRENT_OPS = 64
# How long a burst may wait for a free slot; each operation then has STORE_TIMEOUT_S of its own.
QUEUE_TIMEOUT_S = 10.0
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


# Error replies of a store that cannot take writes for now: at `maxmemory` (OOM), failing to
# persist (MISCONF, a full disk), a replica (READONLY), loading its data (LOADING), running a long
# script (BUSY), without enough replicas (NOREPLICAS) or a cluster without its majority or a slot
# owner (CLUSTERDOWN, MASTERDOWN, TRYAGAIN). Redis refuses a script at its first write, so
# nothing of it ran: each is an outage, retried like a lost connection (docs/failure-modes.md).
WRITE_REFUSALS = frozenset(
    {"OOM", "MISCONF", "READONLY", "LOADING", "BUSY", "NOREPLICAS", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN"}
)
# A script's error reply quotes the refused command's reply: "... -OOM command not allowed ..."
# (Redis 6 wraps it as "Error running script ...: -OOM ..."; Redis 7 and Valkey pass it through).
_QUOTED_REFUSAL = re.compile(r"(?:^|: -)(" + "|".join(sorted(WRITE_REFUSALS)) + r")\b")
# redis-py's own classes for some of them (ClusterDownError covers MasterDownError).
_REFUSAL_CLASSES = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


def refuses_writes(exc: redis.exceptions.ResponseError) -> bool:
    """Whether an error reply means the store cannot take writes for now, not that the
    operation itself is at fault."""
    if isinstance(exc, _REFUSAL_CLASSES):
        return True
    code = getattr(exc, "status_code", None)
    return code in WRITE_REFUSALS or _QUOTED_REFUSAL.search(str(exc)) is not None


class Store:
    """Reserve, settle and snapshot operations on one account's state."""

    def __init__(self, client: aioredis.Redis, account: str) -> None:
        self.client = client
        self.account = account
        self.keys = Keys(account)
        self.epoch = ""  # learned by adopt_epoch(); "" = not yet, and no amnesia check
        # The rollback check (check_sequence in lua/_common.lua): this instance's id, and how many
        # of its settles the store has answered as taken. The store counts them too; finding fewer
        # there means it went back to an earlier copy of itself.
        self.instance = os.urandom(8).hex()
        self.settles_seen = 0
        self._in_flight = 0  # operations holding one of the MAX_CONCURRENT_OPS slots
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._failing = False  # the last operation failed: don't queue behind a dead store
        self.lua_reserve = ledger_script(client, "reserve")
        self.lua_reclaim = ledger_script(client, "reclaim")
        self.lua_settle = ledger_script(client, "settle")
        self.lua_mark_started = ledger_script(client, "mark_started")
        self.lua_apply_snapshot = ledger_script(client, "apply_snapshot")
        self.lua_levels = ledger_script(client, "levels")
        self.lua_identity = ledger_script(client, "identity")
        self.lua_alert_marks = lone_script(client, "alert_marks")
        self.lua_observe = lone_script(client, "observe")
        self._ledger_scripts = {
            "reserve": self.lua_reserve,
            "settle": self.lua_settle,
            "mark_started": self.lua_mark_started,
        }

    async def adopt_epoch(self) -> str:
        """Learn the store's epoch, writing one if the store has none (a new store). Reserves
        then tell a store that lost its state (the epoch vanished or changed) from a new one."""
        epoch = os.urandom(8).hex()

        async def adopt() -> Any:
            await self.client.set(self.key("epoch"), epoch, nx=True)
            return await self.client.get(self.key("epoch"))

        self.epoch = as_text(await self._call(adopt) or epoch)
        return self.epoch

    async def check_identity(self, now_ms: int, *, new_is_safe: bool, not_new_why: str = LOST_UNKNOWN) -> str | None:
        """Is this still the store this instance counts in (identity.lua)? An epoch that vanished
        or changed since this instance learned it, none at all unless `new_is_safe` (nothing
        can have been counted anywhere yet; recorded as `not_new_why`), or fewer of this
        instance's settles than the store has answered as taken (it went back to an earlier
        copy) marks the local budget state lost. Learns the store's epoch and returns its lost
        marker (`"<why>|<ms>"`), or None."""
        safe = 1 if new_is_safe else 0
        args = [self.epoch, os.urandom(8).hex(), now_ms, safe, self.instance, self.settles_seen, not_new_why]
        epoch, lost = await self._call(lambda: self.lua_identity(keys=self.keys.fixed("identity"), args=args))
        self.epoch = as_text(epoch)
        return as_text(lost) if lost else None

    async def init(self) -> tuple[bool, str | None]:
        """Declare a store new (`spend-guard store init`): write an epoch if it has none, and lift a
        marker that says only that nothing showed it was new. Returns (whether an epoch was
        written, the lost marker left in place)."""
        epoch = os.urandom(8).hex()

        async def run() -> tuple[bool, str | None]:
            written = bool(await self.client.set(self.key("epoch"), epoch, nx=True))
            lost = await self.client.get(self.key("lost"))
            if lost is not None and as_text(lost).startswith(LOST_UNKNOWN + "|"):
                await self.client.delete(self.key("lost"))
                lost = None
            return written, None if lost is None else as_text(lost)

        return await self._call(run)

    async def claim_account(self, account_key: str) -> str | None:
        """Record that this account name counts the ImageRouter account whose key is `account_key`
        in this store. The store keeps a fingerprint of the key (HMAC-SHA256 under a salt it
        keeps), never the key. Returns the name the account is already counted under when that
        is another (its budgets would be counted twice), else None."""

        async def run() -> str:
            await self.client.hsetnx(ACCOUNTS, "salt", os.urandom(16).hex())
            salt = as_text(await self.client.hget(ACCOUNTS, "salt") or "")
            field = "fp:" + hmac.new(salt.encode(), account_key.encode(), hashlib.sha256).hexdigest()
            await self.client.hsetnx(ACCOUNTS, field, self.account)
            return as_text(await self.client.hget(ACCOUNTS, field) or self.account)

        owner = await self._call(run)
        return None if owner == self.account else owner

    async def time_s(self) -> float:
        """The store's clock (Redis TIME), in seconds since the epoch."""
        seconds, micros = await self._call(self.client.time)
        return float(seconds) + float(micros) / 1e6

    async def eviction_policy(self) -> str | None:
        """The store's `maxmemory-policy` (every node's that is not `noeviction`, on a cluster), or
        None when the store does not say (CONFIG is disabled on some managed services)."""

        async def read() -> str | None:
            try:
                found = await self.client.config_get("maxmemory-policy")
            except redis.exceptions.ResponseError:
                return None  # CONFIG renamed or not permitted
            values = [found] if "maxmemory-policy" in found else list(found.values())  # a cluster: by node
            policies = {as_text(v["maxmemory-policy"] or "") for v in values if isinstance(v, dict) and v}
            evicting = sorted(policies - {"noeviction"})
            return ",".join(evicting) if evicting else ("noeviction" if policies else None)

        return await self._call(read)

    async def state_lost(self) -> str | None:
        """Why and when the store lost its local budget state (`"<why>|<ms>"`), or None."""
        raw = await self._call(lambda: self.client.get(self.key("lost")))
        return None if raw is None else as_text(raw)

    async def recover(self, counters: Sequence[tuple[BudgetHold, int]] = ()) -> None:
        """Lift the lost-state marker, first setting each budget's counter for its window."""

        async def write() -> None:
            pipe = self.client.pipeline(transaction=True)
            # What the recovery does not set starts from $0: a counter missing now is not a loss.
            pipe.delete(self.key("counted"))
            for budget, micros in counters:
                key = self.budget_key(budget.id, budget.window_start_ms)
                pipe.set(key, micros)
                pipe.hset(self.key("counted"), budget.id, budget.window_start_ms)
                if budget.window_end_ms:
                    pipe.pexpireat(key, budget.window_end_ms + 86_400_000)  # as settle_hold keeps it
            pipe.delete(self.key("lost"))
            await pipe.execute()

        await self._call(write)

    def key(self, name: str) -> str:
        return self.keys(name)

    async def adopt_counters(self, moves: Sequence[tuple[str, BudgetHold]]) -> int:
        """Copy each `(old counter id, budget)` counter of the budget's current window to the
        budget's own counter when only the old one exists (budgets were counted by name before
        they were counted by key fingerprint). Returns how many were copied."""

        async def run() -> int:
            olds = [self.budget_key(old, b.window_start_ms) for old, b in moves]
            news = [self.budget_key(b.id, b.window_start_ms) for _, b in moves]
            pipe = self.client.pipeline(transaction=False)
            for old_key, new_key in zip(olds, news, strict=True):
                pipe.get(old_key)
                pipe.exists(new_key)
            found = await pipe.execute()
            pipe = self.client.pipeline(transaction=False)
            copied = 0
            for i, (new_key, (_, budget)) in enumerate(zip(news, moves, strict=True)):
                value, exists = found[2 * i], found[2 * i + 1]
                if value is not None and not exists:
                    pipe.set(new_key, value, nx=True)
                    if budget.window_end_ms:
                        pipe.pexpireat(new_key, budget.window_end_ms + 86_400_000)
                    copied += 1
            if copied:
                await pipe.execute()
            return copied

        return await self._call(run) if moves else 0

    def budget_key(self, budget_id: str, window_start_ms: int) -> str:
        return self.keys.budget(budget_id, window_start_ms)

    @property
    def failing(self) -> bool:
        """The last operation failed as an outage (not as a script fault)."""
        return self._failing

    async def run(self, script: Script, keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        """One run of `script`, as every store operation runs (deadline, slot, errors)."""
        return await self._call(functools.partial(script, keys=keys, args=args))

    async def run_ledger_script(self, name: str, own_keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        """Run ledger script `name` alone: its fixed keys, then `own_keys`, and `args`."""
        return await self.run(self._ledger_scripts[name], [*self.keys.fixed(name), *own_keys], args)

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        await self._take_slot()
        try:
            async with deadline(STORE_TIMEOUT_S):
                result = await op()
            self._failing = False
            return result
        except asyncio.CancelledError:
            raise
        except redis.exceptions.ResponseError as exc:
            if refuses_writes(exc):
                # Full, read-only, loading, busy, without its replicas or its cluster: nothing
                # ran, and the same operation succeeds once that is over. An outage.
                self._failing = True
                raise StoreError(f"store unavailable: {type(exc).__name__}: {exc}") from exc
            # Redis ran the command and refused it: a script fault, not an outage. A script's
            # error names its file and line there (Script.locate_lines).
            raise StoreScriptError(f"store refused an operation: {exc}") from exc
        except redis.exceptions.AuthenticationError as exc:
            self._failing = True
            raise StoreAuthError(f"store refused the proxy's credentials: {exc}") from exc
        except Exception as exc:
            # Any driver failure, including the RuntimeError/AttributeError redis-py's cluster
            # client raises while a node flaps, is an unavailable store: 503, never 500.
            self._failing = True
            raise StoreError(f"store unavailable: {type(exc).__name__}: {exc}") from exc
        finally:
            self._release_slot()

    async def _take_slot(self) -> None:
        """Take one of the MAX_CONCURRENT_OPS slots: a burst queues here, first come first
        served, up to QUEUE_TIMEOUT_S, instead of asking the driver's pool for more connections
        than it allows (MaxConnectionsError). While the store is failing, nobody queues: they
        fail at once. (A counter, not asyncio.Semaphore: its `locked()` scans its waiters, which
        cost ~2 % of a guarded call's CPU here.)"""
        if self._in_flight < MAX_CONCURRENT_OPS and not self._waiting:
            self._in_flight += 1
            return
        if self._failing:
            raise StoreError("store unavailable: the last operation failed and every connection is busy")
        slot = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        try:
            async with deadline(QUEUE_TIMEOUT_S):
                await slot  # a finishing operation hands its slot over (_release_slot)
        except BaseException as exc:
            if slot.done() and not slot.cancelled():
                self._release_slot()  # handed over just as this waiter gave up: pass it on
            else:
                slot.cancel()
                with contextlib.suppress(ValueError):
                    self._waiting.remove(slot)
            if isinstance(exc, TimeoutError):
                raise StoreError(f"store busy: no connection free within {QUEUE_TIMEOUT_S:g} s") from exc
            raise

    def _release_slot(self) -> None:
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes to the longest waiter, still counted
                return
        self._in_flight -= 1

    async def aclose(self) -> None:
        """Close the connection(s); one already gone is not an error here."""
        try:
            await self.client.aclose()
        except Exception:  # noqa: BLE001 - closing a dead connection must not fail a shutdown
            pass

    async def ping(self) -> None:
        await self._call(self.client.ping)

    async def reserve(self, req: ReserveRequest, send: Send | None = None) -> Decision:
        """Hold `amount_micros` against account, key row and budgets in one round trip, or refuse.
        Expired leases are reclaimed first (two more round trips, only when some expired).
        `send` runs the script (default: alone, `run_ledger_script`)."""
        send = send or self.run_ledger_script
        counters = counters_of(req.budgets)
        keys: list[str | bytes] = [self.keys.tomb(req.hold_id), *self.keys.budgets(counters)]
        reply = await send("reserve", keys, _reserve_args(req, self.epoch, reclaim_first=True))
        reclaimed = Reclaimed()
        if reply[0] == RESERVE_RECLAIM_FIRST:
            _, expired_counters = reply
            reclaimed = await self.reclaim(req.now_ms, counters_named(expired_counters))
            reply = await send("reserve", keys, _reserve_args(req, self.epoch, reclaim_first=False))
        return decision_of(reply, reclaimed)

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
            keys: list[str | bytes] = [self.keys.tomb(hold_id), *self.keys.budgets(counters)]
            args = self.settle_args(hold_id, cost, now_ms, started_ms, counters)
            reply = await send("settle", keys, args)
            if not isinstance(reply, list):
                break
            counters = counters_named(reply)  # the counters it needs: nothing changed yet
        else:
            raise StoreScriptError(f"settle of hold {hold_id} still needs budget counters {counters}")
        return self.settled(hold_id, reply)

    def settle_args(
        self, hold_id: str, cost: int, now_ms: int, started_ms: int, counters: Sequence[tuple[str, int]]
    ) -> list[Any]:
        """settle.lua's ARGV: six fixed fields, then one spec per budget counter (its header)."""
        return [hold_id, cost, now_ms, started_ms, self.instance, self.settles_seen, *(spec(*c) for c in counters)]

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
