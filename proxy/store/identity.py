"""Which store an instance counts in, and whether that store still holds the local budget state.

The store's epoch (written once, by the first instance to find none) tells a store that lost its
state from a new one; each instance's count of its own settles the store has taken tells a store
that went back to an earlier copy of itself (`lua/identity.lua`). Either sets the lost marker,
whose reason is one of the LOST_* below, and calls that touch a local budget are refused until
an operator lifts it: `init` for a store nothing showed to be new, `recover` for any other loss
(docs/state.md). The account claim keeps one ImageRouter account from being counted under two
names in one store; the eviction policy says whether the store may forget budget counters.

`Identity` is the base of `Store` (proxy/store/redis.py), between it and `Connection`
(proxy/store/connection.py): it holds whose keys the store works on (the account's `Keys`), the
epoch and the rollback count the ledger scripts check, and the operations above.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from proxy.store.connection import Connection
from proxy.store.keyspace import ACCOUNTS, Keys
from proxy.store.records import BudgetHold
from proxy.store.scripts import as_text, ledger_script

# The reasons the lost marker records (LOST_* in lua/_common.lua spell them the same). A store found
# without an epoch that nothing showed to be new is LOST_UNKNOWN (`spend-guard store init` lifts
# it; any other loss needs `store recover`).
LOST_EMPTIED = "the store's state was emptied"
LOST_CHANGED = "the store's epoch changed"
LOST_UNKNOWN = "the store has no epoch and nothing shows it is new"
LOST_ROLLED_BACK = "the store went back to an earlier copy of itself, without charges it had taken"
LOST_VANISHED = "a budget counter vanished during its window (evicted?)"


class Identity(Connection):
    """One account's keys in one store, as one instance sees them: the store's epoch, this
    instance's settles the store took, and the operations that check and restore them."""

    def __init__(self, client: aioredis.Redis, account: str) -> None:
        super().__init__(client)
        self.account = account
        self.keys = Keys(account)
        self.epoch = ""  # learned by adopt_epoch(); "" = not yet, and no amnesia check
        # The rollback check (check_sequence in lua/_common.lua): this instance's id, and how many
        # of its settles the store has answered as taken. The store counts them too; finding fewer
        # there means it went back to an earlier copy of itself.
        self.instance = os.urandom(8).hex()
        self.settles_seen = 0
        self.lua_identity = ledger_script(client, "identity")

    def key(self, name: str) -> str:
        return self.keys(name)

    def budget_key(self, budget_id: str, window_start_ms: int) -> str:
        return self.keys.budget(budget_id, window_start_ms)

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
        epoch, lost = await self.run(self.lua_identity, self.keys.fixed("identity"), args)
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

    async def state_lost(self) -> str | None:
        """Why and when the store lost its local budget state (`"<why>|<ms>"`), or None."""
        raw = await self._call(lambda: self.client.get(self.key("lost")))
        return None if raw is None else as_text(raw)

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
