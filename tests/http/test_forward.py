"""Transparent passthrough: what reaches the upstream and what comes back, byte for byte."""

from __future__ import annotations

import hashlib
import json
import socket
import time

import pytest

from proxy.http.upstream import request_head, response_headers
from tests.support.constants import KEY_A
from tests.support.policies import alice_keys
from tests.support.served import ServedProxy

# PUT and POST to paths the route table does not list are refused unless the policy passes them.
PASS = "guard: {unknown_routes: pass}\n"


def test_unguarded_request_reaches_the_upstream_unchanged(make_proxy, up):
    p = make_proxy(PASS)
    body = bytes(range(256)) * 64
    r = p.client.put(
        "/v1/some/Path%20x/?b=2&a=%2F",
        content=body,
        headers={
            "X-Standin": "echo",
            "X-Custom": "kept",
            "Authorization": "Bearer whatever",
            "Content-Type": "application/x-thing",
            "User-Agent": "my-sdk/1.0",
        },
    )
    assert r.status_code == 200
    seen = r.json()
    assert seen["method"] == "PUT"
    assert seen["path"] == "/v1/some/Path%20x/" and seen["query"] == "b=2&a=%2F"
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest() and seen["body_len"] == len(body)
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-custom"] == "kept" and headers["authorization"] == "Bearer whatever"
    assert headers["content-type"] == "application/x-thing"
    assert headers["user-agent"] == "my-sdk/1.0"  # the client's own, not aiohttp's


def test_hop_by_hop_and_connection_listed_headers_are_dropped_on_the_way_up(make_proxy, up):
    p = make_proxy()
    r = p.client.get(
        "/echo/x",
        headers={
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic x",
            "Upgrade": "h2c",
            "X-Stays": "1",
        },
    )
    names = {k.lower() for k, _ in r.json()["headers"]}
    assert "x-stays" in names
    assert not names & {"x-secret-hop", "keep-alive", "te", "proxy-authorization", "upgrade"}


def test_large_upload_streams_through_with_its_declared_length(make_proxy, up):
    p = make_proxy(PASS)
    body = bytes(range(256)) * 4096  # 1 MiB: above the size read whole, so it streams
    r = p.client.put("/echo/upload", content=body, headers={"Content-Type": "application/octet-stream"})
    seen = r.json()
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest() and seen["body_len"] == len(body)
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["content-length"] == str(len(body)) and "transfer-encoding" not in headers


def test_chunked_upload_streams_through_chunked(make_proxy, up):
    p = make_proxy(PASS)
    parts = [b"a" * 70_000, b"b" * 3, b"c" * 200_000]
    r = p.client.post("/echo/chunked", content=iter(parts))  # no length known: httpx sends it chunked
    seen = r.json()
    assert seen["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers.get("transfer-encoding") == "chunked" and "content-length" not in headers


def test_expect_100_continue_is_answered_here_and_not_sent_upstream(make_proxy, up):
    # The proxy's server already answered the client's Expect; passed on, it would make the
    # upstream client wait for a second 100 Continue that an upstream need not send.
    p = make_proxy(alice_keys("[{limit_usd: 10, period: null}]") + "upstream: {timeout_s: 5}\n" + PASS)
    r = p.client.put("/echo/expect", content=b"x" * 5000, headers={"Expect": "100-continue"})
    assert r.status_code == 200
    assert "expect" not in {k.lower() for k, _ in r.json()["headers"]}
    r = p.generate(standin="cost=0.01", headers={"Expect": "100-continue"})
    assert r.status_code == 200
    assert "expect" not in {k.lower() for k, _ in up.generation_requests[-1].headers}


@pytest.mark.system
def test_expect_100_continue_from_a_real_client_gets_its_answer(tmp_path, up):
    policy = tmp_path / "policy.yaml"
    policy.write_text("account: {name: expect}\nupstream: {timeout_s: 5}\n" + PASS)
    with (
        ServedProxy(policy, up.url, None, ready=False) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock,
    ):
        body = b"y" * 5000
        sock.sendall(
            b"PUT /echo/expect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert json.loads(payload)["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_utf8_header_values_reach_the_upstream_unchanged(make_proxy, up):
    p = make_proxy()
    value = "café ✓ 東京".encode()
    r = p.client.get("/echo/headers", headers={"X-Name": value})
    assert r.status_code == 200
    seen = [v for k, v in r.json()["headers"] if k.lower() == "x-name"]
    assert seen == [value.decode()]  # the stand-in reads header bytes as UTF-8
    # obsolete Latin-1 text cannot go up byte for byte (aiohttp writes UTF-8): same text, no error
    r = p.client.get("/echo/headers", headers={"X-Name": b"caf\xe9"})
    assert [v for k, v in r.json()["headers"] if k.lower() == "x-name"] == ["café"]


def test_a_chunked_body_never_goes_up_with_a_content_length_too(make_proxy, up):
    # uvicorn refuses such requests from the network; behind another ASGI server the proxy still
    # must not frame one body two ways to the upstream (request smuggling).
    p = make_proxy(PASS)
    r = p.client.post("/echo/both", content=b"hello" * 60_000, headers={"Transfer-Encoding": "chunked"})
    headers = {k.lower(): v for k, v in r.json()["headers"]}
    assert "content-length" not in headers and headers["transfer-encoding"] == "chunked"
    assert r.json()["body_len"] == 300_000


def test_request_head_drops_hop_by_hop_listed_and_rewritten_headers():
    raw = [
        (b"Connection", b"close, X-A"),
        (b"Host", b"evil.example"),
        (b"X-A", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Encoding", b"gzip"),
        (b"Content-Length", b"10"),
        (b"connection", b"X-C"),
        (b"X-C", b"3"),
        (b"X-B", b"2"),
    ]
    head = request_head(raw)
    assert head.sent == [("content-encoding", "gzip"), ("x-b", "2")]
    assert head.content_length == "10" and head.chunked
    assert request_head([(b"x-request-id", b"abc"), (b"x-b", b"2")], drop=frozenset({b"x-request-id"})).sent == [
        ("x-b", "2")
    ]


def test_response_headers_keep_end_to_end_ones_in_one_pass():
    class Resp:
        raw_headers = (
            (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Content-Length", b"10"),
            (b"X-B", b"2"),
        )

    assert response_headers(Resp()) == [(b"content-length", b"10"), (b"x-b", b"2")]  # type: ignore[arg-type]


def test_upstream_errors_pass_through_unchanged(make_proxy, up):
    p = make_proxy()
    r = p.client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json() == {"error": {"message": "not found", "type": "invalid_request_error"}}
    assert "x-spend-guard-policy" not in r.headers  # unguarded: no guard headers


def test_large_b64_result_streams_through_and_settles(make_proxy, up):
    p = make_proxy(alice_keys("[{limit_usd: 10, period: null}]"))
    size = 20 * 1024 * 1024
    r = p.generate(standin=f"b64={size},cost=0.2")
    assert r.status_code == 200
    data = json.loads(r.content)
    assert len(data["data"][0]["b64_json"]) == size and data["cost"] == 0.2
    me = p.client.get("/-/me", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    assert {s["scope"]: s["spent_usd"] for s in me["scopes"]}["budget:key:alice:lifetime"] == "0.2000"


def test_unreachable_upstream_on_an_unguarded_route_is_502_in_the_envelope(make_proxy, up, monkeypatch):
    from proxy.http.upstream import Upstream

    p = make_proxy()
    p.runtime.upstream = Upstream(p.runtime.session, "http://127.0.0.1:9", 5, 1)
    monkeypatch.setattr(p.runtime, "apply_policy", lambda policy: None)
    r = p.client.get("/v1/models")
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "upstream_error"


def test_upstream_that_never_accepts_is_504_after_the_connect_timeout(make_proxy, up, monkeypatch, silent_port):
    from proxy.http.upstream import Upstream

    p = make_proxy()
    # connect timeout 0.5 s, read timeout 120 s: the answer must come from the connect timeout
    p.runtime.upstream = Upstream(p.runtime.session, f"http://127.0.0.1:{silent_port}", 120, 0.5)
    monkeypatch.setattr(p.runtime, "apply_policy", lambda policy: None)
    started = time.monotonic()
    r = p.client.get("/v1/models")
    assert r.status_code == 504
    assert r.json() == {
        "error": {"message": "ImageRouter did not answer in time (upstream timeout).", "type": "upstream_error"}
    }
    assert time.monotonic() - started < 60  # half the read timeout: the connect timeout fired


def test_healthz_does_not_touch_the_upstream(make_proxy, up):
    p = make_proxy()
    assert p.client.get("/-/healthz").json() == {"status": "ok"}
    # only the refresher's own calls (credits, prices) ever reached the upstream
    assert {r.path for r in up.requests} <= {"/v1/credits", "/v2/models"}


def test_response_headers_drop_hop_by_hop_and_connection_listed_ones():
    from types import SimpleNamespace

    from proxy.http.upstream import response_headers

    resp = SimpleNamespace(
        raw_headers=(
            (b"Content-Type", b"application/json"),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Content-Encoding", b"gzip"),
        )
    )
    assert response_headers(resp) == [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]


async def test_a_broken_upstream_body_hands_on_what_arrived_before_the_break():
    # The bytes and the break can reach the reader before it wakes (a loaded machine): aiohttp's
    # own readany() then raises first and the tail is lost; body_chunks hands it on, then raises.
    import asyncio
    from unittest import mock

    import aiohttp

    from proxy.http.upstream import body_chunks

    content = aiohttp.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    content.feed_data(b" ")
    content.feed_data(b'{"created":1,"data":[{"url":"ht')
    content.set_exception(aiohttp.ClientPayloadError("Response payload is not completed"))
    received = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in body_chunks(content):
            received.append(chunk)
    assert b"".join(received) == b' {"created":1,"data":[{"url":"ht'


async def test_a_whole_upstream_body_is_read_chunk_by_chunk_to_its_end():
    import asyncio
    from unittest import mock

    import aiohttp

    from proxy.http.upstream import body_chunks

    content = aiohttp.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    content.feed_data(b"ab")
    content.feed_data(b"cd")
    content.feed_eof()
    assert [chunk async for chunk in body_chunks(content)] == [b"abcd"]
