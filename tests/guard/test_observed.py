"""Observed holds (`models.holds: observed`): a call holds what its price signature has been
charged, once learned; an under-hold is charged in full, raises the signature at once and is
counted and alerted; and a price change in `/v2/models` forgets the model's learned values
(docs/how-it-works.md#observed-holds)."""

from __future__ import annotations

import json
import logging
from decimal import Decimal

import pytest

from proxy.guard.observed import observed_hold
from proxy.store.learned import Window
from tests.support.constants import KEY_A
from tests.support.policies import alice_keys
from tests.support.proxies import FakeClock
from tests.support.webhook_receiver import Receiver

IMAGES = "/v1/openai/images/generations"
VIDEOS = "/v1/openai/videos/generations"
AUTH = {"Authorization": f"Bearer {KEY_A}"}
BUDGET = alice_keys("[{limit_usd: 100, period: day}]")
OBSERVED = "models: {holds: observed, observed: {min_observations: 3, margin: 0.1}}\n"


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def last_access(caplog) -> dict:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "spend_guard.access"][-1]


def call(p, model: str, path: str = IMAGES, **fields: object):
    return p.client.post(path, json={"model": model, "prompt": "a cat", **fields}, headers=AUTH)


def held(p, caplog, model: str, path: str = IMAGES, **fields: object) -> tuple[int, str, int]:
    """(hold, basis, cost) of one successful call."""
    response = call(p, model, path, **fields)
    assert response.status_code == 200 and "error" not in response.json(), response.text
    line = last_access(caplog)
    return micros(line["hold_usd"]), line["hold_basis"], micros(line["cost_usd"])


@pytest.fixture
def tiered(up):
    up.price_by_request()
    return up


def test_a_signature_holds_its_price_max_until_learned_then_its_cost_with_the_margin(make_proxy, tiered, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(BUDGET + OBSERVED)
    warm = [held(p, caplog, "openai/gpt-image-1", quality="low") for _ in range(3)]
    assert warm == [(300_000, "max", 11_000)] * 3
    assert held(p, caplog, "openai/gpt-image-1", quality="low") == (12_100, "observed", 11_000)
    # another signature of the same model is not learned yet
    assert held(p, caplog, "openai/gpt-image-1", quality="medium") == (300_000, "max", 42_000)
    metrics = p.client.get("/-/metrics").text
    assert 'spend_guard_hold_to_cost_ratio_bucket{kind="image",le="1.1",model="openai/gpt-image-1"} 1.0' in metrics
    assert "spend_guard_underheld_total{" not in metrics


def test_video_seconds_make_their_own_signatures(make_proxy, tiered, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(BUDGET + OBSERVED)
    for _ in range(3):
        held(p, caplog, "openai/sora-2", VIDEOS, seconds=4)
    assert held(p, caplog, "openai/sora-2", VIDEOS, seconds="4") == (440_000, "observed", 400_000)
    hold, basis, cost = held(p, caplog, "openai/sora-2", VIDEOS, seconds=12)
    assert basis == "max" and hold >= cost == 1_200_000


def test_the_default_holds_price_max_and_learns_nothing(make_proxy, tiered, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(BUDGET)
    for _ in range(4):
        assert held(p, caplog, "openai/gpt-image-1", quality="low") == (300_000, "max", 11_000)
    assert p.run(p.runtime.store.client.keys, "*learned*") == []


def test_an_underhold_is_charged_in_full_counted_alerted_and_raises_the_signature_at_once(make_proxy, tiered, caplog):
    caplog.set_level(logging.INFO)
    with Receiver() as receiver:
        hooks = f'alerts: {{webhooks: [{{url: "{receiver.url}"}}]}}\n'
        p = make_proxy(hooks + BUDGET + OBSERVED)
        for _ in range(3):
            held(p, caplog, "openai/dall-e-3", quality="high")
        assert held(p, caplog, "openai/dall-e-3", quality="high") == (88_000, "observed", 80_000)
        tiered.price_by_request(factor=1.5)  # a rise /v2/models does not show
        assert held(p, caplog, "openai/dall-e-3", quality="high") == (88_000, "observed", 120_000)
        metrics = p.client.get("/-/metrics").text
        assert 'spend_guard_underheld_total{model="openai/dall-e-3"} 1.0' in metrics
        assert 'spend_guard_underheld_usd_total{model="openai/dall-e-3"} 0.032' in metrics
        events = [d.event for d in receiver.wait_for(1)]
        assert [e["type"] for e in events] == ["call.underheld"]
        # the next call holds at least the new cost (here the published maximum, which now fits
        # it): no second under-hold
        assert held(p, caplog, "openai/dall-e-3", quality="high") == (120_000, "observed", 120_000)
        assert 'spend_guard_underheld_total{model="openai/dall-e-3"} 1.0' in p.client.get("/-/metrics").text
        assert tiered.charged_by_key[tiered.fingerprint(KEY_A)] >= 80_000 * 3 + 80_000 + 120_000 * 2


def test_a_price_change_in_v2_models_forgets_the_models_learned_values(make_proxy, tiered, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(BUDGET + OBSERVED)
    for _ in range(3):
        held(p, caplog, "openai/dall-e-3")
    assert held(p, caplog, "openai/dall-e-3")[1] == "observed"
    with tiered.lock:
        tiered.models["openai/dall-e-3"]["price"]["max"] = 0.16
    p.refresh()
    assert held(p, caplog, "openai/dall-e-3") == (160_000, "max", 40_000)


def test_a_learned_hold_is_never_below_price_min(make_proxy, tiered, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(BUDGET + OBSERVED)
    for _ in range(3):
        held(p, caplog, "openai/dall-e-3", standin="")
    with tiered.lock:
        tiered.models["openai/dall-e-3"]["price"]["min"] = 0.05  # above what low quality costs: a new stamp
    p.refresh()
    for _ in range(3):
        held(p, caplog, "openai/dall-e-3")
    assert held(p, caplog, "openai/dall-e-3") == (50_000, "observed", 40_000)


@pytest.mark.parametrize(
    ("highest", "margin", "conservative", "minimum", "hold"),
    [
        (0, 0.1, 300_000, 0, 0),
        (1, 0.1, 300_000, 0, 100),  # rounded up to $0.0001
        (11_000, 0.1, 300_000, 0, 12_100),
        (11_000, 0.1, 300_000, 50_000, 50_000),  # never below price.min
        (290_000, 0.1, 300_000, 0, 300_000),  # never above the conservative hold ...
        (320_000, 0.1, 300_000, 0, 352_000),  # ... unless a charge exceeded it
        (10**12, 0.1, 300_000, 0, 11 * 10**11),
        (11_000, 0, 300_000, 0, 11_000),
    ],
)
def test_observed_hold_rules(highest, margin, conservative, minimum, hold):
    assert observed_hold(highest, margin, conservative, minimum) == hold


def test_proxies_sharing_a_store_learn_one_table_and_a_restart_keeps_it(make_proxy, tiered, store_target, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    first, second, third = (make_proxy(BUDGET + OBSERVED) for _ in range(3))
    for p in (first, second, third):  # one call each: three observations of one signature
        assert held(p, caplog, "openai/dall-e-3", quality="high")[1] == "max"
    assert held(second, caplog, "openai/dall-e-3", quality="high") == (88_000, "observed", 80_000)
    restarted = make_proxy(BUDGET + OBSERVED, init=False)
    assert held(restarted, caplog, "openai/dall-e-3", quality="high") == (88_000, "observed", 80_000)


def test_a_learned_signature_is_written_again_only_for_a_higher_cost_or_in_a_new_bucket(make_proxy, tiered, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    clock = FakeClock()
    p = make_proxy(BUDGET + OBSERVED, clock=clock)

    def observations() -> int:
        answer = p.client.get("/-/quote", params={"model": "openai/dall-e-3"}, headers=AUTH).json()
        return answer["observations"]

    for _ in range(5):
        held(p, caplog, "openai/dall-e-3")
    assert observations() == 3  # the store saw enough: the same cost again costs no round trip
    tiered.price_by_request(factor=1.5)
    assert held(p, caplog, "openai/dall-e-3") == (44_000, "observed", 60_000)
    assert observations() == 4  # a higher cost is written at once
    clock.now += Window.of_days(7).bucket_ms / 1000
    p.refresh()
    held(p, caplog, "openai/dall-e-3")
    assert observations() == 5  # and a new bucket of the window is written once
