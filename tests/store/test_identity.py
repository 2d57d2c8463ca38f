"""Every instance checks the store's identity each refresh round, with or without traffic: a store
that lost its state makes every replica unready within one round, and a replica started later
cannot absorb the loss; a store without an epoch is new only when that is provably safe. Real
Redis (private servers) and the embedded Valkey. See docs/state.md."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis
from click.testing import CliRunner

from proxy.cli import main
from tests.store.test_embedded import day_budget_policy
from tests.support.constants import KEY_A
from tests.support.served import RedisServer, ServedProxy, alice_policy, wait_until

AUTH = {"Authorization": f"Bearer {KEY_A}"}
pytestmark = pytest.mark.system


def generate(proxy: ServedProxy, cost: str = "0.1") -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/openai/images/generations",
        json={"model": "openai/gpt-image-1"},
        headers={**AUTH, "X-Standin": f"cost={cost}"},
        timeout=30,
    )


def lost(proxy: ServedProxy) -> bool:
    """Unready for a lost state, and saying so in the metrics."""
    ready = httpx.get(proxy.url + "/-/readyz", timeout=5)
    problems = ready.json().get("problems", []) if ready.status_code == 503 else []
    if not any("local budget state was lost" in problem for problem in problems):
        return False
    return "spend_guard_store_state_lost 1.0" in httpx.get(proxy.url + "/-/metrics", timeout=5).text


@pytest.mark.real
def test_a_flushed_store_makes_every_idle_replica_unready_within_one_refresh_round(tmp_path, up):
    policy = alice_policy(tmp_path, account="ident", budget_usd="1", refresh_s=1)
    with (
        RedisServer() as server,
        ServedProxy(policy, up.url, server.url) as a,
        ServedProxy(policy, up.url, server.url) as b,
    ):
        assert generate(a).status_code == 200
        redis.Redis(port=server.port).flushdb()  # a private server; no call comes in from now on
        flushed = time.monotonic()
        wait_until(lambda: lost(a) and lost(b), 5, "both idle replicas to be unready")
        took = time.monotonic() - flushed
        print(f"both idle replicas unready {took:.2f} s after the FLUSHDB (refresh_s=1)")
        assert took < 2.5  # one refresh round, and the time to ask
        line = "ERROR spend_guard.credits STORE LOST ITS BUDGET STATE (the store's state was emptied)"
        wait_until(lambda: a.output().count(line) == b.output().count(line) == 1, 3, "one ERROR line from each")
        # A redeploy: the old replicas go, a new one starts on the same store. It cannot absorb
        # the loss as a new store: the budget stays refused until an operator recovers it.
        a.stop(), b.stop()
        with ServedProxy(policy, up.url, server.url, ready=False, init=False) as redeployed:
            wait_until(lambda: lost(redeployed), 10, "the redeployed replica to see the loss")
            refused = generate(redeployed)
            assert refused.status_code == 503 and "lost its local budget state" in refused.text
        assert len(up.generation_requests) == 1


@pytest.mark.real
def test_an_empty_store_nothing_shows_to_be_new_is_a_loss_until_store_init(tmp_path, up):
    policy = alice_policy(tmp_path, account="fresh", budget_usd="1", refresh_s=1)
    with RedisServer() as server:
        # Redis restarted empty after every replica was replaced: nothing tells this one it is new.
        with ServedProxy(policy, up.url, server.url, ready=False, init=False) as proxy:
            wait_until(lambda: lost(proxy), 10, "the replica to refuse the unknown store")
            ready = httpx.get(proxy.url + "/-/readyz", timeout=5).json()
            assert (
                "store: local budget state was lost (the store has no epoch and nothing shows it is new); "
                "run `spend-guard store init` if it is new, else `spend-guard store recover`"
            ) in ready["problems"]
            assert generate(proxy).status_code == 503
            done = CliRunner().invoke(main, ["store", "init", "--policy", str(policy), "--redis-url", server.url])
            assert done.exit_code == 0, done.output
            wait_until(lambda: generate(proxy).status_code == 200, 10, "the guard to take the store as new")
            again = CliRunner().invoke(main, ["store", "init", "--policy", str(policy), "--redis-url", server.url])
            assert again.exit_code == 0 and "already initialised" in again.output
        # A store that lost its state is not made new by `store init`.
        redis.Redis(port=server.port).set("sg:{fresh}:lost", "the store's state was emptied|1765000000000")
        refused = CliRunner().invoke(main, ["store", "init", "--policy", str(policy), "--redis-url", server.url])
        assert refused.exit_code == 1 and "run `spend-guard store recover` instead" in refused.output


@pytest.mark.real
def test_an_empty_store_is_new_for_a_policy_without_local_budgets(tmp_path, up):
    policy = tmp_path / "policy.yaml"
    policy.write_text("account: {name: nobudget, refresh_s: 1, max_staleness_s: 300}\n")
    with RedisServer() as server, ServedProxy(policy, up.url, server.url, init=False) as proxy:
        assert httpx.get(proxy.url + "/-/readyz", timeout=5).status_code == 200
        assert generate(proxy).status_code == 200


@pytest.mark.embedded
def test_an_embedded_store_that_lost_its_append_only_file_is_a_loss(tmp_path, up, state_home):
    path = day_budget_policy(tmp_path, "1.00")
    state_dir = state_home / "spend-guard"
    proxy = ServedProxy(path, up.url, None)
    with proxy:
        assert generate(proxy, "0.3").status_code == 200  # a first start here: the empty store is new
        assert proxy.stop(signal.SIGTERM) == 0
        for found in Path(state_dir).glob("appendonly*"):  # the store's data gone, the state dir kept
            shutil.rmtree(found) if found.is_dir() else found.unlink()
        proxy.ready = False
        proxy.start()
        wait_until(lambda: lost(proxy), 10, "the restarted proxy to see the loss")
        assert generate(proxy, "0.3").status_code == 503
        assert len(up.generation_requests) == 1


@pytest.mark.embedded
def test_a_first_start_in_a_state_dir_says_so_and_a_restart_there_does_not(tmp_path, up, state_home):
    path = day_budget_policy(tmp_path, "1.00")
    line = f"store: a first start in state dir {state_home / 'spend-guard'} (no store recorded there)"
    proxy = ServedProxy(path, up.url, None)
    with proxy:
        assert proxy.output().count(line) == 1
        assert proxy.stop(signal.SIGTERM) == 0
        proxy.start()  # the same state dir: its store is recorded there
        assert proxy.output().count(line) == 1
        assert proxy.output().count(f"store: embedded server, state dir {state_home / 'spend-guard'} (") == 2
