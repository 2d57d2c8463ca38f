"""The store records which ImageRouter account each `account.name` counts (a keyed fingerprint of the
account key, never the key), so two policies naming one account differently cannot keep two sets
of budgets on one store: the second is refused at start. Fake, real and embedded Redis; served
proxies on a private redis-server and on the embedded store. See docs/state.md."""

from __future__ import annotations

import hashlib
import signal

import httpx
import pytest

from proxy.store.keyspace import ACCOUNTS
from proxy.store.redis import Store
from tests.support.constants import ACCOUNT_KEY, KEY_A
from tests.support.proxies import envelope
from tests.support.served import RedisServer, ServedProxy, alice_policy

AUTH = {"Authorization": f"Bearer {KEY_A}"}
REFUSED = "startup refused: this store already counts the ImageRouter account of IMAGEROUTER_API_KEY as account.name"


async def test_one_account_key_is_counted_under_one_name(store_target):
    main, other = Store(store_target.client(), "main"), Store(store_target.client(), "other")
    try:
        assert await main.claim_account(ACCOUNT_KEY) is None
        assert await main.claim_account(ACCOUNT_KEY) is None  # the same name again: a restart
        assert await other.claim_account(ACCOUNT_KEY) == "main"
        assert await other.claim_account("sk-another-account") is None  # another account: its own name
        assert await main.claim_account("sk-another-account") == "other"
        # what the store keeps: neither the key nor its plain hash
        stored = b"".join(k + v for k, v in (await main.client.hgetall(ACCOUNTS)).items())
        for secret in (ACCOUNT_KEY, hashlib.sha256(ACCOUNT_KEY.encode()).hexdigest()):
            assert secret.encode() not in stored
    finally:
        await main.aclose()
        await other.aclose()


def test_an_account_found_under_another_name_after_start_refuses_spending_calls(make_proxy, up, store_target):
    p = make_proxy("keys:\n  - {name: alice, key_sha256: " + hashlib.sha256(KEY_A.encode()).hexdigest() + "}\n")
    assert p.generate(standin="cost=0.1").status_code == 200
    # The store did not answer when this proxy started; another policy claimed the account meanwhile.
    prod = Store(store_target.client(), "prod")
    p.run(prod.client.delete, ACCOUNTS)
    assert p.run(prod.claim_account, up.account_key) is None
    p.run(prod.aclose)
    p.runtime.refresher.account_claimed = False
    p.run(p.runtime.refresher.tick)
    refused = p.generate(standin="cost=0.1")
    assert refused.status_code == 503 and envelope(refused)["type"] == "guard_unavailable"
    assert "counts this ImageRouter account under another account name" in envelope(refused)["message"]
    assert len(up.generation_requests) == 1  # nothing more went up
    ready = p.client.get("/-/readyz")
    assert ready.status_code == 503
    named = "as account.name 'prod', and this policy names it 't'"
    assert any(named in problem for problem in ready.json()["problems"])


def policy_named(tmp_path, name: str):
    directory = tmp_path / name
    directory.mkdir()
    return alice_policy(directory, account=name, budget_usd="1")


@pytest.mark.real
@pytest.mark.system
@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_account_name_for_one_account_on_one_store_is_refused_at_start(tmp_path, up, workers):
    with RedisServer() as server, ServedProxy(policy_named(tmp_path, "prod"), up.url, server.url) as first:
        second = ServedProxy(policy_named(tmp_path, "production"), up.url, server.url, workers=workers, ready=False)
        try:
            with pytest.raises(RuntimeError, match="proxy exited with 3"):
                second.start()
            # one line per worker that got that far (the parent stops the others once one fails),
            # and the message nowhere else
            said = second.output().count(f"{REFUSED} 'prod', and this policy names it 'production'")
            assert 1 <= said <= workers
            assert second.output().count("and this policy names it 'production'") == said
            assert "Traceback" not in second.output()
        finally:
            second.__exit__(None, None, None)
        assert first.stop(signal.SIGTERM) == 0  # the first is unaffected; its restart too
        first.start()
        assert httpx.get(first.url + "/-/readyz", timeout=5).status_code == 200


@pytest.mark.embedded
@pytest.mark.system
def test_the_embedded_store_keeps_counting_its_account_under_its_first_name(tmp_path, up, state_home):
    proxy = ServedProxy(policy_named(tmp_path, "emb"), up.url, None)
    with proxy:
        assert proxy.stop(signal.SIGTERM) == 0
    renamed = ServedProxy(policy_named(tmp_path, "emb2"), up.url, None, ready=False)
    try:
        with pytest.raises(RuntimeError, match="proxy exited with 3"):
            renamed.start()
        assert f"{REFUSED} 'emb', and this policy names it 'emb2'" in renamed.output()
    finally:
        renamed.__exit__(None, None, None)
