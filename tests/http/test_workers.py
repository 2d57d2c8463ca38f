"""`serve --workers N` and signals (docs/operations.md): SIGHUP to the parent replaces the workers one
by one, each draining its calls; SIGTERM stops everything within one shutdown_grace_s, even in the
middle of such a rolling restart."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import pytest

from tests.support.served import RedisServer, ServedProxy, alice_policy, generate, wait_until, worker_pids

pytestmark = pytest.mark.system

GRACE_S = 6


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


def healthy(proxy: ServedProxy) -> bool:
    try:
        return httpx.get(proxy.url + "/-/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.real
def test_sighup_to_the_parent_replaces_every_worker_while_the_proxy_keeps_answering(tmp_path, up, redis_server):
    path = alice_policy(tmp_path, account="workers-hup", budget_usd="50", shutdown_grace_s=GRACE_S)
    with ServedProxy(path, up.url, redis_server.url, workers=2) as proxy:
        assert proxy.proc is not None
        before = set(worker_pids(proxy))
        assert len(before) == 2
        os.kill(proxy.proc.pid, signal.SIGHUP)
        failures = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            failures += not healthy(proxy)
            now = set(worker_pids(proxy))
            if len(now) == 2 and not now & before:
                break
            time.sleep(0.1)
        assert len(now) == 2 and not now & before, (before, now)
        assert failures == 0
        assert generate(proxy.url, "cost=0.01").status_code == 200  # the new workers guard calls


@pytest.mark.real
def test_sigterm_during_a_rolling_restart_stops_within_one_grace_period(tmp_path, up, redis_server):
    path = alice_policy(tmp_path, account="workers-term", budget_usd="50", shutdown_grace_s=GRACE_S)
    proxy = ServedProxy(path, up.url, redis_server.url, workers=2)
    proxy.start()
    assert proxy.proc is not None
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            # Calls held open at the upstream on both workers: each old worker drains for the
            # whole grace period when the restart retires it.
            calls = [pool.submit(generate, proxy.url, "gate=hold,cost=0.1") for _ in range(16)]
            proxy.wait_for_upstream_requests(up, 16)
            os.kill(proxy.proc.pid, signal.SIGHUP)
            wait_until(lambda: "Terminated child process" in proxy.output(), 30, "the first old worker to be retired")
            stopped = time.monotonic()
            os.kill(proxy.proc.pid, signal.SIGTERM)
            proxy.proc.wait(GRACE_S * 4)
            took = time.monotonic() - stopped
            up.release("hold")
            for call in calls:
                call.exception()  # answered or cut; never left hanging
        # uvicorn's own supervisor finished the restart first: a second worker's start and drain
        # (14.0 s here).
        assert took < GRACE_S + 4, (
            f"SIGTERM took {took:.1f} s with shutdown_grace_s={GRACE_S}:\n{proxy.output()[-3000:]}"
        )
        assert proxy.proc.returncode is not None
    finally:
        up.release("hold")
        proxy.__exit__(None, None, None)
