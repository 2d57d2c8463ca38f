"""Store integrity through the guard (docs/state.md): in-flight calls are not counted twice, a $0
model never takes the guard down, one bad deferred settle does not hold back the others, and
/-/readyz notices failing reserves. Fake and real Redis."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from proxy.runtime import Flight, Pending
from tests.support.constants import KEY_A, KEY_B
from tests.support.policies import KEYS, key_entry
from tests.support.proxies import envelope, open_holds
from tests.support.served import wait_until
from tests.support.standin import key_row


def test_calls_in_flight_are_not_counted_twice_after_a_refresh(make_proxy, up):
    """Key limit $1.00, three $0.30 calls in flight: the upstream's snapshot already holds their
    pre-charges, so the guard's own holds for them must not count against the key again."""
    up.key_rows = [key_row("key-a", "alice", spend_limit="1.00", period=None)]
    up.key_ids = {KEY_A: "key-a"}
    skew = [0.0]
    p = make_proxy(KEYS, clock=lambda: time.time() + skew[0])
    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(p.generate, standin="heartbeat=1,gate=g,cost=0.3") for _ in range(3)]
        try:
            flights = p.runtime.flights
            wait_until(lambda: len(flights) == 3 and all(f.started_ms for f in flights.values()), 10, "3 started")
            p.run(p.runtime.mark_started)
            skew[0] = 1.0  # the next credits fetch begins a second after the upstream answered
            p.refresh()  # the snapshot now says period_spend 0.90 (the pre-charges)
            r = p.generate(model="google/gemini-2.5-flash", standin="cost=0.039")
            assert r.status_code == 200, r.text  # was 402: "spent $0.90, held by calls in flight $0.90"
            over = p.generate(standin="cost=0.3")
            assert over.status_code == 402 and envelope(over)["type"] == "spend_limit_exceeded"
        finally:
            up.release("g")
        assert [c.result().status_code for c in calls] == [200] * 3
    assert open_holds(p) == 0
    # Nothing was let through past the key's limit: 3 x 0.30 + 0.039 reached the upstream.
    assert len(up.generation_requests) == 4  # the refused one never went up
    assert up.charged_by_key[up.fingerprint(KEY_A)] == 939_000


def test_a_free_model_call_then_paid_calls_keep_working(make_proxy, up):
    # A $0 call whose hold outlives its lease never blocks later calls: hold_ttl_s 4, a paid call,
    # a $0 call, 5 s later paid calls.
    skew = [0.0]
    p = make_proxy(KEYS + "guard: {hold_ttl_s: 4}\nupstream: {timeout_s: 3}\n", clock=lambda: time.time() + skew[0])
    assert p.generate(standin="cost=0.05").status_code == 200
    assert p.generate(model="test/test", standin="cost=0").status_code == 200
    skew[0] = 5.0  # any lease left behind has expired; the next reserve would reclaim it
    assert [p.generate(standin="cost=0.05").status_code for _ in range(3)] == [200] * 3
    assert p.client.get("/-/readyz").status_code == 200
    assert open_holds(p) == 0


def test_one_unsettleable_deferred_settle_does_not_hold_back_the_others(make_proxy, up):
    p = make_proxy(KEYS)
    store = p.runtime.store
    p.run(store.client.hset, store.key("holds"), "bad", "not|a|record")
    good = []
    for _i in range(3):
        r = p.generate(standin="cost=0.01")
        assert r.status_code == 200
    # Three holds whose settles were deferred, with an unreadable one queued first.
    for i in range(3):
        hold_id = f"h{i}"
        p.run(store.client.hset, store.key("holds"), hold_id, f"10000|{10**13}||0|")
        p.run(store.client.hincrby, store.key("held"), "acct", 10000)
        good.append(hold_id)
    p.runtime.pending_settles.update({"bad": Pending(5), **{h: Pending(10000) for h in good}})
    p.run(p.runtime.settle_pending)
    assert p.runtime.pending_settles == {}
    assert open_holds(p) == 0
    assert p.run(store.client.hexists, store.key("quarantine"), "bad")
    metrics = p.client.get("/-/metrics").text
    assert "spend_guard_quarantined_holds_total 1.0" in metrics


@pytest.mark.parametrize("store_target", [pytest.param("fake", marks=pytest.mark.fake)], indirect=True)
def test_readyz_is_unready_for_10_s_after_a_reserve_failed(make_proxy, up, store_target):
    now = [time.time()]
    p = make_proxy(KEYS, clock=lambda: now[0])
    assert p.client.get("/-/readyz").status_code == 200
    store_target.server.connected = False
    assert p.generate().status_code == 503
    store_target.server.connected = True  # Redis answers pings again, but the last reserve failed
    r = p.client.get("/-/readyz")
    assert r.status_code == 503
    assert any(problem.startswith("store: reserves are failing") for problem in r.json()["problems"])
    assert "127.0.0.1" not in r.text
    assert p.generate(standin="cost=0.01").status_code == 200
    now[0] += 9.9  # a success since does not end the 10 s: a flapping store stays unready
    assert p.client.get("/-/readyz").status_code == 503
    now[0] += 0.2
    assert p.client.get("/-/readyz").status_code == 200


TWO_KEYS = KEYS + "\n" + key_entry("bob", token=KEY_B, api_key_id="key-b")


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_an_unreadable_snapshot_row_disables_only_that_keys_upstream_scope(make_proxy, up, mode, caplog):
    bad = key_row("key-a", "alice", spend_limit="1.00", period="day")
    bad["spend_limit_period"] = "year"  # a period this proxy does not know yet
    up.key_rows = [bad, key_row("key-b", "bob", spend_limit="5.00", period="day")]
    p = make_proxy(TWO_KEYS + f"guard: {{on_store_error: {mode}}}\n")
    r = p.generate(standin="cost=0.01")
    if mode == "closed":
        assert r.status_code == 503 and envelope(r)["type"] == "guard_unavailable"
        assert "usage row for key 'alice' could not be read" in envelope(r)["message"]
        assert up.generation_requests == []
    else:
        assert r.status_code == 200  # forwarded, and counted as unguarded
        assert 'spend_guard_unguarded_total{reason="row_unreadable"} 1.0' in p.client.get("/-/metrics").text
    assert p.generate(token=KEY_B, standin="cost=0.01").status_code == 200
    assert "spend_guard_snapshot_rows_unreadable 1.0" in p.client.get("/-/metrics").text
    logged = [rec.getMessage() for rec in caplog.records if "a row is unreadable" in rec.getMessage()]
    assert len(logged) == 1 and "id:key-a" in logged[0] and "'year'" in logged[0]
    p.refresh()
    assert sum("a row is unreadable" in rec.getMessage() for rec in caplog.records) == 1  # logged once


def test_a_reclaimed_hold_is_logged_and_counted_as_charged(make_proxy, up, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    skew = [0.0]
    p = make_proxy(KEYS, clock=lambda: time.time() + skew[0])
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(p.generate, standin="heartbeat=1,gate=r,cost=0.05")
        try:
            wait_until(lambda: any(f.started_ms for f in p.runtime.flights.values()), 10, "the call to start")
            skew[0] = p.runtime.policy.guard.hold_ttl_s + 1  # its lease has run out
            assert p.generate(standin="cost=0.01").status_code == 200  # this reserve reclaims it
        finally:
            up.release("r")
        assert slow.result().status_code == 200
    metrics = p.client.get("/-/metrics").text
    assert "spend_guard_reclaimed_holds_total 1.0" in metrics
    assert 'spend_guard_usd_total{key="reclaimed",kind="charged"} 0.3' in metrics
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "spend_guard.access"]
    first = next(line for line in lines if line["hold_usd"] == "0.3000" and line["outcome"] == "reclaimed")
    assert first["cost_usd"] == "0.3000"  # what was charged, not null


@pytest.mark.parametrize(("precharged", "told"), [(True, 1234), (False, 0)])
def test_only_a_precharged_call_tells_the_store_when_it_started(make_proxy, precharged, told):
    """Text calls are billed when they end, not pre-charged: a snapshot fetched while one runs
    does not hold its charge, so its settle must not claim a start time the snapshot covers."""
    p = make_proxy(KEYS)
    seen = []

    async def settle(hold_id, cost, now_ms, started_ms=0, counters=()):
        seen.append(started_ms)
        return cost

    p.runtime.ledger.settle = settle
    flight = Flight("h", 300_000, "alice", started_ms=1234, precharged=precharged)
    assert p.run(p.runtime.settle, flight, 20_000) == 20_000
    assert seen == [told]


def test_a_startup_that_fails_halfway_closes_what_it_opened(up, store_target, write_policy, monkeypatch):
    import asyncio

    import proxy.app
    from proxy.app import create_app
    from proxy.policy.load import load_policy
    from proxy.settings import Settings

    closed = []
    real_factory = store_target.client

    def factory():
        client = real_factory()
        original = client.aclose

        async def aclose(*args, **kwargs):
            closed.append("redis")
            return await original(*args, **kwargs)

        client.aclose = aclose
        return client

    sessions = []
    real_session = proxy.app.create_session

    def session():
        made = real_session()
        sessions.append(made)
        return made

    async def broken_adopt(self, policy):
        raise RuntimeError("startup broke halfway")

    monkeypatch.setattr(proxy.app, "create_session", session)
    monkeypatch.setattr(proxy.app.SpendGuardApp, "_adopt_name_counters", broken_adopt)
    path = write_policy(KEYS)
    app = create_app(Settings(policy=str(path), upstream=up.url), policy=load_policy(path), redis_factory=factory)

    async def lifespan() -> list[dict]:
        inbox, sent = [{"type": "lifespan.startup"}], []

        async def receive():
            return inbox.pop(0)

        async def send(message):
            sent.append(message)

        await app({"type": "lifespan"}, receive, send)
        return sent

    sent = asyncio.run(lifespan())
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "startup broke halfway" in sent[0]["message"]
    assert closed == ["redis"]
    assert sessions and sessions[0].closed
    assert not app.tasks and app.guard is None
