"""One clock, the store's (docs/state.md): served proxies whose machine clocks run 20 min ahead or
behind (libfaketime) share a Redis with a correct one. None may freeze the snapshot, reclaim
another's live hold or make a correct instance refuse calls; each says how far off it is."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import time

import httpx
import pytest
import redis

from tests.support.served import RedisServer, ServedProxy, alice_policy, generate, scraped, wait_until

pytestmark = [pytest.mark.real, pytest.mark.system]

FAKETIME = shutil.which("faketime")
if FAKETIME is None:
    if os.environ.get("CI"):
        raise RuntimeError("faketime is not installed; .ci/run installs Debian's faketime")
    pytestmark = [
        pytest.mark.real,
        pytest.mark.system,
        pytest.mark.skip(reason="faketime is not installed (apt-get install faketime)"),
    ]


def skewed(offset: str) -> dict:
    # Only the wall clock is faked: asyncio's timers run on the monotonic clock.
    return {"wrap": (FAKETIME or "faketime", "-f", offset), "env": {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}}


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


def policy(tmp_path):
    path = alice_policy(tmp_path, account="skew", budget_usd="50", refresh_s=300)
    text = path.read_text().replace("guard: {shutdown_grace_s: 10}", "guard: {shutdown_grace_s: 5, hold_ttl_s: 30}")
    path.write_text(text + "upstream: {timeout_s: 20}\n")
    return path


def readyz(proxy: ServedProxy) -> dict:
    return httpx.get(proxy.url + "/-/readyz", timeout=5).json()


def test_an_instance_20_minutes_ahead_neither_freezes_the_snapshot_nor_reclaims_live_holds(tmp_path, up, redis_server):
    path = policy(tmp_path)
    store = redis.Redis.from_url(redis_server.url)
    with (
        ServedProxy(path, up.url, redis_server.url, **skewed("+20m")) as ahead,
        ServedProxy(path, up.url, redis_server.url) as correct,
    ):
        report = readyz(ahead)
        assert report["ready"] is True
        assert -1210 < report["clock_offset_s"] < -1190
        assert any("clock" in warning for warning in report["warnings"])
        assert -1210 < scraped(ahead, "spend_guard_clock_offset_seconds") < -1190
        assert abs(readyz(correct)["clock_offset_s"]) < 2
        # The snapshot the fast instance fetched first is stamped on the store's clock.
        fetched_ms = int(store.hget("sg:{skew}:snap", "fetched_ms"))
        assert abs(fetched_ms / 1000 - time.time()) < 30
        # A call through the correct instance is in flight for a while; the fast one reserves
        # meanwhile: it must not judge the live hold expired and charge it whole.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(generate, correct.url, "heartbeat=1,gate=g,cost=0.05")
            up.wait_for_requests(1)
            assert [generate(ahead.url, "cost=0.01").status_code for _ in range(3)] == [200] * 3
            up.release("g")
            assert slow.result().status_code == 200
        assert scraped(ahead, "spend_guard_reclaimed_holds_total") == 0
        wait_until(lambda: store.hlen("sg:{skew}:holds") == 0, 10, "every hold settled")
        # Charged exactly what the upstream billed: 0.05 + 3 x 0.01 (no 0.30 reclaim).
        assert int(store.hget("sg:{skew}:chsum", "acct")) == 80_000
        assert up.charged_micros == 80_000


def test_a_correct_instance_keeps_serving_beside_one_20_minutes_behind(tmp_path, up, redis_server):
    path = policy(tmp_path)
    store = redis.Redis.from_url(redis_server.url)
    # The slow instance starts first, so it wins the refresh lock and stamps the snapshot.
    with ServedProxy(path, up.url, redis_server.url, **skewed("-20m")) as behind:
        assert 1190 < readyz(behind)["clock_offset_s"] < 1210
        fetched_ms = int(store.hget("sg:{skew}:snap", "fetched_ms"))
        assert abs(fetched_ms / 1000 - time.time()) < 30
        with ServedProxy(path, up.url, redis_server.url) as correct:
            r = generate(correct.url, "cost=0.01")
            assert r.status_code == 200, r.text  # was 503: "snapshot 1,202 s old"
            assert generate(behind.url, "cost=0.01").status_code == 200
