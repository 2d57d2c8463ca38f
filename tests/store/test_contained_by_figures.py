"""A snapshot contains a charge, or a pre-charged call in flight, only once its figures have risen
by it since the call was admitted (docs/state.md, "The credits refresher"): the account's
`credit_usage` and the key row's period spend. What the store keeps for that stays bounded when
the figures never rise. Every store target: fake, real Redis, the embedded server."""

from __future__ import annotations

import pytest

from proxy.money import MAX_ABS_MICROS
from proxy.store.records import Snapshot
from proxy.store.redis import CONTAIN_HORIZON_MS, CONTAIN_MARGIN_MS, Store
from tests.store.test_store import NOW_MS, REF, USD, charged, held, req, row, snap, windows
from tests.support.stores import raw

BIG = MAX_ABS_MICROS
ROW_FIELD = f"row:{REF}:{windows(NOW_MS)[0]}"  # the key row's day, as a scope field


def figures(fetched_ms: int, usage: int | None, spend: int, start: int | None = None) -> Snapshot:
    """A snapshot whose account credit_usage is `usage` and whose key row (a daily one) has spent `spend`."""
    return Snapshot(fetched_ms, BIG, {REF: row(None, "day", spend, start)}, {}, usage)


async def kept(store: Store) -> dict[str, int]:
    """How many entries each per-call structure of the ledger holds."""
    return {
        "holds": int(await raw(store, "HLEN", store.key("holds"))),  # type: ignore[arg-type]
        "chlog": int(await raw(store, "ZCARD", store.key("chlog"))),  # type: ignore[arg-type]
        "chamt": int(await raw(store, "HLEN", store.key("chamt"))),  # type: ignore[arg-type]
        "base": int(await raw(store, "HLEN", store.key("base"))),  # type: ignore[arg-type]
        "pend": int(await raw(store, "HLEN", store.key("pend"))),  # type: ignore[arg-type]
        "wm": int(await raw(store, "HLEN", store.key("wm"))),  # type: ignore[arg-type]
        "started": int(await raw(store, "ZCARD", store.key("started"))),  # type: ignore[arg-type]
    }


@pytest.mark.parametrize("amount", [0, 1, 300_000, 10**14, 10**15 - 1])
async def test_a_call_in_flight_is_contained_only_once_the_figures_have_risen_by_it(store, amount):
    await store.apply_snapshot(figures(NOW_MS - 1000, 5 * USD, 2 * USD))
    assert (await store.reserve(req("h", amount, row=REF))).allowed
    started = NOW_MS + 10
    await store.mark_started([("h", started)])
    fetched = started + CONTAIN_MARGIN_MS + 1000
    # The endpoint lags: fetched long after the call started, its figures do not hold the call.
    await store.apply_snapshot(figures(fetched, 5 * USD, 2 * USD))
    assert await held(store, "acct") == amount
    assert await held(store, ROW_FIELD) == amount
    if amount > 0:
        # Risen by one micro-dollar less than the hold (the key row): not yet.
        await store.apply_snapshot(figures(fetched + 1, 5 * USD + amount, 2 * USD + amount - 1))
        assert await held(store, "acct") == amount
    await store.apply_snapshot(figures(fetched + 2, 5 * USD + amount, 2 * USD + amount))
    assert await held(store, "acct") == 0
    assert await held(store, ROW_FIELD) == 0
    # Settling the contained call charges nothing upstream again, and nothing is left behind.
    assert await store.settle("h", amount, fetched + 3, started) == amount
    assert await charged(store, "acct") == 0
    await store.apply_snapshot(figures(fetched + 4, 5 * USD + amount, 2 * USD + amount))
    assert await kept(store) == {"holds": 0, "chlog": 0, "chamt": 0, "base": 0, "pend": 0, "wm": 0, "started": 0}


@pytest.mark.parametrize("amount", [1, 300_000, 10**14, 10**15 - 1])
async def test_a_charge_leaves_only_once_the_figures_have_risen_by_it(store, amount):
    await store.apply_snapshot(figures(NOW_MS - 1000, 0, 0))
    assert (await store.reserve(req("h", amount, row=REF))).allowed
    assert await store.settle("h", amount, NOW_MS + 100, NOW_MS + 10) == amount
    fetched = NOW_MS + 2000
    await store.apply_snapshot(figures(fetched, 0, 0))
    assert await charged(store, "acct") == amount
    assert await charged(store, ROW_FIELD) == amount
    await store.apply_snapshot(figures(fetched + 1, amount, amount - 1))  # the key row lags
    assert await charged(store, "acct") == 0
    assert await charged(store, ROW_FIELD) == 1  # what the row's figure does not show yet
    await store.apply_snapshot(figures(fetched + 2, amount, amount))
    assert await charged(store, ROW_FIELD) == 0
    await store.apply_snapshot(figures(fetched + 3, amount, amount))
    assert await kept(store) == {"holds": 0, "chlog": 0, "chamt": 0, "base": 0, "pend": 0, "wm": 0, "started": 0}


async def test_one_rise_contains_one_call_however_many_snapshots_show_it(store):
    # Two $0.30 charges admitted against the same figures; the figures rise by $0.30 and then
    # stay there for two snapshots: one charge leaves, the other stays counted.
    await store.apply_snapshot(figures(NOW_MS - 1000, 0, 0))
    for hold_id in ("x", "y"):
        assert (await store.reserve(req(hold_id, 300_000, row=REF))).allowed
        assert await store.settle(hold_id, 300_000, NOW_MS + 100, NOW_MS + 10) == 300_000
    await store.apply_snapshot(figures(NOW_MS + 2000, 300_000, 300_000))
    assert await charged(store, "acct") == 300_000
    await store.apply_snapshot(figures(NOW_MS + 3000, 300_000, 300_000))
    assert await charged(store, "acct") == 300_000
    assert await charged(store, ROW_FIELD) == 300_000
    await store.apply_snapshot(figures(NOW_MS + 4000, 600_000, 600_000))
    assert await charged(store, "acct") == 0
    assert await charged(store, ROW_FIELD) == 0


async def test_a_rise_from_before_the_call_was_admitted_does_not_contain_it(store):
    await store.apply_snapshot(figures(NOW_MS - 1000, 0, 0))
    await store.apply_snapshot(figures(NOW_MS - 500, 300_000, 300_000))  # spent outside the guard
    assert (await store.reserve(req("h", 300_000, row=REF))).allowed
    assert await store.settle("h", 300_000, NOW_MS + 100, NOW_MS + 10) == 300_000
    await store.apply_snapshot(figures(NOW_MS + 2000, 300_000, 300_000))
    assert await charged(store, "acct") == 300_000
    assert await charged(store, ROW_FIELD) == 300_000


async def test_in_flight_calls_and_charges_share_one_rise(store):
    await store.apply_snapshot(figures(NOW_MS - 1000, 0, 0))
    assert (await store.reserve(req("done", 300_000, row=REF))).allowed
    assert await store.settle("done", 300_000, NOW_MS + 100, NOW_MS + 10) == 300_000
    assert (await store.reserve(req("running", 300_000, row=REF))).allowed
    await store.mark_started([("running", NOW_MS + 20)])
    await store.apply_snapshot(figures(NOW_MS + 2000, 300_000, 300_000))
    assert await charged(store, "acct") + await held(store, "acct") == 300_000
    # A snapshot already stored when the start is marked goes on from what it gave out.
    assert (await store.reserve(req("late", 300_000, NOW_MS + 2001, row=REF))).allowed
    await store.mark_started([("late", NOW_MS + 30)])
    assert await charged(store, "acct") + await held(store, "acct") == 600_000
    await store.apply_snapshot(figures(NOW_MS + 3000, 900_000, 900_000))
    assert await charged(store, "acct") + await held(store, "acct") == 0


async def test_a_charge_the_figures_never_show_leaves_after_the_horizon(store):
    # A charge ImageRouter never billed (or a credits endpoint that lags past the horizon): it is
    # counted until the horizon has passed, and then leaves by timing alone.
    await store.apply_snapshot(figures(NOW_MS - 1000, 0, 0))
    assert (await store.reserve(req("h", 300_000, row=REF))).allowed
    assert await store.settle("h", 300_000, NOW_MS + 100, NOW_MS + 10) == 300_000
    await store.apply_snapshot(figures(NOW_MS + 1000, 0, 0))
    await store.apply_snapshot(figures(NOW_MS + 1000 + CONTAIN_HORIZON_MS - 1, 0, 0))
    assert await charged(store, "acct") == 300_000
    assert await charged(store, ROW_FIELD) == 300_000
    await store.apply_snapshot(figures(NOW_MS + 1000 + CONTAIN_HORIZON_MS * 11 // 10, 0, 0))
    assert await charged(store, "acct") == 0
    assert await charged(store, ROW_FIELD) == 0
    assert await kept(store) == {"holds": 0, "chlog": 0, "chamt": 0, "base": 0, "pend": 0, "wm": 0, "started": 0}


async def test_without_credit_usage_the_account_keeps_the_timing_rule(store):
    await store.apply_snapshot(snap(fetched_ms=NOW_MS - 1000))
    assert (await store.reserve(req("h", 300_000))).allowed
    await store.mark_started([("h", NOW_MS + 10)])
    await store.apply_snapshot(snap(fetched_ms=NOW_MS + 2000))
    assert await held(store, "acct") == 0
    assert (await store.reserve(req("c", 300_000, NOW_MS + 2001))).allowed
    assert await store.settle("c", 300_000, NOW_MS + 2100) == 300_000
    await store.apply_snapshot(snap(fetched_ms=NOW_MS + 3000))
    assert await charged(store, "acct") == 0


async def test_a_contained_call_charged_less_than_its_hold_gives_the_refund_back(store):
    # ImageRouter pre-charges the hold's $0.50 and refunds $0.30 when the call costs $0.20: the
    # next call's $0.30 leaves once the figures show it, not only after $0.30 more.
    await store.apply_snapshot(figures(NOW_MS - 1000, 0, 0))
    assert (await store.reserve(req("a", 500_000, row=REF))).allowed
    assert (await store.reserve(req("keep", 1, row=REF))).allowed  # keeps the scopes busy throughout
    await store.mark_started([("a", NOW_MS + 10)])
    await store.apply_snapshot(figures(NOW_MS + 2000, 500_000, 500_000))
    assert await held(store, "acct") == 1
    assert await store.settle("a", 200_000, NOW_MS + 2100) == 200_000
    await store.apply_snapshot(figures(NOW_MS + 3000, 200_000, 200_000))
    assert (await store.reserve(req("b", 300_000, NOW_MS + 3100, row=REF))).allowed
    assert await store.settle("b", 300_000, NOW_MS + 3300, NOW_MS + 3200) == 300_000
    await store.apply_snapshot(figures(NOW_MS + 4000, 500_000, 500_000))
    assert await charged(store, "acct") == 0
    assert await charged(store, ROW_FIELD) == 0


async def test_what_the_store_keeps_stays_bounded_when_the_figures_never_rise(store):
    # 1,200 settled charges over four horizons against a credits answer that never changes (the
    # bench's fixed document; charges ImageRouter never billed): the per-call records go with each
    # snapshot, the pending sums and what stays counted with the horizon.
    step_ms = 1000
    per_step = 10
    steps = 4 * CONTAIN_HORIZON_MS // step_ms // 10
    peak: dict[str, int] = {}
    now = NOW_MS
    await store.apply_snapshot(figures(now - 1, 7 * USD, 0))
    for s in range(steps):
        now += step_ms * 10
        for i in range(per_step):
            hold_id = f"c{s}-{i}"
            assert (await store.reserve(req(hold_id, 1000, now, row=REF))).allowed
            assert await store.settle(hold_id, 1000, now + 1, now) == 1000
        await store.apply_snapshot(figures(now + 2, 7 * USD, 0))
        for name, n in (await kept(store)).items():
            peak[name] = max(peak.get(name, 0), n)
    # Every charge of the last horizon (and its tenth) is still counted, none older.
    assert await charged(store, "acct") <= (CONTAIN_HORIZON_MS * 11 // 10 // (step_ms * 10) + 1) * per_step * 1000
    assert await charged(store, "acct") >= CONTAIN_HORIZON_MS // (step_ms * 10) * per_step * 1000
    assert peak["holds"] == peak["chlog"] == peak["chamt"] == peak["base"] == 0
    assert peak["pend"] <= 2 * 11  # two scopes, a pending sum per tenth of the horizon
    assert peak["wm"] <= 1  # the base sweep's cursor at most


async def test_containment_records_left_behind_by_another_release_are_swept(store):
    # Records of contained calls an older release settled (it does not remove them), among as many
    # of calls still in flight: each snapshot looks at a few and goes on from there at the next.
    await store.apply_snapshot(figures(NOW_MS - 1000, 0, 0))
    live = [f"live-{i}" for i in range(400)]
    await raw(store, "HSET", store.key("holds"), *(x for h in live for x in (h, "in flight")))
    await raw(store, "HSET", store.key("base"), *(x for h in live for x in (h, "1|1")))
    await raw(store, "HSET", store.key("base"), *(x for i in range(400) for x in (f"gone-{i}", "1|1")))
    for i in range(40):
        await store.apply_snapshot(figures(NOW_MS + i, 0, 0))
    assert sorted(await raw(store, "HKEYS", store.key("base"))) == sorted(h.encode() for h in live)


async def test_a_hold_an_older_release_took_without_figures_keeps_the_timing_rule(store):
    await store.apply_snapshot(figures(NOW_MS - 1000, 0, 0))
    assert (await store.reserve(req("new", 300_000, row=REF))).allowed
    record = (await raw(store, "HGET", store.key("holds"), "new")).decode()  # type: ignore[union-attr]
    assert record.endswith("|0;0;0")  # admitted against $0 of credit_usage and key row spend
    await raw(store, "HSET", store.key("holds"), "old", record.removesuffix(";0;0"))
    await raw(store, "HINCRBY", store.key("held"), "acct", 300_000)
    await raw(store, "HINCRBY", store.key("held"), f"row:{REF}", 300_000)
    await store.mark_started([("new", NOW_MS + 10), ("old", NOW_MS + 10)])
    await store.apply_snapshot(figures(NOW_MS + 2000, 0, 0))
    assert await held(store, "acct") == 300_000  # only "new" waits for the figures
