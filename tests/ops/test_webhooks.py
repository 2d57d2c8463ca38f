"""Webhook signing and delivery rules (proxy/ops/webhooks.py): the Standard Webhooks test vector,
secrets read from the environment and never shown, what is retried and what is not."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import aiohttp
import pytest

from proxy.ops.metrics import Metrics
from proxy.ops.webhooks import Deliveries, Endpoint, SecretError, endpoints, sign, signing_key
from proxy.policy.model import WebhookPolicy
from tests.support.webhook_receiver import Receiver


def test_signature_reproduces_the_standard_webhooks_test_vector():
    # The vector the Standard Webhooks reference libraries test against.
    key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_secret_without_the_prefix_is_its_own_bytes_and_a_bad_one_is_never_shown():
    assert signing_key("plain secret") == b"plain secret"
    for bad in ("whsec_not*base64!", "whsec_"):
        with pytest.raises(SecretError) as caught:
            signing_key(bad)
        assert bad[6:] == "" or bad[6:] not in str(caught.value)
    found = endpoints(
        [
            WebhookPolicy("http://127.0.0.1:9/a", "SG_SET"),
            WebhookPolicy("http://127.0.0.1:9/b", "SG_UNSET"),
            WebhookPolicy("http://127.0.0.1:9/c", "SG_BAD"),
            WebhookPolicy("http://127.0.0.1:9/d"),
        ],
        {"SG_SET": "whsec_c2VjcmV0", "SG_BAD": "whsec_%%%"},
    )
    assert [(e.key, e.broken) for e in found] == [
        (b"secret", ""),
        (None, "SG_UNSET is not set"),
        (None, "SG_BAD: the secret starts with whsec_ but the rest is not base64"),
        (None, ""),
    ]
    assert "secret" not in repr(found[0])


@pytest.mark.parametrize("status", [410, 301])
async def test_gone_and_redirects_are_not_retried(status):
    metrics = Metrics()
    with Receiver() as receiver:
        receiver.statuses = [status]
        async with aiohttp.ClientSession() as session:
            sender = Deliveries(session, metrics, time.time, backoff_s=(0.01, 0.01))
            sender.send({"id": "msg_1", "type": "credits.low"}, [Endpoint(receiver.url)])
            await sender.aclose(grace_s=5)
        assert len(receiver.deliveries) == 1
    assert metrics.webhook_deliveries.labels("failed")._value.get() == 1
    assert metrics.webhook_deliveries.labels("retried")._value.get() == 0


async def test_an_unusable_secret_sends_nothing_and_says_so_once(caplog):
    metrics = Metrics()
    caplog.set_level(logging.ERROR, "spend_guard.alerts")
    async with aiohttp.ClientSession() as session:
        sender = Deliveries(session, metrics, time.time)
        broken = endpoints([WebhookPolicy("http://127.0.0.1:9/hook", "SG_BAD")], {"SG_BAD": "whsec_%%%"})
        for i in range(3):
            sender.send({"id": f"msg_{i}", "type": "credits.low"}, broken)
        assert not sender.tasks
        await sender.aclose()
    assert metrics.webhook_deliveries.labels("failed")._value.get() == 3
    assert [r.getMessage() for r in caplog.records] == [
        "alert webhook http://127.0.0.1:9 is not sent: SG_BAD: the secret starts with whsec_ but the rest is not base64"
    ]
    assert "%%%" not in caplog.text


async def test_a_blackholed_endpoint_delays_only_its_own_deliveries():
    metrics = Metrics()
    with socket.socket() as blackhole, Receiver() as healthy:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)  # connections complete, nothing is ever read or answered
        dead = Endpoint(f"http://127.0.0.1:{blackhole.getsockname()[1]}/hook")
        async with aiohttp.ClientSession() as session:
            sender = Deliveries(session, metrics, time.time, backoff_s=(0.01,), timeout_s=10)
            started = time.monotonic()
            for i in range(30):
                sender.send({"id": f"msg_{i}", "type": "credits.low"}, [dead, Endpoint(healthy.url)])
            arrived = await asyncio.to_thread(healthy.wait_for, 30, 5)
            await sender.aclose(grace_s=0.1)
    latest = max(delivery.at for delivery in arrived) - started
    assert latest < 1, f"the healthy endpoint's last alert arrived {latest:.1f} s after it was sent"
    assert metrics.webhook_deliveries.labels("sent")._value.get() == 30


async def test_logs_name_a_webhook_by_scheme_and_host_only(caplog):
    # Slack, Discord and Teams URLs carry their secret in the path.
    caplog.set_level(logging.INFO, "spend_guard.alerts")
    metrics = Metrics()
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
    url = f"http://127.0.0.1:{port}/services/T0SECRET/B0SECRET/xoxbSECRETSECRET?token=SECRET"
    async with aiohttp.ClientSession() as session:
        sender = Deliveries(session, metrics, time.time, backoff_s=(0.01,), max_pending=1)
        sender.send({"id": "msg_1", "type": "credits.low"}, [Endpoint(url)])
        sender.send({"id": "msg_2", "type": "credits.low"}, [Endpoint(url)])  # dropped: one pending at most
        await sender.aclose(grace_s=5)
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"alert msg_1 to http://127.0.0.1:{port} failed after 2 attempt(s)" in m for m in messages), messages
    assert any(f"alert msg_2 to http://127.0.0.1:{port} dropped" in m for m in messages), messages
    assert "SECRET" not in caplog.text
    assert "SECRET" not in repr(Endpoint(url))
