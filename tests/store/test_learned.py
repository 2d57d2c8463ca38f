"""The learned table of observed holds on every store: a signature's highest cost and count in its
window, the window sliding, an edge amount kept exactly, the table's bound, and one table shared
by every instance and kept across a restart of the proxy (docs/how-it-works.md#observed-holds)."""

from __future__ import annotations

import pytest

from proxy.store.learned import BUCKETS, Learned, Window
from proxy.store.redis import Store
from proxy.store.scripts import lua_source

ACCOUNT = "learned"
NOW_MS = 1_765_000_000_000
DAY = Window.of_days(1)
MAX_CALL_MICROS = 1_000_000 * 1_000_000


@pytest.fixture
async def store(store_target):
    client = store_target.client()
    yield Store(client, ACCOUNT)
    await client.aclose()


async def observe(store: Store, digest: str, cost: int, now_ms: int = NOW_MS, window: Window = DAY, cap=100):
    return await store.observe(digest, f"text of {digest}", cost, window, now_ms, cap)


@pytest.mark.parametrize("cost", [0, 1, 123_456, MAX_CALL_MICROS])
async def test_an_observed_cost_is_kept_exactly_and_counted(store, cost):
    assert await observe(store, "a", cost) == Learned(cost, 1)
    assert await store.learned("a", DAY, NOW_MS) == Learned(cost, 1)
    assert await store.learned("b", DAY, NOW_MS) == Learned(0, 0)


async def test_the_highest_cost_in_the_window_wins_and_every_call_counts(store):
    for cost in (40_000, 120_000, 80_000):
        await observe(store, "a", cost)
    assert await store.learned("a", DAY, NOW_MS) == Learned(120_000, 3)


async def test_a_cost_older_than_the_window_is_forgotten(store):
    await observe(store, "a", 900_000, now_ms=NOW_MS)
    # within the window the older, higher cost still counts
    assert await store.learned("a", DAY, NOW_MS + DAY.span_ms - DAY.bucket_ms) == Learned(900_000, 1)
    later = NOW_MS + DAY.span_ms + DAY.bucket_ms
    assert await store.learned("a", DAY, later) == Learned(0, 0)
    assert await observe(store, "a", 100_000, now_ms=later) == Learned(100_000, 1)


async def test_a_changed_window_starts_the_signature_afresh(store):
    await observe(store, "a", 900_000, window=DAY)
    week = Window.of_days(7)
    assert await store.learned("a", week, NOW_MS) == Learned(0, 0)
    assert await observe(store, "a", 100_000, window=week) == Learned(100_000, 1)


async def test_the_table_is_bounded_and_a_stale_signature_makes_room(store):
    assert (await observe(store, "a", 1, cap=2)).count == 1
    assert (await observe(store, "b", 1, cap=2)).count == 1
    assert (await observe(store, "c", 1, cap=2)).full
    assert await store.learned("c", DAY, NOW_MS) == Learned(0, 0)
    assert (await observe(store, "a", 2, cap=2)) == Learned(2, 2)  # a known signature is still learned
    later = NOW_MS + DAY.span_ms + 1
    assert (await observe(store, "c", 5, now_ms=later, cap=2)) == Learned(5, 1)


async def test_the_table_expires_with_its_window(store):
    await observe(store, "a", 1)
    ttl = await store.client.pttl(store.keys.learned("a"))
    assert DAY.span_ms < ttl <= DAY.span_ms + DAY.bucket_ms


async def test_two_instances_learn_one_table_and_a_new_one_reads_it(store_target):
    first, second = store_target.client(), store_target.client()
    try:
        a, b = Store(first, ACCOUNT), Store(second, ACCOUNT)
        await observe(a, "sig", 50_000)
        await observe(b, "sig", 70_000)
        assert await a.learned("sig", DAY, NOW_MS) == await b.learned("sig", DAY, NOW_MS) == Learned(70_000, 2)
    finally:
        await first.aclose()
        await second.aclose()
    restarted = store_target.client()
    try:
        assert await Store(restarted, ACCOUNT).learned("sig", DAY, NOW_MS) == Learned(70_000, 2)
    finally:
        await restarted.aclose()


def test_the_script_says_it_is_sent_alone_and_the_window_has_its_buckets():
    assert "nothing is prepended" in lua_source("observe.lua").split("\nlocal ", 1)[0]
    assert Window.of_days(8).bucket_ms == 86_400_000 and BUCKETS == 8
