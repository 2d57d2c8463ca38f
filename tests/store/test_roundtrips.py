"""A guarded call costs exactly one Redis round trip to reserve and one to settle."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis

from tests.support.policies import budget, key_entry, policy_yaml
from tests.support.served import RedisServer
from tests.support.stores import StoreTarget

pytestmark = pytest.mark.system

SENTINEL = "spend-guard-test-done"


def watch(url: str, seen: list[dict], ready: threading.Event) -> None:
    """Record every command a client (not a script) sends, until the sentinel ECHO."""
    with redis.Redis.from_url(url).monitor() as monitor:
        ready.set()
        for command in monitor.listen():
            if SENTINEL in command["command"]:
                return
            if command.get("client_type") != "lua":
                seen.append(command)


@pytest.mark.parametrize("store_target", [pytest.param("real", marks=pytest.mark.real)], indirect=True)
def test_one_round_trip_to_reserve_and_one_to_settle(make_proxy, up, store_target):
    with RedisServer() as server:
        target = StoreTarget("real")
        target.url = server.url
        p = make_proxy(policy_yaml(keys=[key_entry(budgets=[budget(5, "day"), budget(50, "month")])]), store=target)
        assert p.generate(standin="cost=0.1").status_code == 200  # loads the scripts once
        seen: list[dict] = []
        ready = threading.Event()
        thread = threading.Thread(target=watch, args=(server.url, seen, ready), daemon=True)
        thread.start()
        assert ready.wait(10)
        for _ in range(3):
            assert p.generate(standin="cost=0.1").status_code == 200
        admin = redis.Redis.from_url(server.url)
        admin.echo(SENTINEL)
        thread.join(10)
        admin.close()
        # HELLO: the handshake of the admin connection that sends the sentinel
        names = [c["command"].split()[0].upper() for c in seen if not c["command"].upper().startswith("HELLO")]
        assert names == ["EVALSHA"] * 6, names  # reserve + settle, three times


@pytest.mark.parametrize("store_target", [pytest.param("real", marks=pytest.mark.real)], indirect=True)
def test_status_reads_every_key_and_group_in_two_round_trips(store_target, tmp_path):
    """`spend-guard status` with 20 keys in 4 groups: the open holds, then one levels read."""
    from proxy.commands.status import collect
    from proxy.policy.load import load_policy

    groups = "".join(f"  - name: g{i}\n    budgets: [{{limit_usd: 5, period: day}}]\n" for i in range(4))
    keys = "".join(
        f'  - name: k{i}\n    key_sha256: "{i:064x}"\n    group: g{i % 4}\n'
        "    budgets: [{limit_usd: 1, period: month}]\n"
        for i in range(20)
    )
    path = tmp_path / "policy.yaml"
    path.write_text(f"account: {{name: rt}}\ngroups:\n{groups}keys:\n{keys}")
    policy = load_policy(path)
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        admin.hset("sg:{rt}:holds", "h1", "1|0||0|")  # the store holds something for the account
        seen: list[dict] = []
        ready = threading.Event()
        thread = threading.Thread(target=watch, args=(server.url, seen, ready), daemon=True)
        thread.start()
        assert ready.wait(10)
        status = asyncio.run(collect(policy, server.url))
        admin.echo(SENTINEL)
        thread.join(10)
        admin.close()
    assert len([r for r in status.rows if r["owner"].startswith("key ")]) == 20
    assert len([r for r in status.rows if r["owner"].startswith("group ")]) == 4
    handshake = ("HELLO", "CLIENT", "PING")
    names = [c["command"].split()[0].upper() for c in seen if not c["command"].upper().startswith(handshake)]
    # (PING, HELLO, CLIENT: the connection handshake) EVALSHA fails once with NOSCRIPT on a new
    # server, then SCRIPT LOAD and EVALSHA again
    assert [n for n in names if n != "SCRIPT"] in (["HLEN", "EVALSHA"], ["HLEN", "EVALSHA", "EVALSHA"]), names
