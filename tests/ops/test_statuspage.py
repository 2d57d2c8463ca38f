"""`/-/status` and `/-/status.json` (docs/status-page.md): enabled by the policy's `admin` section,
opened with HTTP Basic authentication whose password is the admin token. The browser test is in
tests/ops/test_statuspage_browser.py."""

from __future__ import annotations

import base64
import hashlib
import logging
import re

import pytest

from proxy.errors import StoreError
from proxy.guard.recent_refusals import MAX_RECENT_REFUSALS, RecentRefusal, RecentRefusals
from tests.support.constants import KEY_A, KEY_B
from tests.support.policies import budget, flow, key_entry, policy_yaml
from tests.support.served import ServedProxy
from tests.support.sockets import connect, envelope, read_until_closed

ADMIN_TOKEN = "sg-admin-" + "q" * 40
ADMIN_SHA = hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
KEYS = policy_yaml(
    groups=[flow(name="design", budgets=[budget("10.00", "month")])],
    keys=[
        key_entry(group="design", budgets=[budget("2.00", "day")]),
        key_entry("bob", token=KEY_B, budgets=[budget("0.01", "week", mode="enforce")]),
    ],
)
POLICY = f"admin: {{token_sha256: '{ADMIN_SHA}'}}\n" + KEYS


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_without_an_admin_section_both_answer_404_like_any_unknown_path(make_proxy) -> None:
    proxy = make_proxy(KEYS)
    for path in ("/-/status", "/-/status.json"):
        response = proxy.client.get(path, headers=basic("ops", ADMIN_TOKEN))
        assert response.status_code == 404
        assert response.text == proxy.client.get("/-/nothing-here").text


def test_wrong_or_missing_credentials_get_401_and_a_basic_challenge(make_proxy) -> None:
    proxy = make_proxy(POLICY)
    attempts = [
        {},
        basic("ops", "wrong"),
        basic("ops", ADMIN_TOKEN + "x"),
        {"Authorization": f"Bearer {ADMIN_TOKEN}"},  # the token, but not as Basic
        {"Authorization": "Basic %%%"},
        {"Authorization": "Basic " + base64.b64encode(ADMIN_TOKEN.encode()).decode()},  # no user:password colon
    ]
    for path in ("/-/status", "/-/status.json"):
        for headers in attempts:
            response = proxy.client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"] == 'Basic realm="spend-guard"'
            assert response.json()["error"]["type"] == "unauthorized"
            assert ADMIN_TOKEN not in response.text


def test_the_admin_token_opens_the_page_with_any_user_name(make_proxy) -> None:
    proxy = make_proxy(POLICY)
    for user in ("ops", "", "anyone at all"):
        response = proxy.client.get("/-/status", headers=basic(user, ADMIN_TOKEN))
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
    page = response.text
    # Self-contained: nothing is loaded from anywhere else, and only its own inline code runs.
    loads = r"\bsrc=|@import|url\(|//[a-z0-9.-]+[:/]"
    assert not re.search(loads, page), re.findall(loads, page)
    assert re.findall(r'\bhref="([^"]*)"', page) == ["data:,"]
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
    assert response.headers["cache-control"] == "no-store"


def test_status_json_shows_every_scope_credits_holds_and_the_latest_refusals(make_proxy, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = make_proxy(POLICY)
    assert proxy.generate(standin="cost=0.25").status_code == 200
    refused = proxy.generate(token=KEY_B)
    assert refused.status_code == 402
    response = proxy.client.get("/-/status.json", headers=basic("ops", ADMIN_TOKEN))
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    data = response.json()
    scopes = {scope["scope"]: scope for scope in data["scopes"]}
    assert set(scopes) == {"account", "budget:key:alice:day", "budget:group:design:month", "budget:key:bob:week"}
    day = scopes["budget:key:alice:day"]
    assert (day["limit_usd"], day["spent_usd"], day["held_usd"], day["remaining_usd"]) == (
        "2.0000",
        "0.2500",
        "0.0000",
        "1.7500",
    )
    assert day["used_fraction"] == 0.125 and day["resets_at"].endswith("T00:00:00Z")
    assert scopes["budget:group:design:month"]["spent_usd"] == "0.2500"
    assert scopes["account"]["resets_at"] is None
    assert data["account"]["credits_usd"] == "100.0000" and data["account"]["snapshot_at"]
    assert data["holds_in_flight"] == 0
    assert data["refusals"]["since_start"] == 1
    (latest,) = data["refusals"]["latest"]
    assert (latest["key"], latest["scope"], latest["status"], latest["error_type"]) == (
        "bob",
        "budget:key:bob:week",
        402,
        "spend_limit_exceeded",
    )
    assert latest["request_id"] == refused.headers["x-request-id"]
    assert data["store_error"] is None
    for text in (response.text, caplog.text):
        assert ADMIN_TOKEN not in text and KEY_A not in text and KEY_B not in text


def test_status_json_says_when_the_store_cannot_be_read(make_proxy, monkeypatch) -> None:
    proxy = make_proxy(POLICY)

    async def down(*args: object) -> None:
        raise StoreError("store down") from ConnectionError("refused")

    monkeypatch.setattr(proxy.runtime.store, "levels", down)
    response = proxy.client.get("/-/status.json", headers=basic("ops", ADMIN_TOKEN))
    assert response.status_code == 200
    data = response.json()
    assert data["scopes"] == [] and data["store_error"] == "the store could not be read (ConnectionError)"


def test_the_refusal_ring_keeps_only_the_latest() -> None:
    ring = RecentRefusals()
    for n in range(MAX_RECENT_REFUSALS + 7):
        ring.add(
            RecentRefusal(
                1_700_000_000 + n, "bob", "budget:key:bob:week", 402, "spend_limit_exceeded", f"#{n}", f"r{n}"
            )
        )
    latest = ring.latest()
    assert len(latest) == MAX_RECENT_REFUSALS and ring.count == MAX_RECENT_REFUSALS + 7
    assert latest[0].message == f"#{MAX_RECENT_REFUSALS + 6}" and latest[-1].message == "#7"
    assert latest[0].as_json()["at"] == "2023-11-14T22:14:16Z"


def test_status_json_lists_the_alerts_sent_in_each_scopes_current_window(make_proxy) -> None:
    import time

    from proxy.store.records import MarkRequest
    from proxy.windows import window_start_ms

    proxy = make_proxy(POLICY)
    store, now_s = proxy.runtime.store, time.time()
    day = window_start_ms("day", now_s)
    # What the alert loop claims when alice's day budget crosses 50 % and 80 % (any instance) ...
    proxy.run(store.alert_marks, "budget:key:alice:day", MarkRequest(day, 0, int(now_s * 1000) - 5000, claim=["t:0.5"]))
    proxy.run(store.alert_marks, "budget:key:alice:day", MarkRequest(day, 0, int(now_s * 1000), claim=["t:0.8"]))
    proxy.run(store.alert_marks, "account", MarkRequest(0, 0, int(now_s * 1000), claim=["low"]))
    # ... and a mark of a week that is over: not this window's.
    old_week = window_start_ms("week", now_s) - 7 * 86_400_000
    proxy.run(store.alert_marks, "budget:key:bob:week", MarkRequest(old_week, 0, int(now_s * 1000), claim=["t:1"]))
    data = proxy.client.get("/-/status.json", headers=basic("ops", ADMIN_TOKEN)).json()
    # newest first: the 50 % mark, claimed five seconds earlier, comes last
    assert (data["alerts"][-1]["scope"], data["alerts"][-1]["alert"]) == (
        "budget:key:alice:day",
        "budget.threshold 50%",
    )
    assert sorted((a["scope"], a["alert"]) for a in data["alerts"]) == [
        ("account", "credits.low"),
        ("budget:key:alice:day", "budget.threshold 50%"),
        ("budget:key:alice:day", "budget.threshold 80%"),
    ]
    assert all(a["at"].endswith("Z") for a in data["alerts"])
    page = proxy.client.get("/-/status", headers=basic("ops", ADMIN_TOKEN)).text
    assert 'id="alerts"' in page and "Alerts sent this window" in page


@pytest.mark.system
def test_every_spelling_of_an_own_path_is_served_here_and_never_forwarded(tmp_path, up) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("account: {name: spellings, refresh_s: 1, max_staleness_s: 300}\n" + POLICY)
    auth = basic("ops", ADMIN_TOKEN)["Authorization"]
    with ServedProxy(policy, up.url, None) as proxy:
        for path in (
            "//-/status.json",
            "/x/../-/status.json",
            "/%2D/status.json",
            "/-/STATUS.json",
            "/-/status.json/",
            "http://elsewhere.example/-/status.json",
        ):
            with connect(proxy.port) as sock:
                sock.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n".encode()
                )
                reply, _ = read_until_closed(sock, 5)
            status, _, body = envelope(reply)
            assert status == 200 and "scopes" in body, (path, reply[:200])
        with connect(proxy.port) as sock:  # unknown ones are this proxy's 404, not ImageRouter's
            sock.sendall(
                f"GET //-/nothing HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n".encode()
            )
            reply, _ = read_until_closed(sock, 5)
        assert reply.startswith(b"HTTP/1.1 404") and b"spend-guard" not in reply
        # The page with a trailing slash goes to its one spelling, relative: never built from Host.
        with connect(proxy.port) as sock:
            sock.sendall(b"GET /-/status/ HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
            reply, _ = read_until_closed(sock, 5)
        head = reply.partition(b"\r\n\r\n")[0].decode().lower()
        assert head.startswith("http/1.1 307") and "\r\nlocation: ../status\r\n" in head, head
    assert [r.path for r in up.requests if "status" in r.path or "nothing" in r.path] == []


def test_metrics_are_open_unless_the_admin_section_protects_them(make_proxy) -> None:
    assert make_proxy(POLICY).client.get("/-/metrics").status_code == 200
    proxy = make_proxy(f"admin: {{token_sha256: '{ADMIN_SHA}', protect_metrics: true}}\n" + KEYS)
    for headers in ({}, basic("prometheus", "wrong"), {"Authorization": "Bearer wrong"}):
        denied = proxy.client.get("/-/metrics", headers=headers)
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "unauthorized"
        assert denied.headers["www-authenticate"] == 'Basic realm="spend-guard"'
    for headers in (basic("prometheus", ADMIN_TOKEN), {"Authorization": f"Bearer {ADMIN_TOKEN}"}):
        scraped = proxy.client.get("/-/metrics", headers=headers)
        assert scraped.status_code == 200 and "spend_guard_" in scraped.text
    assert proxy.client.get("/%2D/METRICS").status_code == 401  # every spelling
