"""Where a test's store lives: the in-process fakeredis, the real Redis or the embedded store's server."""

from __future__ import annotations

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis

from proxy.store.batch import batch_call, batch_script
from proxy.store.redis import Store
from tests.support.constants import REAL_REDIS_URL

# The three kinds of store, as `store_target` params. The embedded store's server is a process
# (valkey-server), so the tests on it are `system` tests too.
FAKE = pytest.param("fake", marks=pytest.mark.fake)
REAL = pytest.param("real", marks=pytest.mark.real)
EMBEDDED = pytest.param("embedded", marks=[pytest.mark.embedded, pytest.mark.system])


def assert_local(url: str) -> None:
    host = redis.Redis.from_url(url).connection_pool.connection_kwargs.get("host")
    assert host in ("127.0.0.1", "localhost", "::1"), f"tests only ever use a local Redis, not {host}"


class StoreTarget:
    """Where a test's store lives: a fresh FakeServer, the real Redis or the embedded store's server
    (both flushed)."""

    def __init__(self, kind: str, url: str | None = None) -> None:
        self.kind = kind
        self.server = fakeredis.FakeServer() if kind == "fake" else None
        self.url = url or (REAL_REDIS_URL if kind == "real" else None)

    def client(self) -> aioredis.Redis:
        if self.server is not None:
            return fakeredis.FakeAsyncRedis(server=self.server)
        assert self.url
        return aioredis.Redis.from_url(self.url, socket_timeout=2.0, socket_connect_timeout=1.0)

    def flush(self) -> None:
        if self.url:
            redis.Redis.from_url(self.url).flushdb()


class BatchScriptStore(Store):
    """A store that runs every reserve, settle and started mark as an operation of the batch
    script (proxy/store/batch.py) instead of with its own script, even alone: the store's tests
    run on both, so the batch applies each operation exactly as its own script does."""

    def __init__(self, client: aioredis.Redis, account: str) -> None:
        super().__init__(client, account)
        self.batch = batch_script(client)

    async def run_ledger_script(self, name, own_keys, args):
        (reply,) = await self.run(self.batch, *batch_call(self.keys.base, [(name, own_keys, args)]))
        return reply


async def raw(store: Store, *command: object) -> object:
    """A command sent to the store's server as is, to read or break what a test looks at."""
    return await store.client.execute_command(*command)  # type: ignore[no-untyped-call]
