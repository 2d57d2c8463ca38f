"""Store integrity at the edges (docs/state.md): $0 and huge amounts, unreadable hold records,
double counting of calls a snapshot already contains. Every Lua path here runs on real Redis
(and on the other store targets of the `store_target` fixture)."""

from __future__ import annotations

import pytest

from proxy.errors import HoldQuarantined
from proxy.money import MAX_ABS_MICROS
from proxy.store.redis import CONTAIN_MARGIN_MS
from tests.store.test_store import NOW_MS, REF, USD, budget, charged, held, req, row, snap
from tests.support.stores import raw

BIG = MAX_ABS_MICROS  # $1,000,000,000: the largest amount a scope may carry


# -- amounts: 0, 1 micro-dollar, large ----------------------------------------------------------


@pytest.mark.parametrize("amount", [0, 1, 10**14, 10**15 - 1])
async def test_a_hold_of_any_amount_settles_and_leaves_nothing_behind(store, amount):
    await store.apply_snapshot(snap(remaining=BIG, rows={REF: row(BIG, "day", 0, None)}))
    b = budget("k", BIG)
    assert (await store.reserve(req("h", amount, row=REF, budgets=(b,)))).allowed
    assert await store.settle("h", None, NOW_MS) == amount  # charged in full
    assert await charged(store, "acct") == amount
    assert await held(store, "acct") == 0
    assert await raw(store, "HGETALL", store.key("held")) == {}
    assert int(await raw(store, "GET", store.budget_key("k", b.window_start_ms)) or 0) == amount


@pytest.mark.parametrize("amount", [0, 1, 10**14])
async def test_an_expired_hold_of_any_amount_is_reclaimed_and_reserves_go_on(store, amount):
    await store.apply_snapshot(snap(remaining=BIG))
    assert (await store.reserve(req("zero", amount, lease_ms=1))).allowed
    later = NOW_MS + 10
    d = await store.reserve(req("next", USD, later))
    assert d.allowed
    assert (d.reclaimed.count, d.reclaimed.micros, d.reclaimed.quarantined) == (1, amount, ())
    assert await store.settle("next", USD, later) == USD
    assert await charged(store, "acct") == amount + USD


async def test_a_free_model_no_longer_poisons_the_store(store):
    """A $0 hold whose lease expired is reclaimed like any other: it never makes a later reserve fail."""
    await store.apply_snapshot(snap(remaining=10 * USD))
    assert (await store.reserve(req("paid", 50_000, lease_ms=4000))).allowed
    assert await store.settle("paid", 50_000, NOW_MS + 100) == 50_000
    assert (await store.reserve(req("free", 0, NOW_MS + 200, lease_ms=4000))).allowed
    after = NOW_MS + 5000
    for i in range(3):
        assert (await store.reserve(req(f"p{i}", 50_000, after))).allowed
    assert await charged(store, "acct") == 50_000


async def test_large_charges_keep_snapshot_applies_working(store):
    await store.apply_snapshot(snap(remaining=BIG))
    assert (await store.reserve(req("h", 10**14))).allowed
    assert await store.settle("h", 10**14, NOW_MS) == 10**14
    # The charge log entry is read back by apply_snapshot: "1e+14" used to break it.
    assert await store.apply_snapshot(snap(fetched_ms=NOW_MS + 1, remaining=BIG))
    assert await charged(store, "acct") == 0


# -- unreadable records are quarantined ---------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    ["1e+14|0||0|", "-0|0||0|", "garbage", "5|0||0|b@x", "5|notanumber||0|", "5|0||0|k@1@2|x|1"],
)
async def test_an_unreadable_expired_hold_is_quarantined_and_reserves_go_on(store, record):
    await store.apply_snapshot(snap(remaining=10 * USD))
    await raw(store, "HSET", store.key("holds"), "bad", record)
    await raw(store, "ZADD", store.key("leases"), NOW_MS - 1, "bad")
    d = await store.reserve(req("h1", USD))
    assert d.allowed and d.reclaimed.quarantined == ("bad",)
    assert await raw(store, "HGET", store.key("quarantine"), "bad") == record.encode()
    assert await raw(store, "HEXISTS", store.key("holds"), "bad") == 0
    assert await raw(store, "ZSCORE", store.key("leases"), "bad") is None
    assert (await store.reserve(req("h2", USD))).allowed  # nothing trips twice
    assert await store.settle("h1", USD, NOW_MS) == USD


async def test_settling_an_unreadable_hold_quarantines_it(store):
    await raw(store, "HSET", store.key("holds"), "bad", "x|y")
    with pytest.raises(HoldQuarantined):
        await store.settle("bad", 5, NOW_MS)
    assert await raw(store, "HEXISTS", store.key("quarantine"), "bad") == 1
    assert await store.settle("bad", 5, NOW_MS) is None  # gone: settled nothing twice


async def test_a_five_field_record_from_an_older_version_still_settles(store):
    await store.apply_snapshot(snap(remaining=10 * USD))
    await raw(store, "HSET", store.key("holds"), "old", f"300000|{NOW_MS + 1000}||0|")
    await raw(store, "HINCRBY", store.key("held"), "acct", 300_000)
    assert await store.settle("old", 100_000, NOW_MS) == 100_000
    assert await held(store, "acct") == 0
    assert await charged(store, "acct") == 100_000


# -- calls a snapshot already contains are not counted twice ------------------------------------


async def test_a_started_call_stops_counting_against_upstream_scopes_once_a_snapshot_holds_it(store):
    limit = USD
    await store.apply_snapshot(snap(rows={REF: row(limit, "day", 0, None)}))
    b = budget("k", 10 * USD)
    for i in range(3):
        assert (await store.reserve(req(f"h{i}", 300_000, row=REF, budgets=(b,)))).allowed
    assert not (await store.reserve(req("x", 200_000, row=REF))).allowed  # 0.9 held + 0.2 > 1
    started = NOW_MS + 10
    assert await store.mark_started([(f"h{i}", started) for i in range(3)]) == 3
    # The upstream pre-charged the three calls; a snapshot fetched after they started has them.
    fetched = started + CONTAIN_MARGIN_MS
    await store.apply_snapshot(snap(fetched_ms=fetched, rows={REF: row(limit, "day", 900_000, None)}))
    assert await held(store, "acct") == 0
    assert (await store.usage([], [b]))["b:k"].held_micros == 900_000  # local budgets keep holding
    d = await store.reserve(req("small", 10_000, fetched + 1, row=REF))
    assert d.allowed, d.refusal  # the phantom refusal: spent 0.90 + held 0.90 > 1.00
    assert not (await store.reserve(req("big", 100_001, fetched + 1, row=REF))).allowed  # 0.90+0.01+0.100001
    # Settling a contained call charges the local budget, not the upstream scopes again.
    assert await store.settle("h0", 250_000, fetched + 2, started) == 250_000
    assert await charged(store, "acct") == 0
    assert int(await raw(store, "GET", store.budget_key("k", b.window_start_ms))) == 250_000


async def test_a_call_started_after_the_fetch_began_still_counts(store):
    await store.apply_snapshot(snap(rows={REF: row(USD, "day", 0, None)}))
    assert (await store.reserve(req("h", 300_000, row=REF))).allowed
    fetched = NOW_MS + 1000
    await store.mark_started([("h", fetched - CONTAIN_MARGIN_MS + 1)])  # within the margin
    await store.apply_snapshot(snap(fetched_ms=fetched, rows={REF: row(USD, "day", 0, None)}))
    assert await held(store, "acct") == 300_000
    assert not (await store.reserve(req("x", 700_001, fetched + 1, row=REF))).allowed  # the key row holds it too


async def test_marking_after_the_snapshot_landed_contains_at_once(store):
    fetched = NOW_MS
    await store.apply_snapshot(snap(fetched_ms=fetched))
    assert (await store.reserve(req("h", 300_000, fetched + 1))).allowed
    await store.mark_started([("h", fetched - CONTAIN_MARGIN_MS - 1)])
    assert await held(store, "acct") == 0


async def test_a_settled_started_call_is_dropped_by_the_next_snapshot(store):
    await store.apply_snapshot(snap(fetched_ms=NOW_MS - 5000))
    assert (await store.reserve(req("h", 300_000))).allowed
    started = NOW_MS + 100
    assert await store.settle("h", 200_000, NOW_MS + 3000, started) == 200_000
    assert await charged(store, "acct") == 200_000
    # Fetched after the call started but before it settled here: it holds the charge already.
    await store.apply_snapshot(snap(fetched_ms=NOW_MS + 2000))
    assert await charged(store, "acct") == 0


async def test_a_reclaimed_contained_hold_charges_only_local_budgets(store):
    await store.apply_snapshot(snap(fetched_ms=NOW_MS - 5000))
    b = budget("k", 10 * USD)
    assert (await store.reserve(req("h", 300_000, lease_ms=1000, budgets=(b,)))).allowed
    await store.mark_started([("h", NOW_MS + 1)])
    await store.apply_snapshot(snap(fetched_ms=NOW_MS + 1000))
    d = await store.reserve(req("n", 1, NOW_MS + 2000))
    assert d.reclaimed.count == 1 and d.reclaimed.micros == 300_000
    assert await charged(store, "acct") == 0
    assert int(await raw(store, "GET", store.budget_key("k", b.window_start_ms))) == 300_000


async def test_a_future_stamped_snapshot_is_replaced(store):
    ahead = NOW_MS + 20 * 60_000  # written by an instance whose clock ran 20 min ahead
    assert await store.apply_snapshot(snap(fetched_ms=ahead, remaining=USD), now_ms=ahead)
    assert await store.apply_snapshot(snap(fetched_ms=NOW_MS, remaining=2 * USD), now_ms=NOW_MS + 100)
    assert (await store.read_snapshot()).remaining_micros == 2 * USD  # type: ignore[union-attr]
    # An ordinary later snapshot still wins over an earlier one.
    assert not await store.apply_snapshot(snap(fetched_ms=NOW_MS - 10, remaining=3 * USD), now_ms=NOW_MS + 200)


async def test_a_charge_settled_without_a_start_time_survives_a_snapshot_fetched_before_it(store):
    # A text call: billed when it ends, so a snapshot whose fetch began before the settle lacks it.
    await store.apply_snapshot(snap(fetched_ms=NOW_MS - 5000))
    assert (await store.reserve(req("t", 300_000))).allowed
    assert await store.settle("t", 20_000, NOW_MS + 3000, 0) == 20_000
    await store.apply_snapshot(snap(fetched_ms=NOW_MS + 2000))
    assert await charged(store, "acct") == 20_000


# -- levels: one read of every scope, by reserve.lua's rules ---------------------------------


async def test_levels_read_what_reserve_enforces_for_many_keys_in_one_round_trip(store):
    from tests.store.test_store import win, windows

    day = row(USD, "day", 400_000, win("day"))
    stale = row(USD, "day", 900_000, win("day") - 1)  # its period spend is from an earlier window
    await store.apply_snapshot(snap(rows={REF: day, "id:old": stale, "id:life": row(5 * USD, None, 2 * USD, None)}))
    b = budget("k", 3 * USD)
    assert (await store.reserve(req("h1", 250_000, row=REF, budgets=(b,)))).allowed
    assert await store.settle("h1", 100_000, NOW_MS) == 100_000
    assert (await store.reserve(req("h2", 200_000, row=REF, budgets=(b,)))).allowed
    calls = []
    original = store._call

    async def counting(op):
        calls.append(op)
        return await original(op)

    store._call = counting
    levels = await store.levels([REF, "id:old", "id:life", "id:none"], [b], windows(NOW_MS))
    assert len(calls) == 1
    assert levels.fetched_ms == NOW_MS - 1000
    assert (levels.account.charged_micros, levels.account.held_micros) == (100_000, 200_000)
    key = levels.rows[REF]
    assert (key.limit_micros, key.period, key.spent_micros, key.held_micros) == (USD, "day", 500_000, 200_000)
    assert levels.rows["id:old"].spent_micros == 0  # as reserve.lua counts it
    assert levels.rows["id:life"].period is None and levels.rows["id:life"].spent_micros == 2 * USD
    assert levels.rows["id:none"] is None
    assert (levels.budgets["k"].charged_micros, levels.budgets["k"].held_micros) == (100_000, 200_000)
    # The key row has 1.00 - 0.50 spent - 0.20 held = 0.30 left: reserve agrees to the micro-dollar.
    assert (await store.reserve(req("fits", 300_000, row=REF))).allowed
    assert not (await store.reserve(req("over", 1, row=REF))).allowed


async def test_levels_without_a_snapshot_and_with_an_unreadable_row(store):
    from tests.store.test_store import windows

    levels = await store.levels([REF], [], windows(NOW_MS))
    assert levels.fetched_ms is None and levels.rows[REF] is None
    await store.client.hset(store.key("snap"), mapping={"fetched_ms": NOW_MS, "remaining": USD, f"r:{REF}": "!"})
    assert (await store.levels([REF], [], windows(NOW_MS))).rows[REF] == "unreadable"
