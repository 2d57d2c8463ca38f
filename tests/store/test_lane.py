"""The store's lane (proxy/store/connection.py): its ledger scripts go to Redis on a few of the
client's own connections, without redis-py's command machinery, and still end as they would
through it: a connection the server closed is opened again, a cancelled operation leaves no
reply behind for the next one, a script's error reply keeps the connection, and closing the
client closes the lane's connections."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import fakeredis
import pytest
import redis.asyncio as aioredis

from proxy.errors import StoreScriptError
from proxy.store.connection import Lane
from proxy.store.redis import Store
from tests.store.test_store import NOW_MS, USD, req, snap
from tests.support.served import RedisServer
from tests.support.stores import EMBEDDED, REAL

# On real Redis each test starts a redis-server of its own (it kills connections and pauses it):
# a system test there too.
ON_SERVERS = pytest.mark.parametrize(
    "store_target", [pytest.param("real", marks=[*REAL.marks, pytest.mark.system]), EMBEDDED], indirect=True
)


@pytest.fixture
def server_url(store_target) -> Iterator[str]:
    """The server a test kills connections on and pauses: a private redis-server for real Redis
    (never the shared one), the embedded store's own server."""
    if store_target.kind == "real":
        with RedisServer() as server:
            yield server.url
    else:
        assert store_target.url
        yield store_target.url


def named_client(url: str) -> aioredis.Redis:
    """A client whose connections carry a name of their own (CLIENT SETNAME), so that a test finds,
    and kills, only those."""
    name = f"lane-{uuid.uuid4().hex}"
    return aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0, client_name=name)


@pytest.fixture
async def admin(server_url) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server_url, socket_timeout=2.0)
    yield client
    await client.client_unpause()
    await client.aclose()


@pytest.fixture
async def store(server_url):
    store = Store(named_client(server_url), "lane")
    await store.apply_snapshot(snap(remaining=100 * USD))
    yield store
    await store.aclose()


async def clients(store: Store, admin: aioredis.Redis) -> list[int]:
    """The ids of `store`'s connections open to the server."""
    name = store.client.connection_pool.connection_kwargs["client_name"]
    return [int(c["id"]) for c in await admin.client_list() if c["name"] == name]


def commands_sent(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The names of the commands `store` sends through its client's `execute_command` from now on."""
    sent: list[object] = []
    real = store.client.execute_command

    async def counted(*args, **options):
        sent.append(args[0])
        return await real(*args, **options)

    monkeypatch.setattr(store.client, "execute_command", counted)
    return sent


@ON_SERVERS
async def test_ledger_scripts_go_through_the_lane_not_the_clients_commands(store, monkeypatch):
    sent = commands_sent(store, monkeypatch)
    assert (await store.reserve(req("h1", USD))).allowed
    assert await store.settle("h1", USD, NOW_MS) == USD
    assert "EVALSHA" not in sent
    assert await store.open_holds() == 0


@ON_SERVERS
async def test_the_identity_check_goes_through_the_lane_too(store, monkeypatch):
    sent = commands_sent(store, monkeypatch)
    assert await store.check_identity(NOW_MS, new_is_safe=True) is None
    assert store.epoch
    assert "EVALSHA" not in sent and "EVAL" not in sent


@ON_SERVERS
async def test_closing_the_store_closes_its_client_even_when_the_lane_fails_to_give_back(server_url, admin):
    store = Store(named_client(server_url), "lane")
    await store.apply_snapshot(snap(remaining=100 * USD))
    await asyncio.gather(*(store.reserve(req(f"h{i}", USD)) for i in range(4)))
    assert await clients(store, admin)
    assert store.lane is not None

    async def broken() -> None:
        raise ConnectionError("the pool is gone")

    store.lane.aclose = broken  # type: ignore[method-assign]
    await store.aclose()
    assert await clients(store, admin) == []


@ON_SERVERS
async def test_a_connection_the_server_closed_is_opened_again_for_the_next_operation(store, admin):
    assert (await store.reserve(req("h1", USD))).allowed
    ours = await clients(store, admin)
    assert ours
    for client_id in ours:
        await admin.client_kill_filter(_id=client_id)
    assert await store.settle("h1", USD, NOW_MS) == USD
    assert (await store.reserve(req("h2", 2 * USD))).allowed
    assert not set(await clients(store, admin)) & set(ours)
    assert await store.open_holds() == 1


@ON_SERVERS
async def test_a_cancelled_operation_leaves_no_reply_behind_for_the_next(store, admin):
    assert (await store.reserve(req("warm", 0))).allowed  # the lane's connection is open
    ours = set(await clients(store, admin))
    await admin.client_pause(10_000, all=False)  # writes wait: the next reserve is held unrun
    pending = asyncio.create_task(store.reserve(req("h1", USD)))
    while not any("b" in c["flags"] for c in await admin.client_list() if int(c["id"]) in ours):
        await asyncio.sleep(0.01)  # polls the server until the reserve waits there (blocked)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await admin.client_unpause()
    # The cancelled reserve may still run, but its reply must not answer the next operation.
    d = await store.reserve(req("h2", 200 * USD))
    assert not d.allowed and d.refusal is not None and d.refusal.code == "credits"
    assert await store.settle("h2", 0, NOW_MS) is None  # refused: nothing was held


@ON_SERVERS
async def test_a_scripts_error_reply_keeps_the_connection(store, admin):
    assert (await store.reserve(req("h1", USD))).allowed
    ours = await clients(store, admin)
    with pytest.raises(StoreScriptError):
        await store.run_ledger_script("settle", [store.key("hold:h1")], ["not a number"])
    assert (await store.reserve(req("h2", USD))).allowed
    assert await clients(store, admin) == ours


@ON_SERVERS
async def test_closing_the_client_closes_the_lanes_connections(server_url, admin):
    client = named_client(server_url)
    store = Store(client, "lane")
    await store.apply_snapshot(snap(remaining=100 * USD))
    await asyncio.gather(*(store.reserve(req(f"h{i}", USD)) for i in range(8)))
    assert len(await clients(store, admin)) >= 2
    await client.aclose()  # as a test or a shutdown closes a client several stores share
    assert await clients(store, admin) == []


def test_a_cluster_fake_or_single_connection_client_has_no_lane():
    assert Lane.of(fakeredis.FakeAsyncRedis()) is None
    assert Lane.of(aioredis.RedisCluster(host="127.0.0.1", port=1)) is None  # does not connect yet
    assert Lane.of(aioredis.Redis(single_connection_client=True)) is None
    assert Lane.of(aioredis.Redis()) is not None
