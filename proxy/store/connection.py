"""How every store operation reaches Redis: under one deadline, in one of a bounded number of
slots, and with the driver's errors turned into the proxy's own.

`Connection` is the base of `Store` (proxy/store/redis.py): each operation there hands its
round trip to `Connection._call`. Driver errors leave it as `StoreError`, so the guard decides
fail-open or fail-closed from one setting (`on_store_error`); a store that cannot take writes
for now (`refuses_writes`) is an outage like a lost connection; a script Redis ran and refused
is `StoreScriptError`; refused credentials are `StoreAuthError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import hiredis
import redis.asyncio as aioredis
import redis.exceptions

from proxy.deadlines import deadline
from proxy.errors import StoreAuthError, StoreError, StoreScriptError
from proxy.store.scripts import Script

T = TypeVar("T")

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


# Connections a `Lane` keeps open between operations. Batching keeps at most a few round trips in
# flight (one batch and two operations alone, proxy/store/batch.py); more than this are opened
# for a burst and closed after it.
LANE_IDLE = 4


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


class Connection:
    """One Redis client as the store uses it: each operation under STORE_TIMEOUT_S, at most
    MAX_CONCURRENT_OPS at once, its driver errors raised as `StoreError` and its subclasses."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._in_flight = 0  # operations holding one of the MAX_CONCURRENT_OPS slots
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._failing = False  # the last operation failed: don't queue behind a dead store
        self.lane = Lane.of(client)

    @property
    def failing(self) -> bool:
        """The last operation failed as an outage (not as a script fault)."""
        return self._failing

    async def run(self, script: Script, keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        """One run of `script`, as every store operation runs (deadline, slot, errors)."""
        return await self._call(functools.partial(script, keys=keys, args=args, lane=self.lane))

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
            if self.lane is not None:
                await self.lane.aclose()
        except Exception:  # noqa: BLE001 - closing a dead connection must not fail a shutdown
            pass
        try:
            await self.client.aclose()  # also when giving the lane's connections back failed
        except Exception:  # noqa: BLE001
            pass

    async def ping(self) -> None:
        await self._call(self.client.ping)


class Lane:
    """A few of the client's own connections (its address, credentials, database, TLS, limits),
    used without its command machinery: a command is packed by hiredis and sent on an idle
    connection of the lane, its reply read there. redis-py's `execute_command` takes the pool's
    lock twice, records metrics and type-checks every argument on the way: a reserve or settle
    alone cost the client 287-327 us of CPU through it against 240-254 us through a lane
    (bench/store_ops.py, one task, on a slow box).

    The lane takes its connections from the client's pool and keeps them as the pool's "in use"
    ones, so closing the client closes them. What the pool and `execute_command` do for each
    command, a lane does too: a connection is checked before it is used again (one the server
    closed meanwhile, or with bytes waiting, is reconnected: `ConnectionPool.ensure_connection`),
    its health checked after `health_check_interval`, the connection's own `retry` policy applied,
    and the connection dropped on any error but an error reply (a cancelled read leaves a reply on
    its way) and opened again at its next use. Replies are the driver's: the same parser and
    error classes (NOSCRIPT included)."""

    def __init__(self, pool: aioredis.ConnectionPool) -> None:
        self.pool = pool
        self._idle: list[Any] = []  # the lane's connections that no command is using

    @classmethod
    def of(cls, client: aioredis.Redis) -> Lane | None:
        """A lane for `client`, or None where it would not send as the client does: a cluster
        client (its commands go to each key's node), a client bound to one connection, or any
        client without a plain pool."""
        pool = getattr(client, "connection_pool", None)
        if type(client) is not aioredis.Redis or not isinstance(pool, aioredis.ConnectionPool):
            return None
        if client.single_connection_client:
            return None
        return cls(pool)

    async def execute(self, *command: Any) -> Any:
        """Send `command` (str, int, float or bytes items) and answer its reply."""
        packed = hiredis.pack_command(command)
        conn = self._idle.pop() if self._idle else await self.pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            reply = await conn.retry.call_with_retry(
                lambda: self._roundtrip(conn, packed), lambda _error: conn.disconnect()
            )
        except redis.exceptions.ResponseError:
            await self._keep(conn)  # the server answered: the connection is in step
            raise
        except BaseException:
            await conn.disconnect(nowait=True)  # opened again at its next use
            await self._keep(conn)
            raise
        await self._keep(conn)
        return reply

    async def _roundtrip(self, conn: Any, packed: bytes) -> Any:
        await self.pool.ensure_connection(conn)
        await conn.send_packed_command(packed)
        return await conn.read_response()

    async def _keep(self, conn: Any) -> None:
        if len(self._idle) < LANE_IDLE:
            self._idle.append(conn)
        else:
            await self.pool.release(conn)  # past a burst: back to the client's own commands

    async def aclose(self) -> None:
        """Give the lane's connections back to the client's pool (closing the client closes them)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await self.pool.release(conn)
