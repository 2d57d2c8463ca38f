"""Alert delivery by webhook (docs/alerts.md): a JSON POST signed per Standard Webhooks, sent in the
background with retries and backoff, never on a guarded call's path.

Signing (https://www.standardwebhooks.com, spec §"Verifying webhook authenticity"): headers
`webhook-id` (the event's id, the same on every retry, so receivers can deduplicate),
`webhook-timestamp` (integer Unix seconds of this attempt) and `webhook-signature:
v1,<base64 HMAC-SHA256 over "{id}.{timestamp}.{body}">`. The key is the secret from the env var a
webhook's `secret_env` names: a `whsec_` secret is base64 after its prefix, as the spec serialises
it; any other secret is used as its UTF-8 bytes. Without `secret_env` deliveries are unsigned.

The secret is never logged, stored or put in a label; nor is a webhook's URL beyond its scheme
and host (`Endpoint.shown`): Slack, Discord and Teams URLs carry their secret in the path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.ops.metrics import Metrics
from proxy.policy.model import WebhookPolicy
from proxy.types import Clock

log = logging.getLogger("spend_guard.alerts")
SECRET_PREFIX = "whsec_"
# Delays before each retry (then the delivery counts as failed): about 16 minutes in all, with up to
# 20 % jitter so instances that failed together do not retry together.
BACKOFF_S: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0, 840.0)
# Each endpoint has its own lane, so a dead or slow receiver delays only its own alerts:
# deliveries queued or being retried at once to one endpoint; past this an event is dropped and
# counted: alerts must never hold memory without bound or slow a call.
MAX_PENDING = 1000
# A receiver has this long to answer (the spec recommends 15-30 s).
TIMEOUT_S = 15.0
# HTTP requests in flight at once to one endpoint (retries waiting out their backoff do not count).
MAX_CONCURRENT = 8
# How long a shutdown waits for deliveries in flight before cancelling them.
CLOSE_GRACE_S = 2.0


class SecretError(ValueError):
    """A `whsec_` secret that is not base64 after its prefix (the message never shows it)."""


def signing_key(secret: str) -> bytes:
    """The HMAC key of a webhook secret: base64-decoded after `whsec_`, else its UTF-8 bytes."""
    if not secret.startswith(SECRET_PREFIX):
        return secret.encode()
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise SecretError("the secret starts with whsec_ but the rest is not base64") from None
    if not key:
        raise SecretError("the secret is empty after whsec_")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass(frozen=True)
class Endpoint:
    url: str = field(repr=False)
    key: bytes | None = field(default=None, repr=False)  # None: unsigned
    broken: str = ""  # why its secret is unusable: nothing is sent to it

    @property
    def shown(self) -> str:
        """The URL as logs name it: scheme and host only."""
        return shown_url(self.url)

    def scrub(self, text: str) -> str:
        """`text` (an error that may quote the URL) with the URL shown as its scheme and host only."""
        text = text.replace(self.url, self.shown)
        with contextlib.suppress(ValueError):
            parts = urllib.parse.urlsplit(self.url)
            for secret in (parts.path + ("?" + parts.query if parts.query else ""), parts.path):
                if len(secret) > 1:
                    text = text.replace(secret, "/...")
        return text


def shown_url(url: str) -> str:
    """`https://hooks.slack.com/services/T0/B0/secret` -> `https://hooks.slack.com`."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "?"
        port = parts.port
    except ValueError:
        return "(a malformed URL)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def endpoints(hooks: Sequence[WebhookPolicy], environ: Mapping[str, str] = os.environ) -> list[Endpoint]:
    """The policy's webhooks with their signing keys read from the environment."""
    found = []
    for hook in hooks:
        if hook.secret_env is None:
            found.append(Endpoint(hook.url))
            continue
        secret = environ.get(hook.secret_env, "")
        if not secret:
            found.append(Endpoint(hook.url, broken=f"{hook.secret_env} is not set"))
            continue
        try:
            found.append(Endpoint(hook.url, signing_key(secret)))
        except SecretError as exc:
            found.append(Endpoint(hook.url, broken=f"{hook.secret_env}: {exc}"))
    return found


class _Lane:
    """One endpoint's deliveries: its own pending count and its own slots for requests in flight."""

    __slots__ = ("pending", "sending")

    def __init__(self) -> None:
        self.pending = 0
        self.sending = asyncio.Semaphore(MAX_CONCURRENT)

    def done(self, task: asyncio.Task[None]) -> None:
        self.pending -= 1


class Deliveries:
    """Sends events to webhooks in background tasks, at most `max_pending` at a time per endpoint;
    counts each delivery `sent`, `retried`, `failed` or `dropped` in
    spend_guard_webhook_deliveries_total."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        clock: Clock,
        *,
        backoff_s: Sequence[float] | None = None,
        max_pending: int = MAX_PENDING,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.session = session
        self.metrics = metrics
        self.clock = clock
        self.backoff_s = tuple(BACKOFF_S if backoff_s is None else backoff_s)
        self.max_pending = max_pending
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.tasks: set[asyncio.Task[None]] = set()
        self._lanes: dict[str, _Lane] = {}
        self._broken_logged: set[str] = set()
        self._closed = False

    def send(self, event: Mapping[str, Any], to: Sequence[Endpoint]) -> None:
        """Queue `event` for each endpoint; returns at once. A full queue drops and counts."""
        body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
        for endpoint in to:
            if endpoint.broken:
                self.metrics.webhook_deliveries.labels("failed").inc()
                if endpoint.url not in self._broken_logged:
                    self._broken_logged.add(endpoint.url)
                    log.error("alert webhook %s is not sent: %s", endpoint.shown, endpoint.broken)
                continue
            lane = self._lanes.get(endpoint.url)
            if lane is None:
                lane = self._lanes[endpoint.url] = _Lane()
            if self._closed or lane.pending >= self.max_pending:
                self.metrics.webhook_deliveries.labels("dropped").inc()
                log.warning(
                    "alert %s to %s dropped: %d deliveries already pending", event["id"], endpoint.shown, lane.pending
                )
                continue
            task = asyncio.create_task(self._deliver(endpoint, lane, str(event["id"]), body), name="webhook")
            lane.pending += 1
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            task.add_done_callback(lane.done)

    async def _deliver(self, endpoint: Endpoint, lane: _Lane, msg_id: str, body: bytes) -> None:
        for attempt in range(len(self.backoff_s) + 1):
            async with lane.sending:
                retry_after, why = await self._attempt(endpoint, msg_id, body)
            if retry_after is None:
                self.metrics.webhook_deliveries.labels("sent").inc()
                return
            if retry_after < 0 or attempt == len(self.backoff_s):
                self.metrics.webhook_deliveries.labels("failed").inc()
                log.warning("alert %s to %s failed after %d attempt(s): %s", msg_id, endpoint.shown, attempt + 1, why)
                return
            self.metrics.webhook_deliveries.labels("retried").inc()
            delay = max(retry_after, self.backoff_s[attempt] * (1 + 0.2 * random.random()))
            log.info("alert %s to %s: %s; retrying in %.1f s", msg_id, endpoint.shown, why, delay)
            await asyncio.sleep(delay)

    async def _attempt(self, endpoint: Endpoint, msg_id: str, body: bytes) -> tuple[float | None, str]:
        """One POST: (None, "") when delivered; else (seconds to wait at least, -1 to give up; why)."""
        timestamp = int(self.clock())
        headers = {"Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
        if endpoint.key is not None:
            headers["webhook-signature"] = sign(endpoint.key, msg_id, timestamp, body)
        try:
            async with self.session.post(
                endpoint.url, data=body, headers=headers, timeout=self.timeout, allow_redirects=False
            ) as resp:
                await resp.read()
                status, retry_header = resp.status, resp.headers.get("Retry-After", "")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return 0.0, endpoint.scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if 200 <= status < 300:
            return None, ""
        if status == 410:  # Gone: the receiver wants no more (spec: stop sending)
            return -1.0, "answered 410 Gone"
        if 300 <= status < 400:  # spec: a redirect is a failure; fix the URL instead
            return -1.0, f"answered HTTP {status} (redirects are not followed)"
        wait = float(retry_header) if retry_header.isdigit() else 0.0
        return min(wait, self.backoff_s[-1] if self.backoff_s else 0.0), f"answered HTTP {status}"

    async def aclose(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Stop taking events; give deliveries in flight `grace_s`, then cancel the rest."""
        self._closed = True
        if not self.tasks:
            return
        _, pending = await asyncio.wait(set(self.tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("%d alert delivery(ies) still pending at shutdown were abandoned", len(pending))
            await asyncio.wait(pending, timeout=1.0)
