"""The store's Lua scripts over fake and real Redis: reserve, settle, snapshots, the invariant."""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import re
from typing import Any

import fakeredis
import pytest
import redis

from proxy.errors import HoldQuarantined, StoreError, StoreScriptError
from proxy.prices import PriceTable
from proxy.store.keyspace import SCRIPT_KEYS
from proxy.store.records import RESERVE_REFUSAL_CODES, BudgetHold, ReserveRequest, RowState, Snapshot, row_ref
from proxy.store.redis import LOCK_REFRESH, Store
from proxy.store.scripts import (
    RESERVE_ALLOWED,
    RESERVE_RECLAIM_FIRST,
    RESERVE_REFUSED,
    ROW_NONE,
    ROW_OK,
    ROW_UNREADABLE,
    SETTLE_GONE,
    SETTLE_QUARANTINED,
    Part,
    Script,
    lua_source,
)
from proxy.windows import to_ms, window_end, window_start_ms
from tests.support.constants import ACCOUNT_KEY, KEY_A, KEY_B
from tests.support.policies import key_entry, policy_yaml
from tests.support.standin import key_row
from tests.support.stores import BatchScriptStore

ACCOUNT = "acct"
USD = 1_000_000
HOUR_MS = 3_600_000
UTC = dt.UTC


def _future_day(accept) -> dt.date:
    # Redis expires budget counters on its own (real) clock, so the instants the tests stand on
    # lie in the future: a window that ended a day ago in real time would vanish at once.
    day = dt.datetime.now(UTC).date() + dt.timedelta(days=8)
    while not accept(day):
        day += dt.timedelta(days=1)
    return day


# A Wednesday afternoon.
NOW_MS = to_ms(dt.datetime.combine(_future_day(lambda d: d.isoweekday() == 3), dt.time(15), UTC))
# A Monday the 1st, 00:00 UTC: a new day, week and month start together.
BOUNDARY_MS = to_ms(dt.datetime.combine(_future_day(lambda d: d.isoweekday() == 1 and d.day == 1), dt.time(), UTC))
REF = "id:key-a"
assert row_ref("key-a", None) == REF


def windows(now_ms: int) -> tuple[int, int, int]:
    now_s = now_ms / 1000
    return (window_start_ms("day", now_s), window_start_ms("week", now_s), window_start_ms("month", now_s))


def win(period: str | None, now_ms: int = NOW_MS) -> int:
    return window_start_ms(period, now_ms / 1000)  # type: ignore[arg-type]


def budget(bid: str, limit: int, period: str | None = "day", now_ms: int = NOW_MS, shadow: bool = False) -> BudgetHold:
    end = window_end(period, now_ms / 1000)  # type: ignore[arg-type]
    return BudgetHold(bid, limit, shadow, win(period, now_ms), 0 if end is None else to_ms(end))


def req(
    hold_id: str,
    amount: int,
    now_ms: int = NOW_MS,
    *,
    row: str | None = None,
    floor: int = 0,
    staleness_ms: int = HOUR_MS,
    lease_ms: int = 60_000,
    shadow: bool = False,
    budgets: tuple[BudgetHold, ...] = (),
) -> ReserveRequest:
    return ReserveRequest(
        hold_id, amount, now_ms, now_ms + lease_ms, floor, staleness_ms, row, windows(now_ms), shadow, budgets
    )


def row(
    limit: int | None = None,
    period: str | None = None,
    spend: int = 0,
    start: int | None = None,
    *,
    active: bool = True,
    expires: int | None = None,
) -> RowState:
    return RowState(active, expires, limit, period, spend, start)


def snap(
    fetched_ms: int = NOW_MS - 1000, remaining: int = 100 * USD, rows: dict[str, RowState] | None = None
) -> Snapshot:
    return Snapshot(fetched_ms, remaining, rows or {})


@pytest.fixture(params=["alone", "batched"])
async def store(store_target, request):
    """The store, its ledger operations each run by its own script (alone) or as an operation of
    the batch script (batched)."""
    client = store_target.client()
    yield (Store if request.param == "alone" else BatchScriptStore)(client, ACCOUNT)
    await client.aclose()


async def charged(store: Store, field: str) -> int:
    return (await store.usage([field], []))[field].charged_micros


async def held(store: Store, field: str) -> int:
    return (await store.usage([field], []))[field].held_micros


# -- snapshot prerequisites -----------------------------------------------------------------


async def test_reserve_without_a_snapshot_is_refused_no_snapshot(store):
    d = await store.reserve(req("h1", USD))
    assert not d.allowed and d.refusal is not None
    assert (d.refusal.code, d.refusal.scope) == ("no_snapshot", "account")
    assert await store.open_holds() == 0


async def test_reserve_with_a_stale_snapshot_is_refused_stale(store):
    await store.apply_snapshot(snap(fetched_ms=NOW_MS - 300_001))
    d = await store.reserve(req("h1", USD, staleness_ms=300_000))
    assert not d.allowed and d.refusal is not None
    assert d.refusal.code == "stale"
    assert d.refusal.held_micros == 300_001  # the snapshot's age, for the message
    assert (await store.reserve(req("h2", USD, staleness_ms=300_001))).allowed  # exactly at the limit: fresh


async def test_read_snapshot_round_trips(store):
    rows = {
        "id:k1": row(5 * USD, "day", 123, NOW_MS - 5, expires=NOW_MS + 10),
        "id:k2": row(None, None, 0, None, active=False),
    }
    assert await store.read_snapshot() is None
    assert await store.apply_snapshot(snap(NOW_MS, -2 * USD, rows))
    assert await store.read_snapshot() == Snapshot(NOW_MS, -2 * USD, rows)
    assert await store.snapshot_fetched_ms() == NOW_MS


@pytest.mark.parametrize(
    "state",
    [row(), row(1, "day", 5, 7, active=False, expires=9), row(10**15, "month", 10**15, 0), row(0, "week", 0, None)],
)
def test_row_state_encoding_round_trips(state):
    assert RowState.decode(state.encode()) == state


# -- account floor --------------------------------------------------------------------------


async def test_account_allows_exactly_down_to_the_floor_and_refuses_past_it(store):
    await store.apply_snapshot(snap(remaining=10 * USD))
    d = await store.reserve(req("h1", 9 * USD, floor=USD))
    assert d.allowed and d.refusal is None
    assert (d.tight_scope, d.tight_remaining_micros) == ("account", 0)
    d = await store.reserve(req("h2", 1, floor=USD))
    assert not d.allowed and d.refusal is not None
    assert (d.refusal.code, d.refusal.scope) == ("credits", "account")
    assert (d.refusal.limit_micros, d.refusal.spent_micros, d.refusal.held_micros) == (9 * USD, 0, 9 * USD)
    assert await store.open_holds() == 1


async def test_account_counts_charges_settled_since_the_snapshot(store):
    await store.apply_snapshot(snap(remaining=USD))
    assert (await store.reserve(req("h1", USD))).allowed
    assert await store.settle("h1", 600_000, NOW_MS) == 600_000
    assert not (await store.reserve(req("h2", 400_001))).allowed
    d = await store.reserve(req("h3", 400_000))
    assert d.allowed and d.tight_remaining_micros == 0


async def test_negative_remaining_credits_refuse_everything(store):
    await store.apply_snapshot(snap(remaining=-1))
    d = await store.reserve(req("h1", 0))
    assert not d.allowed and d.refusal is not None and d.refusal.code == "credits"


# -- key rows -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "scope"), [("day", "key:day"), ("week", "key:week"), ("month", "key:month"), (None, "key:lifetime")]
)
async def test_key_limit_per_period(store, period, scope):
    await store.apply_snapshot(snap(rows={REF: row(USD, period, 400_000, win(period) or None)}))
    d = await store.reserve(req("h1", 600_000, row=REF))
    assert d.allowed
    assert (d.tight_scope, d.tight_remaining_micros) == (scope, 0)
    d = await store.reserve(req("h2", 1, row=REF))
    assert not d.allowed and d.refusal is not None
    assert (d.refusal.code, d.refusal.scope) == ("key_limit", scope)
    assert (d.refusal.limit_micros, d.refusal.spent_micros, d.refusal.held_micros) == (USD, 400_000, 600_000)
    # the account still has room: only the key is full
    assert (await store.reserve(req("h3", USD))).allowed


@pytest.mark.parametrize("period", ["day", "week", "month"])
async def test_snapshot_row_from_before_the_current_window_counts_as_zero(store, period):
    start = win(period)
    rows = {
        "id:old": row(USD, period, 900_000, start - 1),
        "id:current": row(USD, period, 900_000, start),
    }
    await store.apply_snapshot(snap(rows=rows))
    assert (await store.reserve(req("h1", USD, row="id:old"))).allowed
    d = await store.reserve(req("h2", 100_001, row="id:current"))
    assert not d.allowed and d.refusal is not None and d.refusal.spent_micros == 900_000


@pytest.mark.parametrize("period", ["day", "week", "month"])
async def test_null_period_start_counts_zero_when_the_snapshot_predates_the_window(store, period):
    # Fetched one second before a new day, week and month began; reserved one second after.
    rows = {REF: row(USD, period, 900_000, None)}
    await store.apply_snapshot(snap(fetched_ms=BOUNDARY_MS - 1000, rows=rows))
    assert (await store.reserve(req("h1", USD, BOUNDARY_MS + 1000, row=REF))).allowed


@pytest.mark.parametrize("period", ["day", "week", "month"])
async def test_null_period_start_counts_when_the_snapshot_is_inside_the_window(store, period):
    rows = {REF: row(USD, period, 900_000, None)}
    await store.apply_snapshot(snap(fetched_ms=BOUNDARY_MS, rows=rows))
    d = await store.reserve(req("h1", 100_001, BOUNDARY_MS + 1000, row=REF))
    assert not d.allowed and d.refusal is not None and d.refusal.spent_micros == 900_000


async def test_lifetime_limit_counts_spend_regardless_of_period_start(store):
    await store.apply_snapshot(snap(fetched_ms=BOUNDARY_MS - 1000, rows={REF: row(USD, None, 900_000, None)}))
    assert not (await store.reserve(req("h1", 100_001, BOUNDARY_MS + 1000, row=REF))).allowed


async def test_inactive_key_is_refused(store):
    await store.apply_snapshot(snap(rows={REF: row(active=False)}))
    d = await store.reserve(req("h1", 1, row=REF))
    assert not d.allowed and d.refusal is not None
    assert (d.refusal.code, d.refusal.scope) == ("key_inactive", "key")
    assert await store.open_holds() == 0


async def test_expired_key_is_refused_from_its_expiry_instant(store):
    await store.apply_snapshot(snap(rows={"id:now": row(expires=NOW_MS), "id:later": row(expires=NOW_MS + 1)}))
    d = await store.reserve(req("h1", 1, row="id:now"))
    assert not d.allowed and d.refusal is not None
    assert (d.refusal.code, d.refusal.scope) == ("key_expired", "key")
    assert (await store.reserve(req("h2", 1, row="id:later"))).allowed


async def test_a_row_missing_from_the_snapshot_is_checked_against_the_account_only(store):
    await store.apply_snapshot(snap(remaining=USD, rows={"id:other": row(1, "day")}))
    d = await store.reserve(req("h1", USD, row="id:missing"))
    assert d.allowed and d.tight_scope == "account"


async def test_key_holds_count_against_the_key_until_settled(store):
    await store.apply_snapshot(snap(rows={REF: row(USD, "day", 0, win("day"))}))
    assert (await store.reserve(req("h1", 700_000, row=REF))).allowed
    assert not (await store.reserve(req("h2", 300_001, row=REF))).allowed
    assert await store.settle("h1", 0, NOW_MS) == 0
    assert (await store.reserve(req("h3", USD, row=REF))).allowed


async def test_charges_in_an_old_window_do_not_count_in_the_new_window(store):
    day1 = BOUNDARY_MS - 60_000
    await store.apply_snapshot(snap(fetched_ms=day1 - 1000, rows={REF: row(USD, "day", 0, win("day", day1))}))
    assert (await store.reserve(req("h1", 800_000, day1, row=REF))).allowed
    assert await store.settle("h1", None, day1 + 1) == 800_000
    assert not (await store.reserve(req("h2", 300_000, day1 + 2, row=REF))).allowed
    # one minute later it is a new day: the 0.80 charged yesterday no longer counts
    day2 = BOUNDARY_MS + 1000
    assert (await store.reserve(req("h3", USD, day2, row=REF))).allowed
    assert await charged(store, f"row:{REF}:{win('day', day1)}") == 800_000
    assert await charged(store, f"row:{REF}:{win('day', day2)}") == 0
    assert await charged(store, "acct") == 800_000  # the account has no window


# -- local budgets --------------------------------------------------------------------------


async def test_local_budget_allows_up_to_its_limit(store):
    await store.apply_snapshot(snap())
    b = budget("key:alice:day", USD)
    assert (await store.reserve(req("h1", 600_000, budgets=(b,)))).allowed
    d = await store.reserve(req("h2", 400_001, budgets=(b,)))
    assert not d.allowed and d.refusal is not None
    assert (d.refusal.code, d.refusal.scope) == ("budget", "budget:key:alice:day")
    assert (d.refusal.limit_micros, d.refusal.spent_micros, d.refusal.held_micros) == (USD, 0, 600_000)
    assert await store.settle("h1", 200_000, NOW_MS) == 200_000
    d = await store.reserve(req("h3", 800_000, budgets=(b,)))
    assert d.allowed and (d.tight_scope, d.tight_remaining_micros) == ("budget:key:alice:day", 0)
    usage = await store.usage([], [b])
    assert usage["b:key:alice:day"].charged_micros == 200_000
    assert usage["b:key:alice:day"].held_micros == 800_000


async def test_local_budget_starts_empty_in_its_next_window(store):
    day1, day2 = BOUNDARY_MS - 1000, BOUNDARY_MS
    await store.apply_snapshot(snap(fetched_ms=day1 - 1000))
    assert (await store.reserve(req("h1", USD, day1, budgets=(budget("b", USD, "day", day1),)))).allowed
    assert await store.settle("h1", None, day1) == USD
    assert not (await store.reserve(req("h2", 1, day1, budgets=(budget("b", USD, "day", day1),)))).allowed
    assert (await store.reserve(req("h3", USD, day2, budgets=(budget("b", USD, "day", day2),)))).allowed


async def test_windowed_budget_counter_expires_a_day_after_its_window_and_lifetime_never(store_target, store):
    await store.apply_snapshot(snap())
    daily, forever = budget("d", USD, "day"), budget("l", USD, None)
    assert (await store.reserve(req("h1", 1000, budgets=(daily, forever)))).allowed
    assert await store.settle("h1", None, NOW_MS) == 1000
    expire_at = await store.client.pexpiretime(store.budget_key("d", daily.window_start_ms))
    assert expire_at == daily.window_end_ms + 86_400_000
    assert await store.client.pttl(store.budget_key("l", 0)) == -1


async def test_budget_whose_limit_is_exceeded_refuses_even_if_others_fit(store):
    await store.apply_snapshot(snap())
    budgets = (budget("roomy", 10 * USD), budget("tight", 100))
    d = await store.reserve(req("h1", 101, budgets=budgets))
    assert not d.allowed and d.refusal is not None and d.refusal.scope == "budget:tight"
    assert await store.open_holds() == 0
    assert (await store.usage([], budgets))["b:roomy"].held_micros == 0  # all or nothing


async def test_shadow_budget_records_the_hold_allows_and_reports_the_would_refuse(store):
    await store.apply_snapshot(snap())
    b = budget("key:bob:day", 500_000, shadow=True)
    d = await store.reserve(req("h1", 600_000, budgets=(b,)))
    assert d.allowed
    assert d.refusal is not None
    assert (d.refusal.code, d.refusal.scope, d.refusal.limit_micros) == ("budget", "budget:key:bob:day", 500_000)
    assert d.tight_scope == "account"  # a shadow scope is never the tight one
    assert (await store.usage([], [b]))["b:key:bob:day"].held_micros == 600_000
    assert await store.settle("h1", None, NOW_MS) == 600_000
    assert (await store.usage([], [b]))["b:key:bob:day"].charged_micros == 600_000


async def test_enforced_refusal_wins_over_a_shadow_one(store):
    await store.apply_snapshot(snap(remaining=USD))
    d = await store.reserve(req("h1", 2 * USD, budgets=(budget("s", 1, shadow=True),)))
    assert not d.allowed and d.refusal is not None and d.refusal.code == "credits"


async def test_global_shadow_allows_what_it_would_refuse_and_holds_it(store):
    await store.apply_snapshot(snap(remaining=USD, rows={"id:off": row(active=False)}))
    d = await store.reserve(req("h1", 2 * USD, shadow=True))
    assert d.allowed and d.refusal is not None
    assert (d.refusal.code, d.refusal.scope) == ("credits", "account")
    assert await held(store, "acct") == 2 * USD
    d = await store.reserve(req("h2", 1, row="id:off", shadow=True))
    assert d.allowed and d.refusal is not None and d.refusal.code == "key_inactive"
    assert await store.open_holds() == 2


async def test_global_shadow_without_anything_exceeded_reports_nothing(store):
    await store.apply_snapshot(snap())
    d = await store.reserve(req("h1", USD, shadow=True))
    assert d.allowed and d.refusal is None


async def test_tight_scope_is_the_scope_with_least_room_left(store):
    await store.apply_snapshot(snap(remaining=10 * USD, rows={REF: row(3 * USD, "week", USD, win("week"))}))
    d = await store.reserve(req("h1", USD, row=REF, budgets=(budget("b", 5 * USD),)))
    assert d.allowed and (d.tight_scope, d.tight_remaining_micros) == ("key:week", USD)


async def test_a_resent_reserve_is_allowed_without_holding_twice(store):
    # Redis Cluster's client re-sends a script whose reply was lost: the first run decided.
    await store.apply_snapshot(snap())
    assert (await store.reserve(req("h1", 1000))).allowed
    d = await store.reserve(req("h1", 1000))
    assert d.allowed and d.refusal is None
    assert await held(store, "acct") == 1000


async def test_a_release_that_overtakes_its_reserve_cancels_it(store):
    # The proxy gave up waiting for a reserve and released it; the reserve then runs late.
    await store.apply_snapshot(snap())
    assert await store.settle("late", 0, NOW_MS) is None
    d = await store.reserve(req("late", 1000))
    assert not d.allowed and d.refusal is not None and d.refusal.code == "cancelled"
    assert await held(store, "acct") == 0


# -- settle ---------------------------------------------------------------------------------


async def test_settle_charges_exactly_once(store):
    await store.apply_snapshot(snap(rows={REF: row(USD, "day", 0, win("day"))}))
    b = budget("b", USD)
    assert (await store.reserve(req("h1", 300_000, row=REF, budgets=(b,)))).allowed
    assert await store.settle("h1", 123_400, NOW_MS) == 123_400
    assert await store.settle("h1", 123_400, NOW_MS) is None
    assert await store.settle("h1", None, NOW_MS) is None
    row_field = f"row:{REF}:{win('day')}"
    usage = await store.usage(["acct", row_field], [b])
    assert usage["acct"].charged_micros == 123_400 and usage["acct"].held_micros == 0
    assert usage[row_field].charged_micros == 123_400 and usage[row_field].held_micros == 0
    assert usage["b:b"].charged_micros == 123_400 and usage["b:b"].held_micros == 0
    assert await store.open_holds() == 0


async def test_settle_with_zero_releases_the_hold(store):
    await store.apply_snapshot(snap())
    b = budget("b", USD)
    assert (await store.reserve(req("h1", 300_000, budgets=(b,)))).allowed
    assert await store.settle("h1", 0, NOW_MS) == 0
    usage = await store.usage(["acct"], [b])
    assert usage["acct"] == usage["b:b"]
    assert (usage["acct"].charged_micros, usage["acct"].held_micros) == (0, 0)
    assert await store.client.exists(store.budget_key("b", b.window_start_ms)) == 0


async def test_settle_with_none_charges_the_whole_hold(store):
    await store.apply_snapshot(snap())
    assert (await store.reserve(req("h1", 300_000))).allowed
    assert await store.settle("h1", None, NOW_MS) == 300_000
    assert await charged(store, "acct") == 300_000


async def test_cost_above_the_hold_is_charged_in_full(store):
    await store.apply_snapshot(snap(rows={REF: row(10 * USD, "month", 0, win("month"))}))
    b = budget("b", 10 * USD, "month")
    assert (await store.reserve(req("h1", 300_000, row=REF, budgets=(b,)))).allowed
    assert await store.settle("h1", 450_000, NOW_MS) == 450_000
    usage = await store.usage(["acct", f"row:{REF}:{win('month')}"], [b])
    assert [u.charged_micros for u in usage.values()] == [450_000, 450_000, 450_000]
    assert [u.held_micros for u in usage.values()] == [0, 0, 0]


async def test_settling_an_unknown_hold_returns_none(store):
    assert await store.settle("never-reserved", 5, NOW_MS) is None
    assert await charged(store, "acct") == 0


async def test_expired_lease_is_reclaimed_by_the_next_reserve_and_charged_its_hold(store):
    await store.apply_snapshot(snap(rows={REF: row(10 * USD, "day", 0, win("day"))}))
    b = budget("b", 10 * USD)
    assert (await store.reserve(req("crashed", 700_000, row=REF, budgets=(b,), lease_ms=5_000))).allowed
    # before its lease ends nothing happens to it
    assert (await store.reserve(req("h2", 1, NOW_MS + 4_999))).allowed
    assert await store.open_holds() == 2
    # the next reserve at the lease expiry reclaims it, even though that reserve is refused
    d = await store.reserve(req("h3", 200 * USD, NOW_MS + 5_000))
    assert not d.allowed
    assert await store.open_holds() == 1  # only h2 is left
    usage = await store.usage(["acct", f"row:{REF}:{win('day')}"], [b])
    assert usage["acct"].charged_micros == 700_000 and usage["acct"].held_micros == 1
    assert usage[f"row:{REF}:{win('day')}"].charged_micros == 700_000
    assert usage[f"row:{REF}:{win('day')}"].held_micros == 0
    assert (usage["b:b"].charged_micros, usage["b:b"].held_micros) == (700_000, 0)
    assert await store.settle("crashed", 100, NOW_MS + 6_000) is None  # too late: charged once only
    assert await charged(store, "acct") == 700_000


# -- hold records, by version ---------------------------------------------------------------


async def test_a_tagged_version_2_record_settles_like_an_untagged_one(store):
    await store.apply_snapshot(snap(rows={REF: row(10 * USD, "day", 0, win("day"))}))
    b = budget("b", 10 * USD)
    assert (await store.reserve(req("h", 300_000, row=REF, budgets=(b,)))).allowed
    record = (await store.client.hget(store.key("holds"), "h")).decode()
    assert record.count("|") == 6 and not record.startswith("v")  # written untagged (_common.lua says why)
    await store.client.hset(store.key("holds"), "h", "v2|" + record)
    assert await store.settle("h", 100_000, NOW_MS + 1_000) == 100_000
    usage = await store.usage(["acct", f"row:{REF}:{win('day')}"], [b])
    assert (usage["acct"].charged_micros, usage["acct"].held_micros) == (100_000, 0)
    assert usage[f"row:{REF}:{win('day')}"].held_micros == 0
    assert (usage["b:b"].charged_micros, usage["b:b"].held_micros) == (100_000, 0)


async def test_a_tagged_version_2_record_is_marked_contained_and_reclaimed(store):
    await store.apply_snapshot(snap(fetched_ms=NOW_MS - 5_000))
    assert (await store.reserve(req("h", 300_000, lease_ms=1_000))).allowed
    record = (await store.client.hget(store.key("holds"), "h")).decode()
    await store.client.hset(store.key("holds"), "h", "v2|" + record)
    assert await store.mark_started([("h", NOW_MS + 1)]) == 1
    await store.apply_snapshot(snap(fetched_ms=NOW_MS + 1_000))  # holds the call's pre-charge
    assert await held(store, "acct") == 0
    d = await store.reserve(req("n", 1, NOW_MS + 2_000))
    assert (d.reclaimed.count, d.reclaimed.micros, d.reclaimed.quarantined) == (1, 300_000, ())
    assert await charged(store, "acct") == 0  # contained: the snapshot has it already


@pytest.mark.parametrize("record", ["v2|300000|0||0|", "v2|", "v3|300000|0||0||0|0", "v2|v2|300000|0||0||0|0"])
async def test_a_tagged_record_of_another_shape_is_quarantined(store, record):
    await store.client.hset(store.key("holds"), "bad", record)
    with pytest.raises(HoldQuarantined):
        await store.settle("bad", 5, NOW_MS)
    assert await store.client.hget(store.key("quarantine"), "bad") == record.encode()


# -- the scripts as Redis runs them ---------------------------------------------------------


def lua_line(name: str, text: str) -> int:
    """The line of `lua/<name>` that holds `text` (exactly one does)."""
    found = [i for i, line in enumerate(lua_source(name).splitlines(), 1) if text in line]
    assert len(found) == 1, (name, text, found)
    return found[0]


async def test_a_script_error_names_the_script_file_and_its_own_line(store):
    await store.apply_snapshot(snap())
    # An amount that is not a number fails in reserve.lua itself...
    with pytest.raises(StoreScriptError) as failed:
        await store.reserve(req("h", "not-a-number"))  # type: ignore[arg-type]
    where = f"reserve.lua:{lua_line('reserve.lua', 'local remaining = limit - spent - in_hold - amount')}:"
    assert where in str(failed.value) and "user_script" not in str(failed.value).replace("@user_script:?", "")
    # ... a cost that is not a number fails in _common.lua's settle_hold, sent before settle.lua.
    assert (await store.reserve(req("h", USD))).allowed
    with pytest.raises(StoreScriptError) as failed:
        await store.settle("h", "not-a-number", NOW_MS)  # type: ignore[arg-type]
    assert f"_common.lua:{lua_line('_common.lua', 'if charge < 0 then')}:" in str(failed.value)
    assert await store.settle("h", USD, NOW_MS) == USD  # nothing was changed by the failed run


def test_script_lines_map_to_the_part_they_come_from():
    script = Script(None, Part("a", "1\n2\n"), Part("b", "3\n"), Part("c", "4\n5"))  # type: ignore[arg-type]
    assert [script.locate(n) for n in range(1, 6)] == ["a:1", "a:2", "b:1", "c:1", "c:2"]
    message = 'user_script:4: boom script: 0, on @user_script:2. [string "<python>"]:3: in main chunk'
    assert script.locate_lines(message) == "c:1: boom script: 0, on @a:2. b:1: in main chunk"


def lua_constants(name: str, *names: str) -> dict[str, object]:
    """The values `lua/<name>` gives `local A, B = 1, 2` for these names (one such line)."""
    pattern = re.compile(r"^local " + ", ".join(names) + r" = (.+)$", re.M)
    (values,) = pattern.findall(lua_source(name))
    return dict(zip(names, (ast.literal_eval(v.strip()) for v in values.split(",")), strict=True))


def test_reply_codes_are_spelled_alike_in_the_scripts_and_in_python():
    reserve = lua_constants("reserve.lua", "REFUSED", "ALLOWED", "RECLAIM_FIRST")
    assert reserve == {"REFUSED": RESERVE_REFUSED, "ALLOWED": RESERVE_ALLOWED, "RECLAIM_FIRST": RESERVE_RECLAIM_FIRST}
    settle = lua_constants("settle.lua", "GONE", "QUARANTINED")
    assert settle == {"GONE": SETTLE_GONE, "QUARANTINED": SETTLE_QUARANTINED}
    rows = lua_constants("levels.lua", "ROW_NONE", "ROW_UNREADABLE", "ROW_OK")
    assert rows == {"ROW_NONE": ROW_NONE, "ROW_UNREADABLE": ROW_UNREADABLE, "ROW_OK": ROW_OK}
    # every code reserve.lua refuses with is named in Python and in its header
    source = lua_source("reserve.lua")
    used = set(re.findall(r'return \{REFUSED, "(\w+)"|code = "(\w+)"|consider\("(\w+)"', source))
    codes = {code for match in used for code in match if code}
    assert codes == RESERVE_REFUSAL_CODES
    header = "".join(line for line in source.splitlines(keepends=True) if line.startswith("--"))
    assert all(code in header for code in RESERVE_REFUSAL_CODES)


def test_each_script_header_says_what_is_sent_before_it():
    for name in SCRIPT_KEYS:
        header = lua_source(f"{name}.lua").split("\nlocal ", 1)[0]
        assert f'SCRIPT_KEYS["{name}"]' in header and "_common.lua" in header, name
    assert "nothing is prepended" in lua_source("alert_marks.lua").split("\nlocal ", 1)[0]


# -- snapshots ------------------------------------------------------------------------------


async def test_snapshot_fetched_earlier_than_the_stored_one_is_ignored(store):
    assert await store.apply_snapshot(snap(fetched_ms=NOW_MS, remaining=5 * USD))
    assert not await store.apply_snapshot(snap(fetched_ms=NOW_MS - 1, remaining=50 * USD))
    assert not await store.apply_snapshot(snap(fetched_ms=NOW_MS, remaining=50 * USD))
    stored = await store.read_snapshot()
    assert stored is not None and (stored.fetched_ms, stored.remaining_micros) == (NOW_MS, 5 * USD)
    assert await store.apply_snapshot(snap(fetched_ms=NOW_MS + 1, remaining=7 * USD))
    stored = await store.read_snapshot()
    assert stored is not None and stored.remaining_micros == 7 * USD


async def test_newer_snapshot_replaces_rows_entirely(store):
    await store.apply_snapshot(snap(NOW_MS - 10, rows={"id:gone": row(1, "day")}))
    await store.apply_snapshot(snap(NOW_MS - 5, rows={"id:new": row()}))
    stored = await store.read_snapshot()
    assert stored is not None and set(stored.rows) == {"id:new"}


async def test_a_charge_settled_during_a_fetch_is_kept_by_it_and_dropped_by_the_next(store):
    t0 = NOW_MS - 60_000
    ref_field = f"row:{REF}:{win('day')}"
    await store.apply_snapshot(snap(fetched_ms=t0, rows={REF: row(100 * USD, "day", 0, win("day"))}))

    async def charge(hold_id: str, amount: int, at_ms: int) -> None:
        assert (await store.reserve(req(hold_id, amount, at_ms, row=REF))).allowed
        assert await store.settle(hold_id, amount, at_ms) == amount

    await charge("before", 1_000, t0 + 100)  # settled before fetch 1 began: in its figures
    t1 = t0 + 200  # fetch 1 begins
    await charge("at-start", 20_000, t1)  # settled the instant the fetch began
    await charge("during", 300_000, t1 + 50)  # settled while the fetch was in flight
    assert await charged(store, "acct") == 321_000

    def billed(spend: int) -> dict[str, RowState]:  # the key row as the upstream shows it
        return {REF: row(100 * USD, "day", spend, win("day"))}

    assert await store.apply_snapshot(snap(fetched_ms=t1, rows=billed(1_000)))
    usage = await store.usage(["acct", ref_field], [])
    # the upstream may not have seen the last two: they stay counted (never lost) ...
    assert usage["acct"].charged_micros == 320_000
    assert usage[ref_field].charged_micros == 320_000

    # ... and a snapshot fetched after them contains them, so they stop counting (never twice)
    assert await store.apply_snapshot(snap(fetched_ms=t1 + 1_000, rows=billed(321_000)))
    usage = await store.usage(["acct", ref_field], [])
    assert usage["acct"].charged_micros == 0
    assert usage[ref_field].charged_micros == 0
    assert await store.client.zcard(store.key("chlog")) == 0
    assert await store.client.hlen(store.key("chamt")) == 0


async def test_an_out_of_order_snapshot_drops_no_charges(store):
    await store.apply_snapshot(snap(fetched_ms=NOW_MS - 100))
    assert (await store.reserve(req("h1", 5_000, NOW_MS - 50))).allowed
    await store.settle("h1", 5_000, NOW_MS - 50)
    assert await store.apply_snapshot(snap(fetched_ms=NOW_MS - 60))  # begun before the settle
    assert not await store.apply_snapshot(snap(fetched_ms=NOW_MS - 70))  # older still: ignored
    assert await charged(store, "acct") == 5_000


async def test_snapshot_does_not_touch_holds_or_local_budgets(store):
    await store.apply_snapshot(snap(fetched_ms=NOW_MS - 100))
    b = budget("b", USD)
    assert (await store.reserve(req("h1", 5_000, NOW_MS - 90, budgets=(b,)))).allowed
    assert (await store.reserve(req("h2", 7_000, NOW_MS - 90, budgets=(b,)))).allowed
    await store.settle("h1", 5_000, NOW_MS - 80)
    await store.apply_snapshot(snap(fetched_ms=NOW_MS))
    usage = await store.usage(["acct"], [b])
    assert (usage["acct"].charged_micros, usage["acct"].held_micros) == (0, 7_000)
    assert (usage["b:b"].charged_micros, usage["b:b"].held_micros) == (5_000, 7_000)


# -- concurrency ----------------------------------------------------------------------------

K = 7
AMOUNT = 100_000


@pytest.mark.parametrize("scope", ["account", "key", "budget"])
async def test_many_concurrent_reserves_allow_exactly_what_fits(store, scope):
    room = K * AMOUNT + AMOUNT - 1  # K fit, K + 1 do not
    remaining = room if scope == "account" else 1_000 * USD
    limit = room if scope == "key" else None
    await store.apply_snapshot(snap(remaining=remaining, rows={REF: row(limit, "day", 0, win("day"))}))
    budgets = (budget("b", room),) if scope == "budget" else ()
    decisions = await asyncio.gather(
        *(store.reserve(req(f"h{i}", AMOUNT, row=REF, budgets=budgets)) for i in range(50))
    )
    assert sum(d.allowed for d in decisions) == K
    assert await store.open_holds() == K
    assert await held(store, "acct") == K * AMOUNT
    refused = [d.refusal for d in decisions if not d.allowed]
    assert refused and all(r is not None and r.held_micros == K * AMOUNT for r in refused)


async def test_concurrent_settles_of_one_hold_charge_it_once(store):
    await store.apply_snapshot(snap())
    assert (await store.reserve(req("h1", AMOUNT))).allowed
    results = await asyncio.gather(*(store.settle("h1", None, NOW_MS) for _ in range(20)))
    assert sorted(results, key=lambda r: r is None)[0] == AMOUNT
    assert results.count(None) == 19
    assert await charged(store, "acct") == AMOUNT


# -- key layout and secrets -----------------------------------------------------------------


async def test_every_key_of_an_account_shares_its_hash_tag(store_target, store):
    await store.apply_snapshot(snap(rows={REF: row(USD, "day", 0, win("day"))}))
    budgets = (budget("key:alice:day", USD), budget("group:team:lifetime", USD, None))
    for i in range(3):
        assert (await store.reserve(req(f"h{i}", 1_000, row=REF, budgets=budgets, lease_ms=10))).allowed
    await store.settle("h0", 500, NOW_MS)
    await store.settle("h1", 0, NOW_MS)
    assert (await store.reserve(req("h9", 1_000, NOW_MS + 20))).allowed  # reclaims h2
    await store.acquire_lock(LOCK_REFRESH, "me", 60_000)
    await store.save_prices(PriceTable({"m": 1}, {}, 1))
    await store.set_status(last_ok_ms=1)
    other = Store(store.client, "other-account")
    await other.apply_snapshot(snap())

    keys = sorted(k.decode() for k in await store.client.keys("*"))
    mine = [k for k in keys if "{acct}" in k]
    assert len(mine) >= 10, keys
    assert all(k.startswith("sg:{acct}:") for k in mine)
    assert set(keys) - set(mine) == {"sg:{other-account}:snap"}


def dump(store_target: Any) -> bytes:
    """Every key name and value in the target Redis, as one blob."""
    sync: Any = (
        fakeredis.FakeRedis(server=store_target.server)
        if store_target.server
        else redis.Redis.from_url(store_target.url)
    )
    out: list[bytes] = []
    try:
        for key in sync.keys("*"):
            out.append(key)
            kind = sync.type(key).decode()
            if kind == "string":
                out.append(sync.get(key) or b"")
            elif kind == "hash":
                for f, v in sync.hgetall(key).items():
                    out += [f, v]
            elif kind == "zset":
                out += [m for m, _ in sync.zrange(key, 0, -1, withscores=True)]
            elif kind == "set":
                out += list(sync.smembers(key))
            elif kind == "list":
                out += sync.lrange(key, 0, -1)
    finally:
        sync.close()
    return b"\n".join(out)


def test_no_bearer_secret_reaches_redis(make_proxy, up, store_target):
    up.key_rows = [key_row("key-a", "alice", spend_limit="5", period="day")]
    up.key_ids = {KEY_A: "key-a"}
    budgets = "[{limit_usd: 50, period: day}, {limit_usd: 100, period: null}]"
    p = make_proxy(policy_yaml(keys=[key_entry(api_key_id="key-a", budgets=budgets)]))
    assert p.generate(token=KEY_A, standin="cost=0.1").status_code == 200
    assert p.generate(token=KEY_B, standin="cost=0.1").status_code == 200  # unknown key: account only
    assert p.generate(token=KEY_A, standin="error").status_code == 200
    blob = dump(store_target)
    assert b"{t}" in blob and b"snap" in blob  # the dump did see the proxy's state
    for secret in (KEY_A, KEY_B, ACCOUNT_KEY):
        assert secret.encode() not in blob
        assert secret[-40:].encode() not in blob


# -- failures -------------------------------------------------------------------------------


FAKE_ONLY = pytest.mark.parametrize("store_target", [pytest.param("fake", marks=pytest.mark.fake)], indirect=True)


@FAKE_ONLY
async def test_driver_errors_leave_the_store_as_store_error(store_target, store):
    store_target.server.connected = False
    with pytest.raises(StoreError):
        await store.reserve(req("h1", 1))
    with pytest.raises(StoreError):
        await store.settle("h1", 1, NOW_MS)
    with pytest.raises(StoreError):
        await store.apply_snapshot(snap())
    with pytest.raises(StoreError):
        await store.usage(["acct"], [])
    store_target.server.connected = True
    assert await store.apply_snapshot(snap())


def test_row_ref_is_redis_safe_and_never_raw_for_odd_ids_or_names():
    assert row_ref("d9eb93dc-56b1-4216-91b5-a44944508bbc", "n") == "id:d9eb93dc-56b1-4216-91b5-a44944508bbc"
    odd = row_ref("a}b:c|d", None)
    assert odd is not None and odd.startswith("id#") and "}" not in odd and "|" not in odd
    named = row_ref(None, "Deleted Key")
    assert named is not None and named.startswith("name#") and "Deleted" not in named
    assert row_ref(None, None) is None
    assert row_ref("x" * 81, None) != row_ref("x" * 82, None)
