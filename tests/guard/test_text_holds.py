"""Text routes hold a token-priced worst case (docs/text-holds.md), through the app on fake, real
and embedded Redis: the two overspends measured without text holds are stopped at the budget, the output bound
falls back to the rate's maximum and scales with `n`, a cut stream is charged its hold, a model
without a rate falls back to `text_hold_usd` (or is refused), and every settle tells the operator
how the hold compared with the bill."""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from decimal import Decimal

import httpx
import pytest

from proxy.guard.pricing import INPUT_FRAMING_TOKENS
from proxy.runtime import Flight
from tests.support.constants import KEY_A, SHA_A
from tests.support.policies import alice_keys
from tests.support.proxies import envelope, open_holds, spent

CHAT, RESPONSES = "/v1/openai/chat/completions", "/v1/openai/responses"
RATES = """
models:
  text_hold_usd: 0.07
  text_rates:
    "openai/gpt-4o*":           {input_usd_per_mtok: 2.50, output_usd_per_mtok: 10.00, max_output_tokens: 16384}
    "anthropic/claude-haiku*":  {input_usd_per_mtok: 3.00, output_usd_per_mtok: 15.00, max_output_tokens: 16384}
    "openai/*":                 {input_usd_per_mtok: 15.00, output_usd_per_mtok: 75.00, max_output_tokens: 8192}
"""
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Write a long essay on budgets."},
]


def chat_body(model: str, **fields: object) -> bytes:
    return json.dumps({"model": model, "messages": MESSAGES, **fields}).encode()


def post(p, body: bytes, standin: str = "", path: str = CHAT):
    headers = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
    if standin:
        headers["X-Standin"] = standin
    return p.client.post(path, content=body, headers=headers)


def formula(body: bytes, input_usd: str, output_usd: str, output_tokens: int) -> int:
    """The text hold in decimal dollars, for a text-only body: (body bytes + framing) x input
    rate + output bound x output rate, rounded up to $0.0001; in micro-dollars."""
    usd = ((len(body) + INPUT_FRAMING_TOKENS) * Decimal(input_usd) + output_tokens * Decimal(output_usd)) / 1_000_000
    return math.ceil(usd * 10_000) * 100


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def access_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "spend_guard.access"]


def held(caplog) -> int:
    return micros(access_lines(caplog)[-1]["hold_usd"])


def finish_refused(calls: list[Future], refused: int) -> None:
    """Wait for the `refused` calls that never reached the upstream (the allowed ones wait at its
    gate): if more were let through, fewer finish and this times out."""
    finished = as_completed(calls, timeout=60)
    for _ in range(refused):
        next(finished)


# -- the overspends measured without text holds ------------------------------------------------


def test_twenty_concurrent_chats_costing_090_through_a_one_dollar_day_budget_let_one_through(make_proxy, up, caplog):
    """Without text holds: all 20 allowed, $18 spent. Each call may produce 90,000 tokens at $10/M: held
    $0.90 and a little input, so the $1 budget has room for one."""
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(RATES + alice_keys("[{limit_usd: 1.00, period: day}]"))
    body = chat_body("openai/gpt-4o", max_tokens=90_000)
    hold = formula(body, "2.50", "10.00", 90_000)
    assert 900_000 < hold < 1_000_000
    with ThreadPoolExecutor(20) as pool:
        calls = [pool.submit(post, p, body, "gate=g,cost=0.90") for _ in range(20)]
        try:
            finish_refused(calls, 19)
            up.wait_for_requests(1)
        finally:
            up.release("g")
        responses = [c.result() for c in calls]
    assert sorted(r.status_code for r in responses) == [200] + [402] * 19
    for r in responses:
        if r.status_code == 402:
            assert envelope(r)["type"] == "spend_limit_exceeded"
            assert r.headers["x-spend-guard-scope"] == "budget:key:alice:day"
    assert len(up.generation_requests) == 1
    assert up.charged_by_key[up.fingerprint(KEY_A)] == 900_000
    assert spent(p, "budget:key:alice:day") == "0.9000"
    assert {line["hold_usd"] for line in access_lines(caplog)} == {f"{Decimal(hold) / 1_000_000:.4f}"}
    assert open_holds(p) == 0


def test_ten_concurrent_streamed_chats_costing_020_against_050_a_day_let_two_through(make_proxy, up, caplog):
    """Without text holds: all 10 allowed, $2.00 spent. Each may stream 16,000 tokens at $15/M: held
    $0.24 and a little input, so the $0.50 budget has room for two."""
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(RATES + alice_keys("[{limit_usd: 0.50, period: day}]"))
    body = chat_body("anthropic/claude-haiku-4.5", stream=True, max_tokens=16_000)
    hold = formula(body, "3.00", "15.00", 16_000)
    assert 200_000 < hold <= 250_000
    with ThreadPoolExecutor(10) as pool:
        calls = [pool.submit(post, p, body, "sse,gate=s,cost=0.20") for _ in range(10)]
        try:
            finish_refused(calls, 8)
            up.wait_for_requests(2)
        finally:
            up.release("s")
        responses = [c.result() for c in calls]
    assert sorted(r.status_code for r in responses) == [200] * 2 + [402] * 8
    assert all("data: [DONE]" in r.text for r in responses if r.status_code == 200)
    assert len(up.generation_requests) == 2
    assert up.charged_by_key[up.fingerprint(KEY_A)] == 400_000
    assert spent(p, "budget:key:alice:day") == "0.4000"
    assert held(caplog) == hold
    assert open_holds(p) == 0


# -- the bounds ------------------------------------------------------------------------------


def test_a_body_without_a_max_holds_the_rates_max_output_tokens(make_proxy, up, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    body = chat_body("openai/gpt-4o-mini")
    r = post(p, body, "cost=0.01")
    assert r.status_code == 200
    assert held(caplog) == formula(body, "2.50", "10.00", 16384) == 166_800
    assert r.headers["x-spend-guard-remaining"] == "9.8332"  # $10 less the hold, before the settle
    # The same call with a max of its own holds that max instead.
    capped = chat_body("openai/gpt-4o-mini", max_completion_tokens=100)
    assert post(p, capped, "cost=0.01").status_code == 200
    assert held(caplog) == formula(capped, "2.50", "10.00", 100) == 4_100
    assert spent(p, "budget:key:alice:day") == "0.0200"


def test_n_3_triples_the_output_bound(make_proxy, up, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    one, three = chat_body("openai/gpt-4o", max_tokens=10_000), chat_body("openai/gpt-4o", max_tokens=10_000, n=3)
    assert post(p, one, "cost=0.01").status_code == 200
    assert held(caplog) == formula(one, "2.50", "10.00", 10_000) == 103_000
    assert post(p, three, "cost=0.01").status_code == 200
    assert held(caplog) == formula(three, "2.50", "10.00", 30_000) == 303_100


def test_responses_is_bounded_by_max_output_tokens(make_proxy, up, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    body = json.dumps({"model": "openai/gpt-4o", "input": "Summarise the budget.", "max_output_tokens": 2000}).encode()
    assert post(p, body, "cost=0.01", RESPONSES).status_code == 200
    assert held(caplog) == formula(body, "2.50", "10.00", 2000)
    # max_tokens is a chat field: a responses call that sends only it runs to the model's maximum.
    loose = json.dumps({"model": "openai/gpt-4o", "input": "Summarise the budget.", "max_tokens": 2000}).encode()
    assert post(p, loose, "cost=0.01", RESPONSES).status_code == 200
    assert held(caplog) == formula(loose, "2.50", "10.00", 16384)


def test_a_media_type_on_the_body_or_a_message_does_not_shrink_the_hold(make_proxy, up, caplog):
    """An earlier release: adding "type": "image" to a 216 KB chat body cut its hold from $3.2644 to $0.1742,
    so five calls put $16.32 on a $1/day budget. Only a content part's payload leaves the count."""
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    text = "Summarise this ledger line. " * 7_700
    plain = {"model": "openai/o3", "max_tokens": 1000, "messages": [{"role": "user", "content": text}]}
    assert 210_000 < len(json.dumps(plain)) < 220_000
    strays = [{**plain, "type": "image"}, {**plain, "messages": [{"role": "user", "type": "image", "content": text}]}]
    holds = []
    for body in [json.dumps(plain).encode()] + [json.dumps(stray).encode() for stray in strays]:
        assert post(p, body, "cost=0.01").status_code == 200
        assert held(caplog) == formula(body, "15.00", "75.00", 1000)
        holds.append(held(caplog))
    assert holds[0] == 3_325_700 and holds[1] >= holds[0] and holds[2] >= holds[0]
    # So a $1 budget refuses the call outright instead of letting five through.
    q = make_proxy(RATES + alice_keys("[{limit_usd: 1, period: day}]"))
    r = post(q, json.dumps(strays[0]).encode(), "cost=3.00")
    assert r.status_code == 402 and envelope(r)["type"] == "spend_limit_exceeded"


def test_a_thinking_budget_is_held_as_output(make_proxy, up, caplog):
    """An earlier release: `max_tokens: 1` beside a 32,000-token thinking budget held $0.0179."""
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    body = chat_body("anthropic/claude-haiku-4.5", max_tokens=1, thinking={"type": "enabled", "budget_tokens": 32_000})
    assert post(p, body, "cost=0.01").status_code == 200
    assert held(caplog) == formula(body, "3.00", "15.00", 32_001) == 483_900
    body = chat_body("openai/gpt-4o", max_tokens=100, reasoning={"max_tokens": 4000})
    assert post(p, body, "cost=0.01").status_code == 200
    assert held(caplog) == formula(body, "2.50", "10.00", 4100)


def test_n_as_a_hex_string_holds_sixteen_outputs(make_proxy, up, caplog):
    """An earlier release: `n: "0x10"` was held as one output; Number("0x10") is 16."""
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    body = chat_body("openai/gpt-4o", max_tokens=1000, n="0x10")
    assert post(p, body, "cost=0.01").status_code == 200
    assert held(caplog) == formula(body, "2.50", "10.00", 16_000)


def test_a_maximum_sent_as_a_string_holds_at_least_the_rate_maximum(make_proxy, up, caplog):
    # ImageRouter reads "12" as 12, but a provider behind it may ignore a maximum that is not a
    # number: the hold covers the model's own maximum too.
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    loose = chat_body("openai/gpt-4o", max_tokens="12")
    assert post(p, loose, "cost=0.01").status_code == 200
    assert held(caplog) == formula(loose, "2.50", "10.00", 16384)
    caplog.clear()
    exact = chat_body("openai/gpt-4o", max_tokens=12)
    assert post(p, exact, "cost=0.01").status_code == 200
    assert held(caplog) == formula(exact, "2.50", "10.00", 12)


def test_a_count_that_is_not_a_number_is_refused_in_the_envelope(make_proxy, up):
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    r = post(p, chat_body("openai/gpt-4o", max_tokens="1_000"), "cost=0.01")
    assert r.status_code == 400 and envelope(r)["type"] == "invalid_request_error"
    assert envelope(r)["message"] == (
        "'max_tokens' is \"1_000\", not a finite number as ImageRouter reads one (JavaScript's Number()); "
        "send a JSON number."
    )
    assert up.generation_requests == []


def test_the_body_is_forwarded_byte_for_byte(make_proxy, up):
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    body = (
        b'{ "model" : "openai/gpt-4o",\n "max_tokens": 5, "max_tokens": 1.0e3, "n": "2",'
        b'\t"messages": [{"role":"user","content":"h\\u00e9"}] }'
    )
    assert post(p, body, "cost=0.01").status_code == 200
    assert up.generation_requests[-1].body == body


# -- everything else applies unchanged -------------------------------------------------------


def test_a_stream_cut_before_its_final_event_is_charged_its_hold(make_proxy, up, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    body = chat_body("openai/gpt-4o", stream=True, max_tokens=4000)
    try:
        text = post(p, body, "sse,cut").text
    except httpx.HTTPError:  # the client may see the cut as a broken connection
        text = ""
    assert '"cost"' not in text
    hold = formula(body, "2.50", "10.00", 4000)
    assert held(caplog) == hold and access_lines(caplog)[-1]["cost_usd"] == f"{Decimal(hold) / 1_000_000:.4f}"
    assert micros(spent(p, "budget:key:alice:day")) == hold
    assert open_holds(p) == 0


def test_a_stream_that_fails_after_content_is_charged_its_hold(make_proxy, up, caplog):
    """An earlier release released the hold of a stream whose provider failed after sending content (charged
    $0.0000), while the upstream billed what was produced."""
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    body = chat_body("openai/gpt-4o", stream=True, max_tokens=4000)
    r = post(p, body, "sse,error,cost=0.03")
    assert r.status_code == 200 and '"content": "h"' in r.text and '"error"' in r.text
    hold = formula(body, "2.50", "10.00", 4000)
    assert up.charged_by_key[up.fingerprint(KEY_A)] == 30_000 <= hold
    assert access_lines(caplog)[-1]["cost_usd"] == f"{Decimal(hold) / 1_000_000:.4f}"
    assert micros(spent(p, "budget:key:alice:day")) == hold
    assert open_holds(p) == 0


def test_a_cost_in_an_early_event_is_not_the_bill(make_proxy, up, caplog):
    """An earlier release settled at a cost an early event carried when the final event had none."""
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    body = chat_body("openai/gpt-4o", stream=True, max_tokens=4000)
    r = post(p, body, "sse,earlycost=0.0001,cost=0.03")
    assert r.status_code == 200 and r.text.count('"cost"') == 1 and "data: [DONE]" in r.text
    hold = formula(body, "2.50", "10.00", 4000)
    assert up.charged_by_key[up.fingerprint(KEY_A)] == 30_000
    assert micros(spent(p, "budget:key:alice:day")) == hold
    assert open_holds(p) == 0


def test_a_model_matching_no_rate_holds_text_hold_usd(make_proxy, up, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    assert post(p, chat_body("mistral/large", max_tokens=10**6), "cost=0.01").status_code == 200
    assert held(caplog) == 70_000  # models.text_hold_usd, whatever the body asks for


def test_a_model_matching_no_rate_is_refused_under_unknown_models_reject(make_proxy, up):
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]") + "guard: {unknown_models: reject}\n")
    r = post(p, chat_body("mistral/large"), "cost=0.01")
    assert r.status_code == 403 and envelope(r)["type"] == "policy_violation"
    assert envelope(r)["message"] == (
        "Model 'mistral/large' matches no models.text_rates entry and unknown models are refused."
    )
    assert up.generation_requests == []
    assert post(p, chat_body("openai/gpt-4o", max_tokens=10), "cost=0.01").status_code == 200  # a rate: priced


def test_a_per_request_cap_catches_a_text_call(make_proxy, up):
    p = make_proxy(
        RATES.replace("models:\n", "models:\n  max_request_usd: 0.50\n") + alice_keys("[{limit_usd: 10, period: day}]")
    )
    r = post(p, chat_body("openai/gpt-4o", max_tokens=90_000), "cost=0.01")
    assert r.status_code == 403 and envelope(r)["type"] == "policy_violation"
    assert "above the per-request cap of $0.5000 (models.max_request_usd)" in envelope(r)["message"]
    assert up.generation_requests == []
    assert post(p, chat_body("openai/gpt-4o", max_tokens=1000), "cost=0.01").status_code == 200


def test_an_absurd_maximum_is_refused_never_a_500(make_proxy, up):
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    r = post(p, chat_body("openai/gpt-4o", max_tokens=1e300, n=1e300), "cost=0.01")
    assert r.status_code == 403 and envelope(r)["type"] == "policy_violation"
    assert "above the spend guard's per-call maximum of $1000000.0000" in envelope(r)["message"]
    assert up.generation_requests == []


def test_shadow_mode_forwards_an_over_budget_text_call_and_counts_it(make_proxy, up, caplog):
    caplog.set_level(logging.INFO, logger="spend_guard.access")
    p = make_proxy("mode: shadow\n" + RATES + alice_keys("[{limit_usd: 0.50, period: day}]"))
    assert post(p, chat_body("openai/gpt-4o", max_tokens=90_000), "cost=0.01").status_code == 200
    assert access_lines(caplog)[-1]["decision"] == "would_refuse"
    assert 'spend_guard_decisions_total{key="alice",outcome="would_refuse"' in p.client.get("/-/metrics").text


# -- operators see whether their rates are right ---------------------------------------------


def test_every_settle_records_charged_over_held_and_an_underheld_call_is_logged_and_counted(make_proxy, up, caplog):
    caplog.set_level(logging.INFO)
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    body = chat_body("openai/gpt-4o", max_tokens=1000)
    hold = formula(body, "2.50", "10.00", 1000)
    assert hold == 13_000
    assert post(p, body, "cost=0.0065").status_code == 200  # half the hold
    assert post(p, body, "cost=0.05").status_code == 200  # the rate is too low for this call
    assert micros(spent(p, "budget:key:alice:day")) == 6_500 + 50_000  # charged in full all the same
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "UNDERHELD" in r.getMessage()]
    assert len(warnings) == 1
    assert (
        warnings[0]
        .getMessage()
        .startswith("UNDERHELD: a text call to model openai/gpt-4o cost $0.0500, above its hold of $0.0130")
    )
    metrics = p.client.get("/-/metrics").text
    assert 'spend_guard_underheld_total{model="openai/gpt-4o"} 1.0' in metrics
    assert 'spend_guard_charged_to_held_ratio_count{kind="text"} 2.0' in metrics
    assert 'spend_guard_charged_to_held_ratio_bucket{kind="text",le="0.5"} 1.0' in metrics
    assert 'spend_guard_charged_to_held_ratio_bucket{kind="text",le="2.0"} 1.0' in metrics  # 0.05 / 0.0130 = 3.8
    assert 'spend_guard_charged_to_held_ratio_bucket{kind="text",le="5.0"} 2.0' in metrics
    assert KEY_A not in metrics and SHA_A not in metrics and SHA_A[:16] not in metrics


def test_an_image_call_records_its_ratio_under_its_own_kind(make_proxy, up):
    p = make_proxy(alice_keys("[{limit_usd: 10, period: day}]"))
    assert p.generate(standin="cost=0.15").status_code == 200  # gpt-image-1 holds $0.30
    metrics = p.client.get("/-/metrics").text
    assert 'spend_guard_charged_to_held_ratio_bucket{kind="image",le="0.25"} 0.0' in metrics
    assert 'spend_guard_charged_to_held_ratio_bucket{kind="image",le="0.5"} 1.0' in metrics
    assert "spend_guard_underheld_total{" not in metrics


@pytest.mark.parametrize("store_target", [pytest.param("fake", marks=pytest.mark.fake)], indirect=True)
def test_the_one_settle_path_compares_every_end_of_a_flight(make_proxy, store_target, caplog):
    """Shutdown and the request path both end a flight through Runtime.settle: a hold charged in
    full (a drained call), and one whose lease a reserve reclaimed, count as charged = held."""
    p = make_proxy(RATES)
    answers = iter([None, 40_000])  # reclaimed (None), then charged what it cost

    async def settle(hold_id, cost, now_ms, started_ms=0, counters=()):
        return next(answers)

    p.runtime.ledger.settle = settle
    assert p.run(p.runtime.settle, Flight("h1", 20_000, "alice", kind="text", model="openai/gpt-4o"), 30_000) is None
    assert p.run(p.runtime.settle, Flight("h2", 20_000, "alice", kind="text", model="openai/gpt-4o"), 40_000) == 40_000
    metrics = p.client.get("/-/metrics").text
    assert 'spend_guard_charged_to_held_ratio_bucket{kind="text",le="1.0"} 1.0' in metrics  # the reclaimed one
    assert 'spend_guard_charged_to_held_ratio_bucket{kind="text",le="2.0"} 2.0' in metrics
    assert 'spend_guard_underheld_total{model="openai/gpt-4o"} 2.0' in metrics  # both cost more than held


def test_the_per_call_maximum_is_one_million_dollars(make_proxy, up):
    # gpt-4o output at $10/Mtok: 1e11 tokens are $1,000,000, plus a few tenths of a cent of input.
    up.credits_remaining_micros = 10**15  # a billion dollars of credits: the account is no limit here
    p = make_proxy(RATES + alice_keys("[{limit_usd: 10, period: day}]"))
    above = post(p, chat_body("openai/gpt-4o", max_tokens=100_000_000_000), "cost=0.01")
    assert above.status_code == 403 and envelope(above)["type"] == "policy_violation"
    assert "above the spend guard's per-call maximum of $1000000.0000" in envelope(above)["message"]
    below = post(p, chat_body("openai/gpt-4o", max_tokens=99_999_000_000), "cost=0.01")
    assert below.status_code == 402 and below.headers["x-spend-guard-scope"] == "budget:key:alice:day"
    assert up.generation_requests == []
