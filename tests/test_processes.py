"""Real processes on a real Redis: several proxies share budgets exactly (the invariant holds
across processes); a store outage refuses every spending call until the store is back, a client
that disconnects still has its call settled with the real cost, raw path spellings never reach a
spending route unguarded, and SIGTERM lets calls in flight finish and settle (docs/how-it-works.md,
docs/failure-modes.md)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import httpx
import pytest

from tests.support.constants import KEY_A, SHA_A
from tests.support.served import (
    AUTH,
    RedisServer,
    ServedProxy,
    alice_policy,
    generate,
    scraped,
    spent,
    wait_until,
    worker_pids,
)

pytestmark = pytest.mark.system


def policy_file(tmp_path, budget_usd: str = "3.00"):
    return alice_policy(tmp_path, account="proc", budget_usd=budget_usd, shutdown_grace_s=20)


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.mark.real
def test_two_processes_let_exactly_k_calls_through(tmp_path, up, redis_server):
    # 3.00 / 0.30 per gpt-image-1 hold = room for exactly 10 calls in flight at once.
    path = policy_file(tmp_path, "3.00")
    with ServedProxy(path, up.url, redis_server.url) as p1, ServedProxy(path, up.url, redis_server.url) as p2:
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            futures = [pool.submit(generate, (p1, p2)[i % 2].url, "gate=k,cost=0.3") for i in range(40)]
            up.wait_for_requests(10)
            # the 30 refusals come back while the 10 allowed calls are still held at the gate
            wait_until(lambda: sum(f.done() for f in futures) == 30, 30, "30 refusals")
            up.release("k")
            results = [f.result() for f in futures]
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200] * 10 + [402] * 30, statuses
        assert len(up.generation_requests) == 10
        assert all(r.json()["error"]["type"] == "spend_limit_exceeded" for r in results if r.status_code == 402)
        # a call settles just after its last byte is sent: wait for the last settles to land
        wait_until(lambda: spent(p1) == "3.0000", 10, "every allowed call to settle")
        assert spent(p2) == "3.0000"


@pytest.mark.real
def test_redis_stopped_mid_traffic_refuses_every_spending_call_then_recovers_once_recovered(tmp_path, up, redis_server):
    path = policy_file(tmp_path, "50")
    with ServedProxy(path, up.url, redis_server.url) as proxy:
        assert generate(proxy.url, "cost=0.01").status_code == 200
        redis_server.stop()
        for _ in range(5):
            r = generate(proxy.url, "cost=0.01")
            assert r.status_code == 503 and r.json()["error"]["type"] == "guard_unavailable"
        assert len(up.generation_requests) == 1
        # unguarded routes keep working without the store
        assert httpx.get(proxy.url + "/echo/x", timeout=5).status_code == 200
        assert httpx.get(proxy.url + "/-/readyz", timeout=5).status_code == 503
        redis_server.start()  # empty: alice's budget counter is gone with the rest
        # The loss is noticed, not absorbed as a budget back at $0.
        lost = generate(proxy.url, "cost=0.01")
        assert lost.status_code == 503 and "lost its local budget state" in lost.json()["error"]["message"]
        assert len(up.generation_requests) == 1
        recovered = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy",
                "store",
                "recover",
                "--policy",
                str(path),
                "--redis-url",
                redis_server.url,
                "--seed",
                "key:alice:lifetime=0.01",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert recovered.returncode == 0, recovered.stderr
        # The refresher lays a snapshot down again; the seed is what alice had spent.
        wait_until(lambda: generate(proxy.url, "cost=0.01").status_code == 200, 20, "the guard to recover")
        # Ready again once 10 s passed since the last failed reserve.
        wait_until(lambda: httpx.get(proxy.url + "/-/readyz", timeout=5).status_code == 200, 15, "readyz")
        assert spent(proxy) == "0.0200"


def raw_request(port: int, target: str, body: bytes) -> bytes:
    head = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY_A}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.real
@pytest.mark.parametrize(
    "target",
    [
        "//v1/openai/images/generations",
        "/v1/./openai/images/generations",
        "/v1/x/../openai/images/generations",
        "/../v1/openai/images/generations",
        "/v1/openai//images/generations/",
        "/V1/OPENAI/images/GENERATIONS",
        "/v1/openai/images%2Fgenerations",
        "/v1%2fopenai/images/generations",
        "/v1/openai/images%5Cgenerations",
        "http://evil.example/v1/openai/images/generations",
    ],
)
def test_raw_path_spellings_never_reach_a_spending_route_unguarded(tmp_path, up, redis_server, target):
    path = policy_file(tmp_path, "0")
    with ServedProxy(path, up.url, redis_server.url) as proxy:
        reply = raw_request(proxy.port, target, b'{"model": "openai/gpt-image-1"}')
        status = int(reply.split(b" ", 2)[1])
        assert status in (400, 402), reply[:300]
        assert b'"error"' in reply and b'"type"' in reply
        assert up.generation_requests == []


@pytest.mark.real
def test_guarded_client_disconnect_still_settles_with_the_real_cost(tmp_path, up, redis_server):
    path = policy_file(tmp_path, "50")
    with ServedProxy(path, up.url, redis_server.url) as proxy:
        with httpx.Client(timeout=10) as client:
            with client.stream(
                "POST",
                proxy.url + "/v1/openai/images/generations",
                json={"model": "openai/gpt-image-1"},
                headers={**AUTH, "X-Standin": "heartbeat=3,gate=d,cost=0.1234"},
            ) as response:
                chunks = response.iter_raw()
                assert next(chunks) == b" "  # the heartbeat reached us before the result
        # the client is gone; the upstream is still generating
        up.release("d")
        wait_until(lambda: spent(proxy) == "0.1234", 20, "the settle with the real cost")
        assert up.closed_early == 0  # the proxy read the upstream response to its end


@pytest.mark.real
def test_unguarded_client_disconnect_closes_the_upstream_at_once(tmp_path, up, redis_server):
    path = policy_file(tmp_path, "50")
    with ServedProxy(path, up.url, redis_server.url) as proxy:
        with httpx.Client(timeout=10) as client:
            with client.stream("GET", proxy.url + "/stream/x", headers={"X-Standin": "gate=never"}) as response:
                chunks = response.iter_raw()
                assert next(chunks) == b" "
                up.wait_for_streams(1)
        up.wait_for_streams(0)  # freed while the gate is still closed
        assert up.closed_early == 1


@pytest.mark.real
def test_sigterm_lets_inflight_calls_finish_and_settle(tmp_path, up, redis_server):
    path = policy_file(tmp_path, "50")
    with ServedProxy(path, up.url, redis_server.url) as observer:
        proxy = ServedProxy(path, up.url, redis_server.url)
        proxy.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                call = pool.submit(generate, proxy.url, "heartbeat=2,gate=t,cost=0.2")
                up.wait_for_requests(1)
                proxy.proc.send_signal(signal.SIGTERM)
                up.release("t")
                response = call.result()
            assert response.status_code == 200 and response.json()["cost"] == 0.2
            # uvicorn re-raises the captured SIGTERM once shut down, so it ends "by" the signal
            assert proxy.proc.wait(30) in (0, -signal.SIGTERM)
            assert "did not stop" not in proxy.output()
        finally:
            proxy.__exit__(None, None, None)
        assert spent(observer) == "0.2000"


@pytest.mark.real
def test_group_budget_shared_by_two_keys_on_two_processes_is_never_exceeded(tmp_path, up, redis_server):
    key_b = "sk-b-" + "b" * 59
    path = tmp_path / "policy.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            account: {{name: proc, refresh_s: 1, max_staleness_s: 300}}
            groups:
              - name: team
                budgets: [{{limit_usd: 1.50, period: day}}]
            keys:
              - {{name: alice, key_sha256: {SHA_A}, group: team}}
              - {{name: bob, key_sha256: {hashlib.sha256(key_b.encode()).hexdigest()}, group: team}}
            """
        )
    )

    def call(i: int) -> httpx.Response:
        token = KEY_A if i % 2 else key_b
        return httpx.post(
            (p1, p2)[i // 2 % 2].url + "/v1/openai/images/generations",
            json={"model": "openai/gpt-image-1"},
            headers={"Authorization": f"Bearer {token}", "X-Standin": "cost=0.3"},
            timeout=30,
        )

    with ServedProxy(path, up.url, redis_server.url) as p1, ServedProxy(path, up.url, redis_server.url) as p2:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, range(32)))
        assert sum(r.status_code == 200 for r in results) == 5  # 5 x 0.30 = 1.50
        assert {r.status_code for r in results} == {200, 402}
        assert len(up.generation_requests) == 5
        # every decision was logged as one JSON object per line, with the policy version
        lines = [json.loads(line) for proxy in (p1, p2) for line in proxy.output().splitlines() if line.startswith("{")]
        assert len(lines) == 32
        assert {line["decision"] for line in lines} == {"allowed", "refused"}
        assert all(line["policy_version"] and line["request_id"] for line in lines)


@pytest.mark.real
def test_every_scrape_of_a_two_worker_proxy_counts_both_workers(tmp_path, up, redis_server):
    path = policy_file(tmp_path, "50")
    with ServedProxy(path, up.url, redis_server.url, workers=2) as proxy:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(generate, proxy.url, "gate=m,cost=0.1") for _ in range(16)]
            proxy.wait_for_upstream_requests(up, 16)
            # 16 calls held at the upstream, spread over both workers' connections
            for _ in range(6):
                assert scraped(proxy, "spend_guard_inflight_holds") == 16
            up.release("m")
            assert [f.result().status_code for f in futures] == [200] * 16
        wait_until(lambda: scraped(proxy, "spend_guard_inflight_holds") == 0, 20, "the last settles")
        for _ in range(6):
            assert scraped(proxy, "spend_guard_decisions_total", outcome="allowed", key="alice") == 16
            assert scraped(proxy, "spend_guard_usd_total", kind="charged", key="alice") == pytest.approx(1.6)


@pytest.mark.real
def test_a_killed_worker_stops_counting_its_holds_in_flight(tmp_path, up, redis_server):
    path = policy_file(tmp_path, "50")
    with ServedProxy(path, up.url, redis_server.url, workers=2) as proxy:
        workers = worker_pids(proxy)
        assert len(workers) == 2
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(generate, proxy.url, "gate=w,cost=0.1") for _ in range(16)]
            proxy.wait_for_upstream_requests(up, 16)
            assert scraped(proxy, "spend_guard_inflight_holds") == 16
            os.kill(workers[0], signal.SIGKILL)  # no shutdown: its gauge file stays behind
            # its clients see their connections drop; the other worker's calls are still held
            # Until the release, only the killed worker's calls can end: the count in flight must
            # come down to exactly the calls still held.
            wait_until(
                lambda: scraped(proxy, "spend_guard_inflight_holds") == 16 - sum(f.done() for f in futures) < 16,
                20,
                "the dead worker's holds to stop counting",
            )
            lost = sum(f.done() for f in futures)
            up.release("w")
            assert sum(1 for f in futures if f.exception() is None and f.result().status_code == 200) == 16 - lost
        wait_until(lambda: scraped(proxy, "spend_guard_inflight_holds") == 0, 20, "every hold settled or forgotten")
