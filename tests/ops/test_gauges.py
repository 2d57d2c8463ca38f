"""Budget levels as Prometheus gauges (docs/monitoring.md): computed from the store when scraped,
so two proxies on one store report the same numbers `/-/me` shows, to the micro-dollar."""

from __future__ import annotations

import decimal

from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from tests.support.constants import KEY_A
from tests.support.policies import budget, flow, key_entry, policy_yaml
from tests.support.standin import key_row

POLICY = policy_yaml(
    groups=[flow(name="design", budgets=[budget("10.00", "month")])],
    keys=[
        key_entry(api_key_id="key-a", group="design", budgets=[budget("2.00", "day"), budget(50, None, mode="shadow")]),
    ],
)


def scrape(proxy) -> dict[tuple[str, str], decimal.Decimal]:
    text = proxy.client.get("/-/metrics").text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("spend_guard_scope_") or sample.name in (
                "spend_guard_account_credits_usd",
                "spend_guard_build_info",
            ):
                found[(sample.name, sample.labels.get("scope") or sample.labels.get("version", ""))] = decimal.Decimal(
                    repr(sample.value)
                )
    return found


def me(proxy) -> dict[str, dict]:
    body = proxy.client.get("/-/me", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    return {scope["scope"]: scope for scope in body["scopes"]}


def test_two_proxies_report_the_levels_me_shows_to_the_micro_dollar(make_proxy, up, store_target):
    up.key_rows = [key_row("key-a", "alice", spend_limit="5.00", period="week", period_start=None)]
    up.key_ids = {KEY_A: "key-a"}
    p1, p2 = make_proxy(POLICY), make_proxy(POLICY)
    assert p1.generate(standin="cost=0.123456").status_code == 200
    assert p2.generate(model="google/gemini-2.5-flash", standin="cost=0.039").status_code == 200
    first, second = scrape(p1), scrape(p2)
    assert first == second
    scopes = me(p1)
    mapping = {
        "account": "account",
        "budget:key:alice:day": "budget:key:alice:day",
        "budget:key:alice:lifetime": "budget:key:alice:lifetime",
        "budget:group:design:month": "budget:group:design:month",
        "key:alice:week": "key:week",  # the key's ImageRouter limit, by key name
    }
    for label, scope in mapping.items():
        for field in ("limit", "spent", "held", "remaining"):
            gauge = first[(f"spend_guard_scope_{field}_usd", label)]
            assert gauge == decimal.Decimal(scopes[scope][f"{field}_usd"]), (label, field)
    # the stand-in bills in $0.0001 steps, as ImageRouter does
    assert first[("spend_guard_scope_spent_usd", "budget:key:alice:day")] == decimal.Decimal("0.1625")
    assert first[("spend_guard_build_info", __version__)] == 1
    credits = first[("spend_guard_account_credits_usd", "")]  # as of the last snapshot
    account = scopes["account"]
    assert credits == decimal.Decimal(account["limit_usd"]) + decimal.Decimal(account["floor_usd"])


def test_a_hold_in_flight_shows_as_held(make_proxy, up):
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.served import wait_until

    p = make_proxy(POLICY)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(p.generate, standin="heartbeat=1,gate=g,cost=0.1")
        try:
            wait_until(lambda: p.runtime.flights, 10, "the call to reserve")
            levels = scrape(p)
            assert levels[("spend_guard_scope_held_usd", "budget:group:design:month")] == decimal.Decimal("0.3")
            assert levels[("spend_guard_scope_remaining_usd", "budget:key:alice:day")] == decimal.Decimal("1.7")
        finally:
            up.release("g")
        assert call.result().status_code == 200
    assert scrape(p)[("spend_guard_scope_held_usd", "budget:group:design:month")] == 0


def test_no_levels_while_the_store_is_unreadable(make_proxy, up, monkeypatch):
    from proxy.errors import StoreError

    p = make_proxy(POLICY)
    assert ("spend_guard_scope_limit_usd", "account") in scrape(p)

    async def down(*args, **kwargs):
        raise StoreError("store unavailable")

    monkeypatch.setattr(p.runtime.store, "levels", down)
    levels = scrape(p)
    assert not any(name.startswith("spend_guard_scope_") for name, _ in levels)
    assert p.client.get("/-/metrics").status_code == 200  # the scrape itself never fails


def test_charged_money_carries_the_model(make_proxy, up):
    p = make_proxy(POLICY)
    assert p.generate(model="google/gemini-2.5-flash", standin="cost=0.039").status_code == 200
    assert p.generate(standin="error").status_code == 200  # released: no charge, no series
    text = p.client.get("/-/metrics").text
    assert 'spend_guard_charged_usd_total{model="google/gemini-2.5-flash"} 0.039' in text
    assert 'spend_guard_charged_usd_total{model="openai/gpt-image-1"}' not in text
