"""Threshold alerts by webhook (docs/alerts.md), as an operator's receiver sees them: exactly one
signed event per scope, window and threshold across several proxies on one store, within a second
of the settle that crossed it; none again after a restart; again in a new window; retried with
backoff; and never a delay to the calls themselves."""

from __future__ import annotations

import base64
import datetime as dt
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.windows import format_ms, to_ms
from tests.support.constants import KEY_A, SHA_A
from tests.support.standin import key_row
from tests.support.webhook_receiver import Receiver

SECRET_ENV = "SG_TEST_WEBHOOK_SECRET"
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
UTC = dt.UTC


def policy(url: str, *, limit: str = "1.00", hold: str = "0.10", alerts: str = "", key: str = "") -> str:
    return f"""
models: {{overrides: {{"openai/gpt-image-1": {hold}}}}}
alerts:
  webhooks: [{{url: "{url}", secret_env: {SECRET_ENV}}}]
{alerts}
keys:
  - name: alice
    key_sha256: {SHA_A}
    budgets: [{{limit_usd: {limit}, period: day}}]
{key}
"""


@pytest.fixture
def receiver(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    with Receiver() as r:
        yield r


def record_settles(proxy, settles: list[tuple[float, int]]) -> None:
    """Note when each settle's store call returned, and what it charged."""
    store = proxy.runtime.store
    original = store.settle

    async def settle(*args, **kwargs):
        charged = await original(*args, **kwargs)
        settles.append((time.monotonic(), charged or 0))
        return charged

    store.settle = settle


def crossing_time(settles: list[tuple[float, int]], line_micros: int) -> float:
    total = 0
    for at, charged in sorted(settles):
        total += charged
        if total >= line_micros:
            return at
    raise AssertionError(f"no settle crossed {line_micros}")


def drain(*proxies) -> None:
    for p in proxies:
        p.run(p.app.alerts.drain)


def deliveries(proxy) -> dict[str, float]:
    text = proxy.client.get("/-/metrics").text
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "spend_guard_webhook_deliveries_total"
    }


def test_three_proxies_send_one_signed_webhook_per_threshold_within_a_second(make_proxy, receiver, caplog):
    text = policy(receiver.url)
    proxies = [make_proxy(text) for _ in range(3)]
    settles: list[tuple[float, int]] = []
    for p in proxies:
        record_settles(p, settles)
    # 12 calls of $0.10 against $1.00, four per proxy at once: 10 fit, 2 are refused.
    with ThreadPoolExecutor(6) as pool:
        calls = [pool.submit(proxies[i % 3].generate, standin="cost=0.1") for i in range(12)]
        statuses = sorted(call.result().status_code for call in calls)
    assert statuses == [200] * 10 + [402] * 2
    got = receiver.wait_for(3)
    drain(*proxies)
    assert len(receiver.deliveries) == 3  # exactly one per threshold, across the three proxies
    events = {d.event["threshold"]: d for d in got}
    assert sorted(events) == [0.5, 0.8, 1.0]
    today = dt.datetime.now(UTC).date()
    delays = []
    for threshold, delivery in events.items():
        event = delivery.event
        assert delivery.signed_by(SECRET), "signature does not verify"
        assert delivery.headers["webhook-id"] == event["id"]
        assert abs(int(delivery.headers["webhook-timestamp"]) - time.time()) < 60
        assert event["type"] == "budget.threshold"
        assert event["scope"] == "budget:key:alice:day"
        assert event["limit_usd"] == "1.0000"
        assert float(event["spent_usd"]) >= threshold
        assert event["window_start"] == format_ms(to_ms(dt.datetime.combine(today, dt.time(), UTC)))
        assert event["resets_at"] == format_ms(to_ms(dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), UTC)))
        assert event["policy_version"] == proxies[0].runtime.policy.version
        assert {"remaining_usd", "held_usd", "message", "timestamp"} <= set(event)
        delay = delivery.at - crossing_time(settles, round(threshold * 1_000_000))
        delays.append(delay)
        assert delay < 1.0, f"threshold {threshold}: delivered {delay:.3f} s after the settle that crossed it"
    print(f"\nsettle -> webhook delays: {', '.join(f'{d * 1000:.0f} ms' for d in delays)}")
    assert sum(deliveries(p).get("sent", 0) for p in proxies) == 3
    # A restart (a new instance on the same store) sends nothing again.
    again = make_proxy(text)
    assert again.run(again.app.alerts.evaluate) == []
    drain(again)
    assert len(receiver.deliveries) == 3
    assert SECRET not in caplog.text and SECRET[6:] not in caplog.text
    assert SECRET[6:] not in proxies[0].client.get("/-/metrics").text


def test_a_new_window_recovers_and_alerts_again(make_proxy, up, receiver):
    # Noon on a day ahead: the store expires marks by its own clock, so windows must lie ahead.
    day = dt.datetime.now(UTC).date() + dt.timedelta(days=3)
    now = [to_ms(dt.datetime.combine(day, dt.time(12), UTC)) / 1000]
    p = make_proxy(policy(receiver.url), clock=lambda: now[0])
    for _ in range(6):
        assert p.generate(standin="cost=0.1").status_code == 200
    first = receiver.wait_for(1)[0].event
    assert (first["type"], first["threshold"], first["spent_usd"]) == ("budget.threshold", 0.5, "0.5000")
    now[0] += 86_400
    p.refresh()
    assert [e["type"] for e in p.run(p.app.alerts.evaluate)] == ["budget.recovered"]
    recovered = receiver.wait_for(2)[1].event
    assert recovered["scope"] == "budget:key:alice:day"
    assert recovered["window_start"] == format_ms(
        to_ms(dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), UTC))
    )
    assert recovered["spent_usd"] == "0.0000" and recovered["threshold"] is None
    assert p.run(p.app.alerts.evaluate) == []  # once
    for _ in range(5):
        assert p.generate(standin="cost=0.1").status_code == 200
    again = receiver.wait_for(3)[2].event
    assert (again["type"], again["threshold"], again["window_start"]) == (
        "budget.threshold",
        0.5,
        recovered["window_start"],
    )
    drain(p)
    assert len(receiver.deliveries) == 3


def test_spend_rate_of_the_last_hour_projects_exhaustion(make_proxy, up, receiver):
    day = dt.datetime.now(UTC).date() + dt.timedelta(days=3)
    now = [to_ms(dt.datetime.combine(day, dt.time(10), UTC)) / 1000]
    p = make_proxy(policy(receiver.url, limit="10.00", hold="1.00", alerts="  thresholds: [0.9]"), clock=lambda: now[0])
    assert p.generate(standin="cost=1").status_code == 200
    drain(p)
    now[0] += 20 * 60
    assert p.generate(standin="cost=1").status_code == 200  # $1 in 20 minutes: $42 more by midnight
    event = receiver.wait_for(1)[0].event
    assert (event["type"], event["scope"], event["spent_usd"]) == ("budget.projected", "budget:key:alice:day", "2.0000")
    assert event["resets_at"] == format_ms(to_ms(dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), UTC)))
    now[0] += 60
    assert p.generate(standin="cost=1").status_code == 200
    drain(p)
    assert len(receiver.deliveries) == 1  # once per window


def test_credits_low_and_topped_up_and_a_key_about_to_expire(make_proxy, up, receiver):
    up.credits_remaining_micros = 5_000_000
    expires = dt.datetime.now(UTC) + dt.timedelta(days=3)
    up.key_rows = [key_row("key-a", "alice", expires_at=expires.strftime("%Y-%m-%dT%H:%M:%S.000Z"))]
    up.key_ids = {KEY_A: "key-a"}
    alerts = "  credits_below_usd: 10.00\n  key_expiry_days: 7"
    p = make_proxy(policy(receiver.url, alerts=alerts, key="    api_key_id: key-a"))
    assert sorted(e["type"] for e in p.run(p.app.alerts.evaluate)) == ["credits.low", "key.expiring"]
    got = {d.event["type"]: d.event for d in receiver.wait_for(2)}
    low, expiring = got["credits.low"], got["key.expiring"]
    assert (low["scope"], low["credits_usd"], low["threshold_usd"]) == ("account", "5.0000", "10.0000")
    assert (expiring["scope"], expiring["expires_at"]) == (
        "key:alice",
        format_ms(to_ms(expires.replace(microsecond=0))),
    )
    assert p.run(p.app.alerts.evaluate) == []
    up.credits_remaining_micros = 50_000_000
    p.refresh()
    [recovered] = p.run(p.app.alerts.evaluate)
    assert (recovered["type"], recovered["scope"], recovered["credits_usd"]) == (
        "budget.recovered",
        "account",
        "50.0000",
    )
    assert receiver.wait_for(3)[2].signed_by(SECRET)


def test_a_failing_receiver_is_retried_with_backoff_and_counted(make_proxy, up, receiver, monkeypatch):
    monkeypatch.setattr("proxy.ops.webhooks.BACKOFF_S", (0.2, 0.4))
    p = make_proxy(policy(receiver.url, alerts="  thresholds: [0.5, 0.8]"))
    receiver.statuses = [500, 503]
    for _ in range(5):
        assert p.generate(standin="cost=0.1").status_code == 200
    tries = receiver.wait_for(3)
    assert len({d.headers["webhook-id"] for d in tries}) == 1  # one event, three attempts
    assert all(d.signed_by(SECRET) for d in tries)
    assert tries[1].at - tries[0].at >= 0.2 and tries[2].at - tries[1].at >= 0.4
    drain(p)
    assert deliveries(p) == {"sent": 1, "retried": 2}
    receiver.statuses = [500, 500, 500]
    for _ in range(3):
        assert p.generate(standin="cost=0.1").status_code == 200
    receiver.wait_for(6)
    drain(p)
    assert deliveries(p) == {"sent": 1, "retried": 4, "failed": 1}


def test_calls_never_wait_for_a_receiver(make_proxy, up, receiver):
    receiver.hold()  # the receiver answers nothing until released
    try:
        p = make_proxy(policy(receiver.url))
        for _ in range(10):
            assert p.generate(standin="cost=0.1").status_code == 200
        # All three deliveries are in the receiver's hands, unanswered, and every call is done.
        assert len(receiver.wait_for(3)) == 3
    finally:
        receiver.release()
    drain(p)
    assert deliveries(p) == {"sent": 3}


async def test_a_full_queue_drops_and_counts(receiver):
    import aiohttp

    from proxy.ops.metrics import Metrics
    from proxy.ops.webhooks import Deliveries, Endpoint

    receiver.hold()
    metrics = Metrics()
    async with aiohttp.ClientSession() as session:
        sender = Deliveries(session, metrics, time.time, backoff_s=(), max_pending=2)
        for i in range(5):
            sender.send({"id": f"msg_{i}", "type": "budget.threshold"}, [Endpoint(receiver.url)])
        assert metrics.webhook_deliveries.labels("dropped")._value.get() == 3
        await __import__("asyncio").to_thread(receiver.wait_for, 2)
        receiver.release()
        await sender.aclose(grace_s=5)
    assert metrics.webhook_deliveries.labels("sent")._value.get() == 2
    assert sorted(d.event["id"] for d in receiver.deliveries) == ["msg_0", "msg_1"]
    assert "webhook-signature" not in receiver.deliveries[0].headers  # no secret_env: unsigned


def test_an_alert_for_the_last_call_before_a_shutdown_still_goes_out(make_proxy, up, receiver):
    p = make_proxy(policy(receiver.url, hold="0.60"))
    assert p.generate(standin="cost=0.6").status_code == 200
    p.client.__exit__(None, None, None)  # shutdown right after the settle that crossed 50 %
    [delivery] = receiver.deliveries  # already there: the shutdown waited for it
    assert (delivery.event["type"], delivery.event["threshold"]) == ("budget.threshold", 0.5)
