"""Shadow-aware alerting: a shadow budget may sit beside an enforced one of the same period (each with
an identity of its own), scope gauges and webhook events carry the budget's mode, and the shipped
rules never page for a shadow budget (docker/prometheus/alerts_test.yml proves it with promtool)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.policy.load import load_policy
from proxy.policy.reload import budget_changes
from tests.support.constants import SHA_A
from tests.support.webhook_receiver import Receiver

ROOT = Path(__file__).resolve().parents[2]
TRIAL = f"""
models: {{overrides: {{"openai/gpt-image-1": 0.25}}}}
groups:
  - name: design
    budgets: [{{limit_usd: 50, period: month}}, {{limit_usd: 5, period: month, mode: shadow}}]
keys:
  - name: alice
    key_sha256: {SHA_A}
    group: design
    budgets: [{{limit_usd: 1.00, period: day}}, {{limit_usd: 0.50, period: day, mode: shadow}}]
"""


def test_a_shadow_and_an_enforced_budget_share_a_period_each_with_its_own_identity(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(TRIAL)
    policy = load_policy(path)
    (alice,) = policy.keys
    fingerprint = f"key-fp:{SHA_A[:24]}"
    assert [(b.id, b.counter, b.limit_micros, b.shadow) for b in alice.budgets] == [
        ("key:alice:day", f"{fingerprint}:day", 1_000_000, False),
        ("key:alice:day:shadow", f"{fingerprint}:day:shadow", 500_000, True),
    ]
    assert [(b.id, b.counter, b.shadow) for b in policy.groups["design"].budgets] == [
        ("group:design:month", "group:design:month", False),
        ("group:design:month:shadow", "group:design:month:shadow", True),
    ]
    # A shadow budget alone on its period keeps the identity it always had.
    alone = tmp_path / "alone.yaml"
    alone.write_text(
        f"keys: [{{name: alice, key_sha256: '{SHA_A}', budgets: [{{limit_usd: 1, period: day, mode: shadow}}]}}]"
    )
    (budget,) = load_policy(alone).keys[0].budgets
    assert (budget.id, budget.counter) == ("key:alice:day", f"{fingerprint}:day")


def test_promoting_the_shadow_cap_keeps_the_enforced_counter(tmp_path: Path) -> None:
    """Trial done: the enforced budget goes and the shadow one is switched to enforce. The new
    enforced budget counts on in the counter both counted the same calls in."""
    path = tmp_path / "policy.yaml"
    path.write_text(TRIAL)
    before = load_policy(path)
    path.write_text(
        TRIAL.replace(
            "{limit_usd: 1.00, period: day}, {limit_usd: 0.50, period: day, mode: shadow}",
            "{limit_usd: 0.50, period: day}",
        )
    )
    lines = budget_changes(before, load_policy(path))
    assert any(line.startswith("budget key:alice:day:shadow is gone") for line in lines), lines
    assert not any(line.startswith("budget key:alice:day is") for line in lines), lines


def test_the_shadow_cap_counts_would_refuse_while_the_enforced_budget_refuses(make_proxy) -> None:
    proxy = make_proxy(TRIAL)
    statuses = [proxy.generate(standin="cost=0.25").status_code for _ in range(5)]
    # $0.25 each against the enforced $1.00: four fit, the fifth is refused by the enforced budget.
    assert statuses == [200, 200, 200, 200, 402]
    refused = proxy.generate(standin="cost=0.25")
    assert refused.headers["x-spend-guard-scope"] == "budget:key:alice:day"
    text = proxy.client.get("/-/metrics").text
    would = {
        (s.labels["scope"], s.value)
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "spend_guard_decisions_total" and s.labels["outcome"] == "would_refuse"
    }
    # The third and fourth calls would take the shadow $0.50 past its limit.
    assert would == {("budget:key:alice:day:shadow", 2.0)}


def scope_modes(proxy) -> dict[str, str]:
    text = proxy.client.get("/-/metrics").text
    return {
        s.labels["scope"]: s.labels["mode"]
        for f in text_string_to_metric_families(text)
        if f.name == "spend_guard_scope_limit_usd"
        for s in f.samples
    }


def test_scope_gauges_carry_each_budgets_mode(make_proxy) -> None:
    proxy = make_proxy(TRIAL)
    assert scope_modes(proxy) == {
        "account": "enforce",
        "budget:key:alice:day": "enforce",
        "budget:key:alice:day:shadow": "shadow",
        "budget:group:design:month": "enforce",
        "budget:group:design:month:shadow": "shadow",
    }


def test_in_global_shadow_mode_every_scope_gauge_says_shadow(make_proxy) -> None:
    proxy = make_proxy("mode: shadow\n" + TRIAL)
    assert set(scope_modes(proxy).values()) == {"shadow"}


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


def test_webhook_events_carry_the_mode_and_a_shadow_budget_past_its_limit_says_nothing_is_refused(
    make_proxy, receiver
) -> None:
    alerts = f'alerts: {{thresholds: [1.0], webhooks: [{{url: "{receiver.url}"}}]}}\n'
    proxy = make_proxy(alerts + TRIAL)
    for _ in range(2):
        assert proxy.generate(standin="cost=0.25").status_code == 200
    receiver.wait_for(1)
    proxy.run(proxy.app.alerts.drain)
    events = {d.event["scope"]: d.event for d in receiver.deliveries}
    assert set(events) == {"budget:key:alice:day:shadow"}  # all of the shadow $0.50; half of $1.00
    event = events["budget:key:alice:day:shadow"]
    assert (event["type"], event["threshold"], event["mode"]) == ("budget.threshold", 1.0, "shadow")
    assert event["message"].endswith("; shadow mode: calls over it would be refused, none is")
    for _ in range(2):
        assert proxy.generate(standin="cost=0.25").status_code == 200
    receiver.wait_for(2)
    proxy.run(proxy.app.alerts.drain)
    enforced = [d.event for d in receiver.deliveries if d.event["scope"] == "budget:key:alice:day"]
    assert [(e["mode"], e["threshold"]) for e in enforced] == [("enforce", 1.0)]
    assert "shadow" not in enforced[0]["message"]


def rules() -> dict[str, dict[str, object]]:
    data = yaml.safe_load((ROOT / "docker" / "prometheus" / "alerts.yml").read_text())
    return {r["alert"]: r for g in data["groups"] for r in g["rules"]}


def test_no_shipped_rule_pages_on_a_scope_gauge_without_reading_its_mode() -> None:
    for name, rule in rules().items():
        expr = str(rule["expr"])
        for gauge in ("spend_guard_scope_spent_usd", "spend_guard_scope_limit_usd", "spend_guard_scope_remaining_usd"):
            for use in expr.split(gauge)[1:]:
                selector = use[: use.index("}") + 1] if use.startswith("{") else ""
                assert 'mode="enforce"' in selector or 'mode="shadow"' in selector, (name, expr)
        if 'mode="shadow"' in expr:
            labels = rule["labels"]
            assert isinstance(labels, dict) and labels["severity"] == "warning", name
    assert "SpendGuardShadowBudgetWouldRefuse" in rules()


def test_promtool_proves_a_shadow_budget_past_its_limit_fires_no_critical_rule() -> None:
    tests = yaml.safe_load((ROOT / "docker" / "prometheus" / "alerts_test.yml").read_text())["tests"]
    proven = [
        test
        for test in tests
        if any('mode="shadow"' in series["series"] for series in test["input_series"])
        and {"alertname": "SpendGuardBudgetExhausted", "eval_time": "5m", "exp_alerts": []} in test["alert_rule_test"]
    ]
    assert proven  # and promtool runs them (tests/test_monitoring.py, .ci/run)
