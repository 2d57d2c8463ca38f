"""Small frictions a new operator met: `--demo` with one's own policy, the demo's paths and its
clean exit on SIGTERM, `spend guard ready` only when ready, and refusals and policy errors that
say what they mean."""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.standin import DEFAULT_ACCOUNT_KEY
from tests.commands.test_demo import Demo
from tests.support.constants import KEY_A, KEY_B, SHA_A
from tests.support.served import free_port, wait_until
from tests.support.standin import key_row

TOKEN = "sk-mine-" + "m" * 40


def own_policy(tmp_path: Path) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(
        f"""
account: {{name: mine, api_key_env: MY_IMAGEROUTER_KEY}}
keys:
  - name: carol
    key_sha256: {hashlib.sha256(TOKEN.encode()).hexdigest()}
    budgets: [{{limit_usd: 0.20, period: day}}]
"""
    )
    return path


@pytest.mark.system
def test_demo_serves_a_policy_of_ones_own_and_prints_the_account_key_and_paths(tmp_path: Path) -> None:
    policy = own_policy(tmp_path)
    demo = Demo(tmp_path, "--policy", str(policy))
    try:
        banner = demo.err.read_text()
        assert f"Policy: {policy} (yours;" in banner
        assert re.search(r"^State: /\S+/state \(the embedded store, removed on exit\)$", banner, re.MULTILINE)
        assert f"put in MY_IMAGEROUTER_KEY (account.api_key_env) for this process: {DEFAULT_ACCOUNT_KEY}" in banner
        assert "Keys of the policy: carol." in banner
        free = demo.image(TOKEN, "test/test")
        assert free.status_code == 200, free.text
        refused = demo.image(TOKEN, "openai/gpt-image-1")  # holds $0.30, over carol's $0.20 a day
        assert refused.status_code == 402
        assert refused.headers["X-Spend-Guard-Scope"] == "budget:key:carol:day"
    finally:
        demo.stop()


@pytest.mark.system
def test_demo_with_an_invalid_policy_of_ones_own_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: dry-run\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--demo", "--policy", str(bad), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{bad}: mode: unknown mode 'dry-run'" in result.stderr


@pytest.mark.system
def test_demo_removes_its_temporary_directory_on_sigterm(tmp_path: Path) -> None:
    demo = Demo(tmp_path)
    (policy,) = re.findall(r"^Policy: (\S+) \(written by the demo", demo.err.read_text(), re.MULTILINE)
    home = Path(policy).parent
    assert home.is_dir() and (home / "state").is_dir()
    assert demo.stop() == 0  # a stop asked for exits 0, as `serve` does (docs/operations.md) ...
    assert not home.exists()  # ... and nothing left behind


@pytest.fixture
def quick_ready_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    import proxy.app

    monkeypatch.setattr(proxy.app, "READY_POLL_S", 0.05)


def test_spend_guard_ready_is_logged_only_once_the_guard_is_ready(make_proxy, up, quick_ready_poll, caplog) -> None:
    caplog.set_level(logging.INFO, logger="spend_guard")
    up.credits_status = 500
    proxy = make_proxy(alice_policy(), refresh=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "spend_guard"]
    assert not [m for m in messages if m.startswith("spend guard ready")]
    (waiting,) = [m for m in messages if m.startswith("spend guard started, not ready yet")]
    assert "snapshot: no credits snapshot fetched yet" in waiting
    assert proxy.client.get("/-/readyz").status_code == 503
    up.credits_status = 200
    proxy.refresh()
    wait_until(
        lambda: any(r.getMessage().startswith("spend guard ready: policy ") for r in caplog.records),
        10,
        "the ready line once the snapshot is in",
    )
    assert proxy.client.get("/-/readyz").status_code == 200


def test_a_ready_start_logs_ready_at_once(make_proxy, up, caplog) -> None:
    caplog.set_level(logging.INFO, logger="spend_guard")
    proxy = make_proxy(alice_policy())
    wait_until(lambda: any(r.getMessage().startswith("spend guard ready") for r in caplog.records), 5, "ready")
    assert not [r for r in caplog.records if "not ready yet" in r.getMessage()]
    assert proxy.client.get("/-/readyz").status_code == 200


def alice_policy(extra: str = "") -> str:
    return f"""
{extra}
keys:
  - name: alice
    key_sha256: {SHA_A}
    api_key_id: key-a
  - name: bob
    key_sha256: {hashlib.sha256(KEY_B.encode()).hexdigest()}
    models: {{deny: ["google/*"]}}
"""


def test_a_globally_denied_model_says_it_is_denied_for_every_key(make_proxy, up) -> None:
    proxy = make_proxy(alice_policy("models: {deny: ['openai/*']}"))
    refused = proxy.generate(model="openai/gpt-image-1")
    assert refused.status_code == 403
    assert refused.json()["error"]["message"] == "Model 'openai/gpt-image-1' is not allowed by policy for any key."
    by_key = proxy.generate(token=KEY_B, model="google/gemini-2.5-flash")
    assert by_key.json()["error"]["message"] == (
        "Model 'google/gemini-2.5-flash' is not allowed by policy for this key."
    )


def test_a_key_limit_refusal_names_the_key_grammatically(make_proxy, up) -> None:
    up.key_rows = [key_row("key-a", "alice", spend_limit="0.10", period="day")]
    up.key_ids = {KEY_A: "key-a"}
    proxy = make_proxy(alice_policy())
    refused = proxy.generate(model="openai/gpt-image-1")
    assert refused.status_code == 402
    message = refused.json()["error"]["message"]
    assert message.startswith(
        "The key 'alice' has an ImageRouter spend limit of $0.1000 per day, which would be exceeded: spent $0.0000, "
    ), message
    assert "''" not in message


def test_policy_errors_name_a_key_and_a_group_by_name(tmp_path: Path) -> None:
    from proxy.errors import PolicyError
    from proxy.policy.load import load_policy

    path = tmp_path / "policy.yaml"
    path.write_text(
        "groups: [{name: design, budgets: [{limit_usd: 1, period: weekly}]}]\n"
        f"keys: [{{name: alice, key_sha256: '{SHA_A}'}}, {{name: bob, key_sha256: '{SHA_A}', max_request_usd: -1}}]\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    locations = [problem.removeprefix(f"{path}: ").split(": ")[0] for problem in caught.value.problems]
    assert locations == [
        "groups[0] (design).budgets[0].period",
        "keys[1] (bob).max_request_usd",
        "keys[1] (bob).key_sha256",
    ]


def test_the_shipped_docs_show_the_new_refusal_text() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "Key 'bob''s" not in readme
    assert "The key 'bob' has an ImageRouter spend limit of $0.1000 per day" in readme
