"""Policy in action (shadow mode, reload, groups) and the operator's surface: metrics, readiness,
/-/me, logs, the CLI — through the app, over fake and real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time

import pytest
from click.testing import CliRunner

from proxy.cli import main
from tests.support.constants import ACCOUNT_KEY, KEY_A, KEY_B, SHA_A, SHA_B
from tests.support.policies import alice_keys, budget, entry, key_entry, policy_yaml
from tests.support.standin import key_row

TEAM = policy_yaml(
    groups=[entry("team", budgets=[budget("1.00", "month")])],
    keys=[key_entry(api_key_id="key-a", group="team"), key_entry("bob", token=KEY_B, group="team")],
)


def me(proxy, token=KEY_A):
    r = proxy.client.get("/-/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return {s["scope"]: s for s in r.json()["scopes"]}


def metric(proxy, name: str, **labels: str) -> float:
    text = proxy.client.get("/-/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+-]+)"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def test_group_budget_is_shared_by_its_keys(make_proxy, up):
    p = make_proxy(TEAM)
    assert p.generate(token=KEY_A, standin="cost=0.3").status_code == 200
    assert p.generate(token=KEY_B, standin="cost=0.3").status_code == 200
    assert p.generate(token=KEY_A, standin="cost=0.3").status_code == 200
    r = p.generate(token=KEY_B)
    assert r.status_code == 402 and r.headers["x-spend-guard-scope"] == "budget:group:team:month"
    assert me(p, KEY_B)["budget:group:team:month"]["spent_usd"] == "0.9000"


def test_global_shadow_mode_forwards_what_it_would_refuse_and_counts_it(make_proxy, up, caplog):
    p = make_proxy(TEAM + "mode: shadow\nmodels: {deny: ['openai/*']}\n")
    caplog.set_level(logging.INFO, logger="spend_guard")
    for _ in range(5):  # 5 x 0.30 against a 1.00 budget, and a denied model
        assert p.generate(standin="cost=0.3").status_code == 200
    assert len(up.generation_requests) == 5
    assert metric(p, "spend_guard_decisions_total", outcome="would_refuse", scope="policy", key="alice") == 5
    assert me(p)["budget:group:team:month"]["spent_usd"] == "1.5000"  # the real spend is still tracked
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "spend_guard.access"]
    assert [line["decision"] for line in lines] == ["would_refuse"] * 5


def test_shadow_budget_forwards_while_enforced_budget_refuses(make_proxy, up):
    p = make_proxy(alice_keys("[{limit_usd: 0.50, period: day, mode: shadow}, {limit_usd: 1.00, period: month}]"))
    assert p.generate(standin="cost=0.3").status_code == 200
    assert p.generate(standin="cost=0.3").status_code == 200  # over the shadow day budget: forwarded
    day = "budget:key:alice:day"
    assert metric(p, "spend_guard_decisions_total", outcome="would_refuse", scope=day, key="alice") == 1
    assert p.generate(standin="cost=0.3").status_code == 200
    r = p.generate()
    assert r.status_code == 402 and r.headers["x-spend-guard-scope"] == "budget:key:alice:month"


def test_reload_with_a_broken_file_keeps_serving_the_old_policy(make_proxy, up):
    p = make_proxy(TEAM)
    old_version = p.runtime.policy.version
    with open(p.app.settings.policy, "a") as f:
        f.write("guard: {on_store_eror: open}\n")
    assert p.runtime.holder.reload() is False
    assert p.runtime.policy.version == old_version
    r = p.generate(standin="cost=0.01")
    assert r.status_code == 200 and r.headers["x-spend-guard-policy"] == old_version
    assert metric(p, "spend_guard_policy_reload_failures") == 1


def test_reload_with_a_good_file_applies_the_new_limits(make_proxy, up):
    p = make_proxy(TEAM)
    assert p.generate(standin="cost=0.01").status_code == 200
    with open(p.app.settings.policy, "a") as f:
        f.write("models: {deny: ['openai/*']}\n")
    assert p.runtime.holder.reload() is True
    r = p.generate()
    assert r.status_code == 403 and r.headers["x-spend-guard-policy"] == p.runtime.policy.version


def test_me_shows_exactly_what_the_guard_enforces(make_proxy, up):
    up.key_rows = [
        key_row(
            "key-a",
            "alice",
            spend_limit="2.00",
            period="month",
            period_spend="0.5000",
            period_start="2999-01-01T00:00:00Z",
        )
    ]
    p = make_proxy(TEAM)
    assert p.generate(standin="cost=0.2").status_code == 200
    scopes = me(p)
    assert scopes["key:month"]["limit_usd"] == "2.0000"
    assert scopes["key:month"]["spent_usd"] == "0.7000"  # 0.50 in the snapshot + 0.20 since
    assert scopes["budget:group:team:month"]["remaining_usd"] == "0.8000"
    assert scopes["account"]["spent_usd"] == "0.2000"
    # the remaining figure is what the next reserve enforces: 0.80 left, a 0.30 hold fits twice
    assert p.generate(standin="cost=0.3").status_code == 200
    assert p.generate(standin="cost=0.3").status_code == 200
    assert me(p)["budget:group:team:month"]["remaining_usd"] == "0.2000"
    assert p.generate().status_code == 402


def test_me_requires_a_bearer_token(make_proxy, up):
    p = make_proxy(TEAM)
    r = p.client.get("/-/me")
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"


def test_me_tells_a_token_the_policy_does_not_list_nothing_about_the_account(make_proxy, up):
    p = make_proxy(TEAM)  # unknown_keys: account_only, the default: such a token can still call
    made_up = "sk-made-up-" + "q" * 30
    r = p.client.get("/-/me", headers={"Authorization": f"Bearer {made_up}"})
    assert r.status_code == 200
    body = r.json()
    assert body["key"] is None and body["scopes"] == []
    assert "not listed" in body["message"]
    for secret_of_the_account in ("99.0000", "100.0000", "floor", "snapshot", p.runtime.policy.version):
        assert secret_of_the_account not in r.text


def test_me_shows_the_account_to_unlisted_tokens_when_the_policy_opts_in(make_proxy, up):
    p = make_proxy(TEAM + "guard: {show_account_to_unknown_keys: true}\n")
    r = p.client.get("/-/me", headers={"Authorization": "Bearer sk-made-up-" + "q" * 30})
    assert r.status_code == 200 and r.json()["key"] is None
    assert [s["scope"] for s in r.json()["scopes"]] == ["account"]


def test_metrics_move_with_decisions(make_proxy, up):
    p = make_proxy(TEAM)
    assert p.generate(standin="cost=0.25").status_code == 200
    p.generate(token=None)
    assert p.generate(standin="error").status_code == 200
    team = "budget:group:team:month"
    assert metric(p, "spend_guard_decisions_total", outcome="allowed", scope=team, key="alice") == 2
    assert metric(p, "spend_guard_decisions_total", outcome="refused", scope="auth", key="unknown") == 1
    assert metric(p, "spend_guard_usd_total", kind="held", key="alice") == pytest.approx(0.6)
    assert metric(p, "spend_guard_usd_total", kind="charged", key="alice") == pytest.approx(0.25)
    assert metric(p, "spend_guard_usd_total", kind="released", key="alice") == pytest.approx(0.35)
    assert metric(p, "spend_guard_overhead_seconds_count") == 2


def test_readyz_flips_when_the_snapshot_ages(make_proxy, up):
    from tests.support.proxies import FakeClock

    clock = FakeClock()
    p = make_proxy(TEAM, clock=clock)
    assert p.client.get("/-/readyz").status_code == 200
    clock.now += 7201
    r = p.client.get("/-/readyz")
    assert r.status_code == 503 and "snapshot" in r.json()["problems"][0]


@pytest.mark.parametrize("store_target", [pytest.param("fake", marks=pytest.mark.fake)], indirect=True)
def test_readyz_flips_when_the_store_stops(make_proxy, up, store_target):
    p = make_proxy(TEAM)
    store_target.server.connected = False
    r = p.client.get("/-/readyz")
    assert r.status_code == 503 and r.json()["problems"][0].startswith("store:")
    store_target.server.connected = True
    assert p.client.get("/-/readyz").status_code == 200


def test_a_started_instance_is_ready_before_it_takes_its_first_call(make_proxy, up):
    # Startup waits for the first refresh: the first call after start is guarded, not refused
    # for want of a snapshot or a price table (with several workers, each starts this way).
    p = make_proxy(TEAM, refresh=False)
    ready = p.client.get("/-/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["problems"] == []
    r = p.generate(standin="cost=0.1")
    assert r.status_code == 200 and r.json()["cost"] == 0.1
    assert r.headers["x-spend-guard-remaining-scope"] == "budget:group:team:month"
    assert len(up.generation_requests) == 1
    assert me(p)["budget:group:team:month"]["spent_usd"] == "0.1000"


def test_startup_does_not_wait_forever_for_an_unreachable_upstream(make_proxy, up):
    up.credits_status = 500
    p = make_proxy(TEAM, refresh=False)  # starts; spending calls fail closed until a snapshot
    assert p.client.get("/-/healthz").status_code == 200
    assert_refused_for_want_of_a_snapshot(p.generate())
    assert up.generation_requests == []
    ready = p.client.get("/-/readyz")
    assert ready.status_code == 503
    assert ready.json()["problems"] == ["snapshot: no credits snapshot fetched yet"]
    assert ready.json()["last_refresh_error"] == "credits fetch: HTTP 500"


def test_startup_waits_for_a_slow_first_refresh_only_so_long(make_proxy, up, monkeypatch, caplog):
    import proxy.app

    monkeypatch.setattr(proxy.app, "STARTUP_REFRESH_S", 0.5)
    up.credits_delay_s = 30
    caplog.set_level(logging.WARNING, logger="spend_guard")
    started = time.monotonic()
    p = make_proxy(TEAM, refresh=False)
    assert time.monotonic() - started < 15  # half the credits delay: the bound, not the answer
    messages = [r.getMessage() for r in caplog.records if r.name == "spend_guard"]
    # (without a Redis URL the app takes its store for the embedded one, met here for the first time)
    messages = [m for m in messages if not m.startswith("store: a first start in state dir")]
    assert messages[0] == "first credits/prices refresh took over 0.5 s; starting without it"
    # Not "spend guard ready": it is not (docs/operations.md#logs).
    assert messages[1].startswith(
        "spend guard started, not ready yet (spending calls get 503 until it is): "
        "snapshot: no credits snapshot fetched yet"
    )
    assert len(messages) == 2
    assert p.client.get("/-/healthz").status_code == 200
    # The price table comes in beside the slow credits fetch: once it is in, the call is refused
    # for want of the snapshot alone.
    p.run(lambda: asyncio.wait_for(p.runtime.refresher.prices_loaded.wait(), 10))
    assert_refused_for_want_of_a_snapshot(p.generate())  # no snapshot yet: closed
    assert up.generation_requests == []


def assert_refused_for_want_of_a_snapshot(r) -> None:
    assert r.status_code == 503 and r.headers["x-spend-guard-scope"] == "store"
    assert r.json() == {
        "error": {
            "message": "Spend guard unavailable: no credits snapshot has been fetched from ImageRouter yet. "
            "The call was not forwarded.",
            "type": "guard_unavailable",
        }
    }


def test_readyz_names_a_wrong_account_key(make_proxy, up, monkeypatch):
    monkeypatch.setenv("IMAGEROUTER_API_KEY", "sk-wrong")
    p = make_proxy(TEAM, refresh=False)
    p.run(p.runtime.refresher.refresh_credits)
    body = p.client.get("/-/readyz").json()
    assert not body["ready"] and any("401" in problem for problem in body["problems"])


def test_no_secret_in_logs_metrics_redis_or_errors(make_proxy, up, caplog, store_target):
    caplog.set_level(logging.DEBUG)
    p = make_proxy(TEAM + "guard: {unknown_keys: reject}\n")
    stranger = "sk-stranger-" + "z" * 50
    outputs = [
        p.generate(standin="cost=0.1").text,
        p.generate(token=stranger).text,
        p.generate(token=KEY_A, model="x" * 10, standin="nocost").text,
        p.client.get("/-/me", headers={"Authorization": f"Bearer {stranger}"}).text,
        p.client.get("/-/metrics").text,
        p.client.get("/-/readyz").text,
    ]
    outputs += [r.getMessage() for r in caplog.records]
    outputs.append(repr(p.runtime.refresher.api_key))

    async def dump():
        client = p.runtime.store.client
        found = []
        for key in await client.keys("*"):
            found.append(key.decode())
            kind = (await client.type(key)).decode()
            if kind == "hash":
                found += [f"{k.decode()}={v.decode()}" for k, v in (await client.hgetall(key)).items()]
            elif kind == "string":
                found.append((await client.get(key)).decode())
            elif kind == "zset":
                found += [m.decode() for m in await client.zrange(key, 0, -1)]
        return found

    outputs += p.run(dump)
    everything = "\n".join(outputs)
    for secret in (KEY_A, KEY_B, stranger, ACCOUNT_KEY):
        assert secret not in everything
    # fingerprints are not secrets, but they are no label or log field either
    assert hashlib.sha256(stranger.encode()).hexdigest() not in everything
    assert SHA_A not in everything and SHA_B not in everything


@pytest.mark.parametrize("store_target", [pytest.param("real", marks=pytest.mark.real)], indirect=True)
def test_status_cli_prints_every_key_and_group(make_proxy, up, store_target):
    p = make_proxy(TEAM)
    assert p.generate(standin="cost=0.25").status_code == 200
    runner = CliRunner()
    result = runner.invoke(main, ["status", "--policy", p.app.settings.policy, "--redis-url", store_target.url])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"store: {store_target.url}"
    assert lines[3].split() == [
        "owner",
        "scope",
        "mode",
        "limit",
        "$",
        "spent",
        "$",
        "held",
        "$",
        "remaining",
        "$",
        "over",
        "$",
        "resets",
        "at",
    ]
    team = next(line for line in lines if line.startswith("group team"))
    assert team.split()[2:8] == ["budget:group:team:month", "enforce", "1.0000", "0.2500", "0.0000", "0.7500"]
    result = runner.invoke(
        main, ["status", "--policy", p.app.settings.policy, "--redis-url", store_target.url, "--json"]
    )
    status = json.loads(result.output)
    assert status["holds_in_flight"] == 0
    assert {r["owner"] for r in status["rows"]} == {"account t", "key alice", "key bob", "group team"}


def test_fingerprint_and_check_policy_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["fingerprint"], input=KEY_A + "\n")
    assert result.exit_code == 0 and result.output.strip() == SHA_A
    assert runner.invoke(main, ["fingerprint"], input="").exit_code == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("guard: {on_store_eror: open}\n")
    result = runner.invoke(main, ["check-policy", str(bad)])
    assert result.exit_code == 2 and "guard.on_store_eror: unknown key" in result.output
    result = runner.invoke(main, ["check-policy", "policies/teams.yaml"])
    assert result.exit_code == 0 and "ok" in result.output


def test_serve_options_and_env_reach_the_settings(monkeypatch, state_home, tmp_path):
    called = []
    monkeypatch.setattr("proxy.cli.run", lambda settings, policy, **kw: called.append(settings))
    # Several workers share the embedded store's one server, so they need no Redis URL.
    result = CliRunner().invoke(main, ["serve", "--workers", "2"])
    assert result.exit_code == 0 and called[0].workers == 2 and called[0].redis_url is None
    assert called[0].state_dir == str(state_home / "spend-guard")  # the documented default
    result = CliRunner().invoke(main, ["serve", "--port", "9999", "--upstream", "http://127.0.0.1:1"])
    assert result.exit_code == 0 and called[1].port == 9999 and called[1].upstream == "http://127.0.0.1:1"
    monkeypatch.setenv("SPEND_GUARD_PORT", "7777")
    monkeypatch.setenv("SPEND_GUARD_REDIS_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("SPEND_GUARD_STATE_DIR", str(tmp_path / "relative-or-not"))
    result = CliRunner().invoke(main, ["serve", "--workers", "2"])
    assert result.exit_code == 0 and called[2].port == 7777 and called[2].workers == 2
    assert called[2].state_dir == str(tmp_path / "relative-or-not")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["serve", "--state-dir", "here"])
    assert called[3].state_dir == str(tmp_path / "here")  # absolute, so every worker finds it
