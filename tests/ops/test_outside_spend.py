"""Spend outside the guard: a credits refresh that finds ImageRouter charged a guarded key (or the
account) beyond what passed through the proxy reports it once; traffic that all passes the guard,
calls in flight across refreshes included, never does (proxy/ops/outside.py)."""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.ops.outside import TOLERANCE_MICROS, OutsideSpend, compare, counted
from proxy.policy.load import load_policy
from proxy.store.records import Levels, RowLevel, RowState, ScopeUsage, Snapshot
from tests.support.constants import KEY_A, KEY_B, SHA_A, SHA_B
from tests.support.standin import key_row
from tests.support.webhook_receiver import Receiver

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "sg-admin-" + "o" * 40
DAY_START = 1_800_000_000_000


def policy_text(receiver_url: str | None = None) -> str:
    hooks = f'alerts: {{webhooks: [{{url: "{receiver_url}"}}]}}\n' if receiver_url else ""
    return f"""{hooks}
admin: {{token_sha256: '{hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}'}}
keys:
  - {{name: alice, key_sha256: '{SHA_A}', api_key_id: key-a}}
  - {{name: bob, key_sha256: '{SHA_B}', api_key_id: key-b}}
"""


@pytest.fixture
def rows(up) -> None:
    up.key_rows = [
        key_row("key-a", "alice", spend_limit="50.00", period="day"),
        key_row("key-b", "bob", spend_limit="50.00", period="day"),
    ]
    up.key_ids = {KEY_A: "key-a", KEY_B: "key-b"}


def outside(proxy) -> dict[str, float]:
    text = proxy.client.get("/-/metrics").text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "spend_guard_outside_spend_usd_total":
                found[sample.labels["key"]] = round(sample.value, 4)
            if sample.name == "spend_guard_account_outside_spend_usd_total":
                found["(account)"] = round(sample.value, 4)
    return found


def direct_call(up, token: str, cost: str) -> None:
    """A call straight to the stand-in, as a client holding a guarded key could make it."""
    response = httpx.post(
        up.url + "/v1/openai/images/generations",
        json={"model": "openai/gpt-image-1", "prompt": "around the guard"},
        headers={"Authorization": f"Bearer {token}", "X-Standin": f"cost={cost}"},
        timeout=30,
    )
    assert response.status_code == 200


def test_a_direct_call_with_a_guarded_key_is_reported_within_one_refresh_exactly_once(make_proxy, up, rows) -> None:
    with Receiver() as receiver:
        proxy = make_proxy(policy_text(receiver.url))
        assert proxy.generate(token=KEY_A, standin="cost=0.05").status_code == 200
        proxy.refresh()
        assert outside(proxy) == {"(account)": 0.0}  # nothing yet (the labelled counter has no series)

        direct_call(up, KEY_A, "0.30")
        proxy.refresh()
        assert outside(proxy) == {"alice": 0.3, "(account)": 0.3}
        receiver.wait_for(2)
        proxy.run(proxy.app.alerts.drain)
        events = sorted((d.event for d in receiver.deliveries), key=lambda e: e["scope"])
        assert [(e["type"], e["scope"], e["outside_usd"]) for e in events] == [
            ("key.spend_outside_guard", "account", "0.3000"),
            ("key.spend_outside_guard", "key:alice", "0.3000"),
        ]
        alice = events[1]
        assert alice["message"] == (
            "ImageRouter charged key alice $0.3000 that did not pass through the guard (it reports $0.3500 spent "
            "this window; the guard accounted for $0.0500)"
        )
        assert alice["guard_usd"] == "0.0500" and alice["window_start"] is not None

        # The next refreshes find nothing new, and a second direct call in the same window counts
        # but is not alerted again.
        proxy.refresh()
        proxy.refresh()
        assert outside(proxy) == {"alice": 0.3, "(account)": 0.3}
        direct_call(up, KEY_A, "0.20")
        proxy.refresh()
        proxy.run(proxy.app.alerts.drain)
        assert outside(proxy) == {"alice": 0.5, "(account)": 0.5}
        assert len(receiver.deliveries) == 2

    admin = {"Authorization": "Basic " + base64.b64encode(f"ops:{ADMIN_TOKEN}".encode()).decode()}
    status = proxy.client.get("/-/status.json", headers=admin).json()
    shown = {(row["scope"], row["alert"]) for row in status["alerts"]}
    assert {("key:alice", "key.spend_outside_guard"), ("account", "key.spend_outside_guard")} <= shown


def test_without_webhooks_it_is_counted_and_shown_on_the_status_page(make_proxy, up, rows, caplog) -> None:
    proxy = make_proxy(policy_text())
    proxy.refresh()
    direct_call(up, KEY_B, "0.30")
    proxy.refresh()
    assert outside(proxy) == {"bob": 0.3, "(account)": 0.3}
    assert any(
        r.getMessage().startswith("SPEND OUTSIDE THE GUARD: ImageRouter charged key bob $0.3000")
        for r in caplog.records
    )
    admin = {"Authorization": "Basic " + base64.b64encode(f"ops:{ADMIN_TOKEN}".encode()).decode()}
    alerts = proxy.client.get("/-/status.json", headers=admin).json()["alerts"]
    assert {(row["scope"], row["alert"]) for row in alerts} >= {("key:bob", "key.spend_outside_guard")}


def test_calls_in_flight_across_refreshes_are_never_spend_outside_the_guard(make_proxy, up, rows) -> None:
    """Guarded calls pre-charged upstream and still in flight while snapshots are fetched, then
    settled between later refreshes: every refresh finds nothing outside."""
    proxy = make_proxy(policy_text())
    proxy.refresh()
    with ThreadPoolExecutor(8) as pool:
        for round_ in range(3):
            gate = f"flight-{round_}"
            calls = [
                pool.submit(proxy.generate, token=(KEY_A, KEY_B)[i % 2], standin=f"gate={gate},cost=0.0{i + 1}")
                for i in range(6)
            ]
            up.wait_for_requests(7 * round_ + 6, timeout=30)  # six a round, and one more after each
            assert len(proxy.runtime.flights) == 6
            proxy.refresh()  # all six pre-charged upstream, none settled
            assert any(row["period_spend"] != "0.0000" for row in up.key_rows)
            proxy.refresh()
            up.release(gate)
            assert sorted(call.result(timeout=30).status_code for call in calls) == [200] * 6
            proxy.refresh()
            done = pool.submit(proxy.generate, token=KEY_A, standin="cost=0.02")
            proxy.refresh()  # maybe mid-call
            assert done.result(timeout=30).status_code == 200
    proxy.refresh()
    assert outside(proxy) == {"(account)": 0.0}


def levels(row: RowLevel | None, *, remaining: int = 10_000_000, charged: int = 0, held: int = 0) -> Levels:
    return Levels(DAY_START + 1000, remaining, ScopeUsage(charged, held), {"id:key-a": row} if row else {}, {})


def row_level(spent: int, held: int = 0) -> RowLevel:
    return RowLevel(True, None, 50_000_000, "day", DAY_START, spent, held)


def snapshot(spend: int, remaining: int, *, period_start: int | None = None, period: str = "day") -> Snapshot:
    state = RowState(True, None, 50_000_000, period, spend, period_start)
    return Snapshot(DAY_START + 60_000, remaining, {"id:key-a": state}, {})


def alice_policy(tmp_path: Path):
    path = tmp_path / "policy.yaml"
    path.write_text(f"keys: [{{name: alice, key_sha256: '{SHA_A}', api_key_id: key-a}}]\n")
    return load_policy(path)


def test_the_bound_is_the_previous_spend_plus_charges_plus_holds(tmp_path: Path) -> None:
    policy = alice_policy(tmp_path)
    # The guard accounted for $0.40 spent and $0.30 held; ImageRouter reports up to $0.70 (+ a cent).
    before = levels(row_level(400_000, 300_000), charged=400_000, held=300_000)
    assert compare(policy, before, snapshot(700_000 + TOLERANCE_MICROS, 9_300_000), DAY_START) == []
    found = compare(policy, before, snapshot(1_000_000, 9_000_000), DAY_START)
    assert found == [
        OutsideSpend("alice", 300_000, DAY_START, "day", 1_000_000, 700_000),
        OutsideSpend(None, 300_000, DAY_START, None, 9_000_000, 9_300_000),
    ]


def test_nothing_is_compared_without_a_previous_snapshot_or_across_a_period_change(tmp_path: Path) -> None:
    policy = alice_policy(tmp_path)
    empty = Levels(None, 0, ScopeUsage(0, 0), {}, {})
    assert compare(policy, empty, snapshot(5_000_000, 1_000_000), DAY_START) == []
    before = levels(row_level(0), remaining=20_000_000)
    assert compare(policy, before, snapshot(5_000_000, 25_000_000, period="week"), DAY_START) == []  # and a top-up


def test_a_new_window_compares_the_new_windows_spend(tmp_path: Path) -> None:
    # The previous snapshot was of yesterday: the guard's bound in today's window is today's charges.
    row = RowState(True, None, 50_000_000, "day", 900_000, DAY_START - 86_400_000)
    assert counted(row, DAY_START, DAY_START + 1) == 0
    assert counted(RowState(True, None, None, None, 900_000, None), 0, DAY_START) == 900_000
    policy = alice_policy(tmp_path)
    before = levels(row_level(100_000), charged=100_000)
    assert compare(policy, before, snapshot(100_000, 9_900_000, period_start=DAY_START), DAY_START) == []


def test_a_shipped_rule_alerts_on_spend_outside_the_guard() -> None:
    rules = yaml.safe_load((ROOT / "docker" / "prometheus" / "alerts.yml").read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r["alert"] == "SpendGuardSpendOutsideGuard"]
    assert "spend_guard_outside_spend_usd_total" in rule["expr"]
