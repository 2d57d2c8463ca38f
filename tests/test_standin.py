"""The ImageRouter stand-in itself: heartbeat, gates, ledger, cut-offs, credits, models, echo."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator

import httpx
import pytest

from tests.support.standin import StandIn, b64_text, fingerprint, key_row

TOKEN = "sk-client-" + "1" * 54
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IMAGES = "/v1/openai/images/generations"


@pytest.fixture(scope="module")
def server() -> Iterator[StandIn]:
    with StandIn() as up:
        yield up


@pytest.fixture
def up(server: StandIn) -> Iterator[StandIn]:
    server.reset()
    yield server
    server.wait_for_streams(0)  # nothing left hanging for the next test


@pytest.fixture
def client(up: StandIn) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=up.url, timeout=5) as c:
        yield c


def generate(client: httpx.Client, behaviour: str = "", model: str = "openai/gpt-image-1", **kw) -> httpx.Response:
    headers = {**AUTH, "X-Standin": behaviour} if behaviour else AUTH
    return client.post(IMAGES, json={"model": model, "prompt": "a cat"}, headers=headers, **kw)


def credits(client: httpx.Client, up: StandIn, query: str = "") -> httpx.Response:
    return client.get(f"/v1/credits{query}", headers={"Authorization": f"Bearer {up.account_key}"})


def test_heartbeat_spaces_arrive_before_the_body_while_the_gate_is_closed(up, client):
    headers = {**AUTH, "X-Standin": "heartbeat=3,interval=0.01,gate=g"}
    with client.stream("POST", IMAGES, json={"model": "openai/gpt-image-1"}, headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/json"
        chunks = resp.iter_raw()
        assert next(chunks) == b" "
        assert up.charged_micros == 300_000  # the hold is taken while the generation runs
        up.release("g")
        rest = b"".join(chunks)
    assert rest.startswith(b"  {")
    body = json.loads(rest)
    assert body["cost"] == 0.167 and body["data"][0]["url"].startswith("https://")
    assert up.charged_micros == 167_000


def test_success_bills_the_actual_cost_and_credits_show_in_flight_holds(up, client):
    with client.stream(
        "POST", IMAGES, json={"model": "openai/gpt-image-1"}, headers={**AUTH, "X-Standin": "gate=g"}
    ) as resp:
        up.wait_for_requests(1)
        assert credits(client, up).json()["remaining_credits"] == "99.7000"
        up.release("g")
        assert json.loads(resp.read())["cost"] == 0.167
    assert up.charged_micros == 167_000
    assert up.charged_by_key == {fingerprint(TOKEN): 167_000}
    assert up.credits_remaining_micros == 100_000_000 - 167_000
    assert credits(client, up).json() == {
        "remaining_credits": "99.8330",
        "credit_usage": "0.1670",
        "total_deposits": "100.0000",
    }


def test_lagging_credits_serve_the_figures_from_before_the_calls_it_has_pre_charged(up, client):
    up.credits_lag_s = 3600.0
    with client.stream(
        "POST", IMAGES, json={"model": "openai/gpt-image-1"}, headers={**AUTH, "X-Standin": "gate=g"}
    ) as resp:
        up.wait_for_requests(1)
        assert up.charged_micros == 300_000  # pre-charged, but /v1/credits does not show it yet
        assert credits(client, up).json() == {
            "remaining_credits": "100.0000",
            "credit_usage": "0.0000",
            "total_deposits": "100.0000",
        }
        up.release("g")
        resp.read()
    assert credits(client, up).json()["credit_usage"] == "0.0000"
    up.credits_lag_s = 0.0
    assert credits(client, up).json()["credit_usage"] == "0.1670"


def test_error_after_heartbeat_is_a_200_and_refunds_everything(up, client):
    resp = generate(client, "heartbeat=2,interval=0.01,error")
    assert resp.status_code == 200
    assert resp.content.startswith(b"  {")
    assert resp.json() == {"error": {"message": "provider failed", "type": "generation_failed"}}
    assert up.charged_micros == 0 and up.charged_by_key == {fingerprint(TOKEN): 0}


def test_error_with_status_is_sent_with_that_status(up, client):
    resp = generate(client, "error,status=502")
    assert resp.status_code == 502 and resp.json()["error"]["type"] == "generation_failed"
    assert up.charged_micros == 0


def test_cost_above_the_hold_is_billed_in_full(up, client):
    assert generate(client, "cost=0.45").json()["cost"] == 0.45
    assert up.charged_micros == 450_000


def test_nocost_keeps_the_hold_and_omits_cost(up, client):
    assert "cost" not in generate(client, "nocost").json()
    assert up.charged_micros == 300_000


def test_insufficient_credits_is_a_200_error_and_charges_nothing(up, client):
    up.credits_remaining_micros = 299_900
    resp = generate(client)
    assert resp.status_code == 200
    assert resp.json()["error"]["type"] == "internal_error"
    assert resp.json()["error"]["message"].startswith("Insufficient credits (this model needs minimum $0.3000")
    assert up.charged_micros == 0 and up.credits_remaining_micros == 299_900


def test_unknown_model_missing_auth_and_bad_behaviour_are_refused_without_charge(up, client):
    assert generate(client, model="no/such").status_code == 400
    resp = client.post(IMAGES, json={"model": "test/test"})
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "unauthorized"
    resp = generate(client, "heartbeat=1,status=500,error")
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "standin_error"
    assert generate(client, "hearbeat=1").json()["error"]["type"] == "standin_error"
    assert up.charged_micros == 0 and len(up.generation_requests) == 4


def test_aliases_and_multipart_bodies_are_priced(up, client):
    resp = client.post(
        "/v1/openai/images/edits",
        data={"model": "gemini-2.5-flash-image", "prompt": "edit"},
        files={"image[]": ("a.png", b"\x89PNG\r\n\r\n" * 100, "image/png")},
        headers=AUTH,
    )
    assert resp.json()["cost"] == 0.039
    assert up.charged_micros == 39_000


def test_cut_aborts_the_connection_and_keeps_the_hold(up, client):
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        generate(client, "heartbeat=2,interval=0.01,cut")
    assert up.charged_micros == 300_000
    assert up.closed_early == 0


def test_client_closing_mid_stream_frees_the_stream_and_is_billed_as_planned(up, client):
    headers = {**AUTH, "X-Standin": "heartbeat=2,gate=never"}
    with client.stream("POST", IMAGES, json={"model": "openai/gpt-image-1"}, headers=headers) as resp:
        chunks = resp.iter_raw()
        assert next(chunks) == b" "
        up.wait_for_streams(1)
    up.wait_for_streams(0)
    assert up.closed_early == 1
    assert up.charged_micros == 167_000  # the upstream finishes the generation anyway


def test_slow_upstream_times_out_the_client(up, client):
    with pytest.raises(httpx.ReadTimeout):
        generate(client, "slow=5", timeout=httpx.Timeout(5, read=0.2))
    up.wait_for_streams(0)
    assert up.closed_early == 1


def test_gate_released_before_the_request_does_not_wait(up, client):
    up.release("early")
    assert generate(client, "gate=early", model="test/test").json()["cost"] == 0


def test_wait_for_requests_counts_generation_requests_in_flight(up, client):
    headers = {**AUTH, "X-Standin": "gate=both"}
    with (
        client.stream("POST", IMAGES, json={"model": "test/test"}, headers=headers) as first,
        httpx.Client(base_url=up.url) as other,
        other.stream("POST", IMAGES, json={"model": "test/test"}, headers=headers) as second,
    ):
        up.wait_for_requests(2)
        up.wait_for_streams(2)
        up.release("both")
        assert first.read() and second.read()
    with pytest.raises(TimeoutError):
        up.wait_for_requests(3, timeout=0.01)


def test_b64_and_gzip_bodies(up, client):
    body = generate(client, "b64=200001").json()
    assert body["data"][0]["b64_json"] == b64_text(200_001) and body["cost"] == 0.167
    for behaviour in ("gzip", "gzip,b64=10"):
        with client.stream(
            "POST", IMAGES, json={"model": "test/test"}, headers={**AUTH, "X-Standin": behaviour}
        ) as resp:
            assert resp.headers["content-encoding"] == "gzip"
            raw = b"".join(resp.iter_raw())
        assert json.loads(gzip.decompress(raw))["cost"] == 0
    assert json.loads(gzip.decompress(raw))["data"][0]["b64_json"] == b64_text(10)


def test_sse_streams_carry_cost_in_the_final_event(up, client):
    chat = client.post(
        "/v1/openai/chat/completions", json={"model": "any/llm"}, headers={**AUTH, "X-Standin": "sse,cost=0.0012"}
    )
    assert chat.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in chat.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["cost"] == 0.0012 and json.loads(events[-2])["usage"]["cost"] == 0.0012
    resp = client.post("/v1/openai/responses", json={"model": "any/llm"}, headers={**AUTH, "X-Standin": "sse"})
    assert "event: response.completed" in resp.text
    completed = json.loads(resp.text.strip().splitlines()[-1].removeprefix("data: "))
    assert completed["response"]["cost"] == 0.0001
    assert client.post("/v1/openai/chat/completions", json={"model": "any/llm"}, headers=AUTH).json()["cost"] == 0.0001
    assert up.charged_micros == 1200 + 100 + 100


def test_sse_failure_after_a_chunk_is_billed_and_an_early_cost_is_not_final(up, client):
    chat = client.post(
        "/v1/openai/chat/completions", json={"model": "any/llm"}, headers={**AUTH, "X-Standin": "sse,error,cost=0.0012"}
    )
    events = [json.loads(line.removeprefix("data: ")) for line in chat.text.splitlines() if line.startswith("data: ")]
    assert events[0]["choices"][0]["delta"]["content"] == "h" and events[-1]["error"]["type"] == "generation_failed"
    assert up.charged_micros == 1200
    chat = client.post(
        "/v1/openai/chat/completions",
        json={"model": "any/llm"},
        headers={**AUTH, "X-Standin": "sse,earlycost=0.0001,cost=0.0012"},
    )
    events = [line.removeprefix("data: ") for line in chat.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["cost"] == 0.0001 and "cost" not in json.loads(events[-2])
    assert up.charged_micros == 2400
    assert generate(client, "earlycost=0.0001").json()["error"]["type"] == "standin_error"


def test_credits_shape_key_rows_and_overrides(up, client):
    up.key_rows = [key_row("k1", "team", spend_limit=5, period="day", period_start="2026-11-25T00:00:00Z")]
    up.key_ids = {TOKEN: "k1"}
    generate(client)
    body = credits(client, up, "?by_api_key=true").json()
    assert body["remaining_credits"] == "99.8330"
    (row,) = body["usage_by_api_key"]
    assert row["spend_limit"] == "5.0000" and row["period_spend"] == "0.1670" and row["total_requests"] == 1
    assert "usage_by_api_key" not in credits(client, up).json()
    assert client.get("/v1/credits", headers=AUTH).status_code == 401
    assert client.get("/v1/credits").json()["error"]["type"] == "unauthorized"
    up.credits_status = 500
    assert credits(client, up).json()["error"]["type"] == "internal_error"
    up.credits_status, up.credits_body = 200, b"{not json"
    assert credits(client, up).content == b"{not json"
    assert up.credits_calls == 6


def test_models_as_object_and_as_array(up, client):
    by_id = client.get("/v2/models").json()
    assert by_id["openai/gpt-image-1"]["price"] == {"min": 0.011, "average": 0.167, "max": 0.3}
    assert by_id["google/gemini-2.5-flash"]["aliases"] == ["gemini-2.5-flash-image"]
    up.models_as_array = True
    array = client.get("/v2/models").json()
    assert {m["id"] for m in array} == set(by_id)
    assert client.get("/v2/models/google%2Fveo-3.1").json()["price"]["max"] == 3.2
    assert up.models_calls == 3


def test_echo_and_unknown_paths_are_recorded(up, client):
    resp = client.post("/v1/anything%2Fraw?b=2&a=1", content=b"payload", headers={"X-Standin": "echo", "X-Trace": "t1"})
    echo = resp.json()
    assert echo["path"] == "/v1/anything%2Fraw" and echo["query"] == "b=2&a=1"
    assert ["X-Trace", "t1"] in echo["headers"]
    assert echo["body_sha256"] == hashlib.sha256(b"payload").hexdigest() and echo["body_len"] == 7
    assert client.get("/echo/x").json()["path"] == "/echo/x"
    missing = client.post("/v1/openai/images/generations/", json={})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    assert [r.path for r in up.requests] == ["/v1/anything%2Fraw", "/echo/x", "/v1/openai/images/generations/"]
    assert up.requests[0].header("x-trace") == "t1" and up.requests[0].body == b"payload"


# -- prices by what the request asks for (proxy/standin/tiers.py) --------------------------------

VIDEOS = "/v1/openai/videos/generations"


def charge(client: httpx.Client, up: StandIn, path: str = IMAGES, **fields: object) -> tuple[int, object]:
    before = up.charged_micros
    body = client.post(path, json={"prompt": "a cat", **fields}, headers=AUTH).json()
    return up.charged_micros - before, body.get("cost", body.get("error"))


@pytest.mark.parametrize(
    ("path", "fields", "micros"),
    [
        (IMAGES, {"model": "openai/gpt-image-1", "quality": "low"}, 11_000),
        (IMAGES, {"model": "openai/gpt-image-1", "quality": "medium", "size": "1024x1536"}, 63_000),
        (IMAGES, {"model": "openai/gpt-image-1"}, 167_000),  # auto: charged as high
        (IMAGES, {"model": "openai/dall-e-3", "quality": "high", "size": "1536x1024"}, 120_000),
        (IMAGES, {"model": "openai/dall-e-3", "size": "1536X1024"}, 40_000),  # not a size it lists
        (VIDEOS, {"model": "google/veo-3.1", "seconds": 8}, 3_200_000),  # linear per second
        (VIDEOS, {"model": "google/veo-3.1", "seconds": 7}, 1_600_000),  # unlisted: its default 4 s
        (VIDEOS, {"model": "google/veo-3.1", "seconds": "6"}, 2_400_100),  # 0.4 * 6 in doubles
        (VIDEOS, {"model": "openai/sora-2", "seconds": 5}, 800_000),  # stepped: two 4 s steps
        (VIDEOS, {"model": "openai/sora-2", "seconds": 12}, 1_200_000),
        (VIDEOS, {"model": "openai/sora-2"}, 400_000),
    ],
)
def test_tiered_prices_charge_by_quality_size_and_seconds(up, client, path, fields, micros):
    up.price_by_request()
    assert charge(client, up, path, **fields)[0] == micros


def test_a_post_generation_tier_is_pre_charged_the_maximum_and_a_factor_raises_every_tier(up, client):
    up.price_by_request(factor=2)
    headers = {**AUTH, "X-Standin": "gate=g"}
    body = {"model": "openai/gpt-image-1", "quality": "low"}
    with client.stream("POST", IMAGES, json=body, headers=headers) as resp:
        up.wait_for_requests(1)
        assert up.charged_micros == 300_000
        up.release("g")
        assert json.loads(resp.read())["cost"] == 0.022
    assert charge(client, up, VIDEOS, model="openai/sora-2", seconds=4)[0] == 800_000


def test_tiers_are_off_by_default_and_refuse_a_quality_imagerouter_refuses(up, client):
    assert charge(client, up, model="openai/gpt-image-1", quality="low") == (167_000, 0.167)
    assert "openai/sora-2" not in client.get("/v2/models").json()
    up.price_by_request()
    assert "openai/sora-2" in client.get("/v2/models").json()
    micros, error = charge(client, up, model="openai/gpt-image-1", quality="ultra")
    assert micros == 0 and error["type"] == "invalid_request_error"
