"""Money-path behaviours no other test pinned, found by mutation testing: each test here fails on
a mutant of the money path that the rest of the suite let live. Fake and real Redis."""

from __future__ import annotations

import pytest

from tests.support.constants import KEY_A
from tests.support.policies import budget, entry, key_entry, policy_yaml
from tests.support.proxies import envelope, open_holds, spent
from tests.support.standin import key_row

GROUPED = policy_yaml(
    groups=[entry("design", max_request_usd="0.20")],
    keys=[key_entry(api_key_id="key-a", group="design", budgets=[budget(50, None)])],
)


def test_a_hold_equal_to_a_per_request_cap_is_allowed(make_proxy, up):
    # gpt-image-1 holds exactly $0.30; a cap of $0.30 lets it through (`>` not `>=`).
    p = make_proxy(GROUPED.replace("max_request_usd: 0.20", "max_request_usd: 0.30"))
    assert p.generate(standin="cost=0.1").status_code == 200
    p2 = make_proxy(GROUPED.replace("max_request_usd: 0.20", "max_request_usd: 0.2999"))
    assert p2.generate().status_code == 403


def test_a_group_per_request_cap_is_enforced(make_proxy, up):
    p = make_proxy(GROUPED)
    r = p.generate()
    assert r.status_code == 403 and "group design" in envelope(r)["message"]
    assert "$0.3000" in envelope(r)["message"] and "$0.2000" in envelope(r)["message"]
    assert up.generation_requests == []


def test_a_key_per_request_cap_is_enforced(make_proxy, up):
    p = make_proxy(GROUPED.replace("    group: design\n", "    max_request_usd: 0.10\n"))
    r = p.generate()
    assert r.status_code == 403 and "key alice" in envelope(r)["message"]
    assert up.generation_requests == []
    assert p.generate(model="google/gemini-2.5-flash", standin="cost=0.039").status_code == 200


def test_a_route_disabled_by_policy_is_refused(make_proxy, up):
    p = make_proxy(GROUPED + "routes:\n  - {path: /v1/openai/videos/generations, enabled: false}\n")
    r = p.generate(model="google/veo-3.1", path="/v1/openai/videos/generations")
    assert r.status_code == 403 and envelope(r)["type"] == "policy_violation"
    assert "disabled" in envelope(r)["message"]
    assert up.generation_requests == []


def test_an_imagerouter_spend_limit_of_zero_refuses_every_paid_call(make_proxy, up):
    up.key_rows = [key_row("key-a", "alice", spend_limit="0.00", period="day")]
    p = make_proxy(GROUPED.replace("    group: design\n", ""))
    r = p.generate()
    assert r.status_code == 402 and envelope(r)["type"] == "spend_limit_exceeded"
    assert r.headers["x-spend-guard-scope"] == "key:day"
    assert up.generation_requests == []


def test_the_smallest_charge_the_upstream_reports_is_added_to_budgets(make_proxy, up):
    # $0.0001 is ImageRouter's unit; 1 micro-dollar itself is covered on the store in
    # tests/store/test_store_integrity.py (amounts 0, 1 and large through every script).
    p = make_proxy(GROUPED.replace("    group: design\n", ""))
    assert p.generate(model="test/test", standin="cost=0.0001").status_code == 200
    assert spent(p, "budget:key:alice:lifetime") == "0.0001"
    assert open_holds(p) == 0


def test_a_stale_snapshot_under_fail_open_forwards_and_counts(make_proxy, up):
    clock_s = [0.0]
    import time

    p = make_proxy(
        GROUPED.replace("    group: design\n", "") + "guard: {on_store_error: open}\n",
        clock=lambda: time.time() + clock_s[0],
    )
    clock_s[0] = 7201  # past max_staleness_s (7200 in the test policy base)
    r = p.generate(standin="cost=0.01")
    assert r.status_code == 200
    assert len(up.generation_requests) == 1
    metrics = p.client.get("/-/metrics").text
    assert 'spend_guard_unguarded_total{reason="stale"} 1.0' in metrics


def test_a_stale_snapshot_fails_closed_by_default(make_proxy, up):
    import time

    clock_s = [0.0]
    p = make_proxy(GROUPED.replace("    group: design\n", ""), clock=lambda: time.time() + clock_s[0])
    clock_s[0] = 7201
    r = p.generate(standin="cost=0.01")
    assert r.status_code == 503 and envelope(r)["type"] == "guard_unavailable"
    assert "old" in envelope(r)["message"]
    assert up.generation_requests == []


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_no_price_table_yet(make_proxy, up, mode):
    p = make_proxy(GROUPED.replace("    group: design\n", "") + f"guard: {{on_store_error: {mode}}}\n", refresh=False)
    p.runtime.refresher.prices = type(p.runtime.refresher.prices)()  # as if /v2/models never answered
    r = p.generate(standin="cost=0.01")
    if mode == "open":
        assert r.status_code == 200 and len(up.generation_requests) == 1
        assert 'spend_guard_unguarded_total{reason="no_prices"} 1.0' in p.client.get("/-/metrics").text
    else:
        assert r.status_code == 503 and "price table" in envelope(r)["message"]
        assert up.generation_requests == []


@pytest.mark.system
@pytest.mark.real
def test_calls_open_at_the_shutdown_deadline_are_charged_their_hold(tmp_path, up):
    import concurrent.futures
    import signal

    import redis

    from tests.support.served import RedisServer, ServedProxy, alice_policy, generate, wait_until
    from tests.support.served import spent as served_spent

    path = alice_policy(tmp_path, account="sd", budget_usd="50", shutdown_grace_s=1)
    with RedisServer() as server, ServedProxy(path, up.url, server.url) as proxy:
        assert served_spent(proxy) == "0.0000"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(generate, proxy.url, "heartbeat=1,gate=sd,cost=0.01")
            try:
                up.wait_for_streams(1)
                proxy.stop(signal.SIGTERM)  # the call is still open at the 1 s deadline
            finally:
                up.release("sd")
            call.exception()
        store = redis.Redis.from_url(server.url)
        wait_until(lambda: store.hlen("sg:{sd}:holds") == 0, 10, "no hold left")
        budget = [k for k in store.keys("sg:{sd}:b:*")]
        assert [int(store.get(k)) for k in budget] == [300_000]  # the whole hold, never left to its lease


def test_a_running_text_call_keeps_its_hold_on_the_key_limit_across_a_snapshot(make_proxy, up):
    # ImageRouter bills a text call when it ends, so a snapshot fetched while one runs does not
    # hold its charge: its hold must stay on the key's limit. $0.80 of chat in flight on a $1.00
    # key limit leaves no room for a $0.30 image, before and after that snapshot.
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.served import wait_until

    up.key_rows = [key_row("key-a", "alice", spend_limit="1.00", period="day")]
    skew = [0.0]
    policy = GROUPED.replace("    group: design\n", "") + "models: {overrides: {openai/gpt-4o: 0.80}}\n"
    p = make_proxy(policy, clock=lambda: time.time() + skew[0])
    chat = {
        "model": "openai/gpt-4o",
        "path": "/v1/openai/chat/completions",
        "messages": [{"role": "user", "content": "hi"}],
    }
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(p.generate, standin="heartbeat=1,gate=t,cost=0.70", **chat)
        try:
            wait_until(lambda: any(f.started_ms for f in p.runtime.flights.values()), 10, "the chat to start")
            p.run(p.runtime.mark_started)
            assert p.generate(standin="cost=0.30").status_code == 402
            skew[0] = 5.0  # a snapshot fetched well after the chat started
            p.refresh()
            r = p.generate(standin="cost=0.30")
            assert r.status_code == 402, r.text
            assert r.headers["x-spend-guard-scope"] == "key:day"
        finally:
            up.release("t")
        assert running.result().status_code == 200
    assert len(up.generation_requests) == 1  # only the chat reached ImageRouter


def test_a_snapshot_fetched_within_the_margin_of_a_start_does_not_contain_the_call(make_proxy, up):
    # ImageRouter's books may trail its answer by a moment: a snapshot fetched within 250 ms of
    # the start of a pre-charged call is not taken to hold its charge, so the hold stays on the
    # key's limit.
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.proxies import FakeClock
    from tests.support.served import wait_until

    up.key_rows = [key_row("key-a", "alice", spend_limit="0.50", period="day")]
    clock = FakeClock()
    p = make_proxy(GROUPED.replace("    group: design\n", ""), clock=clock)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(p.generate, standin="heartbeat=1,gate=m,cost=0.30")
        try:
            wait_until(lambda: any(f.started_ms for f in p.runtime.flights.values()), 10, "the call to start")
            p.run(p.runtime.mark_started)
            clock.now += 0.1
            p.refresh()
            r = p.generate(standin="cost=0.30")
            assert r.status_code == 402, r.text
            assert r.headers["x-spend-guard-scope"] == "key:day"
        finally:
            up.release("m")
        assert running.result().status_code == 200


def _image_calls(p, clock, n: int) -> list[int]:
    """`n` $0.30 image calls one after another, each followed by a credits snapshot fetched a
    second after it started (well past the containment margin)."""
    statuses = []
    for _ in range(n):
        statuses.append(p.generate(standin="cost=0.30").status_code)
        p.run(p.runtime.mark_started)
        clock.now += 1.0
        p.refresh()
    return statuses


def test_a_lagging_credits_endpoint_does_not_drop_the_charges_it_has_not_counted(make_proxy, up):
    # /v1/credits serves figures that do not hold the calls ImageRouter has already pre-charged:
    # a snapshot fetched well after a call started leaves its charge counted, since the key row's
    # period_spend (and the account's credit_usage) has not risen by it. Three $0.30 calls fit a
    # $1.00 key limit; the next three are refused.
    from tests.support.proxies import FakeClock

    up.credits_lag_s = 3600.0
    up.key_rows = [key_row("key-a", "alice", spend_limit="1.00", period="day")]
    up.key_ids = {KEY_A: "key-a"}
    clock = FakeClock()
    p = make_proxy(GROUPED.replace("    group: design\n", ""), clock=clock)
    assert _image_calls(p, clock, 6) == [200, 200, 200, 402, 402, 402]
    assert up.charged_micros == 900_000
    # Once the endpoint catches up, the charges leave and count once, in its figures: $0.10 is left.
    up.credits_lag_s = 0.0
    clock.now += 1.0
    p.refresh()
    assert spent(p, "key:day") == "0.9000"
    assert p.generate(standin="cost=0.30").status_code == 402
    assert p.generate(model="google/gemini-2.5-flash", standin="cost=0.039").status_code == 200


def test_a_snapshot_that_holds_the_pre_charges_drops_them_so_they_count_once(make_proxy, up):
    # The usual case: each snapshot holds the calls' pre-charges, so the guard forgets its own
    # charges and the key row's period_spend alone counts them; the fourth $0.30 call is refused.
    from tests.support.proxies import FakeClock

    up.key_rows = [key_row("key-a", "alice", spend_limit="1.00", period="day")]
    up.key_ids = {KEY_A: "key-a"}
    clock = FakeClock()
    p = make_proxy(GROUPED.replace("    group: design\n", ""), clock=clock)
    assert _image_calls(p, clock, 5) == [200, 200, 200, 402, 402]
    assert spent(p, "key:day") == "0.9000"
    assert p.generate(model="google/gemini-2.5-flash", standin="cost=0.039").status_code == 200


@pytest.mark.parametrize(("cost", "charged"), [("1000000", "1000000.0000"), ("1000000.5", "1000000.0000")])
def test_a_reported_cost_is_charged_up_to_one_million_dollars_a_call(make_proxy, up, cost, charged):
    up.credits_remaining_micros = 10**15  # a billion dollars of credits: only the clamp decides
    p = make_proxy(GROUPED.replace("    group: design\n", ""))
    assert p.generate(standin=f"cost={cost}").status_code == 200
    assert spent(p, "budget:key:alice:lifetime") == charged


def test_a_denied_model_is_refused_also_when_it_would_go_up_unpriced(make_proxy, up):
    # Without a price table, on_store_error: open forwards a call without a hold; a model the
    # policy denies is still refused, and nothing is counted as unguarded.
    policy = GROUPED.replace("    group: design\n", "") + "guard: {on_store_error: open}\nmodels: {deny: [openai/*]}\n"
    p = make_proxy(policy, refresh=False)
    p.runtime.refresher.prices = type(p.runtime.refresher.prices)()  # as if /v2/models never answered
    r = p.generate(standin="cost=0.01")
    assert r.status_code == 403 and envelope(r)["type"] == "policy_violation"
    assert up.generation_requests == []
    metrics = p.client.get("/-/metrics").text.splitlines()
    assert not [line for line in metrics if line.startswith("spend_guard_unguarded_total{")]
