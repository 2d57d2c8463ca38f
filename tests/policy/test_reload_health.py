"""A failed policy reload is visible: in /-/readyz (still ready, with a warning naming it), in a
metric a shipped alert rule fires on, and on the status page beside the enforced version."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import yaml

from proxy.policy.load import file_version
from tests.support.constants import SHA_A

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "sg-admin-" + "r" * 40
POLICY = f"""
admin: {{token_sha256: '{hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}'}}
keys:
  - name: alice
    key_sha256: {SHA_A}
    budgets: [{{limit_usd: 2.00, period: day}}]
"""
BROKEN = "guard: {on_store_eror: open}\n"


def admin() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"ops:{ADMIN_TOKEN}".encode()).decode()}


def break_policy(proxy) -> tuple[Path, str]:
    """Append a typo to the served policy file and reload it: it fails. Returns the path and the
    version the files now have."""
    path = Path(proxy.runtime.holder.path)
    path.write_text(path.read_text() + BROKEN)
    assert proxy.runtime.holder.reload() is False
    version = file_version(path)
    assert version is not None
    return path, version


def test_a_failed_reload_keeps_readyz_ready_with_a_warning_that_names_it(make_proxy) -> None:
    proxy = make_proxy(POLICY)
    enforced = proxy.runtime.policy.version
    assert proxy.client.get("/-/readyz").json()["warnings"] == []
    path, on_disk = break_policy(proxy)
    response = proxy.client.get("/-/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True and body["problems"] == []
    (warning,) = body["warnings"]
    assert re.fullmatch(
        rf"policy: the reload of {re.escape(str(path))} at \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ "
        r"failed with 1 problem\(s\), "
        rf"the first: {re.escape(str(path))}: guard\.on_store_eror: unknown key; expected one of .*; "
        rf"still enforcing version {enforced} \(the files are version {on_disk}\)",
        warning,
    ), warning
    assert (body["policy_version"], body["policy_file_version"]) == (enforced, on_disk)

    # Fixed: the next reload succeeds and the warning goes.
    path.write_text(path.read_text().replace(BROKEN, ""))
    assert proxy.runtime.holder.reload() is True
    body = proxy.client.get("/-/readyz").json()
    assert body["warnings"] == [] and body["policy_version"] == body["policy_file_version"] == enforced


def test_a_failed_reload_sets_the_metrics_the_alert_rule_reads(make_proxy) -> None:
    proxy = make_proxy(POLICY)

    def gauges() -> dict[str, float]:
        text = proxy.client.get("/-/metrics").text
        found = re.findall(r"^(spend_guard_policy_reload_fail\w+) (\S+)$", text, re.MULTILINE)
        return {name: float(value) for name, value in found}

    assert gauges() == {"spend_guard_policy_reload_failures": 0.0, "spend_guard_policy_reload_failing": 0.0}
    path, _ = break_policy(proxy)
    assert gauges() == {"spend_guard_policy_reload_failures": 1.0, "spend_guard_policy_reload_failing": 1.0}
    path.write_text(path.read_text().replace(BROKEN, ""))
    assert proxy.runtime.holder.reload() is True
    assert gauges() == {"spend_guard_policy_reload_failures": 1.0, "spend_guard_policy_reload_failing": 0.0}


def test_a_shipped_alert_rule_fires_on_reload_failures_and_is_unit_tested() -> None:
    rules = yaml.safe_load((ROOT / "docker" / "prometheus" / "alerts.yml").read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "SpendGuardPolicyReloadFailed"]
    assert "spend_guard_policy_reload_failures" in rule["expr"] and "spend_guard_policy_reload_failing" in rule["expr"]
    tests = yaml.safe_load((ROOT / "docker" / "prometheus" / "alerts_test.yml").read_text())
    fired = [
        case
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["alertname"] == "SpendGuardPolicyReloadFailed" and case["exp_alerts"]
    ]
    assert fired  # promtool runs it (tests/test_monitoring.py and .ci/run)


def test_the_status_page_shows_the_enforced_version_beside_the_files(make_proxy) -> None:
    proxy = make_proxy(POLICY)
    enforced = proxy.runtime.policy.version
    body = proxy.client.get("/-/status.json", headers=admin()).json()
    assert (body["policy_version"], body["policy_file_version"], body["policy_reload_error"]) == (
        enforced,
        enforced,
        None,
    )
    path, on_disk = break_policy(proxy)
    body = proxy.client.get("/-/status.json", headers=admin()).json()
    assert (body["policy_version"], body["policy_file_version"]) == (enforced, on_disk)
    assert body["policy_reload_error"].startswith(f"policy: the reload of {path} at ")
    assert body["policy_reload_error"].endswith(f"still enforcing version {enforced} (the files are version {on_disk})")
    page = proxy.client.get("/-/status", headers=admin()).text
    assert "policy_file_version" in page and 'id="reload"' in page
