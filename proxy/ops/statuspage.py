"""`/-/status` and `/-/status.json`: a page an operator opens in a browser (docs/status-page.md).

One self-contained HTML file (proxy/ops/static/status.html: inline CSS and JS, no build step, nothing
fetched from elsewhere) that fetches `/-/status.json` and redraws itself every few seconds. The
JSON is the same data: account credits, every scope's limit, spent, held and reset, holds in
flight, the alerts sent in each scope's current window (by any instance) and this process's latest
refusals.

Protected: the policy's `admin: {token_sha256}` enables both; a browser sends the admin token as
the password of HTTP Basic authentication (any user name). Without an `admin` section they answer
404, like any unknown path; with wrong or missing credentials 401 and a Basic challenge. The token
is hashed before it is compared (in constant time) and never logged or echoed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import importlib.resources
import re
from collections.abc import Sequence
from typing import Any

from starlette.responses import HTMLResponse, PlainTextResponse, Response

from proxy import __version__
from proxy.errors import StoreError, error_response
from proxy.guard.recent_refusals import RecentRefusals
from proxy.money import format_usd
from proxy.ops.levels import ScopeLevel, every_level
from proxy.policy.model import Policy
from proxy.store.contract import StatusStore
from proxy.windows import format_ms, window_start_ms

REALM = 'Basic realm="spend-guard"'
NO_STORE = {"Cache-Control": "no-store"}
INLINE_RE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


def authorize(policy: Policy, authorization: Sequence[str]) -> Response | None:
    """None when the request carries the admin token; else the response to send instead."""
    if policy.admin is None:
        return PlainTextResponse("Not Found", status_code=404)
    digest = _password_digest(authorization[0]) if len(authorization) == 1 else None
    if digest is not None and hmac.compare_digest(digest, policy.admin.token_sha256):
        return None
    return error_response(
        401,
        "unauthorized",
        "The status page needs the admin token as the password of HTTP Basic authentication (any user name).",
        headers={"WWW-Authenticate": REALM, **NO_STORE},
    )


def authorize_metrics(policy: Policy, authorization: Sequence[str]) -> Response | None:
    """None when `/-/metrics` is open (the default) or the request carries the admin token, as a
    Bearer token or a Basic password (Prometheus sends either); else a 401."""
    admin = policy.admin
    if admin is None or not admin.protect_metrics:
        return None
    digest = None
    if len(authorization) == 1:
        scheme, _, token = authorization[0].partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            digest = hashlib.sha256(token.strip().encode()).hexdigest()
        else:
            digest = _password_digest(authorization[0])
    if digest is not None and hmac.compare_digest(digest, admin.token_sha256):
        return None
    return error_response(
        401,
        "unauthorized",
        "/-/metrics needs the admin token (admin.protect_metrics): as a Bearer token or the password of HTTP Basic "
        "authentication.",
        headers={"WWW-Authenticate": REALM, **NO_STORE},
    )


def _password_digest(header: str) -> str | None:
    """sha256 hex of the password of a Basic `Authorization` header, or None if it is not one."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, colon, password = decoded.partition(":")
    return hashlib.sha256(password.encode()).hexdigest() if colon else None


async def status_data(
    store: StatusStore,
    policy: Policy,
    refusals: RecentRefusals,
    now_s: float,
    *,
    file_version: str | None = None,
    reload_error: str | None = None,
) -> dict[str, Any]:
    """What the page shows; scopes are read in one round trip (the store's `levels`).
    `file_version`: the version of the policy files on disk, beside the enforced `policy.version`;
    `reload_error`: the latest reload's failure, while no reload has succeeded since."""
    body: dict[str, Any] = {
        "generated_at": format_ms(int(now_s * 1000)),
        "version": __version__,
        "policy_version": policy.version,
        "policy_file_version": file_version,
        "policy_reload_error": reload_error,
        "account": {"name": policy.account.name, "floor_usd": format_usd(policy.account.min_remaining_micros)},
        "scopes": [],
        "holds_in_flight": None,
        "refusals": {"since_start": refusals.count, "latest": [r.as_json() for r in refusals.latest()]},
        "store_error": None,
    }
    try:
        (levels, credits), holds, fetched_ms = await asyncio.gather(
            every_level(store, policy, now_s), store.open_holds(), store.snapshot_fetched_ms()
        )
    except StoreError as exc:
        body["store_error"] = f"the store could not be read ({type(exc.__cause__ or exc).__name__})"
        return body
    body["account"]["credits_usd"] = None if credits is None else format_usd(credits)
    body["account"]["snapshot_at"] = None if fetched_ms is None else format_ms(fetched_ms)
    body["holds_in_flight"] = holds
    body["alerts"] = await _alerts_sent(store, policy, levels, now_s)
    for level in levels:
        used = level.spent_micros + level.held_micros
        fraction = used / level.limit_micros if level.limit_micros > 0 else (1.0 if level.limit_micros == 0 else 0.0)
        body["scopes"].append(level.as_json(now_s, used_fraction=round(fraction, 4)))
    return body


async def _alerts_sent(
    store: StatusStore, policy: Policy, levels: list[ScopeLevel], now_s: float
) -> list[dict[str, Any]] | None:
    """The alerts claimed (so sent, by whichever instance) in each scope's current window, newest
    first; None when they cannot be read."""
    scopes = [(level.scope, window_start_ms(level.period, now_s)) for level in levels]
    scopes.append(("account", 0))  # credits.low
    scopes += [(f"key:{key.name}", 0) for key in policy.keys]  # key.expiring
    # key.spend_outside_guard, kept under scopes of their own (proxy/ops/alerts.py outside_spend)
    scopes += [(f"outside:key:{key.name}", 0) for key in policy.keys] + [("outside:account", 0)]
    try:
        sent = await store.alerts_sent(scopes)
    except StoreError:
        return None
    rows = [
        {"scope": scope.removeprefix("outside:"), "alert": _alert_name(mark), "at": format_ms(at_ms)}
        for scope, marks in sent.items()
        for mark, at_ms in marks.items()
    ]
    return sorted(rows, key=lambda row: row["at"], reverse=True)


def _alert_name(mark: str) -> str:
    """alert_marks.lua's mark names, as the webhook event types say them."""
    if mark.startswith("t:"):
        return f"budget.threshold {float(mark[2:]):.0%}"
    if mark.startswith("exp:"):
        return "key.expiring"
    if mark.startswith("outside:"):
        return "key.spend_outside_guard"
    return {"projected": "budget.projected", "low": "credits.low"}.get(mark, mark)


@functools.cache
def _page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy: only its own inline script and style may run."""
    html = (importlib.resources.files("proxy.ops") / "static" / "status.html").read_bytes()
    hashes = {"script": [], "style": []}  # type: dict[str, list[str]]
    for kind, content in INLINE_RE.findall(html):
        hashes[kind.decode()].append("'sha256-" + base64.b64encode(hashlib.sha256(content).digest()).decode() + "'")
    csp = (
        f"default-src 'none'; script-src {' '.join(hashes['script'])}; style-src {' '.join(hashes['style'])}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, csp


def page_response() -> Response:
    html, csp = _page()
    headers = {
        **NO_STORE,
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return HTMLResponse(html, headers=headers)
