"""Micro-batched store round trips (proxy/store/batch.py): what is issued while a round trip is in
flight goes to the store as one EVALSHA, and each operation in it ends exactly as it would alone;
up to two operations go alone at once while no batch is in flight.

Most tests here are about what a batch does: their ledger lets one operation go alone
(`max_alone=1`), so that everything issued with it makes one batch."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import redis

from proxy.errors import StoreError
from proxy.store.batch import BatchedLedger, batch_call, batch_script
from proxy.store.redis import Store
from proxy.store.scripts import RESERVE_ALLOWED, RESERVE_RECLAIM_FIRST, RESERVE_REFUSED
from tests.store.test_roundtrips import SENTINEL, watch
from tests.store.test_store import NOW_MS, USD, budget, req, row, snap
from tests.support.constants import KEY_A
from tests.support.policies import KEYS
from tests.support.proxies import envelope, open_holds
from tests.support.served import RedisServer

LARGE = 10**15  # money.MAX_ABS_MICROS: the largest amount the proxy sends
B = budget("b", 5 * USD)
COUNTERS = ((B.id, B.window_start_ms),)
# A mix that refuses some and allows others, edge amounts included: credits are 10^15 + 6 USD.
REQUESTS = [
    req("r0", USD, budgets=(B,)),
    req("r1", 0, budgets=(B,)),
    req("r2", 1),
    req("r3", 4 * USD + 1, budgets=(B,)),  # the budget has 4 USD left: refused
    req("r4", 4 * USD, budgets=(B,)),  # exactly what is left: allowed
    req("r5", 1, budgets=(B,)),  # refused by the budget
    req("r6", LARGE),  # the account has 10^15 + 1 USD - 1 left
    req("r7", USD),  # refused by the account: 1 USD - 1 left
    req("r8", USD - 1),  # allowed: exactly what is left
    req("r9", 1),  # refused
]


@pytest.fixture
async def stores(store_target):
    """Two accounts' stores on one server: `batched` behind a ledger, `alone` as the reference."""
    client = store_target.client()
    batched, alone = Store(client, "batched"), Store(client, "alone")
    for store in (batched, alone):
        await store.apply_snapshot(snap(remaining=LARGE + 6 * USD))
    yield BatchedLedger(batched, max_alone=1), alone
    await client.aclose()


async def state(store: Store) -> tuple[object, ...]:
    usage = await store.usage(["acct"], [B])
    return await store.open_holds(), usage["acct"], usage["b:b"]


async def until_queued(ledger: BatchedLedger, n: int) -> None:
    """Let the other tasks run until `n` operations wait for the next round trip."""
    for _ in range(10_000):
        if ledger.queued >= n:
            return
        await asyncio.sleep(0)  # a turn of the loop, not a wait for time to pass
    raise AssertionError(f"{ledger.queued} operations queued, not {n}")


async def test_reserves_issued_while_one_is_in_flight_go_as_one_round_trip_each_as_it_would_alone(stores):
    ledger, alone = stores
    expected = [await alone.reserve(r) for r in REQUESTS]
    assert [d.allowed for d in expected] == [True, True, True, False, True, False, True, False, True, False]
    got = await asyncio.gather(*(ledger.reserve(r) for r in REQUESTS))
    assert got == expected  # each decision, refusal and tightest scope, as alone in that order
    assert (ledger.round_trips, ledger.operations) == (2, 10)  # the first alone, then nine as one
    assert await state(ledger.store) == await state(alone)


async def test_arguments_json_would_escape_reach_a_batched_script_as_they_reach_it_alone(store_target):
    """The batch sends its operations' arguments as one JSON text: a key row named with quotes,
    backslashes, control and non-ASCII characters is still found, and its spend limit applies."""
    name = 'k\u00e9"\\y\x01\u2603 \U0001f600'
    client = store_target.client()
    try:
        batched, alone = Store(client, "batched"), Store(client, "alone")
        for store in (batched, alone):
            await store.apply_snapshot(snap(remaining=LARGE, rows={name: row(limit=USD, period="day")}))
        ledger = BatchedLedger(batched, max_alone=1)
        asks = [req("w0", USD // 2, row=name), req("w1", USD // 2 + 1, row=name), req("w2", USD // 2, row=name)]
        expected = [await alone.reserve(r) for r in asks]
        assert [d.allowed for d in expected] == [True, False, True]  # the row's $1 limit was found
        got = await asyncio.gather(*(ledger.reserve(r) for r in asks))
        assert (got, ledger.round_trips) == (expected, 2)  # the first alone, then two as one batch
    finally:
        await client.aclose()


def test_a_batch_refuses_an_argument_redis_would_refuse():
    with pytest.raises(TypeError, match="bool"):
        batch_call([], [("settle", [], ["h", True])])


async def test_settles_and_started_marks_go_as_one_round_trip_each_as_it_would_alone(stores):
    ledger, alone = stores
    for store in (ledger.store, alone):
        for r in REQUESTS[:3]:
            assert (await store.reserve(r)).allowed
    # a charge, a release, one that needs the budget counter it was not given, one gone
    settles = [("r0", 250_000, COUNTERS), ("r1", 0, ()), ("r0x", 5, ()), ("r2", None, ())]
    marks = [("r0", NOW_MS), ("nope", NOW_MS)]
    expected_marks = await alone.mark_started(marks)
    expected = [await alone.settle(h, cost, NOW_MS, 0, c) for h, cost, c in settles]
    got_marks, *got = await asyncio.gather(
        ledger.mark_started(marks), *(ledger.settle(h, cost, NOW_MS, 0, c) for h, cost, c in settles)
    )
    assert (got_marks, got) == (expected_marks, expected) == (1, [250_000, 0, None, 1])
    assert ledger.round_trips == 2
    assert await state(ledger.store) == await state(alone)


async def test_a_settle_in_a_batch_that_needs_its_budget_counters_runs_again_with_them(stores):
    ledger, _ = stores
    for r in REQUESTS[:2]:
        assert (await ledger.store.reserve(r)).allowed
    charged = await asyncio.gather(*(ledger.settle(r.hold_id, 300_000, NOW_MS) for r in REQUESTS[:2]))
    assert charged == [300_000, 300_000]
    usage = await ledger.store.usage(["acct"], [B])
    assert usage["b:b"].charged_micros == 600_000 and usage["b:b"].held_micros == 0


async def test_a_batched_reserve_behind_an_expired_lease_reclaims_it_once(stores):
    ledger, _ = stores
    assert (await ledger.store.reserve(req("crashed", 700_000, budgets=(B,), lease_ms=1_000))).allowed
    later = [req(f"n{i}", USD, NOW_MS + 2_000) for i in range(5)]
    decisions = await asyncio.gather(*(ledger.reserve(r) for r in later))
    assert all(d.allowed for d in decisions)
    assert sum(d.reclaimed.count for d in decisions) == 1
    assert sum(d.reclaimed.micros for d in decisions) == 700_000
    usage = await ledger.store.usage(["acct"], [B])
    assert usage["acct"].charged_micros == 700_000 and usage["b:b"].charged_micros == 700_000


async def one_run(store: Store, calls, *, batched: bool) -> list[object]:
    """Replies to `calls` (script name, own keys, ARGV), as one batch or each alone in turn."""
    if batched:
        return await store.run(batch_script(store.client), *batch_call(store.keys.base, calls))
    return [await store.run_ledger_script(name, keys, args) for name, keys, args in calls]


async def batch_as_alone(stores, make_calls) -> list[object]:
    """Run `make_calls(store)` as one batch on one store and alone on the other: the same replies
    and the same state. The batch shares what its run read once (epoch, lost marker, first lease)
    among its operations: what one operation changes, the next must see."""
    ledger, alone = stores
    got = await one_run(ledger.store, make_calls(ledger.store), batched=True)
    expected = await one_run(alone, make_calls(alone), batched=False)
    assert got == expected
    assert await state(ledger.store) == await state(alone)
    return got


async def test_a_lease_an_earlier_reserve_of_the_batch_took_is_seen_expiring_by_a_later_one(stores):
    def calls(store):
        short = req("short", USD, lease_ms=1_000)  # its lease ends 1 s after NOW_MS
        later = req("later", USD, NOW_MS + 2_000)
        return [("reserve", *store.reserve_call(r, reclaim_first=True)) for r in (short, later)]

    first, second = await batch_as_alone(stores, calls)
    assert first[0] == RESERVE_ALLOWED and second == [RESERVE_RECLAIM_FIRST, []]


async def test_a_rollback_a_settle_of_the_batch_finds_refuses_the_budgets_of_reserves_after_it(stores):
    def calls(store):
        before, after = req("before", 1, budgets=(B,)), req("after", 1, budgets=(B,))
        settle_keys, settle = store.settle_call("before", 1, NOW_MS, 0, COUNTERS)
        settle[5] = 1_000  # the instance saw the store take 1,000 of its settles: it went back
        return [
            ("reserve", *store.reserve_call(before, reclaim_first=True)),
            ("settle", settle_keys, settle),
            ("reserve", *store.reserve_call(after, reclaim_first=True)),
        ]

    before, charged, after = await batch_as_alone(stores, calls)
    assert (before[0], charged, after[:2]) == (RESERVE_ALLOWED, 1, [RESERVE_REFUSED, b"state_lost"])


async def test_an_epoch_changed_between_reserves_of_one_batch_is_found_by_the_later_one(stores):
    def calls(store):
        ops = []
        for hold_id, epoch in (("e0", "first"), ("e1", "first"), ("e2", "second"), ("e3", "first")):
            store.epoch = epoch
            ops.append(("reserve", *store.reserve_call(req(hold_id, 1, budgets=(B,)), reclaim_first=True)))
        return ops

    for store in stores[0].store, stores[1]:
        await store.client.set(store.key("epoch"), "first")
    replies = await batch_as_alone(stores, calls)
    # an instance that holds another epoch than the store's marks the state lost: from then on
    # local budgets are refused, whoever asks
    assert [r[:2] for r in replies] == [[RESERVE_ALLOWED, b"budget:b"]] * 2 + [[RESERVE_REFUSED, b"state_lost"]] * 2


async def test_a_round_trip_carries_at_most_max_batch_operations(stores):
    ledger, _ = stores
    ledger.max_batch = 4
    decisions = await asyncio.gather(*(ledger.reserve(req(f"h{i}", 1)) for i in range(10)))
    assert all(d.allowed for d in decisions)
    assert (ledger.round_trips, ledger.operations) == (4, 10)  # 1 alone, then 4 + 4 + 1
    assert await ledger.store.open_holds() == 10


async def test_a_failed_round_trip_fails_every_operation_in_it_as_one_alone_fails(stores):
    ledger, _ = stores
    store = ledger.store
    original = store.run

    async def reply_lost(script, keys, args):
        if script is ledger.script:
            await original(script, keys, args)  # it ran, but its reply never came back
            raise StoreError("store unavailable: TimeoutError: reply lost")
        return await original(script, keys, args)

    store.run = reply_lost
    results = await asyncio.gather(*(ledger.reserve(req(f"h{i}", 1)) for i in range(4)), return_exceptions=True)
    assert results[0].allowed  # alone: answered
    errors = results[1:]
    assert all(isinstance(e, StoreError) and "reply lost" in str(e) for e in errors), errors
    assert len({id(e) for e in errors}) == 3  # each caller raises its own
    store.run = original
    # The ledger is idle again: the next call goes alone and is answered.
    assert (await ledger.reserve(req("after", 1))).allowed
    assert ledger.queued == 0


async def test_nothing_queues_behind_a_failing_store_while_a_round_trip_is_in_flight(stores):
    ledger, _ = stores
    store = ledger.store
    original = store.run
    entered, release = asyncio.Event(), asyncio.Event()

    async def stalled(script, keys, args):
        entered.set()
        await release.wait()
        return await original(script, keys, args)

    store.run = stalled
    first = asyncio.ensure_future(ledger.reserve(req("h0", 1)))
    await entered.wait()
    store._failing = True  # the last operation failed as an outage
    with pytest.raises(StoreError, match="the last operation failed"):
        async with asyncio.timeout(10):  # (queued, it would wait for the stalled one)
            await ledger.reserve(req("h1", 1))
    release.set()
    assert (await first).allowed
    assert await store.open_holds() == 1


async def test_a_queued_call_whose_caller_gave_up_is_never_sent(stores):
    ledger, _ = stores
    store = ledger.store
    original = store.run
    release = asyncio.Event()

    async def stalled(script, keys, args):
        await release.wait()
        return await original(script, keys, args)

    store.run = stalled
    first = asyncio.ensure_future(ledger.reserve(req("h0", 1)))
    gave_up = asyncio.ensure_future(ledger.reserve(req("h1", 1)))
    kept = asyncio.ensure_future(ledger.reserve(req("h2", 1)))
    await until_queued(ledger, 2)
    gave_up.cancel()
    release.set()
    assert (await first).allowed and (await kept).allowed
    assert gave_up.cancelled()
    holds = await store.client.hkeys(store.key("holds"))
    assert sorted(holds) == [b"h0", b"h2"]


@pytest.mark.parametrize("store_target", [pytest.param("fake", marks=pytest.mark.fake)], indirect=True)
async def test_a_reserve_issued_while_a_settle_is_in_flight_alone_goes_at_once(stores):
    # A lone call's settle ends after its answer went out: the next call's reserve must not wait
    # for it.
    ledger = BatchedLedger(stores[0].store)
    store = ledger.store
    assert (await store.reserve(req("before", 1))).allowed
    original, entered, release = store.run, asyncio.Event(), asyncio.Event()

    async def settle_stalls(script, keys, args):
        if not entered.is_set():
            entered.set()
            await release.wait()
        return await original(script, keys, args)

    store.run = settle_stalls
    settling = asyncio.ensure_future(ledger.settle("before", 1, NOW_MS))
    await entered.wait()
    async with asyncio.timeout(10):  # (queued, it would wait for the stalled settle)
        assert (await ledger.reserve(req("next", 1))).allowed  # answered, the settle still in flight
    assert not settling.done() and ledger.queued == 0
    release.set()
    assert await settling == 1
    assert (ledger.round_trips, ledger.operations) == (2, 2)


async def test_past_two_in_flight_alone_the_next_wait_and_go_as_one_batch(stores):
    ledger = BatchedLedger(stores[0].store)
    store = ledger.store
    original, release = store.run, asyncio.Event()
    stalled: list[object] = []

    async def lone_ones_stall(script, keys, args):
        if script is not ledger.script:
            stalled.append(script)
            await release.wait()
        return await original(script, keys, args)

    store.run = lone_ones_stall
    calls = [asyncio.ensure_future(ledger.reserve(req(f"h{i}", 1))) for i in range(5)]
    await until_queued(ledger, 3)
    assert len(stalled) == 2  # two alone, three wait
    release.set()
    assert all(d.allowed for d in await asyncio.gather(*calls))
    assert (ledger.round_trips, ledger.operations) == (3, 5)
    assert await store.open_holds() == 5


async def test_while_a_batch_is_in_flight_nothing_goes_alone(stores):
    ledger = BatchedLedger(stores[0].store)
    store = ledger.store
    original, lone_release, batch_in, batch_release = store.run, asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def stall(script, keys, args):
        if script is ledger.script:
            batch_in.set()
            await batch_release.wait()
        else:
            await lone_release.wait()
        return await original(script, keys, args)

    store.run = stall
    calls = [asyncio.ensure_future(ledger.reserve(req(f"h{i}", 1))) for i in range(4)]
    await until_queued(ledger, 2)
    lone_release.set()
    await batch_in.wait()  # the two alone answered; the two queued go as one batch
    later = asyncio.ensure_future(ledger.reserve(req("later", 1)))
    await until_queued(ledger, 1)  # nothing alone in flight, but a batch: it waits for the next
    batch_release.set()
    assert all(d.allowed for d in await asyncio.gather(*calls, later))
    assert (ledger.round_trips, ledger.operations) == (4, 5)  # 2 alone, a batch of 2, then 1


def test_concurrent_calls_whose_batch_reply_is_lost_each_fail_and_release_their_hold(make_proxy, up, store_target):
    """Through the proxy: calls queued behind one in flight go as one batch; its reply is lost,
    so each is refused 503 like a lone call whose reply is lost, never forwarded, and the retry
    loop releases the holds the batch did take."""
    p = make_proxy(KEYS)  # on_store_error: closed
    ledger, store = p.runtime.ledger, p.runtime.store
    ledger.max_alone = 1  # the others queue behind the first
    original = store.run
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def run(script, keys, args):
        if script is ledger.script:
            await original(script, keys, args)
            raise StoreError("store unavailable: TimeoutError: reply lost")
        if not first_in.is_set():
            first_in.set()
            await release.wait()  # the first reserve stays in flight until the others queued
        return await original(script, keys, args)

    async def calls() -> list[httpx.Response]:
        store.run = run
        transport = httpx.ASGITransport(app=p.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:

            async def one() -> httpx.Response:
                return await client.post(
                    "/v1/openai/images/generations",
                    json={"model": "openai/gpt-image-1", "prompt": "a cat"},
                    headers={"Authorization": f"Bearer {KEY_A}", "X-Standin": "cost=0.01"},
                )

            sent = [asyncio.ensure_future(one()) for _ in range(4)]
            await first_in.wait()
            await until_queued(ledger, 3)
            release.set()
            answers = await asyncio.gather(*sent)
        store.run = original
        return answers

    answers = p.run(calls)
    assert sorted(r.status_code for r in answers) == [200, 503, 503, 503]
    assert {envelope(r)["type"] for r in answers if r.status_code == 503} == {"guard_unavailable"}
    assert len(up.generation_requests) == 1
    assert open_holds(p) == 3  # the batch ran: its holds are there, their calls never went up
    assert len(p.runtime.pending_settles) == 3
    p.run(p.runtime.settle_pending)
    assert open_holds(p) == 0 and not p.runtime.pending_settles


@pytest.mark.real
@pytest.mark.system
def test_under_load_each_round_trip_is_one_evalsha_for_the_whole_batch():
    """MONITOR-counted: 40 concurrent reserves, then their 40 settles, cost one EVALSHA per
    round trip: two alone, then the rest in batches of at most 32."""
    seen: list[dict] = []

    async def run(url: str) -> BatchedLedger:
        ledger = BatchedLedger(Store(redis.asyncio.Redis.from_url(url), "load"))
        await ledger.store.apply_snapshot(snap(remaining=LARGE))
        # two alone and one batch of each kind first: every script is loaded before MONITOR
        await asyncio.gather(*(ledger.reserve(req(f"w{i}", 1, budgets=(B,))) for i in range(4)))
        await asyncio.gather(*(ledger.settle(f"w{i}", 0, NOW_MS) for i in range(4)))
        ready = threading.Event()
        thread = threading.Thread(target=watch, args=(url, seen, ready), daemon=True)
        thread.start()
        assert ready.wait(10)
        ledger.round_trips = ledger.operations = 0
        decisions = await asyncio.gather(*(ledger.reserve(req(f"h{i}", USD, budgets=(B,))) for i in range(40)))
        assert [d.allowed for d in decisions] == [True] * 5 + [False] * 35  # the budget of 5 USD
        charged = await asyncio.gather(*(ledger.settle(f"h{i}", 1, NOW_MS, 0, COUNTERS) for i in range(40)))
        assert charged == [1] * 5 + [None] * 35
        admin = redis.asyncio.Redis.from_url(url)
        await admin.echo(SENTINEL)
        await admin.aclose()
        thread.join(10)
        await ledger.aclose()
        return ledger

    with RedisServer() as server:
        ledger = asyncio.run(run(server.url))
    names = [c["command"].split()[0].upper() for c in seen if not c["command"].upper().startswith("HELLO")]
    # reserves: 2 alone, then 32 + 6; settles the same
    assert (ledger.round_trips, ledger.operations) == (8, 80)
    assert names == ["EVALSHA"] * 8, names
