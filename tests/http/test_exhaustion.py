"""No client can exhaust the proxy: what one client makes it hold (memory, slots, CPU, buffer
credit) is bounded by what that client sends (docs/failure-modes.md, "Hostile clients").

Each attack runs against a served proxy on loopback, bounded in count and time; memory is read
from the proxy process's /proc/<pid>/status.
"""

from __future__ import annotations

import concurrent.futures
import re
import socket
import socketserver
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.http.test_hostile import AUTH, ROUTE, head, spent, start_reading_then_stop, write_policy
from tests.support.constants import KEY_A
from tests.support.served import ServedProxy, wait_until
from tests.support.sockets import connect, envelope, read_until_closed

pytestmark = pytest.mark.system  # every test here starts a served proxy


def rss_mb(proxy: ServedProxy, field: str = "VmRSS") -> float:
    """The proxy process's resident memory (one worker: the process serving); VmHWM: its peak."""
    assert proxy.proc is not None
    for line in Path(f"/proc/{proxy.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def healthz_s(proxy: ServedProxy) -> float:
    started = time.monotonic()
    assert httpx.get(proxy.url + "/-/healthz", timeout=5).status_code == 200
    return time.monotonic() - started


def send_until_closed(sock: socket.socket, chunks, limit_s: float) -> int:
    """Send `chunks` until the proxy closes the connection or `limit_s` passes; bytes sent."""
    sock.settimeout(2)
    sent = 0
    deadline = time.monotonic() + limit_s
    try:
        for chunk in chunks:
            if time.monotonic() > deadline:
                break
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


# -- request heads ---------------------------------------------------------------------------


def test_a_head_past_16_kib_is_refused_with_431_and_one_under_it_is_served(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None, ready=False) as proxy:
        filler = "".join(f"X-Pad-{i}: {'p' * 1000}\r\n" for i in range(15))  # 15 lines, ~15.2 KB
        with connect(proxy.port) as sock:
            sock.sendall(f"GET /-/healthz HTTP/1.1\r\nHost: x\r\n{filler}\r\n".encode())
            reply, _ = read_until_closed(sock, 2)
        assert reply.startswith(b"HTTP/1.1 200")
        filler = "".join(f"X-Pad-{i}: {'p' * 1000}\r\n" for i in range(17))  # ~17.2 KB
        with connect(proxy.port) as sock:
            sock.sendall(f"GET /-/healthz HTTP/1.1\r\nHost: x\r\n{filler}\r\n".encode())
            reply, closed = read_until_closed(sock, 5)
        status, headers, body = envelope(reply)
        assert status == 431 and closed and headers["connection"] == "close"
        assert body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert "16384" in body["error"]["message"]  # type: ignore[index]


def test_a_long_header_line_too_many_headers_and_a_long_url_are_refused(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None, ready=False) as proxy:
        cases = [
            (f"GET /-/healthz HTTP/1.1\r\nHost: x\r\nX-Long: {'l' * 9000}\r\n\r\n", 431),
            ("GET /-/healthz HTTP/1.1\r\n" + "".join(f"X-{i}: v\r\n" for i in range(101)) + "\r\n", 431),
            (f"GET /{'u' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        ]
        for request, expected in cases:
            with connect(proxy.port) as sock:
                sock.sendall(request.encode())
                reply, closed = read_until_closed(sock, 5)
            status, headers, _ = envelope(reply)
            assert (status, closed, headers["connection"]) == (expected, True, "close"), request[:60]
        assert [r.path for r in up.requests if r.path.startswith("/u")] == []
        with connect(proxy.port) as sock:  # 100 headers are fine
            lines = "".join(f"X-{i}: v\r\n" for i in range(99))
            sock.sendall(f"GET /-/healthz HTTP/1.1\r\n{lines}Host: x\r\n\r\n".encode())
            reply, _ = read_until_closed(sock, 2)
        assert reply.startswith(b"HTTP/1.1 200")


def test_one_connection_streaming_headers_is_cut_and_rss_stays_bounded(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None, ready=False) as proxy:
        healthz_s(proxy)
        before = rss_mb(proxy)
        line = b"X-Stream: " + b"s" * 4000 + b"\r\n"
        with connect(proxy.port) as sock:
            # At most 64 MB or 5 s of header lines, as fast as the proxy takes them.
            sent = send_until_closed(sock, [b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n", *([line] * 16_000)], 5)
            reply, closed = read_until_closed(sock, 5)
        grown = rss_mb(proxy) - before
        assert closed and envelope(reply)[0] == 431
        assert grown < 16, f"RSS grew {grown:.0f} MB for {sent / 1e6:.1f} MB of header lines"
        assert sent < 8_000_000  # cut once the head passed its bound (the rest is what the kernels buffered)
        assert healthz_s(proxy) < 1


def test_a_url_streamed_in_small_pieces_is_cut_at_its_bound_without_quadratic_work(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None, ready=False) as proxy, connect(proxy.port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"GET /")
        sent = send_until_closed(sock, (b"u" * 500 for _ in range(4000)), 4)  # up to 2 MB, 500 bytes a write
        reply, closed = read_until_closed(sock, 5)
        assert closed and envelope(reply)[0] == 414
        assert sent < 2_000_000
        assert healthz_s(proxy) < 1


# -- pipelined requests ----------------------------------------------------------------------


def test_eight_connections_pipelining_without_reading_hold_little_and_healthz_stays_prompt(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None, ready=False) as proxy:
        healthz_s(proxy)
        before = rss_mb(proxy)
        request = b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        burst = request * (18_000 // len(request))
        socks = [connect(proxy.port, SO_RCVBUF=4096) for _ in range(8)]
        try:
            # 1.8 MB each, never reading a response: the proxy stops reading once enough are queued
            sent = [send_until_closed(sock, [burst] * 100, 3) for sock in socks]
            grown = rss_mb(proxy) - before
            took = healthz_s(proxy)
        finally:
            for sock in socks:
                sock.close()
        assert grown < 40, f"RSS grew {grown:.0f} MB for {sum(sent) / 1e6:.1f} MB of pipelined requests"
        assert took < 1, took


def test_pipelined_requests_are_all_answered_in_order_as_the_client_reads(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None, ready=False) as proxy, connect(proxy.port) as sock:
        requests = b"".join(
            f"GET {f'/echo/{i}' if i % 2 else '/-/healthz'} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(200)
        )
        sock.sendall(requests + b"GET /-/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        replies, closed = read_until_closed(sock, 20)
        assert closed
        assert replies.count(b"HTTP/1.1 200 ") == 201
        echoed = [int(n) for n in re.findall(rb'"path": "/echo/(\d+)"', replies)]
        assert echoed == list(range(1, 200, 2))


# -- caches keyed by client input ------------------------------------------------------------


def test_unique_long_paths_leave_no_memory_behind(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None, ready=False) as proxy:
        healthz_s(proxy)
        before = rss_mb(proxy)

        def walk(start: int) -> set[int]:
            with httpx.Client(base_url=proxy.url, timeout=10) as client:
                # unique paths of 8,000 bytes (just under the URL bound), one with an escape left
                # after one decode (the deeper canonical form is computed too)
                return {client.get(f"/{n:08d}/%2541{'p' * 7980}").status_code for n in range(start, 4500, 6)}

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            statuses = set().union(*pool.map(walk, range(6)))
        grown = rss_mb(proxy) - before
        assert statuses == {404}
        assert grown < 16, f"RSS grew {grown:.0f} MB after 4,500 unique 8 KB paths"


# -- upstream control documents ----------------------------------------------------------------


class HugeDocuments:
    """An upstream answering `/v1/credits` (close-delimited) and `/v2/models` (with its length) with
    400 MB each, generated as sent; anything else 404."""

    SIZE = 400_000_000

    def __init__(self) -> None:
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), self._handler(), bind_and_activate=True)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.sent: list[int] = []

    def _handler(self) -> type[socketserver.BaseRequestHandler]:
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                target = (self.rfile.readline().split(b" ") + [b""])[1]
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                if target.startswith(b"/v1/credits"):
                    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
                elif target.startswith(b"/v2/models"):
                    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % outer.SIZE
                else:
                    self.wfile.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                chunk = b'{"pad": "' + b"x" * (1 << 20)
                sent = 0
                try:
                    self.wfile.write(head)
                    while sent < outer.SIZE:
                        self.wfile.write(chunk[: outer.SIZE - sent])
                        sent += min(len(chunk), outer.SIZE - sent)
                except OSError:
                    pass
                outer.sent.append(sent)

        return Handler

    def __enter__(self) -> HugeDocuments:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_400_mb_credits_or_models_answer_is_refused_unread_and_rss_stays_bounded(tmp_path):
    with HugeDocuments() as huge, ServedProxy(write_policy(tmp_path), huge.url, None, ready=False) as proxy:
        wait_until(lambda: "models answer rejected" in proxy.output(), 10, "the models answer to be refused")
        wait_until(lambda: "credits answer rejected" in proxy.output(), 10, "the credits answer to be refused")
        peak = rss_mb(proxy, "VmHWM")
        assert peak < 150, f"RSS peaked at {peak:.0f} MB"
        output = proxy.output()
        why = "larger than 16777216 bytes, not read further"
        assert f"credits refresh failed: credits answer rejected: {why}" in output
        assert f"models answer rejected: {why}" in output
        ready = httpx.get(proxy.url + "/-/readyz", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["last_refresh_error"] == f"credits answer rejected: {why}"
        assert all(sent < HugeDocuments.SIZE for sent in huge.sent), huge.sent


# -- request bodies ----------------------------------------------------------------------------


def test_a_chunked_body_past_max_body_bytes_is_refused_413_unread_and_unforwarded(tmp_path, up):
    policy = write_policy(tmp_path, "guard: {max_body_bytes: 65536}\n")
    with ServedProxy(policy, up.url, None) as proxy, connect(proxy.port) as sock:
        head = (
            f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        chunk = b"%x\r\n%s\r\n" % (16384, b'{"model": "openai/gpt-image-1", "pad": "'.ljust(16384, b"x"))
        # up to 64 MB, as fast as the proxy takes it: it stops reading past 64 KiB
        sent = send_until_closed(sock, [head, *([chunk] * 4096)], 5)
        reply, closed = read_until_closed(sock, 5)
        status, headers, body = envelope(reply)
        assert (status, closed, headers["connection"]) == (413, True, "close")
        assert body["error"]["message"] == "Request body exceeds the 65536-byte limit."  # type: ignore[index]
        assert sent < 16_000_000  # the rest is what the kernels buffered
        assert up.generation_requests == []


def test_four_heads_declaring_64_mib_hold_no_buffer_credit(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None) as proxy:
        declared = [connect(proxy.port) for _ in range(4)]  # the default bound: 4 x 64 MiB
        try:
            for sock in declared:
                sock.sendall(head(64 * 1024 * 1024))  # ~150 bytes each, no body
            time.sleep(0.5)  # a sleep: the four heads must be read first (no event crosses processes)
            statuses = [
                httpx.post(
                    proxy.url + ROUTE,
                    json={"model": "openai/gpt-image-1"},
                    headers={**AUTH, "X-Standin": "cost=0.01"},
                    timeout=10,
                ).status_code
                for _ in range(10)
            ]
        finally:
            for sock in declared:
                sock.close()
        assert statuses == [200] * 10


def test_a_stalled_body_past_its_fair_share_is_cut_to_make_room_for_a_small_one(tmp_path, up):
    args = ("--max-buffered-bytes", "3000000", "--body-timeout-s", "30")
    with ServedProxy(write_policy(tmp_path), up.url, None, args=args) as proxy:
        hog = connect(proxy.port)
        # 2.9 MB of a 3 MB body, then nothing: all but 100 KB of the bound
        hog.sendall(head(3_000_000) + b'{"model": "openai/gpt-image-1", "pad": "' + b"x" * 2_900_000)
        time.sleep(0.5)  # a sleep: the body must be read first (no event crosses processes)
        small = httpx.post(
            proxy.url + ROUTE,
            content=b'{"model": "openai/gpt-image-1", "pad": "' + b"x" * 400_000 + b'"}',
            headers={**AUTH, "Content-Type": "application/json", "X-Standin": "cost=0.01"},
            timeout=5,
        )
        assert small.status_code == 200
        reply, closed = read_until_closed(hog, 5)  # the hog held more than half: it is refused
        status, headers, body = envelope(reply)
        assert (status, closed, headers["retry-after"]) == (503, True, "1")
        assert body["error"]["type"] == "guard_unavailable"  # type: ignore[index]
        hog.close()
        assert len(up.generation_requests) == 1


# -- connection slots ------------------------------------------------------------------------


def test_idle_kept_alive_connections_make_room_for_new_callers_at_the_cap(tmp_path, up):
    with ServedProxy(write_policy(tmp_path), up.url, None) as proxy:  # the default cap: 2048
        idle: list[socket.socket] = []
        try:
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                idle = list(pool.map(lambda _: kept_alive(proxy.port), range(2048)))
            # every slot is held by a connection idle between requests; callers still get in
            statuses = [
                httpx.post(
                    proxy.url + ROUTE,
                    json={"model": "openai/gpt-image-1"},
                    headers={**AUTH, "X-Standin": "cost=0.01", "Connection": "close"},
                    timeout=10,
                ).status_code
                for _ in range(20)
            ]
            closed = sum(read_until_closed(sock, 0.01)[1] for sock in idle)
        finally:
            for sock in idle:
                sock.close()
        assert statuses == [200] * 20
        assert 1 <= closed <= 20  # at most one idle connection closed per newcomer (the longest idle first)


def kept_alive(port: int) -> socket.socket:
    """A connection that made one request and keeps its connection open, idle."""
    sock = connect(port)
    sock.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while not got.endswith(b'{"status":"ok"}'):
        got += sock.recv(4096)
    return sock


def test_a_client_that_stops_reading_a_guarded_answer_is_dropped_at_the_write_timeout(tmp_path, up):
    policy = write_policy(tmp_path, "upstream: {timeout_s: 60}\n")
    with (
        ServedProxy(policy, up.url, None, args=("--write-timeout-s", "2")) as proxy,
        connect(proxy.port, SO_RCVBUF=65536) as sock,
    ):
        started, _ = start_reading_then_stop(sock)
        # ...and reads no more: dropped 2 s after the proxy could send nothing, not at timeout_s (60 s)
        wait_until(lambda: spent(proxy) != "0.0000", 15, "the stalled call to settle")
        assert time.monotonic() - started < 10
        assert spent(proxy) == "0.3000"  # the hold, as for any client that stopped reading
        lines = [line for line in proxy.output().splitlines() if "stopped reading" in line]
        assert len(lines) == 1 and "WARNING" in lines[0] and "--write-timeout-s=2" in lines[0], lines
