"""Budgets keep their identity across policy edits (docs/policies.md): renaming a key (or a group with an
`id`) mid-window keeps what its budget counted; a reload that orphans spent money says so; and the
counters an older version kept under key names are carried over. Fake and real Redis."""

from __future__ import annotations

import logging

from proxy.guard.verdicts import budget_holds
from proxy.policy.load import load_policy
from proxy.policy.reload import budget_changes
from tests.support.constants import KEY_A
from tests.support.policies import budget, flow, key_entry, policy_yaml

ALICE = policy_yaml(
    groups=[flow(name="design", id="grp-7", budgets=[budget("10.00", "day")])],
    keys=[key_entry(group="design", budgets=[budget("0.50", "day")])],
)
RENAMED = (
    ALICE.replace("name: alice", "name: alice-renamed")
    .replace("name: design", "name: design-renamed")
    .replace("group: design", "group: design-renamed")
)


def test_renaming_a_key_mid_window_keeps_its_spent_budget(make_proxy, up, write_policy):
    p = make_proxy(ALICE)
    assert p.generate(model="google/gemini-2.5-flash", standin="cost=0.039").status_code == 200
    assert p.generate(standin="cost=0.2").status_code == 200  # 0.239 spent of 0.50
    write_policy(RENAMED)
    assert p.runtime.holder.reload()
    r = p.generate(standin="cost=0.2")  # a 0.30 hold: 0.239 + 0.30 > 0.50
    assert r.status_code == 402, r.text
    assert r.headers["x-spend-guard-scope"] == "budget:key:alice-renamed:day"
    assert "spent $0.2390" in r.json()["error"]["message"]
    me = p.client.get("/-/me", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    group = next(s for s in me["scopes"] if s["scope"] == "budget:group:design-renamed:day")
    assert group["spent_usd"] == "0.2390"  # the group had an id: its counter survived the rename too


def test_a_reload_logs_what_happens_to_counted_money(tmp_path):
    before = tmp_path / "before.yaml"
    before.write_text(ALICE)
    after = tmp_path / "after.yaml"
    after.write_text(RENAMED.replace("{limit_usd: 0.50, period: day}", "{limit_usd: 0.50, period: week}"))
    lines = budget_changes(load_policy(before), load_policy(after))
    assert lines == [
        "budget group:design:day is now group:design-renamed:day; it keeps counting what it counted",
        "budget key:alice:day is gone (removed, its period changed, or its key/group got a new id or secret): "
        "what it counted this window stays in the store but no longer limits anything",
        "budget key:alice-renamed:week is new: it counts from what its store counter holds ($0 if never used)",
    ]


def test_a_reload_that_orphans_a_budget_logs_a_warning(make_proxy, write_policy, caplog):
    p = make_proxy(ALICE)
    write_policy(ALICE.replace("    budgets: [{limit_usd: 0.50, period: day}]\n", ""))
    with caplog.at_level(logging.WARNING, logger="spend_guard"):
        assert p.runtime.holder.reload()
    assert any("budget key:alice:day is gone" in rec.getMessage() for rec in caplog.records)


def test_counters_kept_under_key_names_are_carried_over_at_start(make_proxy, up, store_target):
    # What an older version left: alice's day budget counted under its name, $0.45 spent.
    first = make_proxy(ALICE, refresh=False)
    (budget,) = first.runtime.policy.keys[0].budgets
    hold = budget_holds([budget], first.runtime.clock())[0]
    store = first.runtime.store
    first.run(store.client.delete, store.budget_key(budget.counter, hold.window_start_ms))
    first.run(store.client.set, store.budget_key("key:alice:day", hold.window_start_ms), 450_000)
    p = make_proxy(ALICE)  # a new instance starts
    r = p.generate(standin="cost=0.2")  # a 0.30 hold: 0.45 + 0.30 > 0.50
    assert r.status_code == 402 and "spent $0.4500" in r.json()["error"]["message"], r.text
