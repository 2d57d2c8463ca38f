"""Slow and hostile clients against a served proxy (docs/operations.md): request heads and bodies
are timed out, connections and buffered bodies are bounded, a client that stops reading cannot keep
a call open, and a cut response is one WARNING line."""

from __future__ import annotations

import concurrent.futures
import os
import selectors
import socket
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.support.constants import KEY_A, SHA_A
from tests.support.policies import budget, flow, key_entry, policy_yaml
from tests.support.served import ServedProxy, wait_until
from tests.support.sockets import connect, envelope, read_until_closed

AUTH = {"Authorization": f"Bearer {KEY_A}"}
ROUTE = "/v1/openai/images/generations"


def write_policy(directory: Path, extra: str = "") -> Path:
    path = directory / "policy.yaml"
    path.write_text(
        policy_yaml(
            account=flow(name=f"hostile-{os.urandom(4).hex()}", refresh_s=1, max_staleness_s=300),
            keys=[key_entry(budgets=[budget(50, None)])],
        )
        + textwrap.dedent(extra)
    )
    return path


def spent(proxy: ServedProxy) -> str:
    me = httpx.get(proxy.url + "/-/me", headers=AUTH, timeout=5).json()
    return next(s for s in me["scopes"] if s["scope"] == "budget:key:alice:lifetime")["spent_usd"]


def head(length: int | str, *, auth: str | None = KEY_A, extra: str = "") -> bytes:
    lines = [f"POST {ROUTE} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if auth is not None:
        lines.append(f"Authorization: Bearer {auth}")
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


@pytest.mark.system
def test_half_sent_heads_are_cut_within_the_head_timeout_while_healthz_answers(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None, ready=False, args=("--head-timeout-s", "3")) as proxy:
        opened = time.monotonic()
        partial = [connect(proxy.port) for _ in range(600)]
        for sock in partial:
            sock.sendall(b"POST /v1/openai/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bea")
        silent = [connect(proxy.port) for _ in range(100)]
        # The proxy's own endpoints still answer while all 700 are open.
        assert httpx.get(proxy.url + "/-/healthz", timeout=2).status_code == 200
        assert time.monotonic() - opened < 2.5, "the check above must run while the connections are open"
        selector = selectors.DefaultSelector()
        replies: dict[socket.socket, bytes] = {}
        closed_at: dict[socket.socket, float] = {}
        for sock in partial + silent:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            replies[sock] = b""
        deadline = opened + 10
        while len(closed_at) < len(replies) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                sock = key.fileobj  # type: ignore[assignment]
                try:
                    chunk = sock.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                replies[sock] += chunk
                if not chunk:
                    closed_at[sock] = time.monotonic()
                    selector.unregister(sock)
        assert len(closed_at) == 700, f"{700 - len(closed_at)} connections still open 10 s later"
        earliest, latest = min(closed_at.values()) - opened, max(closed_at.values()) - opened
        assert 2.5 < earliest and latest < 7, (earliest, latest)
        for sock in partial:
            status, headers, body = envelope(replies[sock])
            assert status == 408 and headers["connection"] == "close"
            assert body["error"]["type"] == "request_timeout"  # type: ignore[index]
        assert all(replies[sock] == b"" for sock in silent)  # nothing asked, nothing answered
        # one WARNING line for the lot (at most one a minute), not one per connection
        wait_until(lambda: "slow clients:" in proxy.output(), 5, "the warning")
        warned = [line for line in proxy.output().splitlines() if "slow clients:" in line]
        assert len(warned) == 1 and "WARNING" in warned[0] and "700 connection(s) cut" in warned[0], warned
        for sock in partial + silent:
            sock.close()
        assert up.generation_requests == []


@pytest.mark.system
def test_a_slow_second_head_on_a_kept_alive_connection_is_cut_too(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None, ready=False, args=("--head-timeout-s", "2")) as proxy:
        with connect(proxy.port) as sock:
            sock.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b'{"status":"ok"}'):
                first += sock.recv(4096)
            assert first.startswith(b"HTTP/1.1 200")
            time.sleep(1.5)  # idle, well inside the 30 s keep-alive: no head has begun yet
            started = time.monotonic()
            sock.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            reply, closed = read_until_closed(sock, 6)
            took = time.monotonic() - started
        assert closed and envelope(reply)[0] == 408
        assert 1.8 < took < 5, took  # timed from the second head's first bytes


@pytest.mark.system
def test_at_max_connections_the_slowest_head_makes_room_and_busy_calls_are_never_cut(tmp_path, up):
    args = ("--max-connections", "20", "--head-timeout-s", "30")
    with ServedProxy(write_policy(tmp_path), up.url, None, args=args) as proxy:
        slow = [connect(proxy.port) for _ in range(20)]
        for sock in slow:
            sock.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        # A prompt client still gets in: the connection waiting longest for its head makes room.
        assert httpx.get(proxy.url + "/-/healthz", timeout=5).status_code == 200
        reply, closed = read_until_closed(slow[0], 2)
        assert closed and envelope(reply)[0] == 408
        assert read_until_closed(slow[1], 0.2) == (b"", False)  # the others are still open
        for sock in slow:
            sock.close()
        # 20 connections busy with calls: none is cut; a 21st is refused with 503 and closed.
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            calls = [
                pool.submit(
                    httpx.post,
                    proxy.url + ROUTE,
                    json={"model": "openai/gpt-image-1"},
                    headers={**AUTH, "X-Standin": "gate=busy,cost=0.01"},
                    timeout=20,
                )
                for _ in range(20)
            ]
            up.wait_for_requests(20)
            with connect(proxy.port) as extra:
                extra.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                reply, closed = read_until_closed(extra, 2)
            assert closed
            if reply:  # (a reset can beat the 503 to the client when its request was unread)
                status, headers, body = envelope(reply)
                assert status == 503 and headers["retry-after"] == "1"
                assert body["error"]["type"] == "guard_unavailable"  # type: ignore[index]
            up.release("busy")
            assert [c.result().status_code for c in calls] == [200] * 20


@pytest.mark.system
def test_a_slow_body_is_refused_with_408_and_nothing_is_forwarded_or_held(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None, args=("--body-timeout-s", "1")) as proxy:
        with connect(proxy.port) as sock:
            started = time.monotonic()
            sock.sendall(head(1000) + b'{"model": "openai/gpt-image-1", "prompt": "')
            reply, closed = read_until_closed(sock, 5)
            took = time.monotonic() - started
        status, headers, body = envelope(reply)
        assert status == 408 and closed and 0.9 < took < 4
        assert body == {
            "error": {
                "message": "The request body did not arrive within 1 s; nothing was forwarded.",
                "type": "request_timeout",
            }
        }
        assert headers["connection"] == "close"
        assert up.generation_requests == []
        assert spent(proxy) == "0.0000"


@pytest.mark.system
def test_a_slow_small_upload_on_an_unguarded_route_is_refused_with_408_too(tmp_path, up):
    free = "routes:\n  - {path: /echo/slow, kind: free}\n"
    with ServedProxy(write_policy(tmp_path, free), up.url, None, ready=False, args=("--body-timeout-s", "1")) as proxy:
        with connect(proxy.port) as sock:
            sock.sendall(b"PUT /echo/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            reply, closed = read_until_closed(sock, 5)
        status, headers, body = envelope(reply)
        assert status == 408 and closed and headers["connection"] == "close"
        assert body["error"]["type"] == "request_timeout"  # type: ignore[index]
        assert [r.path for r in up.requests if r.path.startswith("/echo")] == []


@pytest.mark.system
def test_bodies_buffered_past_the_bound_get_503_and_the_bound_frees_when_they_end(tmp_path, up):
    args = ("--max-buffered-bytes", "3000000", "--body-timeout-s", "30")
    with ServedProxy(write_policy(tmp_path), up.url, None, args=args) as proxy:
        stalled = [connect(proxy.port) for _ in range(2)]
        for sock in stalled:  # 1.4 MB of 1.45 MB sent each: 2.8 MB held
            sock.sendall(head(1_450_000) + b'{"model": "openai/gpt-image-1", "pad": "' + b"x" * 1_400_000)
        time.sleep(0.5)  # a sleep: no event crosses the process boundary; the two bodies must be read first
        # A third past its fair share (a third of the bound while three are read) is refused...
        third = httpx.post(
            proxy.url + ROUTE,
            content=b'{"model": "openai/gpt-image-1", "pad": "' + b"x" * 2_000_000 + b'"}',
            headers={**AUTH, "Content-Type": "application/json"},
            timeout=5,
        )
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert third.json()["error"]["type"] == "guard_unavailable"
        for sock in stalled:
            sock.close()  # their bodies end (client gone): the bytes they held are free again

        def fits() -> bool:
            r = httpx.post(
                proxy.url + ROUTE,
                content=b'{"model": "openai/gpt-image-1", "pad": "' + b"x" * 2_000_000 + b'"}',
                headers={**AUTH, "Content-Type": "application/json", "X-Standin": "cost=0.01"},
                timeout=5,
            )
            return r.status_code == 200

        wait_until(fits, 5, "a 2 MB body to fit again")
        assert len(up.generation_requests) == 1


@pytest.mark.system
@pytest.mark.parametrize(
    ("extra", "auth", "status"),
    [
        ("guard: {unknown_keys: reject}\n", "sk-nobody", 401),
        ("", None, 401),
        ("routes: [{path: /v1/openai/images/generations, kind: image, enabled: false}]\n", KEY_A, 403),
    ],
    ids=["unknown-key-rejected", "no-bearer", "route-disabled"],
)
def test_a_caller_the_policy_refuses_is_answered_before_its_body_is_sent(tmp_path, up, extra, auth, status):
    with ServedProxy(write_policy(tmp_path, extra), up.url, None) as proxy, connect(proxy.port) as sock:
        sock.sendall(head(50_000_000, auth=auth))  # 50 MB announced, not one byte sent
        reply, closed = read_until_closed(sock, 3)
        got, headers, _ = envelope(reply)
        assert got == status and closed and headers["connection"] == "close"
        assert up.generation_requests == []


def test_a_large_body_is_priced_off_the_event_loop(make_proxy, up, monkeypatch):
    import threading

    from proxy.guard import guard

    threads: list[str] = []
    real = guard.read_price_fields

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(guard, "read_price_fields", spy)
    p = make_proxy(f"keys: [{{name: alice, key_sha256: {SHA_A}, budgets: [{{limit_usd: 5, period: null}}]}}]\n")
    small = p.client.post(ROUTE, json={"model": "openai/gpt-image-1"}, headers={**AUTH, "X-Standin": "cost=0.01"})
    big = p.client.post(
        ROUTE,
        json={"model": "openai/gpt-image-1", "image": "x" * 3_000_000},
        headers={**AUTH, "X-Standin": "cost=0.01"},
    )
    assert small.status_code == big.status_code == 200
    loop_thread, big_thread = threads
    assert big_thread != loop_thread and big_thread.startswith("asyncio_")  # the default executor's
    seen = up.generation_requests[-1]
    assert len(seen.body) > 3_000_000 and seen.header("content-length") == str(len(seen.body))
    assert seen.header("transfer-encoding") is None


def scraped_inflight(proxy: ServedProxy) -> float:
    text = httpx.get(proxy.url + "/-/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("spend_guard_inflight_holds"))


def held_by_a_process(local_port: int, remote_port: int) -> bool:
    """Whether the TCP socket 127.0.0.1:local_port <-> remote_port still belongs to a process
    (in /proc/net/tcp a socket no process holds any more, an orphan, has inode 0)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == local_port and int(fields[2].split(":")[1], 16) == remote_port:
            return fields[9] != "0"
    return False


def start_reading_then_stop(sock: socket.socket) -> tuple[float, bytes]:
    """Ask for a 20 MiB guarded answer ($0.30 hold, $0.05 cost), read its first 64 KiB and no more;
    answers when the call was sent and what was read."""
    body = b'{"model": "openai/gpt-image-1", "prompt": "x"}'
    started = time.monotonic()
    sock.sendall(head(len(body), extra=f"X-Standin: b64={20 * 1024 * 1024},cost=0.05\r\n") + body)
    got = b""
    while len(got) < 64 * 1024:
        got += sock.recv(65536)
    assert got.startswith(b"HTTP/1.1 200")
    return started, got


@pytest.mark.system
def test_a_client_that_stops_reading_is_dropped_and_its_call_settled_within_timeout_s(tmp_path, up):
    policy = write_policy(tmp_path, "upstream: {timeout_s: 5}\nguard: {hold_ttl_s: 60}\n")
    with ServedProxy(policy, up.url, None) as proxy, connect(proxy.port, SO_RCVBUF=65536) as sock:
        started, got = start_reading_then_stop(sock)
        # ...and the client reads no more, holding its socket open. The proxy is soon blocked
        # sending to it; upstream.timeout_s (5 s) still ends the call and settles its hold.
        wait_until(lambda: spent(proxy) != "0.0000", 15, "the stalled call to settle")
        settled = time.monotonic() - started
        assert 4.5 < settled < 12, settled
        # the cost was never reached (it ends the 20 MB body): the $0.30 hold is charged
        assert spent(proxy) == "0.3000"
        assert scraped_inflight(proxy) == 0
        # Dropped at once: no proxy socket waits for this client to read what was buffered (a
        # plain close would keep it until then); the kernel may still deliver what it holds.
        assert not held_by_a_process(proxy.port, sock.getsockname()[1])
        rest, closed = read_until_closed(sock, 5)
        assert closed and len(got) + len(rest) < 20 * 1024 * 1024  # cut, not finished
        output = proxy.output()
        lines = [line for line in output.splitlines() if "stopped reading" in line]
        assert len(lines) == 1 and "WARNING" in lines[0], lines
        assert "Traceback" not in output


@pytest.mark.system
def test_a_cut_upstream_body_is_one_warning_line_not_a_traceback(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None) as proxy:
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(
                proxy.url + ROUTE,
                json={"model": "openai/gpt-image-1"},
                headers={**AUTH, "X-Standin": "heartbeat=1,cut"},
                timeout=10,
            )
        # the cut call settles by charging its hold; its log line comes with the settle
        wait_until(lambda: spent(proxy) == "0.3000", 5, "the cut call to settle")
        wait_until(lambda: "broke off" in proxy.output(), 5, "the warning")
        output = proxy.output()
        lines = [line for line in output.splitlines() if "broke off" in line]
        assert len(lines) == 1 and "WARNING" in lines[0], lines
        assert "Traceback" not in output and "Exception in ASGI application" not in output
        assert KEY_A not in output


def test_client_limits_come_from_serve_options_or_spend_guard_env(monkeypatch):
    from click.testing import CliRunner

    from proxy.cli import main
    from proxy.settings import Settings

    seen: list[Settings] = []
    monkeypatch.setattr("proxy.cli.run", lambda settings, policy, **kw: seen.append(settings))
    result = CliRunner().invoke(
        main,
        ["serve", "--head-timeout-s", "2.5", "--max-connections", "7"],
        env={"SPEND_GUARD_BODY_TIMEOUT_S": "12", "SPEND_GUARD_MAX_BUFFERED_BYTES": "1000"},
    )
    assert result.exit_code == 0, result.output
    (settings,) = seen
    assert (
        settings.head_timeout_s,
        settings.body_timeout_s,
        settings.max_connections,
        settings.max_buffered_bytes,
    ) == (2.5, 12, 7, 1000)
    # ...and reach the workers (uvicorn factory mode) through the same variables
    assert Settings.from_env(settings.to_env()) == settings
    assert CliRunner().invoke(main, ["serve", "--max-connections", "0"]).exit_code == 2
    assert "--head-timeout-s" in CliRunner().invoke(main, ["serve", "--help"]).output
