"""The shipped monitoring (docs/monitoring.md): Prometheus alert rules and a Grafana dashboard under
docker/, wired into compose as the `monitoring` profile. Every metric they query must exist in a
live `/-/metrics` scrape, so a renamed metric cannot silently turn an alert off."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.constants import KEY_A, KEY_B
from tests.support.policies import budget, flow, key_entry, policy_yaml
from tests.support.served import RedisServer, ServedProxy, free_port, wait_until
from tests.support.standin import key_row

DOCKER = Path(__file__).parents[2] / "docker"
RULES = DOCKER / "prometheus" / "alerts.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "spend-guard.json"
# Series Prometheus makes itself, not the proxy.
PROMETHEUS_OWN = {"up"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ()}

POLICY = policy_yaml(
    account=flow(name="t", refresh_s=3600, models_refresh_s=3600, max_staleness_s=7200, min_remaining_usd=1),
    groups=[flow(name="design", budgets=[budget("10.00", "month")])],
    keys=[
        key_entry(api_key_id="key-a", group="design", budgets=[budget("2.00", "day")]),
        key_entry("bob", token=KEY_B, budgets=[budget("0.01", "week")]),
    ],
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions,
    keywords, label names in matchers or grouping clauses, or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries, Grafana's $__rate_interval
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word, rest = match.group(), expr[match.end() :].lstrip()
        if word in PROMQL_WORDS or rest.startswith("(") or expr[match.start() - 1 : match.start()] == "$":
            continue
        names.add(word)
    return names


def rule_exprs() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard_exprs() -> dict[str, str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {f"{panel['title']} {t['refId']}": t["expr"] for panel in panels for t in panel["targets"]}


def exposed_names(text: str) -> set[str]:
    """Every series name a scrape can carry: each family's samples, and the suffixed names of
    families that have no sample yet (a labelled counter before its first increment)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
    return names


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'sum by (scope) (rate(spend_guard_decisions_total{outcome="refused",scope!="store"}[5m]))'
        " / on () group_left () histogram_quantile(0.9, sum by (le) (rate(x_bucket[$__rate_interval])))"
        ' and up{job="a"} == 0 > bool 1'
    )
    assert metric_names(expr) == {"spend_guard_decisions_total", "x_bucket", "up"}


def test_the_six_named_alerts_are_shipped() -> None:
    alerts = rule_exprs()
    for wanted in (
        "CreditsLow",
        "BudgetAbove80Percent",
        "Unavailable",
        "RefusalsSpiking",
        "SnapshotStale",
        "UnguardedCalls",
    ):
        assert f"SpendGuard{wanted}" in alerts


def test_every_metric_the_rules_and_dashboard_query_is_in_a_live_scrape(make_proxy, up) -> None:
    up.key_rows = [key_row("key-a", "alice", spend_limit="5.00", period="week", period_start=None)]
    up.key_ids = {KEY_A: "key-a"}
    proxy = make_proxy(POLICY)
    assert proxy.generate(standin="cost=0.05").status_code == 200
    assert proxy.generate(token=KEY_B).status_code == 402  # bob's $0.01 week budget refuses
    text = proxy.client.get("/-/metrics").text
    exposed = exposed_names(text)
    queries = {
        **{f"rule {k}": v for k, v in rule_exprs().items()},
        **{f"panel {k}": v for k, v in dashboard_exprs().items()},
    }
    assert len(queries) >= 20
    missing = {where: sorted(metric_names(expr) - exposed - PROMETHEUS_OWN) for where, expr in queries.items()}
    assert {where: names for where, names in missing.items() if names} == {}
    read = set().union(*(metric_names(expr) for expr in queries.values()))
    for name in (
        "spend_guard_account_credits_usd",
        "spend_guard_scope_spent_usd",
        "spend_guard_decisions_total",
        "spend_guard_upstream_latency_seconds_bucket",
        "spend_guard_unguarded_total",
        "spend_guard_snapshot_age_seconds",
    ):
        assert name in read
    # The budget alert's scopes are the ones the policy defines, as refusals spell them.
    scopes = {
        s.labels["scope"]
        for f in text_string_to_metric_families(text)
        if f.name == "spend_guard_scope_limit_usd"
        for s in f.samples
    }
    assert {
        "account",
        "key:alice:week",
        "budget:key:alice:day",
        "budget:group:design:month",
        "budget:key:bob:week",
    } <= scopes


def test_compose_monitoring_profile_mounts_the_shipped_files() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), volume
    assert "profiles" not in services["spend-guard"] and "profiles" not in services["redis"]
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["metrics_path"] == "/-/metrics"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed (.ci/run installs Debian's prometheus package)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


@pytest.mark.system
def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    binary = promtool()
    for args in (
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        done = subprocess.run(
            [binary, *args], cwd=DOCKER / "prometheus", capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.system
def test_a_real_prometheus_scraping_a_served_proxy_fires_the_budget_alert(up, tmp_path: Path) -> None:
    """The shipped rules, evaluated by a real Prometheus every second against a served proxy: the
    budget alert fires for the budget a call took past 80 % and for no other scope. The rules'
    `for:` durations are cut to 0 here (promtool's unit tests cover them)."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed (.ci/run installs Debian's prometheus package)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule.pop("for", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        POLICY.replace("account: {name: t,", "account: {name: prom,").replace("refresh_s: 3600,", "refresh_s: 1,", 1)
    )
    with RedisServer() as redis, ServedProxy(policy, up.url, redis.url) as proxy:
        assert (
            httpx.post(
                proxy.url + "/v1/openai/images/generations",
                json={"model": "openai/gpt-image-1", "prompt": "a cat"},
                headers={"Authorization": f"Bearer {KEY_A}", "X-Standin": "cost=1.70"},
                timeout=30,
            ).status_code
            == 200
        )  # alice's $2.00 day budget: 85 %
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {
                    "job_name": "spend-guard",
                    "metrics_path": "/-/metrics",
                    "static_configs": [{"targets": [proxy.url.removeprefix("http://")]}],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        with open(tmp_path / "prometheus.log", "wb") as log:
            prom = subprocess.Popen(
                [
                    binary,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            firing: list[dict[str, str]] = []

            def budget_alert_fires() -> bool:
                assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
                try:
                    response = httpx.get(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=2)
                except httpx.HTTPError:
                    return False
                if response.status_code != 200:
                    return False  # a starting Prometheus answers 503 "Service Unavailable" in plain text
                alerts = response.json()["data"]["alerts"]
                firing[:] = [
                    a["labels"]
                    for a in alerts
                    if a["state"] == "firing" and a["labels"]["alertname"] == "SpendGuardBudgetAbove80Percent"
                ]
                return bool(firing)

            try:
                wait_until(budget_alert_fires, 60, "Prometheus to fire SpendGuardBudgetAbove80Percent")
            finally:
                prom.terminate()
                try:
                    prom.wait(10)
                except subprocess.TimeoutExpired:
                    prom.kill()
                    prom.wait(10)
    assert [labels["scope"] for labels in firing] == ["budget:key:alice:day"]
