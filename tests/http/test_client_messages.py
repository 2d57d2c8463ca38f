"""What a client is told when the guard refuses before pricing: enough to fix the call, and
nothing about the proxy's insides (docs/refusals.md)."""

from __future__ import annotations

import pytest

from tests.support.constants import KEY_A
from tests.support.served import RedisServer
from tests.support.stores import StoreTarget

AUTH = {"Authorization": f"Bearer {KEY_A}"}
IMAGES = "/v1/openai/images/generations"
JSON_BODY = b'{"model": "openai/gpt-image-1", "prompt": "a lighthouse"}'


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded",  # what `curl -d` sends without -H 'Content-Type: ...'
        None,
        "text/plain",
    ],
)
def test_a_json_body_sent_without_its_content_type_is_refused_as_not_read_as_json(make_proxy, up, content_type):
    p = make_proxy()
    headers = dict(AUTH) if content_type is None else {**AUTH, "Content-Type": content_type}
    r = p.client.post(IMAGES, content=JSON_BODY, headers=headers)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "was not read as JSON" in r.json()["error"]["message"]
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    assert r.headers["X-Spend-Guard-Scope"] == "request"
    assert up.generation_calls == 0


def test_a_body_without_a_model_is_refused_with_the_request_scope(make_proxy, up):
    p = make_proxy()
    r = p.client.post(IMAGES, json={"prompt": "a lighthouse"}, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Request has no 'model'; the spend guard prices every call by its model."
    assert r.headers["X-Spend-Guard-Scope"] == "request"  # as docs/refusals.md promises


@pytest.mark.system
@pytest.mark.parametrize("store_target", [pytest.param("real", marks=pytest.mark.real)], indirect=True)
def test_a_store_outage_shows_clients_no_internal_address(make_proxy, up, caplog):
    with RedisServer() as redis_server:
        p = make_proxy(store=StoreTarget("real", redis_server.url))  # healthy: snapshot and prices loaded
        redis_server.stop()
        r = p.client.post(IMAGES, json={"model": "openai/gpt-image-1", "prompt": "x"}, headers=AUTH)
        ready = p.client.get("/-/readyz")
        me = p.client.get("/-/me", headers=AUTH)
    assert r.status_code == 503 and r.json()["error"]["type"] == "guard_unavailable"
    assert ready.status_code == 503 and me.status_code == 200  # an unlisted key's /-/me reads no store
    for response in (r, ready, me):
        assert str(redis_server.port) not in response.text and "127.0.0.1" not in response.text, response.text
    # The log keeps the driver's own words for the operator.
    assert any("reserve failed: store unavailable: ConnectionError" in rec.getMessage() for rec in caplog.records)
