"""Routes the policy does not list: a POST (or PUT, PATCH, DELETE) to one is refused with 403 and
never reaches the upstream, unless `routes` lists it as free (forwarded, counted) or as a spending
kind (held and settled), or `guard.unknown_routes: pass` lets it through, counted and logged
(fake, real and embedded Redis)."""

from __future__ import annotations

import json
import logging

import pytest

from tests.support.constants import KEY_A
from tests.support.policies import alice_keys
from tests.support.proxies import envelope, open_holds, spent

UNKNOWN = ("/v1/responses", "/v1/openai/images/variations", "/v1/openai/audio/speech")
BUDGET = "[{limit_usd: 1, period: day}]"


def sample(proxy, name: str, **labels: str) -> float:
    return proxy.runtime.metrics.registry.get_sample_value(name, labels) or 0.0


def reached(up, path: str) -> list[str]:
    return [r.method for r in up.requests if r.path.casefold().rstrip("/") == path]


@pytest.mark.parametrize("path", UNKNOWN)
def test_a_post_to_an_unknown_route_is_refused_and_never_reaches_the_upstream(make_proxy, up, path):
    """An earlier release forwarded these unguarded, with no access line; ImageRouter has a branch
    adding a spending POST /v1/responses."""
    p = make_proxy(alice_keys(BUDGET))
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        body = {"model": "openai/gpt-image-1", "prompt": "a cat"}
        r = p.client.request(method, path, json=body, headers={"Authorization": f"Bearer {KEY_A}"})
        assert r.status_code == 403, (method, r.text)
        assert envelope(r) == {
            "message": f"{method} {path} is not a route the spend guard knows, and unknown routes are refused: "
            "list it in the policy's routes (kind: free, or its spending kind).",
            "type": "policy_violation",
        }
        assert r.headers["x-spend-guard-scope"] == "policy"
    # Any spelling of it too.
    assert p.client.post(path.upper() + "/", json={"model": "m"}).status_code == 403
    assert reached(up, path) == [] and up.charged_micros == 0
    # Reading stays a passthrough.
    for method in ("GET", "HEAD", "OPTIONS"):
        assert p.client.request(method, path).status_code == 404  # the stand-in's own answer
    assert reached(up, path) == ["GET", "HEAD", "OPTIONS"]


def test_a_refused_unknown_route_is_logged_and_counted(make_proxy, up, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(alice_keys(BUDGET))
    assert p.client.post("/v1/openai/audio/speech", json={"model": "tts-1"}).status_code == 403
    line = [json.loads(r.getMessage()) for r in caplog.records if r.name == "spend_guard.access"][-1]
    assert (line["decision"], line["scope"], line["route"]) == ("refused", "policy", "/v1/openai/audio/speech")
    assert sample(p, "spend_guard_decisions_total", outcome="refused", scope="policy", key="unknown") == 1


def test_a_listed_free_route_passes_and_is_counted(make_proxy, up):
    p = make_proxy(alice_keys(BUDGET) + "routes:\n  - {path: /v1/openai/audio/speech, kind: free}\n")
    for _ in range(2):
        r = p.client.post("/V1/openai/audio/speech/", json={"model": "tts-1"}, headers={"X-Standin": "echo"})
        assert r.status_code == 200 and r.json()["path"] == "/V1/openai/audio/speech/"
    assert sample(p, "spend_guard_free_route_requests_total", route="/v1/openai/audio/speech") == 2
    assert sample(p, "spend_guard_unguarded_total", reason="unknown_route") == 0
    # Only the listed path: its neighbours are still refused.
    assert p.client.post("/v1/openai/audio/speech/x", json={}).status_code == 403
    assert open_holds(p) == 0


def test_imagerouter_s_own_key_check_is_free_by_default(make_proxy, up):
    # POST /v1/auth/test spends nothing (ImageRouter's authRoutes): integrations call it to check a key.
    p = make_proxy(alice_keys(BUDGET))
    r = p.client.post("/v1/auth/test", headers={"Authorization": f"Bearer {KEY_A}", "X-Standin": "echo"})
    assert r.status_code == 200 and r.json()["method"] == "POST"
    assert sample(p, "spend_guard_free_route_requests_total", route="/v1/auth/test") == 1
    # Disabled, it is as if unlisted.
    q = make_proxy(alice_keys(BUDGET) + "routes:\n  - {path: /v1/auth/test, kind: free, enabled: false}\n")
    assert q.client.post("/v1/auth/test", headers={"X-Standin": "echo"}).status_code == 403


def test_unknown_routes_pass_when_the_policy_says_so_counted_and_logged(make_proxy, up, caplog):
    caplog.set_level(logging.WARNING, logger="spend_guard.guard")
    p = make_proxy(alice_keys(BUDGET) + "guard: {unknown_routes: pass}\n")
    r = p.client.post("/v1/openai/images/variations", json={"model": "m"}, headers={"X-Standin": "echo"})
    assert r.status_code == 200 and r.json()["path"] == "/v1/openai/images/variations"
    assert sample(p, "spend_guard_unguarded_total", reason="unknown_route") == 1
    assert any(
        "UNGUARDED: forwarding POST /v1/openai/images/variations without a hold" in rec.getMessage()
        for rec in caplog.records
    )


def test_a_listed_new_spending_route_is_held_and_settled(make_proxy, up):
    routes = "routes:\n  - {path: /v1/responses, kind: image}\n"
    p = make_proxy(alice_keys(BUDGET) + routes)
    r = p.generate(path="/v1/responses", standin="cost=0.25")
    assert r.status_code == 200
    assert spent(p, "budget:key:alice:day") == "0.2500" and open_holds(p) == 0
    # Held at the model's maximum ($0.30) before it goes up: past the budget, refused.
    for _ in range(2):
        p.generate(path="/v1/responses", standin="cost=0.25")
    r = p.generate(path="/v1/responses", standin="cost=0.25")
    assert r.status_code == 402 and envelope(r)["type"] == "spend_limit_exceeded"
    assert len(reached(up, "/v1/responses")) == 3


def test_global_shadow_mode_passes_unknown_routes_counted(make_proxy, up):
    p = make_proxy(alice_keys(BUDGET) + "mode: shadow\n")
    r = p.client.post("/v1/responses", json={"model": "m"}, headers={"X-Standin": "echo"})
    assert r.status_code == 200 and r.json()["path"] == "/v1/responses"
    assert sample(p, "spend_guard_unguarded_total", reason="unknown_route") == 1
