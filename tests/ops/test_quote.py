"""`/-/quote`: what a call would hold, asked with the caller's bearer token before it is sent; the
answer is the hold the guard then takes, for every route kind (docs/operations.md#endpoints)."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from tests.guard.test_calculated_prices import multipart
from tests.guard.test_observed import AUTH, BUDGET, IMAGES, OBSERVED, VIDEOS, call, held, last_access, micros
from tests.support.constants import KEY_A
from tests.support.policies import alice_keys


@pytest.fixture
def tiered(up):
    up.price_by_request()
    return up


def quote(p, token: str = KEY_A, method: str = "GET", **params: object):
    headers = {"Authorization": f"Bearer {token}"}
    if method == "POST":
        route = params.pop("route", None)
        query = {"route": route} if route else {}
        return p.client.post("/-/quote", params=query, json=params, headers=headers)
    return p.client.get("/-/quote", params=params, headers=headers)


@pytest.mark.parametrize(
    ("model", "path", "fields"),
    [
        ("openai/gpt-image-1", IMAGES, {"quality": "low", "size": "1536x1024"}),
        ("openai/sora-2", VIDEOS, {"seconds": "8"}),
        ("google/veo-3.1", VIDEOS, {"seconds": "6"}),
        ("tencent/hunyuan-video-1.5", VIDEOS, {"seconds": "8", "size": "1280x720"}),
    ],
)
def test_a_quote_is_the_hold_the_guard_then_takes(make_proxy, tiered, caplog, model, path, fields):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(alice_keys("[{limit_usd: 50, period: day}]") + OBSERVED)
    for method in ("GET", "POST", "GET", "POST", "GET"):  # across the warm-up and after it
        answer = quote(p, method=method, model=model, **fields)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        hold, basis, _ = held(p, caplog, model, path, **fields)
        assert (micros(body["hold_usd"]), body["basis"]) == (hold, basis)
        assert body["route"] == path and body["signature"]["model"] == model
    assert body["basis"] == "observed" and body["observations"] == 3  # a cost no higher is not written again
    assert body["remaining_scope"] == "budget:key:alice:day" and body["fits"] is True


def test_a_posted_body_is_read_as_the_guard_reads_it_compressed_or_multipart(make_proxy, tiered, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(BUDGET + OBSERVED)
    body = gzip.compress(json.dumps({"model": "runware/Flux-2-Dev-Turbo", "size": "2048x2048"}).encode())
    headers = {**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    answer = p.client.post("/-/quote", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert p.client.post(IMAGES, content=body, headers=headers).status_code == 200
    assert last_access(caplog)["hold_usd"] == answer.json()["hold_usd"] == "0.0961"
    form, ctype = multipart({"model": "runware/Flux-2-Dev-Turbo", "size": "2048x2048"}, 1)
    headers = {**AUTH, "Content-Type": ctype}
    answer = p.client.post("/-/quote?route=/v1/openai/images/edits", content=form, headers=headers).json()
    assert p.client.post("/v1/openai/images/edits", content=form, headers=headers).status_code == 200
    assert answer["signature"]["input_images"] == 1
    assert last_access(caplog)["hold_usd"] == answer["hold_usd"]
    bad = p.client.post("/-/quote", content=b"{", headers={**AUTH, "Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_a_quote_for_a_text_call_is_its_token_priced_hold(make_proxy, up, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    rate = "{input_usd_per_mtok: 2.5, output_usd_per_mtok: 10, max_output_tokens: 1000}"
    rates = f"models: {{text_rates: {{'openai/gpt-4o': {rate}}}}}\n"
    p = make_proxy(BUDGET + rates)
    body = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    answer = p.client.post("/-/quote?route=text", json=body, headers=AUTH).json()
    assert answer["basis"] == "text_rate" and answer["kind"] == "text"
    response = p.client.post("/v1/openai/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200
    assert last_access(caplog)["hold_usd"] == answer["hold_usd"]


def test_a_quote_names_the_refusal_and_a_refusal_names_hold_and_basis(make_proxy, tiered, caplog):
    models = "models: {holds: observed, max_request_usd: 2, observed: {min_observations: 3}}\n"
    p = make_proxy(alice_keys("[{limit_usd: 0.10, period: day}]") + models)
    answer = quote(p, model="openai/gpt-image-1", quality="high").json()
    assert (answer["hold_usd"], answer["basis"], answer["fits"]) == ("0.3000", "max", False)
    assert answer["remaining_usd"] == "0.1000" and "refusal" not in answer
    refused = call(p, "openai/gpt-image-1", quality="high")
    assert refused.status_code == 402
    assert "this call holds up to $0.3000 (hold basis: max)" in refused.json()["error"]["message"]
    capped = quote(p, model="google/veo-3.1", seconds="60").json()
    assert capped["refusal"]["status"] == 403
    assert (
        "may cost up to $24.0001 (hold basis: max), above the per-request cap of $2.0000"
        in (capped["refusal"]["message"])
    )
    refused = call(p, "google/veo-3.1", VIDEOS, seconds="60")
    assert refused.status_code == 403 and refused.json()["error"]["message"] == capped["refusal"]["message"]


def test_a_token_the_policy_does_not_list_learns_nothing_of_the_account(make_proxy, tiered, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(BUDGET + OBSERVED)
    for _ in range(3):
        held(p, caplog, "openai/dall-e-3")
    mine = quote(p, model="openai/dall-e-3").json()
    theirs = quote(p, token="sk-made-up-" + "x" * 40, model="openai/dall-e-3").json()
    assert mine["observations"] == 3 and mine["remaining_usd"] is not None
    assert theirs["hold_usd"] == mine["hold_usd"] == "0.0440"
    assert (theirs["observations"], theirs["remaining_usd"], theirs["fits"]) == (None, None, None)


def test_a_quote_needs_a_bearer_token_and_a_known_route(make_proxy, up):
    p = make_proxy(BUDGET + "guard: {unknown_keys: reject}\n")
    assert p.client.get("/-/quote", params={"model": "openai/gpt-image-1"}).status_code == 401
    assert quote(p, token="sk-unknown", model="openai/gpt-image-1").status_code == 401
    bad = quote(p, model="openai/gpt-image-1", route="/v1/nowhere")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert quote(p, model="openai/gpt-image-1", images="17").status_code == 400
    assert quote(p).status_code == 400  # no model
