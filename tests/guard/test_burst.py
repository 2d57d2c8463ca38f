"""Bursts wait, they aren't refused (docs/performance.md): 1,500 concurrent spending calls through one
served proxy are each answered 200 or a budget refusal, never 503, and the budget holds."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis

from tests.support.constants import KEY_A
from tests.support.served import RedisServer, ServedProxy, alice_policy

pytestmark = [pytest.mark.real, pytest.mark.system]
CALLS = 1500


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


async def burst(url: str) -> list[tuple[int, str]]:
    limits = httpx.Limits(max_connections=CALLS, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one() -> tuple[int, str]:
            r = await client.post(
                url + "/v1/openai/images/generations",
                json={"model": "google/gemini-2.5-flash", "prompt": "x"},
                headers={"Authorization": f"Bearer {KEY_A}", "X-Standin": "cost=0.039"},
            )
            return r.status_code, r.text if r.status_code == 503 else ""

        return list(await asyncio.gather(*(one() for _ in range(CALLS))))


def test_1500_concurrent_calls_wait_for_the_store_instead_of_failing(tmp_path, up, redis_server):
    # Room for exactly 1,000 calls of $0.039 in a $39 budget.
    path = alice_policy(tmp_path, account="burst", budget_usd="39")
    with ServedProxy(path, up.url, redis_server.url, args=("--max-connections", "4000")) as proxy:
        answers = asyncio.run(burst(proxy.url))
    statuses = [status for status, _ in answers]
    counts = {status: statuses.count(status) for status in set(statuses)}
    # before: 101 x 200 and 1,399 x 503 (MaxConnectionsError)
    assert set(counts) <= {200, 402}, (counts, sorted({text for _, text in answers if text})[:3])
    assert counts.get(200) == 1000, counts
    assert len(up.generation_requests) == 1000
    assert redis.Redis.from_url(redis_server.url).hlen("sg:{burst}:holds") == 0
