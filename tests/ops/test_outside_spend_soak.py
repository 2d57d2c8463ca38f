"""Soak: traffic that all passes the guard, with calls in flight across a refresh every second,
is never reported as spend outside the guard (docs/alerts.md). Two served proxies on one Redis,
two keys, image calls pre-charged upstream and chat calls billed when they end, refunds and
held costs mixed in. SPEND_GUARD_OUTSIDE_SOAK_S sets how long (20 s by default)."""

from __future__ import annotations

import concurrent.futures
import os
import random
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.constants import KEY_A, KEY_B, SHA_A, SHA_B
from tests.support.served import RedisServer, ServedProxy, wait_until
from tests.support.standin import key_row

pytestmark = [pytest.mark.real, pytest.mark.system]

SOAK_S = float(os.environ.get("SPEND_GUARD_OUTSIDE_SOAK_S", "20"))
CHAT = "/v1/openai/chat/completions"
IMAGES = "/v1/openai/images/generations"


def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"""account: {{name: outside-soak, refresh_s: 1, max_staleness_s: 300}}
models:
  text_rates:
    "*": {{input_usd_per_mtok: 1.00, output_usd_per_mtok: 2.00, max_output_tokens: 4096}}
keys:
  - {{name: alice, key_sha256: '{SHA_A}', api_key_id: key-a}}
  - {{name: bob, key_sha256: '{SHA_B}', api_key_id: key-b}}
"""
    )
    return path


def one_call(rng: random.Random, url: str) -> int:
    token = rng.choice((KEY_A, KEY_B))
    cost = f"0.0{rng.randrange(1, 500):03d}"
    beat = f"heartbeat={rng.randint(1, 12)},interval=0.1"  # in flight for up to ~1.2 s
    kind = rng.choices(["image", "slow image", "refund", "held", "chat"], weights=[25, 35, 10, 10, 20])[0]
    standin, path, body = {
        "image": (f"cost={cost}", IMAGES, {"model": "openai/gpt-image-1", "prompt": "x"}),
        "slow image": (f"{beat},cost={cost}", IMAGES, {"model": "openai/gpt-image-1", "prompt": "x"}),
        "refund": (f"{beat},error", IMAGES, {"model": "openai/gpt-image-1", "prompt": "x"}),
        "held": ("nocost", IMAGES, {"model": "openai/gpt-image-1", "prompt": "x"}),
        "chat": (
            f"{beat},cost={cost}",
            CHAT,
            {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100},
        ),
    }[kind]
    response = httpx.post(
        url + path, json=body, headers={"Authorization": f"Bearer {token}", "X-Standin": standin}, timeout=60
    )
    return response.status_code


def outside(url: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/-/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "spend_guard_outside_spend_usd_total":
                found[sample.labels["key"]] = sample.value
            if sample.name == "spend_guard_account_outside_spend_usd_total":
                found["(account)"] = sample.value
    return found


def test_guarded_traffic_across_refreshes_is_never_spend_outside_the_guard(tmp_path, up):
    # Limits far above what even a long soak spends: every call is admitted, so every call is
    # one ImageRouter bills and the guard charges.
    up.credits_remaining_micros = 10**15
    up.key_rows = [
        key_row("key-a", "alice", spend_limit="1000000.00", period="day"),
        key_row("key-b", "bob", spend_limit="1000000.00", period="day"),
    ]
    up.key_ids = {KEY_A: "key-a", KEY_B: "key-b"}
    path = policy(tmp_path)
    with (
        RedisServer() as redis_server,
        ServedProxy(path, up.url, redis_server.url) as p1,
        ServedProxy(path, up.url, redis_server.url) as p2,
    ):
        deadline = time.monotonic() + SOAK_S

        def worker(seed: int) -> list[int]:
            rng, statuses = random.Random(seed), []
            while time.monotonic() < deadline:
                statuses.append(one_call(rng, (p1.url, p2.url)[seed % 2]))
            return statuses

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = [status for done in pool.map(worker, range(8)) for status in done]
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        fetched = up.credits_calls
        wait_until(lambda: up.credits_calls >= fetched + 2, 15, "two more refresh rounds after the last call")
        seen = {**outside(p1.url), **{f"p2 {k}": v for k, v in outside(p2.url).items()}}
        assert all(value == 0 for value in seen.values()), seen
        assert len(up.generation_requests) == len(statuses)
