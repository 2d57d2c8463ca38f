"""Prices follow ImageRouter's: a price raised upstream is held within one models refresh, and
at once after a call cost more than its hold (counting the stand-in's /v2/models requests)."""

from __future__ import annotations

import logging
import time

from proxy.policy.model import default_policy
from tests.support.policies import alice_keys, policy_yaml
from tests.support.proxies import envelope

GPT_IMAGE = "openai/gpt-image-1"


def raise_price(up, model: str, usd: float) -> None:
    up.models[model]["price"] = {"min": usd, "average": usd, "max": usd}


def hold_of(proxy, model: str) -> int:
    return proxy.runtime.refresher.prices.hold_for(model)


def wait_for(done, timeout: float) -> float:
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - started


def test_by_default_a_raised_price_is_held_within_a_minute():
    """An earlier release fetched /v2/models every 3600 s: a $0.01 model raised to $0.50 took a
    $1.00 budget to $4.74 in 15 s."""
    account = default_policy().account
    assert account.models_refresh_s + account.refresh_s <= 60


def test_a_price_raised_mid_run_is_held_within_one_models_refresh(make_proxy, up):
    account = policy_yaml(account="{name: t, refresh_s: 0.2, models_refresh_s: 0.5, max_staleness_s: 7200}")
    p = make_proxy(account + alice_keys("[{limit_usd: 1, period: day}]"))
    assert hold_of(p, GPT_IMAGE) == 300_000
    raise_price(up, GPT_IMAGE, 3.20)
    took = wait_for(lambda: hold_of(p, GPT_IMAGE) == 3_200_000, 5)
    assert took < 0.5 + 0.2 + 1.0  # models_refresh_s + refresh_s, and slack for a loaded machine
    r = p.generate(model=GPT_IMAGE)
    assert r.status_code == 402 and envelope(r)["type"] == "spend_limit_exceeded"
    assert up.generation_requests == []


def test_a_call_charged_above_its_hold_fetches_the_prices_at_once(make_proxy, up, caplog):
    caplog.set_level(logging.WARNING)
    p = make_proxy(alice_keys("[{limit_usd: 10, period: day}]"))  # models_refresh_s: 3600
    fetched = up.models_calls
    assert p.generate(model=GPT_IMAGE, standin="cost=0.25").status_code == 200
    time.sleep(0.3)
    assert up.models_calls == fetched  # a call within its hold fetches nothing
    raise_price(up, GPT_IMAGE, 0.50)
    assert p.generate(model=GPT_IMAGE).status_code == 200  # held $0.30, charged $0.50
    assert any("UNDERHELD" in r.getMessage() for r in caplog.records)
    wait_for(lambda: up.models_calls == fetched + 1, 5)
    wait_for(lambda: hold_of(p, GPT_IMAGE) == 500_000, 5)
    # Underheld again straight away: no second fetch within PRICE_KICK_INTERVAL_S.
    raise_price(up, GPT_IMAGE, 0.70)
    assert p.generate(model=GPT_IMAGE).status_code == 200
    time.sleep(0.3)
    assert up.models_calls == fetched + 1
