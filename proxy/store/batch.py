"""Micro-batched store round trips: a `Ledger` in front of a `Store` that sends the reserves,
settles and started marks issued while one is in flight as one EVALSHA.

A call that finds no batch in flight, nobody queued and fewer than `MAX_ALONE` calls in flight
alone goes at once, alone, with its own script: at low load nothing waits and nothing changes
(a call's reserve does not wait behind the settle of the call before it). Other calls queue;
when a round trip ends, the queue goes to the store together (up to `MAX_BATCH` a round trip)
as one run of the batch script (`batch_script`), which applies each operation in turn with its
own script's code, exactly as it runs alone: each reserve all or nothing, one refusal leaving
the others untouched. Each operation gets its own reply back, and the store's code that reads it
(`Store.reserve`, `Store.settle`, `Store.mark_started`) reads it as it reads a lone reply: a
reclaim-first reserve reclaims and asks again, a settle that needs budget counters runs again
with them. A round trip that fails fails every operation in it with the error a lone call would
get (the guard's release-and-tombstone path follows for each reserve, as for a lone one).

One batcher per `Store`, so one per account: every key of an account shares one hash slot, so
a batch is one script on one Redis Cluster node.

The batch script is built from the scripts' own files, never a copy of them: for each kind,
the key binding, `_common.lua` and the script's file are wrapped so that its body runs as a
function of one operation's KEYS and ARGV (see `batch_script`). A change to a script reaches
the batch with it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from proxy.errors import StoreError
from proxy.store.connection import QUEUE_TIMEOUT_S
from proxy.store.keyspace import BASE, SCRIPT_KEYS, Keys
from proxy.store.records import BudgetHold, Decision, Levels, ReserveRequest
from proxy.store.redis import Store
from proxy.store.scripts import Part, Script, lua_source

# Operations a round trip carries at most. 16 operations as one EVALSHA cost ~11 us of the
# client's CPU each, against ~114 us for one EVALSHA each; past a few dozen the gain is gone and
# the script holds Redis longer (each operation takes ~20-30 us of Redis time).
MAX_BATCH = 32
# Round trips of one operation each that may be in flight together while no batch is. Two let
# one call's reserve go while the call before it settles (a lone call's settle ends after its
# answer went out: with one, the next call's reserve waited for it); under load a batch is in
# flight and every operation queues for the next, as with one.
MAX_ALONE = 2

# The scripts a batch carries, and the code each has in the batch's ARGV.
BATCHED = ("reserve", "settle", "mark_started")

_HEAD = """\
-- batch: several ledger operations of one account in one run, each in turn exactly as its own
-- script runs it alone (built by proxy/store/batch.py from the scripts' own files).
-- KEYS: the account's fixed keys (keyspace.BASE, in that order), then each operation's own keys
--   (those its script receives after its fixed ones), operation after operation
-- ARGV[1]: the operations, as JSON: [[script name, how many own keys, [its ARGV, as strings]], ...]
--   (one argument for the batch, not one per operation's argument: redis-py packs each argument
--   it sends with several type checks, which cost the client more than the whole batch's JSON)
-- Returns one reply per operation, in order: what its script returns alone.
-- Every operation shares the run's memo, ONCE (_common.lua says what it holds). A kind's code is
-- set up (its key binding and _common.lua run) at its first operation of the batch, not before.
local ONCE = {}
local OPS, SETUP = {}, {}
local function fixed_keys(indexes)
  local keys = {}
  for i, at in ipairs(indexes) do keys[i] = KEYS[at] end
  return keys
end
"""

# Each script's code, run as a function of one operation: its fixed keys bound once (the key
# binding and _common.lua see `KEYS` and `ARGV` as upvalues), then its own file's body as the
# inner function, which points those upvalues at the operation's keys and arguments. SETUP[name]
# does the binding once and answers that function.
_OPEN = """\
SETUP["{name}"] = function() return (function(KEYS)
local ARGV
"""
_BODY = """\
return function(op_keys, op_args)
KEYS, ARGV = op_keys, op_args
"""
_CLOSE = """\
end
end)(fixed_keys({{{indexes}}})) end
"""

_TAIL = """\
local replies = {}
local at_key = N_FIXED + 1
for _, op in ipairs(cjson.decode(ARGV[1])) do
  local name, n_keys, args = op[1], op[2], op[3]
  local indexes = INDEXES[name]
  local keys = {}
  for i, at in ipairs(indexes) do keys[i] = KEYS[at] end
  for i = 0, n_keys - 1 do keys[#indexes + 1 + i] = KEYS[at_key + i] end
  local run = OPS[name]
  if run == nil then
    run = SETUP[name]()
    OPS[name] = run
  end
  local reply = run(keys, args)
  if reply == nil then reply = false end
  replies[#replies + 1] = reply
  at_key = at_key + n_keys
end
return replies
"""


def _indexes(name: str) -> str:
    """The positions (from 1) in `BASE` of the fixed keys script `name` receives, as Lua list items."""
    return ", ".join(str(BASE.index(key) + 1) for key in SCRIPT_KEYS[name])


def batch_script(client: aioredis.Redis) -> Script:
    """The batch script: the head, then for each of `BATCHED` its key binding, `_common.lua` and
    its own file wrapped as a function of one operation, then the loop over the operations. An
    error names the part and line it comes from, as in a lone script (`reserve.lua:88`)."""
    parts = [Part("batch head", _HEAD)]
    for name in BATCHED:
        parts += [
            Part("batch wrapper", _OPEN.format(name=name)),
            Part("key binding", Keys.lua_binding(name)),
            Part("_common.lua", lua_source("_common.lua")),
            Part("batch wrapper", _BODY),
            Part(f"{name}.lua", _ended(lua_source(f"{name}.lua"))),
            Part("batch wrapper", _CLOSE.format(indexes=_indexes(name))),
        ]
    indexes = ", ".join(f"{name} = {{{_indexes(name)}}}" for name in BATCHED)
    parts.append(Part("batch loop", f"local N_FIXED = {len(BASE)}\nlocal INDEXES = {{{indexes}}}\n" + _TAIL))
    return Script(client, *parts)


def _ended(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


@dataclass(slots=True)
class _Op:
    """One queued operation: its script, the keys after its fixed ones, its arguments."""

    name: str
    keys: Sequence[str | bytes]
    args: Sequence[Any]
    future: asyncio.Future[Any]
    queued_s: float = field(default_factory=time.monotonic)


class BatchedLedger:
    """The store's `Ledger`, with reserves, settles and started marks batched (module doc)."""

    def __init__(self, store: Store, max_batch: int = MAX_BATCH, max_alone: int = MAX_ALONE) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_alone = max_alone
        self.script = batch_script(store.client)
        self._queue: collections.deque[_Op] = collections.deque()
        self._alone = 0  # round trips of one operation each in flight
        self._drainer: asyncio.Task[None] | None = None  # sends the queue, batch after batch
        # Round trips sent and operations they carried (tests and the bench read them).
        self.round_trips = 0
        self.operations = 0

    @property
    def queued(self) -> int:
        """Operations waiting for the next round trip."""
        return len(self._queue)

    async def reserve(self, req: ReserveRequest) -> Decision:
        return await self.store.reserve(req, send=self.send)

    async def settle(
        self,
        hold_id: str,
        cost_micros: int | None,
        now_ms: int,
        started_ms: int = 0,
        counters: Sequence[tuple[str, int]] = (),
    ) -> int | None:
        return await self.store.settle(hold_id, cost_micros, now_ms, started_ms, counters, send=self.send)

    async def mark_started(self, started: Sequence[tuple[str, int]]) -> int:
        return await self.store.mark_started(started, send=self.send)

    async def levels(
        self, row_refs: Sequence[str], budgets: Sequence[BudgetHold], windows_ms: tuple[int, int, int]
    ) -> Levels:
        return await self.store.levels(row_refs, budgets, windows_ms)

    async def aclose(self) -> None:
        """Let a batch in flight finish (each round trip is bounded by the store's deadline),
        then close the store."""
        if self._drainer is not None:
            await asyncio.wait([self._drainer])
        await self.store.aclose()

    async def send(self, name: str, keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        """Run script `name` with its own `keys` and `args` and answer its reply: at once and alone
        when no batch is in flight, nobody queued and fewer than `max_alone` go alone, else with
        the next batch."""
        if (self._alone or self._drainer is not None) and self.store.failing:
            # The last round trip failed and another is in flight: nobody queues behind (or goes
            # beside) a dead store, as the store's own connection slots refuse then.
            raise StoreError("store unavailable: the last operation failed and another is in flight")
        if self._drainer is None and not self._queue and self._alone < self.max_alone:
            self._alone += 1
            try:
                self.round_trips += 1
                self.operations += 1
                return await self.store.run_ledger_script(name, keys, args)
            finally:
                self._alone -= 1
                self._next()
        op = _Op(name, keys, args, asyncio.get_running_loop().create_future())
        self._queue.append(op)
        return await op.future

    def _next(self) -> None:
        """A lone round trip ended: send what queued meanwhile, unless a batch is on its way."""
        if self._queue and self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._queue:
                ops = self._take()
                if ops:
                    await self._send_batch(ops)
        finally:
            self._drainer = None
            while self._queue:  # only when the drain itself was cancelled (the loop is closing)
                op = self._queue.popleft()
                if not op.future.done():
                    op.future.set_exception(StoreError("store unavailable: the batch was cancelled"))

    def _take(self) -> list[_Op]:
        """Up to `max_batch` queued operations whose callers still wait; those that waited past
        QUEUE_TIMEOUT_S fail as a lone call fails when no connection frees up in time."""
        ops: list[_Op] = []
        now = time.monotonic()
        while self._queue and len(ops) < self.max_batch:
            op = self._queue.popleft()
            if op.future.done():
                continue  # its caller gave up (cancelled): it never goes
            if now - op.queued_s > QUEUE_TIMEOUT_S:
                op.future.set_exception(StoreError(f"store busy: not sent within {QUEUE_TIMEOUT_S:g} s"))
                continue
            ops.append(op)
        return ops

    async def _send_batch(self, ops: list[_Op]) -> None:
        self.round_trips += 1
        self.operations += len(ops)
        try:
            if len(ops) == 1:
                replies = [await self.store.run_ledger_script(ops[0].name, ops[0].keys, ops[0].args)]
            else:
                calls = [(op.name, op.keys, op.args) for op in ops]
                replies = await self.store.run(self.script, *batch_call(self.store.keys.base, calls))
                if len(replies) != len(ops):
                    raise StoreError(f"the batch script answered {len(replies)} replies for {len(ops)} operations")
        except BaseException as exc:
            for op in ops:
                if not op.future.done():
                    op.future.set_exception(_each(exc))
            if not isinstance(exc, Exception):
                raise
            return
        for op, reply in zip(ops, replies, strict=True):
            if not op.future.done():
                op.future.set_result(reply)


def batch_call(
    base_keys: Sequence[str | bytes], calls: Sequence[tuple[str, Sequence[str | bytes], Sequence[Any]]]
) -> tuple[list[str | bytes], list[Any]]:
    """The batch script's KEYS and ARGV for `calls`, each `(script name, its own keys, its ARGV)`
    (the script's header says how they are laid out); `base_keys`: the account's `Keys.base`.
    Each argument reaches its script as the string Redis would have made of it sent alone."""
    keys: list[str | bytes] = list(base_keys)
    ops: list[list[Any]] = []
    for name, own_keys, own_args in calls:
        keys += own_keys
        # Most arguments are str or int: converted inline, not by a call each (~10 a reserve).
        args = [arg if type(arg) is str else str(arg) if type(arg) is int else _as_arg(arg) for arg in own_args]
        ops.append([name, len(own_keys), args])
    return keys, [_JSON.encode(ops)]


# The batch's JSON text, compact: one encoder for every batch (json.dumps with an argument builds
# one each call).
_JSON = json.JSONEncoder(separators=(",", ":"))


def _as_arg(value: Any) -> str:
    """`value` as the text redis-py sends for it: a str as is, an int or float as its repr, bytes as
    UTF-8 text (a ledger script's arguments are text)."""
    if type(value) is int or type(value) is str:
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, bytes)):
        raise TypeError(f"a ledger script's argument must be str, int, float or bytes, not {type(value).__name__}")
    return value.decode() if isinstance(value, bytes) else repr(value)


def _each(exc: BaseException) -> BaseException:
    """A copy of `exc` for each operation of a failed batch: each caller raises its own (with the
    same cause, which the guard reports), not one object whose traceback they all extend. A
    cancelled round trip fails its operations as an unavailable store."""
    if not isinstance(exc, StoreError):
        err = StoreError(f"store unavailable: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err
    copy = type(exc)(*exc.args)
    copy.__cause__ = exc.__cause__
    return copy
