"""A store that went back to an earlier copy of itself (a failover to a replica that missed the last
writes, a restore from an older file) with its epoch intact lost the charges it had taken since:
each instance counts the settles the store took from it, and finding fewer there is a loss, noticed
by its next settle or refresh round. Fake, real and embedded Redis; a private redis-server restored
from an earlier dump under a served proxy. See docs/state.md."""

from __future__ import annotations

import httpx
import pytest
import redis

from proxy.commands.recover import Plan, recover
from proxy.store.identity import LOST_ROLLED_BACK
from proxy.store.redis import Store
from tests.store.test_store import NOW_MS, budget, req, snap
from tests.support.constants import KEY_A
from tests.support.served import RedisServer, ServedProxy, alice_policy, spent, wait_until

DAY = budget("key:alice:day", 10**14)
COUNTERS = [(DAY.id, DAY.window_start_ms)]


async def charge(store: Store, hold_id: str, cost: int, now_ms: int = NOW_MS) -> int | None:
    """Hold 1 µ$ and settle `cost` (a cost above the hold is charged in full)."""
    assert (await store.reserve(req(hold_id, 1, now_ms, budgets=(DAY,)))).allowed
    return await store.settle(hold_id, cost, now_ms, 0, COUNTERS)


async def copy_of(store: Store) -> dict[bytes, tuple[bytes, int]]:
    """Every key of the store as DUMP gives it, with its time to live (ms; 0: none)."""
    found = {}
    for key in await store.client.keys("*"):
        found[key] = (await store.client.dump(key), max(0, await store.client.pttl(key)))
    return found


async def restore(store: Store, copy: dict[bytes, tuple[bytes, int]]) -> None:
    """The store as it was when `copy` was taken: what a lagging replica has after a failover."""
    await store.client.flushdb()
    for key, (value, ttl_ms) in copy.items():
        await store.client.restore(key, ttl_ms, value)


async def counted(store: Store) -> int:
    return (await store.usage([], [DAY]))[f"b:{DAY.id}"].charged_micros


@pytest.fixture
async def stores(store_target):
    """Two instances on one store, each with its own connection (and its own settle count)."""
    one, two = Store(store_target.client(), "acct"), Store(store_target.client(), "acct")
    await one.apply_snapshot(snap(remaining=10**14))
    for s in (one, two):
        assert await s.check_identity(NOW_MS, new_is_safe=True) is None
    yield one, two
    await one.aclose()
    await two.aclose()


async def test_a_store_back_at_an_earlier_copy_is_lost_state_at_the_next_round(stores):
    one, two = stores
    assert await charge(one, "h1", 100_000) == 100_000
    earlier = await copy_of(one)
    assert await charge(one, "h2", 200_000) == 200_000
    assert await charge(one, "h3", 1) == 1
    await restore(one, earlier)  # the epoch is intact; the last two charges are gone
    assert await counted(one) == 100_000
    lost = await one.check_identity(NOW_MS + 1000, new_is_safe=False)
    assert lost == f"{LOST_ROLLED_BACK}|{NOW_MS + 1000}"
    # every instance sees the marker; budgeted calls are refused, as with any other loss
    assert await two.check_identity(NOW_MS + 2000, new_is_safe=False) == lost
    refused = await two.reserve(req("h4", 1, budgets=(DAY,)))
    assert refused.refusal is not None and refused.refusal.code == "state_lost"
    # a recovery ends it; the rollback, recorded once, is not found again
    await recover(one, Plan([]))
    assert await one.check_identity(NOW_MS + 3000, new_is_safe=False) is None
    assert await charge(one, "h5", 10**12) == 10**12
    assert await one.check_identity(NOW_MS + 4000, new_is_safe=False) is None


async def test_other_instances_settles_after_the_rollback_do_not_hide_it(stores):
    one, two = stores
    earlier = await copy_of(one)
    assert await charge(one, "h1", 300_000) == 300_000
    await restore(one, earlier)
    # the other instance keeps settling on the restored store: more settles than were lost
    for i in range(3):
        assert await charge(two, f"t{i}", 0) == 0
    assert await two.check_identity(NOW_MS + 1000, new_is_safe=False) is None  # it lost nothing of its own
    # the first instance's next settle finds its own count short
    assert await charge(one, "h2", 0) == 0
    assert (await one.state_lost() or "").startswith(LOST_ROLLED_BACK + "|")


@pytest.mark.parametrize("cost", [0, 1, 10**12])
async def test_instances_settling_side_by_side_lose_nothing(stores, cost):
    one, two = stores
    for i in range(4):
        for s in (one, two):
            assert await charge(s, f"{s.instance}-{i}", cost) == cost
            assert await s.check_identity(NOW_MS + i, new_is_safe=False) is None
    assert one.settles_seen == two.settles_seen == 4
    assert await one.state_lost() is None


async def test_a_settle_whose_hold_was_gone_counts_nothing(stores):
    one, _ = stores
    assert await one.settle("never-reserved", 100, NOW_MS) is None
    assert one.settles_seen == 0
    assert await one.check_identity(NOW_MS, new_is_safe=False) is None


AUTH = {"Authorization": f"Bearer {KEY_A}"}


def generate(proxy: ServedProxy, cost: str) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/openai/images/generations",
        json={"model": "openai/gpt-image-1"},
        headers={**AUTH, "X-Standin": f"cost={cost}"},
        timeout=30,
    )


def lost_for(proxy: ServedProxy, why: str) -> bool:
    ready = httpx.get(proxy.url + "/-/readyz", timeout=5)
    problems = ready.json().get("problems", []) if ready.status_code == 503 else []
    if not any(f"local budget state was lost ({why})" in problem for problem in problems):
        return False
    return "spend_guard_store_state_lost 1.0" in httpx.get(proxy.url + "/-/metrics", timeout=5).text


@pytest.mark.real
@pytest.mark.system
def test_a_failover_to_a_copy_that_missed_the_last_charges_is_detected_as_lost_state(tmp_path, up):
    policy = alice_policy(tmp_path, account="rolled", budget_usd="1", refresh_s=1)
    with RedisServer() as server, ServedProxy(policy, up.url, server.url) as proxy:
        assert generate(proxy, "0.1").status_code == 200
        wait_until(lambda: spent(proxy) == "0.1000", 5, "the charge to be settled")
        redis.Redis(port=server.port).save()  # what a replica that then fell behind holds (dump.rdb)
        for _ in range(3):
            assert generate(proxy, "0.2").status_code == 200
        wait_until(lambda: spent(proxy) == "0.7000", 5, "the charges to be settled")  # of $1.00
        server.stop()  # the primary dies; its replacement starts from the earlier copy
        server.start()
        assert redis.Redis(port=server.port).get("sg:{rolled}:epoch") is not None  # the epoch survived
        wait_until(lambda: lost_for(proxy, LOST_ROLLED_BACK), 5, "the proxy to see the rollback")
        line = f"ERROR spend_guard.credits STORE LOST ITS BUDGET STATE ({LOST_ROLLED_BACK})"
        wait_until(lambda: proxy.output().count(line) == 1, 3, "one ERROR line")
        refused = generate(proxy, "0.2")  # $0.10 counted, so this would have fitted
        assert refused.status_code == 503 and "lost its local budget state" in refused.text
        assert len(up.generation_requests) == 4


def in_sync(primary: redis.Redis, replica: redis.Redis) -> bool:
    offset = primary.info("replication")["master_repl_offset"]
    info = replica.info("replication")
    return info.get("master_link_status") == "up" and info.get("slave_repl_offset", -1) >= offset


@pytest.mark.real
@pytest.mark.system
def test_the_primary_replaced_by_a_replica_that_stopped_replicating_is_detected(tmp_path, up):
    policy = alice_policy(tmp_path, account="replica", budget_usd="1", refresh_s=1)
    with RedisServer() as server, RedisServer() as spare, ServedProxy(policy, up.url, server.url) as proxy:
        primary, replica = redis.Redis(port=server.port), redis.Redis(port=spare.port)
        for node in (primary, replica):
            node.config_set("repl-diskless-sync-delay", 0)  # a full sync at once, not after 5 s
        replica.replicaof("127.0.0.1", server.port)
        assert generate(proxy, "0.1").status_code == 200
        wait_until(lambda: spent(proxy) == "0.1000", 5, "the charge to be settled")
        wait_until(lambda: in_sync(primary, replica), 10, "the replica to catch up")
        replica.replicaof("NO", "ONE")  # it falls behind: the next charges never reach it
        for _ in range(3):
            assert generate(proxy, "0.2").status_code == 200
        wait_until(lambda: spent(proxy) == "0.7000", 5, "the charges to be settled")
        # The failover: the proxy's store takes the replica's data (a full sync from it) and is
        # writable again, with the epoch intact and the last three charges gone.
        primary.replicaof("127.0.0.1", spare.port)
        wait_until(lambda: in_sync(replica, primary), 10, "the store to take the replica's data")
        primary.replicaof("NO", "ONE")
        wait_until(lambda: lost_for(proxy, LOST_ROLLED_BACK), 5, "the proxy to see the rollback")
        refused = generate(proxy, "0.2")
        assert refused.status_code == 503 and "lost its local budget state" in refused.text
        assert len(up.generation_requests) == 4
