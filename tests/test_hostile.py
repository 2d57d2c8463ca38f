"""Slow and hostile clients against a served proxy (issue 13, items 5-7): request heads and bodies
are timed out, connections and buffered bodies are bounded, a client that stops reading cannot keep
a call open, and a cut response is one WARNING line."""

from __future__ import annotations

import json
import os
import selectors
import socket
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import KEY_A, SHA_A
from tests.served import ServedProxy, wait_until

AUTH = {"Authorization": f"Bearer {KEY_A}"}
ROUTE = "/v1/openai/images/generations"


def write_policy(directory: Path, extra: str = "") -> Path:
    path = directory / "policy.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            account: {{name: hostile-{os.urandom(4).hex()}, refresh_s: 1, max_staleness_s: 300}}
            keys:
              - name: alice
                key_sha256: {SHA_A}
                budgets: [{{limit_usd: 50, period: null}}]
            """
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


def connect(port: int, **opts: int) -> socket.socket:
    sock = socket.socket()
    for name, value in opts.items():
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, name), value)
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or `timeout` passes (False)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
        return data, True
    except ConnectionResetError:
        return data, True
    except TimeoutError:
        return data, False


def envelope(reply: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head_part, _, body = reply.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, json.loads(body)


def test_half_sent_heads_are_cut_within_the_head_timeout_while_healthz_answers(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None, ready=False, args=("--head-timeout-s", "2")) as proxy:
        opened = time.monotonic()
        partial = [connect(proxy.port) for _ in range(600)]
        for sock in partial:
            sock.sendall(b"POST /v1/openai/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bea")
        silent = [connect(proxy.port) for _ in range(100)]
        # The proxy's own endpoints still answer while all 700 are open.
        assert httpx.get(proxy.url + "/-/healthz", timeout=2).status_code == 200
        assert time.monotonic() - opened < 2, "the check above must run while the connections are open"
        selector = selectors.DefaultSelector()
        replies: dict[socket.socket, bytes] = {}
        closed_at: dict[socket.socket, float] = {}
        for sock in partial + silent:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            replies[sock] = b""
        deadline = opened + 8
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
        assert len(closed_at) == 700, f"{700 - len(closed_at)} connections still open 8 s later"
        latest = max(closed_at.values()) - opened
        assert 1.5 < latest < 5, latest
        for sock in partial:
            status, headers, body = envelope(replies[sock])
            assert status == 408 and headers["connection"] == "close"
            assert body["error"]["type"] == "request_timeout"  # type: ignore[index]
        assert all(replies[sock] == b"" for sock in silent)  # nothing asked, nothing answered
        for sock in partial + silent:
            sock.close()
        assert up.generation_requests == []


def test_connections_past_max_connections_get_503_until_the_slow_ones_are_cut(tmp_path, up):
    args = ("--max-connections", "20", "--head-timeout-s", "2")
    with ServedProxy(write_policy(tmp_path), up.url, None, ready=False, args=args) as proxy:
        wait_until(lambda: up.requests and True, 5, "the first refresh")
        hogs = [connect(proxy.port) for _ in range(20)]
        extra = connect(proxy.port)
        extra.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply, closed = read_until_closed(extra, 2)
        assert closed
        if reply:  # the 503 may be lost to a reset when the request was still unread
            status, headers, body = envelope(reply)
            assert status == 503 and headers["retry-after"] == "1"
            assert body["error"]["type"] == "guard_unavailable"  # type: ignore[index]
        # The silent 20 are cut at the head timeout; then the proxy answers again.
        wait_until(lambda: httpx.get(proxy.url + "/-/healthz", timeout=1).status_code == 200, 6, "healthz again")
        for sock in hogs + [extra]:
            sock.close()


def scraped_inflight(proxy: ServedProxy) -> float:
    text = httpx.get(proxy.url + "/-/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("spend_guard_inflight_holds"))


def test_a_client_that_stops_reading_is_dropped_and_its_call_settled_within_timeout_s(tmp_path, up):
    policy = write_policy(tmp_path, "upstream: {timeout_s: 5}\nguard: {hold_ttl_s: 60}\n")
    with ServedProxy(policy, up.url, None) as proxy, connect(proxy.port, SO_RCVBUF=65536) as sock:
        body = b'{"model": "openai/gpt-image-1", "prompt": "x"}'
        started = time.monotonic()
        sock.sendall(head(len(body), extra=f"X-Standin: b64={20 * 1024 * 1024},cost=0.05\r\n") + body)
        got = b""
        while len(got) < 64 * 1024:
            got += sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 200")
        # ...and the client reads no more, holding its socket open. The proxy is soon blocked
        # sending to it; upstream.timeout_s (5 s) still ends the call and settles its hold.
        wait_until(lambda: spent(proxy) != "0.0000", 12, "the stalled call to settle")
        settled = time.monotonic() - started
        assert 4.5 < settled < 9, settled
        # the cost was never reached (it ends the 20 MB body): the $0.30 hold is charged
        assert spent(proxy) == "0.3000"
        assert scraped_inflight(proxy) == 0
        rest, closed = read_until_closed(sock, 5)
        assert closed and len(got) + len(rest) < 20 * 1024 * 1024  # dropped, not finished
        output = proxy.output()
        lines = [line for line in output.splitlines() if "stopped reading" in line]
        assert len(lines) == 1 and "WARNING" in lines[0], lines
        assert "Traceback" not in output


def test_a_cut_upstream_body_is_one_warning_line_not_a_traceback(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None) as proxy:
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(proxy.url + ROUTE, json={"model": "openai/gpt-image-1"}, headers={**AUTH, "X-Standin": "heartbeat=1,cut"}, timeout=10)
        # the cut call settles by charging its hold; its log line comes with the settle
        wait_until(lambda: spent(proxy) == "0.3000", 5, "the cut call to settle")
        wait_until(lambda: "broke off" in proxy.output(), 5, "the warning")
        output = proxy.output()
        lines = [line for line in output.splitlines() if "broke off" in line]
        assert len(lines) == 1 and "WARNING" in lines[0], lines
        assert "Traceback" not in output and "Exception in ASGI application" not in output
        assert KEY_A not in output
