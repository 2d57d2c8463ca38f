"""Virtual keys: clients hold proxy tokens, the proxy sends the real ImageRouter key upstream, so
the guard is not optional for them (docs/policies.md#virtual-keys)."""

from __future__ import annotations

import base64
import hashlib
import logging
from pathlib import Path

import fakeredis
import pytest
import redis
from click.testing import CliRunner

from proxy.cli import main
from proxy.errors import PolicyError
from proxy.policy.load import load_policy
from tests.support.constants import KEY_A, KEY_B
from tests.support.standin import key_row

REAL = KEY_A  # alice's real ImageRouter key: the stand-in bills its row when it receives it
REAL_ENV = "SG_TEST_REAL_KEY_ALICE"
TOKEN_1 = "sgt_first-" + "1" * 30
TOKEN_2 = "sgt_second-" + "2" * 30
ADMIN_TOKEN = "sg-admin-" + "v" * 40


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def policy(*tokens: str, extra: str = "", upstream: str = f"upstream_key_env: {REAL_ENV}") -> str:
    listed = "\n".join(f"      - {token}" for token in tokens)
    return f"""
admin: {{token_sha256: '{sha(ADMIN_TOKEN)}'}}
{extra}
keys:
  - name: alice
    {upstream}
    api_key_id: key-a
    budgets: [{{limit_usd: 5.00, period: day}}]
    key_sha256:
{listed}
"""


@pytest.fixture
def real_key(up, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(REAL_ENV, REAL)
    up.key_rows = [key_row("key-a", "alice", spend_limit="3.00", period="day")]
    up.key_ids = {REAL: "key-a"}
    return REAL


def authorizations(up) -> list[str]:
    return [value for r in up.requests for name, value in r.headers if name.lower() == "authorization"]


def test_a_virtual_keys_calls_reach_the_upstream_with_the_real_key_never_the_token(make_proxy, up, real_key) -> None:
    proxy = make_proxy(policy(f"'{sha(TOKEN_1)}'"))
    response = proxy.generate(token=TOKEN_1, standin="cost=0.05")
    assert response.status_code == 200, response.text
    (call,) = up.generation_requests
    assert [v for k, v in call.headers if k.lower() == "authorization"] == [f"Bearer {REAL}"]
    assert not any(TOKEN_1 in value for _, value in call.headers)
    # The key's ImageRouter row applies through api_key_id, and the stand-in billed it (it got the real key).
    me = proxy.client.get("/-/me", headers={"Authorization": f"Bearer {TOKEN_1}"}).json()
    assert me["key"] == "alice"
    scopes = {s["scope"]: s for s in me["scopes"]}
    assert scopes["key:day"]["limit_usd"] == "3.0000"
    assert scopes["budget:key:alice:day"]["spent_usd"] == "0.0500"
    proxy.refresh()
    assert up.key_rows[0]["period_spend"] == "0.0500"


def test_a_virtual_keys_row_limit_still_refuses(make_proxy, up, real_key) -> None:
    up.key_rows = [key_row("key-a", "alice", spend_limit="0.10", period="day")]
    proxy = make_proxy(policy(f"'{sha(TOKEN_1)}'"))
    refused = proxy.generate(token=TOKEN_1, model="openai/gpt-image-1")
    assert refused.status_code == 402 and refused.headers["x-spend-guard-scope"] == "key:day"
    assert up.generation_requests == []


def test_calls_that_spend_nothing_go_up_with_the_real_key_too(make_proxy, up, real_key) -> None:
    proxy = make_proxy(policy(f"'{sha(TOKEN_1)}'"))
    proxy.client.get("/v1/some/listing", headers={"Authorization": f"Bearer {TOKEN_1}"})
    proxy.client.get("/v1/some/listing", headers={"Authorization": f"Bearer {KEY_B}"})  # not a token: as sent
    listings = [r for r in up.requests if r.path == "/v1/some/listing"]
    assert [[v for k, v in r.headers if k.lower() == "authorization"] for r in listings] == [
        [f"Bearer {REAL}"],
        [f"Bearer {KEY_B}"],
    ]


def test_a_token_the_policy_does_not_list_is_401_when_any_key_is_virtual(make_proxy, up, real_key) -> None:
    for extra in ("", "mode: shadow"):  # never forwarded, in shadow mode either
        proxy = make_proxy(policy(f"'{sha(TOKEN_1)}'", extra=extra))
        for token in (KEY_B, REAL):  # made up, or a real ImageRouter key trying to go around the guard
            refused = proxy.generate(token=token)
            assert refused.status_code == 401
            assert refused.json()["error"]["message"] == "This API key is not registered with the spend guard."
            assert proxy.client.get("/-/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert up.generation_requests == []


def test_a_token_past_its_expires_at_gets_401(make_proxy, up, real_key) -> None:
    old = f"{{sha256: {sha(TOKEN_1)}, expires_at: '2020-01-01T00:00:00Z'}}"
    new = f"{{sha256: {sha(TOKEN_2)}, expires_at: '2099-01-01T00:00:00Z'}}"
    proxy = make_proxy(policy(old, new))
    refused = proxy.generate(token=TOKEN_1)
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == (
        "This token of key 'alice' expired at 2020-01-01T00:00:00Z; ask for a new one."
    )
    assert proxy.client.get("/-/me", headers={"Authorization": f"Bearer {TOKEN_1}"}).status_code == 401
    proxy.client.get("/v1/some/listing", headers={"Authorization": f"Bearer {TOKEN_1}"})
    assert f"Bearer {REAL}" not in authorizations(up)  # an expired token never gets the real key
    assert proxy.generate(token=TOKEN_2, standin="cost=0.01").status_code == 200


def test_rotation_with_two_live_tokens_works_across_a_reload_without_a_restart(make_proxy, up, real_key) -> None:
    proxy = make_proxy(policy(f"'{sha(TOKEN_1)}'"))
    path = Path(proxy.runtime.holder.path)
    assert proxy.generate(token=TOKEN_1, standin="cost=0.10").status_code == 200
    assert proxy.generate(token=TOKEN_2).status_code == 401

    path.write_text(
        path.read_text().replace(f"      - '{sha(TOKEN_1)}'", f"      - '{sha(TOKEN_1)}'\n      - '{sha(TOKEN_2)}'")
    )
    assert proxy.runtime.holder.reload() is True
    for token in (TOKEN_1, TOKEN_2):  # both live: clients move over at their own pace
        assert proxy.generate(token=token, standin="cost=0.10").status_code == 200

    path.write_text(path.read_text().replace(f"      - '{sha(TOKEN_1)}'\n", ""))
    assert proxy.runtime.holder.reload() is True
    assert proxy.generate(token=TOKEN_1).status_code == 401
    assert proxy.generate(token=TOKEN_2, standin="cost=0.10").status_code == 200
    # Same key, same budget counter throughout: rotating tokens loses nothing counted.
    me = proxy.client.get("/-/me", headers={"Authorization": f"Bearer {TOKEN_2}"}).json()
    assert {s["scope"]: s["spent_usd"] for s in me["scopes"]}["budget:key:alice:day"] == "0.4000"
    assert {v for v in authorizations(up) if "sgt_" in v} == set()


def test_an_unavailable_real_key_gives_503_and_a_readyz_warning(make_proxy, up, real_key, monkeypatch) -> None:
    monkeypatch.delenv(REAL_ENV)
    proxy = make_proxy(policy(f"'{sha(TOKEN_1)}'"))
    refused = proxy.generate(token=TOKEN_1)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "guard_unavailable"
    assert up.generation_requests == []
    ready = proxy.client.get("/-/readyz").json()
    assert (
        f"virtual key alice: its ImageRouter key is unavailable ({REAL_ENV} is not set); its calls get 503"
        in (ready["warnings"])
    )


def test_the_real_key_can_come_from_a_file_next_to_the_policy(make_proxy, up, real_key, tmp_path) -> None:
    (tmp_path / "alice.key").write_text(REAL + "\n")
    proxy = make_proxy(policy(f"'{sha(TOKEN_1)}'", upstream="upstream_key_file: alice.key"))
    assert proxy.generate(token=TOKEN_1, standin="cost=0.01").status_code == 200
    assert authorizations(up)[-1] == f"Bearer {REAL}"


def store_dump(store_target) -> str:
    """Every key and value in the test's store, as text."""
    if store_target.server is not None:
        client = fakeredis.FakeRedis(server=store_target.server)
    else:
        client = redis.Redis.from_url(store_target.url)
    parts = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        readers = {
            "string": client.get,
            "hash": client.hgetall,
            "zset": lambda name: client.zrange(name, 0, -1, withscores=True),
            "list": lambda name: client.lrange(name, 0, -1),
            "set": client.smembers,
        }
        value = readers[kind](key) if kind in readers else b""
        parts.append(f"{key!r} {kind} {value!r}")
    return "\n".join(parts)


def test_the_real_key_is_in_no_log_line_redis_key_metric_or_response(
    make_proxy, up, real_key, store_target, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    up.key_rows = [key_row("key-a", "alice", spend_limit="0.40", period="day")]
    proxy = make_proxy(policy(f"'{sha(TOKEN_1)}'"))
    admin = {"Authorization": "Basic " + base64.b64encode(f"ops:{ADMIN_TOKEN}".encode()).decode()}
    auth = {"Authorization": f"Bearer {TOKEN_1}"}
    responses = [
        proxy.generate(token=TOKEN_1, standin="cost=0.30"),  # allowed
        proxy.generate(token=TOKEN_1),  # refused by the key's row limit
        proxy.generate(token=TOKEN_1, model="openai/gpt-4o-mini", path="/v1/openai/chat/completions"),
        proxy.generate(token=KEY_B),  # 401
        proxy.client.get("/v1/some/listing", headers=auth),
        proxy.client.get("/-/me", headers=auth),
        proxy.client.get("/-/readyz"),
        proxy.client.get("/-/metrics"),
        proxy.client.get("/-/status.json", headers=admin),
        proxy.client.get("/-/status", headers=admin),
    ]
    assert [r.status_code for r in responses[:4]] == [200, 402, 200, 401]
    proxy.run(proxy.app.alerts.drain)
    seen = {
        "responses": "\n".join(f"{r.headers!r}\n{r.text}" for r in responses),
        "logs": caplog.text + "\n".join(repr(r.args) for r in caplog.records),
        "store": store_dump(store_target),
        "runtime": repr(proxy.runtime.upstream_keys) + repr(proxy.runtime.policy),
    }
    for where, text in seen.items():
        assert REAL not in text, f"the real key is in the {where}"
        assert TOKEN_1 not in text, f"the client's token is in the {where}"
    assert f"Bearer {REAL}" in authorizations(up)  # it did go upstream


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        (
            "[{name: a, key_sha256: [X]}]",
            "keys[0] (a).key_sha256: a list of tokens needs upstream_key_env or upstream_key_file (a virtual key); "
            "a key whose clients send their own ImageRouter key has one key_sha256",
        ),
        (
            "[{name: a, upstream_key_env: A, upstream_key_file: a.key, key_sha256: X}]",
            "keys[0] (a): give upstream_key_env or upstream_key_file, not both",
        ),
        (
            "[{name: a, upstream_key_env: A, key_sha256: [{sha256: X, expires_at: soon}]}]",
            "keys[0] (a).key_sha256[0].expires_at: expected an ISO 8601 time such as 2027-01-31T00:00:00Z, got 'soon'",
        ),
        (
            "[{name: a, upstream_key_env: A, key_sha256: [X, X]}]",
            "keys[0] (a).key_sha256[1]: duplicate token 'XXXXXXXX...'; keys[0] (a).key_sha256[0] has it",
        ),
        (
            "[{name: a, upstream_key_env: A, key_sha256: [Y, X]}, {name: b, upstream_key_env: B, key_sha256: X}]",
            "keys[1] (b).key_sha256: duplicate key_sha256 'XXXXXXXX...'; first defined at {file}: keys[0] (a)",
        ),
        (
            "[{name: a, upstream_key_env: 'sk-live-123', key_sha256: X}]",
            "keys[0] (a).upstream_key_env: expected an environment variable name such as IMAGEROUTER_API_KEY "
            "(value not shown)",
        ),
        ("[{name: a, upstream_key_env: A, key_sha256: []}]", "keys[0] (a).key_sha256: expected at least one token"),
    ],
)
def test_virtual_key_entries_are_checked(tmp_path, keys: str, problem: str) -> None:
    x, y = sha("x"), sha("y")
    path = tmp_path / "policy.yaml"
    path.write_text("keys: " + keys.replace("X", f"'{x}'").replace("Y", f"'{y}'") + "\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    expected = problem.format(file=path).replace("XXXXXXXX", x[:8])
    assert caught.value.problems == [f"{path}: {expected}"]


def test_a_virtual_keys_budgets_are_keyed_by_its_upstream_key_not_a_token(tmp_path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy(f"'{sha(TOKEN_1)}'"))
    before = load_policy(path).keys[0]
    path.write_text(policy(f"'{sha(TOKEN_2)}'").replace("name: alice", "name: alice-renamed"))
    after = load_policy(path).keys[0]
    assert [b.counter for b in before.budgets] == [b.counter for b in after.budgets]
    assert before.budgets[0].counter.startswith("key-vk:") and before.virtual


def test_token_new_prints_a_token_once_and_the_entry_to_paste(tmp_path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy(f"{{sha256: '{sha(TOKEN_1)}', expires_at: '2027-01-31T00:00:00Z'}}"))
    result = CliRunner().invoke(main, ["token", "new", "--key", "alice", "--policy", str(path)])
    assert result.exit_code == 0, result.output
    (token,) = [line.strip() for line in result.output.splitlines() if line.strip().startswith("sgt_")]
    assert len(token) > 40
    assert f"      - {{sha256: {sha(TOKEN_1)}, expires_at: '2027-01-31T00:00:00Z'}}" in result.output
    assert f"      - {{sha256: {sha(token)}}}" in result.output
    # Pasted, the entry loads, and both tokens belong to alice.
    block = result.output[result.output.index("    key_sha256:") :].split("\n\n")[0]
    text = policy("X").replace("    key_sha256:\n      - X", block.rstrip())
    path.write_text(text)
    pasted = load_policy(path)
    assert pasted.key_for(sha(token)) is pasted.key_for(sha(TOKEN_1)) is pasted.keys[0]

    again = CliRunner().invoke(main, ["token", "new", "--key", "alice", "--policy", str(path)])
    assert token not in again.output  # a fresh one each time
    missing = CliRunner().invoke(main, ["token", "new", "--key", "nobody", "--policy", str(path)])
    assert missing.exit_code == 2 and "no key 'nobody'" in missing.output


def test_token_new_with_an_expiry(tmp_path) -> None:
    result = CliRunner().invoke(main, ["token", "new", "--key", "alice", "--expires-in-days", "30"])
    assert result.exit_code == 0
    assert "expires_at: '20" in result.output


def test_the_shipped_teams_policy_shows_a_virtual_key_mid_rotation() -> None:
    teams = load_policy(Path(__file__).resolve().parents[2] / "policies" / "teams.yaml")
    (bot,) = [key for key in teams.keys if key.virtual]
    assert bot.upstream_key_env and len(bot.credentials()) == 2 and bot.credentials()[0].expires_ms
