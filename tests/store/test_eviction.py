"""A store that can evict the guard's keys (any `maxmemory-policy` but `noeviction`) would forget
budget counters silently when full: every instance says so within a refresh round (readyz 503, a
metric, one ERROR line) while the policy counts local budgets. See docs/failure-modes.md."""

from __future__ import annotations

import httpx
import pytest
import redis

from tests.support.served import RedisServer, ServedProxy, alice_policy, wait_until

pytestmark = [pytest.mark.real, pytest.mark.system]
PROBLEM = "store: its maxmemory-policy volatile-ttl can evict budget counters; set noeviction"


def problems(proxy: ServedProxy) -> list[str]:
    return list(httpx.get(proxy.url + "/-/readyz", timeout=5).json().get("problems", []))


def test_an_evicting_store_is_loudly_unready_until_set_to_noeviction(tmp_path, up):
    policy = alice_policy(tmp_path, account="evict", budget_usd="1", refresh_s=1)
    with RedisServer() as server, ServedProxy(policy, up.url, server.url) as proxy:
        admin = redis.Redis(port=server.port)  # a private server
        admin.config_set("maxmemory-policy", "volatile-ttl")  # as a Redis shared with a cache might run
        wait_until(lambda: PROBLEM in problems(proxy), 5, "readyz to name the eviction policy")
        assert "spend_guard_store_can_evict 1.0" in httpx.get(proxy.url + "/-/metrics", timeout=5).text
        admin.config_set("maxmemory-policy", "noeviction")
        wait_until(lambda: problems(proxy) == [], 5, "ready again")
        assert "spend_guard_store_can_evict 0.0" in httpx.get(proxy.url + "/-/metrics", timeout=5).text
        assert proxy.output().count("STORE CAN EVICT BUDGET COUNTERS: its maxmemory-policy is volatile-ttl") == 1
