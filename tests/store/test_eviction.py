"""A store that can evict the guard's keys (any `maxmemory-policy` but `noeviction`) would forget
budget counters silently when full: every instance says so within a refresh round (readyz 503, a
metric, one ERROR line) while the policy counts local budgets; and a budget counter found gone in a
window it was charged in is lost state, never a budget counted from $0 again. See
docs/failure-modes.md."""

from __future__ import annotations

import httpx
import pytest
import redis

from proxy.commands.recover import Plan, recover
from proxy.store.identity import LOST_VANISHED
from proxy.store.records import BudgetHold
from proxy.store.redis import Store
from tests.store.test_store import BOUNDARY_MS, NOW_MS, USD, budget, req, snap
from tests.support.policies import budget as budget_entry
from tests.support.policies import flow, key_entry, policy_yaml
from tests.support.served import RedisServer, ServedProxy, alice_policy, generate, wait_until

AGES = 10**12  # a snapshot this old still counts: the tests move between far-apart instants
PROBLEM = "store: its maxmemory-policy volatile-ttl can evict budget counters; set noeviction"


def problems(proxy: ServedProxy) -> list[str]:
    return list(httpx.get(proxy.url + "/-/readyz", timeout=5).json().get("problems", []))


@pytest.mark.real
@pytest.mark.system
def test_an_evicting_store_is_loudly_unready_until_set_to_noeviction(tmp_path, up):
    policy = alice_policy(tmp_path, account="evict", budget_usd="1", refresh_s=1)
    with RedisServer() as server, ServedProxy(policy, up.url, server.url) as proxy:
        admin = redis.Redis(port=server.port)  # a private server
        admin.config_set("maxmemory-policy", "volatile-ttl")  # as a Redis shared with a cache might run
        wait_until(lambda: PROBLEM in problems(proxy), 5, "readyz to name the eviction policy")
        assert "spend_guard_store_can_evict 1.0" in httpx.get(proxy.url + "/-/metrics", timeout=5).text
        admin.config_set("maxmemory-policy", "noeviction")
        wait_until(lambda: problems(proxy) == [], 5, "ready again")
        assert "spend_guard_store_can_evict 0.0" in httpx.get(proxy.url + "/-/metrics", timeout=5).text
        assert proxy.output().count("STORE CAN EVICT BUDGET COUNTERS: its maxmemory-policy is volatile-ttl") == 1


@pytest.mark.real
@pytest.mark.system
def test_a_counter_evicted_by_a_cache_filling_a_volatile_ttl_store_is_lost_state_not_a_reset(tmp_path, up):
    path = tmp_path / "policy.yaml"
    path.write_text(
        policy_yaml(
            account=flow(name="cache", refresh_s=1, max_staleness_s=300),
            keys=[key_entry(budgets=[budget_entry("1.00", "day")])],
        )
    )
    with RedisServer() as server, ServedProxy(path, up.url, server.url) as proxy:
        assert generate(proxy.url, "cost=0.6").status_code == 200  # $0.60 of alice's $1.00 today
        admin = redis.Redis(port=server.port)  # a private server
        wait_until(lambda: admin.keys("sg:{cache}:b:*"), 5, "the charge to be settled (after the answer)")
        (counter,) = admin.keys("sg:{cache}:b:*")
        # Shared with a cache: volatile-ttl, and the cache's entries outlive the budget counter
        # (which lives a day past its window), so a full store evicts the counter first.
        admin.config_set("maxmemory-policy", "volatile-ttl")
        admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 1_000_000)
        for batch in range(100):
            if not admin.exists(counter):
                break
            with admin.pipeline(transaction=False) as pipe:
                for i in range(200):
                    pipe.set(f"cache:{batch}:{i}", "x" * 1000, ex=30 * 86_400)
                pipe.execute()
        assert not admin.exists(counter)
        admin.config_set("maxmemory", 0)  # room again: reserves can write
        refused = generate(proxy.url, "cost=0.6")  # counted from $0, this would fit
        assert refused.status_code == 503 and "lost its local budget state" in refused.text
        problems = httpx.get(proxy.url + "/-/readyz", timeout=5).json()["problems"]
        assert f"store: local budget state was lost ({LOST_VANISHED}); run `spend-guard store recover`" in problems
        assert len(up.generation_requests) == 1


@pytest.fixture
async def store(store_target):
    client = store_target.client()
    s = Store(client, "acct")
    await s.apply_snapshot(snap())
    yield s
    await client.aclose()


async def spend(store: Store, b: BudgetHold, hold_id: str, cost: int, now_ms: int = NOW_MS) -> None:
    assert (await store.reserve(req(hold_id, 1, now_ms, staleness_ms=AGES, budgets=(b,)))).allowed
    assert await store.settle(hold_id, cost, now_ms, 0, [(b.id, b.window_start_ms)]) == cost


@pytest.mark.parametrize("period", ["day", None])
async def test_a_counter_gone_in_a_window_it_was_charged_in_is_lost_state(store, period):
    b = budget("key:alice", 10 * USD, period)
    await spend(store, b, "h1", 1)  # 1 µ$ is enough for the window to be known
    await store.client.delete(store.budget_key(b.id, b.window_start_ms))  # evicted
    refused = await store.reserve(req("h2", USD, budgets=(b,)))
    assert refused.refusal is not None and refused.refusal.code == "state_lost"
    assert await store.state_lost() == f"{LOST_VANISHED}|{NOW_MS}"
    assert (await store.reserve(req("h3", USD))).allowed  # a call touching no local budget goes on
    # accepting the loss counts the budget from $0 again, and no longer calls the counter vanished
    await recover(store, Plan([]))
    await spend(store, b, "h4", 10**12 // 10**3)
    assert (await store.usage([], [b]))[f"b:{b.id}"].charged_micros == 10**9


async def test_a_counter_never_charged_in_its_window_is_not_a_loss(store):
    day = budget("key:alice:day", 10 * USD)
    assert (await store.reserve(req("h1", USD, budgets=(day,)))).allowed  # never charged at all
    assert await store.settle("h1", 0, NOW_MS, 0, [(day.id, day.window_start_ms)]) == 0  # a release
    assert (await store.reserve(req("h2", USD, budgets=(day,)))).allowed
    # charged yesterday: today's counter has not been written yet
    yesterday_ms = BOUNDARY_MS - 1000
    yesterday = budget("key:bob:day", 10 * USD, "day", yesterday_ms)
    await spend(store, yesterday, "h3", 5 * USD, yesterday_ms)
    today = budget("key:bob:day", 10 * USD, "day", BOUNDARY_MS)
    assert (await store.reserve(req("h4", USD, BOUNDARY_MS, staleness_ms=AGES, budgets=(today,)))).allowed
    assert await store.state_lost() is None


async def test_a_counter_a_recovery_set_and_that_then_vanished_is_a_loss(store):
    day = budget("key:alice:day", 10 * USD)
    await recover(store, Plan([(day, 300_000)]), force=True)
    assert (await store.usage([], [day]))[f"b:{day.id}"].charged_micros == 300_000
    await store.client.delete(store.budget_key(day.id, day.window_start_ms))
    refused = await store.reserve(req("h1", USD, budgets=(day,)))
    assert refused.refusal is not None and refused.refusal.code == "state_lost"
