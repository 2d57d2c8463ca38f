"""The guard through the app: refusals, settles, fail modes, path spellings (fake and real Redis)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json

import fakeredis
import pytest
import redis

from proxy.guard.callers import identify_token
from proxy.guard.reserving import reserve_request
from proxy.guard.verdicts import budgets_for
from proxy.runtime import Flight
from proxy.store.records import counters_of
from tests.support.constants import KEY_A, KEY_B
from tests.support.policies import KEYS, alice_keys
from tests.support.proxies import FakeClock, envelope, open_holds, spent
from tests.support.standin import key_row


def test_allowed_call_is_charged_its_real_cost(make_proxy, up):
    p = make_proxy(KEYS)
    r = p.generate(standin="heartbeat=2,cost=0.1234")
    assert r.status_code == 200
    assert r.text.startswith("  {") and r.json()["cost"] == 0.1234
    assert r.headers["x-spend-guard-remaining-scope"] == "budget:key:alice:lifetime"
    assert r.headers["x-spend-guard-remaining"] == "49.7000"  # 50 - the 0.30 hold, before settling
    assert spent(p, "budget:key:alice:lifetime") == "0.1234"
    assert open_holds(p) == 0


def test_error_body_after_heartbeat_releases_the_hold(make_proxy, up):
    p = make_proxy(KEYS)
    r = p.generate(standin="heartbeat=2,error")
    assert r.status_code == 200 and "error" in r.json()
    assert spent(p, "budget:key:alice:lifetime") == "0.0000"
    assert open_holds(p) == 0


def test_missing_cost_charges_the_hold(make_proxy, up):
    p = make_proxy(KEYS)
    assert p.generate(standin="nocost").status_code == 200
    assert spent(p, "budget:key:alice:lifetime") == "0.3000"


def test_cost_above_the_hold_is_charged_in_full(make_proxy, up):
    p = make_proxy(KEYS)
    assert p.generate(standin="cost=0.45").status_code == 200
    assert spent(p, "budget:key:alice:lifetime") == "0.4500"


def test_cut_off_response_charges_the_hold(make_proxy, up):
    p = make_proxy(KEYS)
    r = p.generate(standin="heartbeat=1,cut")
    # The 200 headers had gone out; the client gets what ImageRouter sent before it broke off
    # (the heartbeat space and a partial body, proxy/standin/wire.py PARTIAL_BODY), no cost, and
    # then its connection is cut (UpstreamBroken: TestClient ends the body there; over a served
    # proxy the client sees httpx.RemoteProtocolError, tests/http/test_hostile.py).
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.content == b' {"created":1,"data":[{"url":"ht'
    assert '"cost"' not in r.text
    assert len(up.generation_requests) == 1
    assert spent(p, "budget:key:alice:lifetime") == "0.3000"
    assert open_holds(p) == 0


def test_gzip_response_is_observed_and_passed_through_compressed(make_proxy, up):
    p = make_proxy(KEYS)
    r = p.generate(standin="gzip,cost=0.2", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert r.json()["cost"] == 0.2
    assert spent(p, "budget:key:alice:lifetime") == "0.2000"


def test_sse_text_stream_settles_with_final_event_cost(make_proxy, up):
    p = make_proxy(KEYS)
    r = p.generate(
        standin="sse,cost=0.0123", model="openai/gpt-image-1", path="/v1/openai/chat/completions", stream=True
    )
    assert r.status_code == 200 and "data:" in r.text
    assert spent(p, "budget:key:alice:lifetime") == "0.0123"


# -- refusals --------------------------------------------------------------------------------


def test_missing_or_malformed_token_is_401_without_an_upstream_call(make_proxy, up):
    p = make_proxy(KEYS)
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}):
        r = p.client.post("/v1/openai/images/generations", json={"model": "test/test"}, headers=headers)
        assert r.status_code == 401 and envelope(r)["type"] == "unauthorized"
    assert up.generation_requests == []


def test_unknown_key_rejected_when_policy_says_reject(make_proxy, up):
    p = make_proxy(KEYS + "guard: {unknown_keys: reject}\n")
    r = p.generate(token=KEY_B)
    assert r.status_code == 401 and envelope(r)["type"] == "unauthorized"
    assert KEY_B not in r.text
    assert p.generate(token=KEY_A, standin="cost=0.01").status_code == 200
    assert len(up.generation_requests) == 1


def test_account_floor_refuses_with_402(make_proxy, up):
    up.credits_remaining_micros = 1_200_000
    p = make_proxy(KEYS + "account: {name: t, refresh_s: 3600, max_staleness_s: 7200, min_remaining_usd: 1.00}\n")
    r = p.generate()  # gpt-image-1 holds 0.30; 1.20 - 0.30 < 1.00
    assert r.status_code == 402
    err = envelope(r)
    assert err["type"] == "insufficient_credits" and "floor of $1.0000" in err["message"]
    assert r.headers["x-spend-guard-scope"] == "account"
    assert up.generation_requests == []
    assert p.generate(model="google/gemini-2.5-flash", standin="cost=0.039").status_code == 200


def test_key_spend_limit_refuses_with_reset_time_and_retry_after(make_proxy, up):
    up.key_rows = [
        key_row(
            "key-a",
            "alice",
            spend_limit="1.00",
            period="day",
            period_spend="0.8000",
            period_start="2000-01-01T00:00:00Z",
        )
    ]
    # period_start far in the past: the snapshot's 0.80 belongs to an old window and counts as 0
    p = make_proxy(KEYS)
    assert p.generate(standin="cost=0.3").status_code == 200
    assert p.generate(standin="cost=0.3").status_code == 200
    assert p.generate(standin="cost=0.3").status_code == 200
    r = p.generate()
    assert r.status_code == 402
    err = envelope(r)
    assert err["type"] == "spend_limit_exceeded"
    assert "spend limit of $1.0000 per day" in err["message"] and "spent $0.9000" in err["message"]
    assert "resets at" in err["message"]
    assert r.headers["x-spend-guard-scope"] == "key:day"
    assert 0 < int(r.headers["retry-after"]) <= 86400
    assert len(up.generation_requests) == 3


def test_current_window_spend_in_snapshot_counts(make_proxy, up):
    import datetime as dt

    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT00:00:00Z")
    up.key_rows = [
        key_row("key-a", "alice", spend_limit="1.00", period="day", period_spend="0.8000", period_start=today)
    ]
    p = make_proxy(KEYS)
    r = p.generate()
    assert r.status_code == 402 and envelope(r)["type"] == "spend_limit_exceeded"


@pytest.mark.parametrize(
    ("row", "error_type"),
    [
        ({"is_active": False}, "key_inactive"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "key_expired"),
    ],
)
def test_inactive_or_expired_key_is_403(make_proxy, up, row, error_type):
    up.key_rows = [key_row("key-a", "alice", **row)]
    p = make_proxy(KEYS)
    r = p.generate()
    assert r.status_code == 403 and envelope(r)["type"] == error_type
    assert up.generation_requests == []


def test_local_budget_refuses_and_names_the_budget(make_proxy, up):
    p = make_proxy(alice_keys("[{limit_usd: 0.50, period: month}]"))
    assert p.generate(standin="cost=0.3").status_code == 200
    r = p.generate()
    assert r.status_code == 402
    err = envelope(r)
    assert err["type"] == "spend_limit_exceeded" and "Budget 'key:alice:month'" in err["message"]
    assert r.headers["x-spend-guard-scope"] == "budget:key:alice:month"
    assert "retry-after" in r.headers


def test_denied_model_and_request_cap_are_policy_violations(make_proxy, up):
    p = make_proxy(KEYS + "models: {deny: ['openai/*'], max_request_usd: 0.10}\n")
    r = p.generate(model="openai/gpt-image-1")
    assert r.status_code == 403 and envelope(r)["type"] == "policy_violation"
    r = p.generate(model="google/veo-3.1", path="/v1/openai/videos/generations")
    assert r.status_code == 403 and "per-request cap" in envelope(r)["message"]
    assert up.generation_requests == []
    # an alias resolves to its model before pricing and rules
    assert p.generate(model="gemini-2.5-flash-image", standin="cost=0.039").status_code == 200


def test_unknown_model_gets_the_dearest_hold_of_its_kind_or_is_refused(make_proxy, up):
    # listed upstream without a price: the proxy cannot price it
    up.models["vendor/new-model"] = {"id": "vendor/new-model", "price": {}, "output": ["image"]}
    p = make_proxy(KEYS + "models: {default_hold_usd: 0.25}\n")
    r = p.generate(model="vendor/new-model", standin="nocost")
    assert r.status_code == 200
    assert spent(p, "budget:key:alice:lifetime") == "0.3000"  # openai/gpt-image-1's, above the default
    p2 = make_proxy(KEYS + "guard: {unknown_models: reject}\n")
    r = p2.generate(model="vendor/new-model")
    assert r.status_code == 403 and envelope(r)["type"] == "policy_violation"


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"[1,2]", "application/json", 400),
        (b'{"prompt": "no model"}', "application/json", 400),
        (b'{"model": 5}', "application/json", 400),
        (b"model=a&model=b", "application/x-www-form-urlencoded", 400),
        (b"\x00\x01", "application/octet-stream", 400),
        (b"x" * 5000, "application/json", 413),
    ],
)
def test_unreadable_bodies_are_refused_in_the_envelope(make_proxy, up, body, content_type, status):
    p = make_proxy(KEYS + "guard: {max_body_bytes: 4096}\n")
    r = p.client.post(
        "/v1/openai/images/generations",
        content=body,
        headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": content_type},
    )
    assert r.status_code == status and envelope(r)["type"] == "invalid_request_error"
    assert up.generation_requests == []


def test_multipart_and_gzip_request_bodies_are_priced_and_forwarded_byte_for_byte(make_proxy, up):
    p = make_proxy(KEYS + "models: {deny: ['openai/*']}\n")
    files = {"image": ("a.png", b"\x89PNG" + b"\x00" * 100, "image/png")}
    r = p.client.post(
        "/v1/openai/images/edits",
        data={"model": "openai/gpt-image-1", "prompt": "x"},
        files=files,
        headers={"Authorization": f"Bearer {KEY_A}"},
    )
    assert r.status_code == 403  # the model was read from the multipart form
    raw = gzip.compress(json.dumps({"model": "openai/gpt-image-1"}).encode())
    r = p.client.post(
        "/v1/openai/images/generations",
        content=raw,
        headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 403  # a gzipped body does not hide the model
    body = json.dumps({"model": "google/gemini-2.5-flash", "prompt": "é"}).encode()
    r = p.client.post(
        "/v1/openai/images/generations",
        content=body,
        headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json", "X-Standin": "echo"},
    )
    assert r.status_code == 200
    assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


GUARDED = (402, "spend_limit_exceeded", "budget:key:alice:day")  # priced, then refused by the $0 budget
REFUSED = (400, "invalid_request_error", "request")  # an encoded separator: refused as a path


@pytest.mark.parametrize(
    ("path", "answer"),
    [
        ("/v1/openai/images/generations/", GUARDED),
        ("/V1/OpenAI/Images/Generations", GUARDED),
        ("/v1/openai/images/%67enerations", GUARDED),
        ("/v1/openai/images%2Fgenerations", REFUSED),
        ("/v1/openai/images%5cgenerations", REFUSED),
        ("/v1/openai/videos/generations?x=1", GUARDED),
    ],
)
def test_path_spellings_never_reach_a_spending_route_unguarded(make_proxy, up, path, answer):
    # Dot segments and `//` are normalised by httpx itself; test_processes sends them raw.
    p = make_proxy(alice_keys("[{limit_usd: 0, period: day}]"))
    model = "google/veo-3.1" if "videos" in path else "openai/gpt-image-1"
    r = p.client.post(path, json={"model": model}, headers={"Authorization": f"Bearer {KEY_A}"})
    assert (r.status_code, envelope(r)["type"], r.headers["x-spend-guard-scope"]) == answer, (path, r.text)
    assert up.generation_requests == []
    assert all(rec.path.startswith("/v1/credits") or rec.path.startswith("/v2/") for rec in up.requests)


def test_absolute_form_host_header_cannot_redirect(make_proxy, up):
    p = make_proxy(KEYS)
    r = p.client.get("http://evil.example/echo/x", headers={"Host": "evil.example", "X-Standin": "echo"})
    assert r.status_code == 200 and r.json()["path"] == "/echo/x"


# -- fail modes ------------------------------------------------------------------------------


FAKE_ONLY = pytest.mark.parametrize("store_target", [pytest.param("fake", marks=pytest.mark.fake)], indirect=True)


@FAKE_ONLY  # the outage is a fakeredis FakeServer going away; test_processes stops a real Redis
def test_store_down_fails_closed_then_recovers(make_proxy, up, store_target):
    p = make_proxy(KEYS)
    store_target.server.connected = False
    r = p.generate()
    assert r.status_code == 503 and envelope(r)["type"] == "guard_unavailable"
    assert r.headers["x-spend-guard-scope"] == "store"
    assert up.generation_requests == []
    store_target.server.connected = True
    assert p.generate(standin="cost=0.01").status_code == 200


@FAKE_ONLY
def test_a_long_outage_keeps_a_bounded_number_of_pending_releases(make_proxy, up, store_target, monkeypatch):
    # Each reserve that failed might still run once Redis wakes, so its hold is released later;
    # a retry loop against a dead Redis must not grow that list without end.
    import proxy.guard.reserving

    monkeypatch.setattr(proxy.guard.reserving, "MAX_PENDING_RELEASES", 5)
    p = make_proxy(KEYS)
    store_target.server.connected = False
    assert [p.generate().status_code for _ in range(20)] == [503] * 20
    assert len(p.runtime.pending_settles) == 5
    store_target.server.connected = True
    p.run(p.runtime.settle_pending)
    assert p.runtime.pending_settles == {}
    assert p.generate(standin="cost=0.01").status_code == 200
    assert open_holds(p) == 0


@FAKE_ONLY
def test_a_settle_cut_by_a_cancellation_is_retried_at_the_calls_cost(make_proxy, up, store_target):
    # A stop past its grace cancels the calls still running, some in the middle of their settle:
    # the settle is retried (the shutdown retries once more), so the hold ends at the call's
    # cost, not charged in full at its lease.
    p = make_proxy(KEYS)
    rt = p.runtime
    key = identify_token(rt.policy, hashlib.sha256(KEY_A.encode()).hexdigest(), rt.clock())
    budgets = budgets_for(rt.policy, key)
    request = reserve_request(rt.policy, key, 500_000, budgets, rt.clock())
    assert p.run(rt.ledger.reserve, request).allowed
    flight = Flight(request.hold_id, 500_000, "alice", counters=counters_of(request.budgets))
    rt.open_flight(flight)

    async def cancelled_mid_settle() -> None:
        entered = asyncio.Event()

        async def never_answered(*args: object) -> None:
            entered.set()
            await asyncio.Event().wait()

        real, rt.ledger.settle = rt.ledger.settle, never_answered
        try:
            task = asyncio.ensure_future(rt.settle(flight, 123_400))
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            rt.ledger.settle = real

    p.run(cancelled_mid_settle)
    assert rt.pending_settles[request.hold_id].cost_micros == 123_400
    assert open_holds(p) == 1
    p.run(rt.settle_pending)
    assert rt.pending_settles == {} and open_holds(p) == 0
    assert spent(p, "budget:key:alice:lifetime") == "0.1234"


@FAKE_ONLY
def test_store_down_fails_open_when_configured_and_counts_it(make_proxy, up, store_target):
    p = make_proxy(KEYS + "guard: {on_store_error: open}\n")
    store_target.server.connected = False
    r = p.generate(standin="cost=0.01")
    assert r.status_code == 200 and len(up.generation_requests) == 1
    metrics = p.client.get("/-/metrics").text
    assert 'spend_guard_unguarded_total{reason="store"} 1.0' in metrics
    store_target.server.connected = True


def test_stale_snapshot_fails_closed(make_proxy, up):
    clock = FakeClock()
    p = make_proxy(KEYS, clock=clock)
    clock.now += 7201  # max_staleness_s in the test policy is 7200
    r = p.generate()
    assert r.status_code == 503 and "s old" in envelope(r)["message"]
    assert up.generation_requests == []


def test_no_snapshot_yet_fails_closed(make_proxy, up):
    up.credits_status = 500
    p = make_proxy(KEYS, refresh=False)
    r = p.generate()
    assert r.status_code == 503 and envelope(r)["type"] == "guard_unavailable"


@pytest.mark.parametrize(
    ("asked", "sent"),
    [
        ("br, gzip;q=0.8, zstd", "gzip;q=0.8"),
        ("gzip, deflate, br, zstd", "gzip, deflate"),
        ("br", "identity"),
        ("*", "identity"),
        ("GZIP", "GZIP"),
    ],
)
def test_a_spending_call_asks_only_for_encodings_whose_cost_the_guard_can_read(make_proxy, up, asked, sent):
    # A brotli or zstd answer would hide `cost`, and the call would be charged its whole hold.
    p = make_proxy(KEYS)
    assert p.generate(standin="cost=0.1", headers={"Accept-Encoding": asked}).status_code == 200
    seen = [v for k, v in up.generation_requests[-1].headers if k.lower() == "accept-encoding"]
    assert seen == [sent]
    assert spent(p, "budget:key:alice:lifetime") == "0.1000"


def test_an_unguarded_call_keeps_its_accept_encoding(make_proxy, up):
    p = make_proxy()
    r = p.client.get("/echo/x", headers={"Accept-Encoding": "br, zstd"})
    assert [v for k, v in r.json()["headers"] if k.lower() == "accept-encoding"] == ["br, zstd"]


def test_scripts_lost_by_redis_are_loaded_again(make_proxy, up, store_target):
    p = make_proxy(KEYS)
    assert p.generate(standin="cost=0.1").status_code == 200
    # A Redis restart or SCRIPT FLUSH empties its script cache: EVALSHA answers NOSCRIPT.
    if store_target.server is not None:
        fakeredis.FakeRedis(server=store_target.server).script_flush()
    else:
        redis.Redis.from_url(store_target.url).script_flush()
    assert p.generate(standin="cost=0.1").status_code == 200
    assert spent(p, "budget:key:alice:lifetime") == "0.2000"
    assert open_holds(p) == 0


def test_upstream_unreachable_is_502_and_releases(make_proxy, up, monkeypatch):
    p = make_proxy(KEYS)
    from proxy.http.upstream import Upstream

    # point the running proxy at a closed port (and keep it there across policy checks)
    p.runtime.upstream = Upstream(p.runtime.session, "http://127.0.0.1:9", 5, 1)
    monkeypatch.setattr(p.runtime, "apply_policy", lambda policy: None)
    r = p.generate()
    assert r.status_code == 502 and envelope(r)["type"] == "upstream_error"
    assert spent(p, "budget:key:alice:lifetime") == "0.0000"
    assert open_holds(p) == 0


def test_upstream_connect_timeout_is_504_and_releases(make_proxy, up, monkeypatch, silent_port):
    p = make_proxy(KEYS)
    from proxy.http.upstream import Upstream

    # The handshake never completes, so nothing was sent: the hold is released, not charged.
    p.runtime.upstream = Upstream(p.runtime.session, f"http://127.0.0.1:{silent_port}", 120, 0.3)
    monkeypatch.setattr(p.runtime, "apply_policy", lambda policy: None)
    r = p.generate()
    assert r.status_code == 504 and envelope(r)["type"] == "upstream_error"
    assert spent(p, "budget:key:alice:lifetime") == "0.0000"
    assert open_holds(p) == 0


def test_upstream_timeout_is_504_and_charges_the_hold(make_proxy, up):
    p = make_proxy(KEYS + "upstream: {timeout_s: 0.3}\nguard: {hold_ttl_s: 60}\n")
    r = p.generate(standin="slow=2")
    assert r.status_code == 504 and envelope(r)["type"] == "upstream_error"
    assert spent(p, "budget:key:alice:lifetime") == "0.3000"
