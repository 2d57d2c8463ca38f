"""A store that forgets (restart without persistence, FLUSHALL, failover to an empty replica) is
noticed, never absorbed as if every budget were at $0 (docs/failure-modes.md). Fake and real Redis."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from proxy.cli import main
from proxy.commands.recover import from_access_log, from_seeds, recover
from tests.support.constants import KEY_B
from tests.support.policies import budget, key_entry, policy_yaml
from tests.support.proxies import envelope

POLICY = policy_yaml(keys=[key_entry(budgets=[budget("1.00", "day")]), key_entry("bob", token=KEY_B)])


def generate_within(p, seconds: float, **kw):
    """The first non-503 answer within `seconds` (the store recovers in the background)."""
    deadline = time.monotonic() + seconds
    while (r := p.generate(**kw)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    return r


def forget(p) -> None:
    p.run(p.runtime.store.client.flushdb)


def test_a_store_that_forgot_refuses_budgeted_calls_until_recovered(make_proxy, up):
    p = make_proxy(POLICY)
    assert p.generate(standin="cost=0.3").status_code == 200
    assert p.client.get("/-/readyz").status_code == 200
    forget(p)
    r = p.generate(standin="cost=0.3")
    assert r.status_code == 503 and envelope(r)["type"] == "guard_unavailable"
    assert "lost its local budget state" in envelope(r)["message"]
    assert up.generation_requests and len(up.generation_requests) == 1  # nothing more went up
    ready = p.client.get("/-/readyz")
    assert ready.status_code == 503
    assert any("local budget state was lost" in problem for problem in ready.json()["problems"])
    assert "spend_guard_store_state_lost 1.0" in p.client.get("/-/metrics").text
    # A key with no local budget only needs a fresh snapshot, which the missing one triggered.
    b = generate_within(p, 2.0, token=KEY_B, standin="cost=0.01")
    assert b.status_code == 200, b.text
    assert p.generate(standin="cost=0.3").status_code == 503  # still refused
    # The operator re-seeds alice's day budget with what she had spent.
    plan = from_seeds(p.runtime.policy, ["key:alice:day=0.30"], p.runtime.clock())
    assert p.run(recover, p.runtime.store, plan).written
    assert p.generate(standin="cost=0.3").status_code == 200  # 0.30 + 0.30 held... fits in 1.00
    assert p.generate(standin="cost=0.3").status_code == 200
    over = p.generate(standin="cost=0.3")
    assert over.status_code == 402, over.text  # 0.90 spent: the seed counted
    assert p.client.get("/-/readyz").status_code == 200


def test_a_new_store_is_not_mistaken_for_a_lost_one(make_proxy, up):
    p = make_proxy(POLICY)
    assert [p.generate(standin="cost=0.1").status_code for _ in range(3)] == [200] * 3
    assert p.client.get("/-/readyz").status_code == 200


def test_recover_from_the_access_log_sums_the_current_window(make_proxy):
    p = make_proxy(POLICY, refresh=False)
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    lines = [
        "2026-11-30 05:00:00 INFO spend_guard started",  # not an access line
        json.dumps({"time": stamp, "key": "alice", "cost_usd": "0.1200", "decision": "allowed"}),
        json.dumps({"time": stamp, "key": "alice", "cost_usd": "0.0300", "decision": "allowed"}),
        json.dumps({"time": "2000-01-01T00:00:00Z", "key": "alice", "cost_usd": "5.0000"}),  # old window
        json.dumps({"time": stamp, "key": "bob", "cost_usd": "1.0000"}),  # no local budget
        json.dumps({"time": stamp, "key": "alice", "cost_usd": None, "decision": "refused"}),
    ]
    plan = from_access_log(p.runtime.policy, lines, now)
    (budget,) = p.runtime.policy.keys[0].budgets
    assert [(hold.id, micros) for hold, micros in plan.counters] == [(budget.counter, 150_000)]
    assert plan.lines_used == 2


@pytest.mark.parametrize("store_target", [pytest.param("real", marks=pytest.mark.real)], indirect=True)
def test_store_recover_command(make_proxy, up, store_target):
    p = make_proxy(POLICY)
    assert p.generate(standin="cost=0.2").status_code == 200
    forget(p)
    assert p.generate(standin="cost=0.2").status_code == 503
    policy_path = p.app.settings.policy
    runner = CliRunner()
    bad = runner.invoke(main, ["store", "recover", "--policy", policy_path, "--redis-url", store_target.url])
    assert bad.exit_code == 2 and "exactly one of" in bad.output
    unknown = runner.invoke(
        main,
        ["store", "recover", "--policy", policy_path, "--redis-url", store_target.url, "--seed", "key:carol:day=1"],
    )
    assert unknown.exit_code == 2 and "key:alice:day" in unknown.output
    ok = runner.invoke(
        main, ["store", "recover", "--policy", policy_path, "--redis-url", store_target.url, "--accept-loss"]
    )
    assert ok.exit_code == 0, ok.output
    assert "recovered: the store's state was emptied" in ok.output
    assert generate_within(p, 2.0, standin="cost=0.2").status_code == 200


def test_lost_budget_state_is_refused_even_when_store_errors_fail_open(make_proxy, up):
    # Failing open forwards a call the store cannot answer; a store that answers "I forgot every
    # budget" is not that: a budget counted from $0 again is no budget at all.
    p = make_proxy(POLICY + "guard: {on_store_error: open}\n")
    assert p.generate(standin="cost=0.3").status_code == 200
    forget(p)
    r = p.generate(standin="cost=0.3")
    assert r.status_code == 503 and envelope(r)["type"] == "guard_unavailable"
    assert "lost its local budget state" in envelope(r)["message"]
    assert len(up.generation_requests) == 1  # nothing more went up
    metrics = p.client.get("/-/metrics").text.splitlines()
    assert not [line for line in metrics if line.startswith("spend_guard_unguarded_total{")]
