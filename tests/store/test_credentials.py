"""A Redis that refuses the proxy's password is a setup error: one clear ERROR line and /-/readyz
naming it, not a warning every refresh round. See docs/failure-modes.md."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from tests.support.served import RedisServer, ServedProxy, alice_policy, wait_until

pytestmark = [pytest.mark.real, pytest.mark.system]


def test_a_wrong_redis_password_is_one_clear_error_line(tmp_path, up):
    with RedisServer() as server:
        redis.Redis(port=server.port).config_set("requirepass", "right-password")  # a private server
        wrong = f"redis://:wrong-password@127.0.0.1:{server.port}/0"
        policy = alice_policy(tmp_path, account="auth", budget_usd="5", refresh_s=1)
        with ServedProxy(policy, up.url, wrong, ready=False, init=False) as proxy:
            wait_until(lambda: "CREDENTIALS" in proxy.output(), 10, "the error line")
            time.sleep(3)  # three more refresh rounds
            ready = httpx.get(proxy.url + "/-/readyz", timeout=5)
            assert ready.status_code == 503
            assert (
                "store: it refused the proxy's credentials (the password in the Redis URL)" in ready.json()["problems"]
            )
            log = proxy.output()
            problems = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
            # Besides the one line at startup saying what readiness waits for, one ERROR line in all.
            problems = [line for line in problems if "spend guard started, not ready yet" not in line]
            assert len(problems) == 1, "\n".join(problems)
            assert "STORE REJECTED THE PROXY'S CREDENTIALS" in problems[0] and "wrong-password" not in log
