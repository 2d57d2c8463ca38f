"""A model name the price table does not list is priced and matched as what it runs, against a
stand-in that resolves ImageRouter's own aliases (`MODEL_ALIASES`) which `/v2/models` does not
list: a known alias is priced as its target and `deny`/`allow` see both names; any other unlisted
name is held at the dearest price of its route kind, never at `default_hold_usd` below it
(fake, real and embedded Redis)."""

from __future__ import annotations

import json
import logging
from decimal import Decimal

from tests.support.constants import KEY_A
from tests.support.policies import alice_keys
from tests.support.proxies import envelope, open_holds, spent

VIDEO = "/v1/openai/videos/generations"


def access_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "spend_guard.access"]


def test_an_alias_of_a_denied_model_is_refused(make_proxy, up):
    """An earlier release: with deny ["kling/*"], kwaivgi/kling-2.1-master got 200 and ran kling-2.1-master
    for $2.80 on a $1/day budget (held $0.50 as an unknown model)."""
    assert "kwaivgi/kling-2.1-master" not in json.dumps(up.models)  # /v2/models does not list it
    p = make_proxy(alice_keys("[{limit_usd: 1, period: day}]") + "models: {deny: ['kling/*']}\n")
    r = p.generate(model="kwaivgi/kling-2.1-master", path=VIDEO, standin="cost=2.80")
    assert r.status_code == 403 and envelope(r)["type"] == "policy_violation"
    assert envelope(r)["message"] == "Model 'kling/kling-2.1-master' is not allowed by policy for any key."
    assert up.generation_requests == [] and up.charged_micros == 0


def test_a_rule_names_a_model_by_any_of_its_names(make_proxy, up):
    # Denied by an alias's spelling, the model is refused under its own id and its other aliases.
    p = make_proxy(alice_keys("[{limit_usd: 10, period: day}]") + "models: {deny: ['kwaivgi/kling-*']}\n")
    for name in ("kling/kling-2.1-master", "kwaivgi/kling-2.1-master"):
        r = p.generate(model=name, path=VIDEO)
        assert r.status_code == 403 and envelope(r)["type"] == "policy_violation"
    # Allowed by one spelling, it runs under any other.
    q = make_proxy(alice_keys("[{limit_usd: 10, period: day}]") + "models: {allow: ['gemini-2.5-flash-image']}\n")
    assert q.generate(model="google/gemini-2.5-flash", standin="cost=0.039").status_code == 200
    assert q.generate(model="openai/gpt-image-1").status_code == 403
    assert len(up.generation_requests) == 1


def test_a_known_alias_is_priced_and_charged_as_its_target(make_proxy, up, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(alice_keys("[{limit_usd: 10, period: day}]") + "guard: {unknown_models: reject}\n")
    r = p.generate(model="kwaivgi/kling-2.1-master", path=VIDEO)
    assert r.status_code == 200
    line = access_lines(caplog)[-1]
    assert (line["model"], line["hold_usd"], line["cost_usd"]) == ("kling/kling-2.1-master", "2.8000", "1.4000")
    assert up.charged_by_key[up.fingerprint(KEY_A)] == 1_400_000  # the stand-in ran the target
    assert spent(p, "budget:key:alice:day") == "1.4000"
    assert open_holds(p) == 0


def test_an_unlisted_model_is_held_at_the_dearest_price_of_its_route_kind(make_proxy, up, caplog):
    """An earlier release held an alias the guard could not resolve at default_hold_usd ($0.50), below the
    model it ran: a $1/day budget let a $1.60 veo call through."""
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    up.unlisted_aliases.update({"vendor/veo-next": "google/veo-3.1", "vendor/image-next": "test/test"})
    p = make_proxy(alice_keys("[{limit_usd: 1, period: day}]"))
    r = p.generate(model="vendor/veo-next", path=VIDEO)
    assert r.status_code == 402 and envelope(r)["type"] == "spend_limit_exceeded"
    assert up.generation_requests == []
    q = make_proxy(alice_keys("[{limit_usd: 10, period: day}]"))
    assert q.generate(model="vendor/veo-next", path=VIDEO).status_code == 200
    assert access_lines(caplog)[-1]["hold_usd"] == "3.2000"  # google/veo-3.1, the dearest video model
    assert up.charged_by_key[up.fingerprint(KEY_A)] == 1_600_000 <= 3_200_000
    # An image call holds the dearest image price, or default_hold_usd where that is more.
    assert q.generate(model="vendor/image-next", standin="cost=0").status_code == 200
    assert access_lines(caplog)[-1]["hold_usd"] == "0.5000"
    cheap = make_proxy(alice_keys("[{limit_usd: 10, period: day}]") + "models: {default_hold_usd: 0.05}\n")
    assert cheap.generate(model="vendor/image-next", standin="cost=0").status_code == 200
    assert Decimal(access_lines(caplog)[-1]["hold_usd"]) == Decimal("0.30")  # openai/gpt-image-1


def test_an_allow_list_refuses_a_name_it_does_not_list_whatever_it_runs(make_proxy, up):
    up.unlisted_aliases["vendor/veo-next"] = "google/veo-3.1"
    p = make_proxy(alice_keys("[{limit_usd: 10, period: day}]") + "models: {allow: ['google/*']}\n")
    r = p.generate(model="vendor/veo-next", path=VIDEO)
    assert r.status_code == 403 and envelope(r)["type"] == "policy_violation"
    # A deny list cannot see what an alias it does not know runs: only reject or an allow list can.
    d = make_proxy(alice_keys("[{limit_usd: 10, period: day}]") + "models: {deny: ['google/*']}\n")
    assert d.generate(model="vendor/veo-next", path=VIDEO).status_code == 200
    r = make_proxy(
        alice_keys("[{limit_usd: 10, period: day}]") + "models: {deny: ['google/*']}\nguard: {unknown_models: reject}\n"
    ).generate(model="vendor/veo-next", path=VIDEO)
    assert r.status_code == 403
    assert envelope(r)["message"] == "Model 'vendor/veo-next' has no published price and unknown models are refused."
    assert len(up.generation_requests) == 1
