"""`spend-guard status`: what an operator sees, and one clear line when there is nothing to see."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
from click.testing import CliRunner

from proxy.cli import main
from proxy.commands.status import describe_url
from tests.support.constants import KEY_A, KEY_B
from tests.support.policies import budget, entry, flow, key_entry, policy_yaml
from tests.support.served import free_port
from tests.support.stores import EMBEDDED, REAL

STORES = [REAL, EMBEDDED]
# alice and bob are limited only by their group; carol has a shadow budget of her own; the group
# `idle` has no keys at all. All of them must be listed.
POLICY = policy_yaml(
    account=flow(name="st", refresh_s=3600, models_refresh_s=3600, max_staleness_s=7200),
    groups=[entry("team", budgets=[budget("1.00", "month")]), entry("idle", budgets=[budget("5.00", "day")])],
    keys=[
        key_entry(group="team"),
        key_entry("bob", token=KEY_B, group="team"),
        entry("carol", key_sha256="c" * 64, budgets=[budget("0.10", None, mode="shadow")]),
    ],
)


def status(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["status", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("store_target", STORES, indirect=True)
def test_status_lists_every_key_and_group_and_says_what_it_read(make_proxy, store_target):
    p = make_proxy(POLICY)
    assert p.generate(KEY_A, standin="cost=0.25").status_code == 200
    code, out, err = status("--policy", p.app.settings.policy, "--redis-url", store_target.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"store: {store_target.url}"
    assert lines[1].startswith(f"account: st; policy: {p.app.settings.policy} (version ")
    assert lines[2] == "" and lines[3].split()[:2] == ["owner", "scope"]
    table = {line.split()[0] + " " + line.split()[1]: line for line in lines[5:]}
    assert set(table) == {"account st", "key alice", "key bob", "key carol", "group team", "group idle"}
    assert table["key alice"].endswith("(limited by group team)")
    assert table["group team"].split()[2:9] == [
        "budget:group:team:month",
        "enforce",
        "1.0000",
        "0.2500",
        "0.0000",
        "0.7500",
        "-",
    ]
    assert table["group idle"].split()[4:6] == ["5.0000", "0.0000"]
    assert table["key carol"].split()[2:4] == ["budget:key:carol:lifetime", "shadow"]


@pytest.mark.parametrize("store_target", STORES, indirect=True)
def test_status_shows_how_far_a_shadow_budget_ran_over(make_proxy, store_target):
    carol = "sk-carol-" + "c" * 20
    p = make_proxy(POLICY.replace("c" * 64, hashlib.sha256(carol.encode()).hexdigest()))
    assert p.generate(carol, standin="cost=0.25").status_code == 200  # shadow: forwarded anyway
    code, out, err = status("--policy", p.app.settings.policy, "--redis-url", store_target.url, "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    row = next(r for r in rows if r["owner"] == "key carol")
    assert (row["mode"], row["limit_usd"], row["spent_usd"], row["remaining_usd"], row["over_usd"]) == (
        "shadow",
        "0.1000",
        "0.2500",
        "0.0000",
        "0.1500",
    )


def test_status_fails_in_one_line_when_redis_is_down():
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, out, err = status("--redis-url", url)
    assert code == 3 and out == ""
    assert err.startswith(f"spend-guard status: cannot read the store at {url}: store unavailable: ConnectionError")
    assert len(err.strip().splitlines()) == 1  # no traceback


@pytest.mark.parametrize("store_target", [pytest.param("real", marks=pytest.mark.real)], indirect=True)
def test_status_fails_when_the_store_holds_nothing_for_the_account(store_target, tmp_path):
    # A wrong DB number, or a different account.name: the same empty store either way.
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"account: {{name: never-used-{uuid.uuid4().hex[:8]}}}\n")
    code, out, err = status("--policy", str(policy), "--redis-url", store_target.url)
    assert code == 3 and out == ""
    assert f"the store at {store_target.url} holds nothing for account 'never-used-" in err
    assert "wrong URL or DB number" in err


def test_status_without_a_redis_url_needs_a_running_embedded_store(tmp_path):
    code, out, err = status("--state-dir", str(tmp_path))
    assert code == 3 and out == ""
    assert err.strip() == (
        f"spend-guard status: no embedded store is running in {tmp_path} (no socket {tmp_path}/valkey.sock): start the "
        "proxy, or give the --state-dir it runs with, or the --redis-url the proxies share"
    )


@pytest.mark.parametrize("store_target", [EMBEDDED], indirect=True)
def test_status_reads_the_embedded_store_of_a_state_dir(make_proxy, store_target, embedded_server):
    p = make_proxy(POLICY)
    assert p.generate(KEY_B, standin="cost=0.10").status_code == 200
    code, out, err = status("--policy", p.app.settings.policy, "--state-dir", embedded_server.state_dir)
    assert code == 0, err
    assert out.splitlines()[0] == f"store: unix://{embedded_server.state_dir}/valkey.sock"


def test_status_never_prints_a_redis_password():
    assert describe_url("redis://user:s3cret@127.0.0.1:6379/2") == "redis://user:***@127.0.0.1:6379/2"
    assert describe_url("redis://127.0.0.1:6379/2") == "redis://127.0.0.1:6379/2"
    assert describe_url("rediss://:s3cret@[::1]:6380/0?password=s3cret&ssl_cert_reqs=none") == (
        "rediss://:***@[::1]:6380/0?password=***&ssl_cert_reqs=none"
    )
    url = f"redis://127.0.0.1:{free_port()}/0?password=s3cret"
    code, out, err = status("--redis-url", url)
    assert code == 3 and "s3cret" not in out + err
    assert "cannot read the store at redis://127.0.0.1:" in err and "?password=***" in err


def test_store_recover_never_prints_a_redis_password(tmp_path):
    url = f"redis://ops:s3cret@127.0.0.1:{free_port()}/0?password=s3cret2"
    result = CliRunner().invoke(main, ["store", "recover", "--redis-url", url, "--accept-loss"])
    assert result.exit_code == 3, result.output
    assert "cannot reach the store at redis://ops:***@127.0.0.1:" in result.output
    assert "s3cret" not in result.output


def test_status_help_explains_every_option():
    result = CliRunner().invoke(main, ["status", "--help"])
    assert result.exit_code == 0
    for option in ("--policy", "--redis-url", "--state-dir", "--json"):
        line = next(line for line in result.output.splitlines() if line.strip().startswith(option))
        assert len(line.split()) > 2, f"{option} has no help text"
