"""A store that refuses writes for a while (at `maxmemory`, a full disk, a replica, loading,
busy) is an outage: settles it refuses stay pending and land once it takes writes again; only a
fault of the script itself is a `StoreScriptError`. See docs/failure-modes.md."""

from __future__ import annotations

import concurrent.futures
import contextlib
import time

import fakeredis
import httpx
import pytest
import redis
from redis._parsers.base import BaseParser

from proxy.errors import StoreError, StoreScriptError
from proxy.store.embedded import socket_path
from proxy.store.keyspace import Keys
from proxy.store.redis import Store
from tests.support.constants import KEY_A, SHA_A
from tests.support.served import RedisServer, ServedProxy, alice_policy, wait_until

AUTH = {"Authorization": f"Bearer {KEY_A}"}
ACCOUNT = "full"


@pytest.mark.parametrize(
    "reply",
    [
        "OOM command not allowed when used memory > 'maxmemory'.",
        "OOM command not allowed when used memory > 'maxmemory'. script: 99da, on @user_script:1.",
        "MISCONF Errors writing to the AOF file: No space left on device",
        "READONLY You can't write against a read only replica. script: 99da, on @user_script:1.",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
        "NOREPLICAS Not enough good replicas to write.",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "ERR Error running script (call to f_99da): @user_script:7: @user_script: 7: "
        "-OOM command not allowed when used memory > 'maxmemory'.",
    ],
)
async def test_a_store_refusing_writes_is_an_outage_not_a_script_fault(reply):
    store = Store(fakeredis.FakeAsyncRedis(), ACCOUNT)

    async def refused() -> None:
        raise BaseParser.parse_error(reply)

    with pytest.raises(StoreError) as caught:
        await store._call(refused)
    assert not isinstance(caught.value, StoreScriptError), caught.value


@pytest.mark.parametrize(
    "reply",
    [
        "ERR user_script:1: attempt to perform arithmetic on a nil value script: d13b, on @user_script:1.",
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "ERR value is not an integer or out of range",
    ],
)
async def test_a_fault_of_the_operation_itself_is_a_script_fault(reply):
    store = Store(fakeredis.FakeAsyncRedis(), ACCOUNT)

    async def refused() -> None:
        raise BaseParser.parse_error(reply)

    with pytest.raises(StoreScriptError):
        await store._call(refused)


def spent_usd(proxy: ServedProxy) -> str:
    me = httpx.get(proxy.url + "/-/me", headers=AUTH, timeout=5).json()
    return str(next(s for s in me["scopes"] if s["scope"] == "budget:key:alice:lifetime")["spent_usd"])


def generate(base: str, standin: str) -> httpx.Response:
    body = {"model": "openai/gpt-image-1", "prompt": "x"}  # held at $0.30 each
    return httpx.post(
        base + "/v1/openai/images/generations", json=body, headers={**AUTH, "X-Standin": standin}, timeout=60
    )


@pytest.mark.real
@pytest.mark.system
@pytest.mark.parametrize("backend", ["redis", pytest.param("embedded", marks=pytest.mark.embedded)])
def test_settles_refused_while_the_store_is_full_land_once_it_takes_writes(tmp_path, up, state_home, backend):
    # Four calls in flight when the store reaches `maxmemory`: their settles are refused (OOM)
    # for a few seconds, retried, and applied afterwards; the budget equals the bill.
    policy = alice_policy(tmp_path, account=ACCOUNT, budget_usd="5")
    with contextlib.ExitStack() as stack:
        url = None
        if backend == "redis":
            url = stack.enter_context(RedisServer()).url
            admin = redis.Redis.from_url(url)
        else:  # the embedded Valkey of the default state dir (under XDG_STATE_HOME)
            admin = redis.Redis(unix_socket_path=socket_path(None))
        stack.callback(admin.close)
        proxy = stack.enter_context(ServedProxy(policy, up.url, url))
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(generate, proxy.url, f"gate=full,cost=0.0{i + 1}") for i in range(4)]
            proxy.wait_for_upstream_requests(up, 4)
            admin.config_set("maxmemory", 1)
            try:
                full_since = time.monotonic()
                up.release("full")
                assert [f.result(timeout=60).status_code for f in futures] == [200] * 4
                wait_until(lambda: proxy.output().count("deferred") >= 4, 10, "four deferred settles")
                time.sleep(max(0.0, full_since + 4 - time.monotonic()))  # full for 4 s: retried, refused
                assert admin.hlen(Keys(ACCOUNT)("holds")) == 4
            finally:
                admin.config_set("maxmemory", 0)
        wait_until(lambda: admin.hlen(Keys(ACCOUNT)("holds")) == 0, 10, "the deferred settles to land")
        billed = up.charged_by_key[SHA_A]
        assert billed == 100_000  # 0.01 + 0.02 + 0.03 + 0.04
        assert spent_usd(proxy) == "0.1000"  # the ledger equals the bill
        assert "dropped" not in proxy.output()
