"""Requests that spend nothing: forwarded as they came and streamed back, nothing held.

A client that goes away closes the upstream at once (a guarded call instead reads on, to settle).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from proxy.deadlines import deadline_at
from proxy.errors import UpstreamBroken, UpstreamError
from proxy.http.request import read_body, stream_body
from proxy.http.upstream import (
    ClientStalled,
    WriteStalled,
    abort_client,
    arrived_whole,
    body_chunks,
    request_head,
    response_headers,
    send_within,
)
from proxy.runtime import Runtime
from proxy.types import Receive, Scope, Send

AUTHORIZATION = frozenset({b"authorization"})
# Request bodies up to this size are read whole and sent with their length; larger ones (and
# chunked ones) stream through.
SMALL_REQUEST_BYTES = 256 * 1024


async def passthrough(rt: Runtime, scope: Scope, receive: Receive, send: Send, path: bytes) -> None:
    """Forward a request that spends nothing: no hold, no body parsing, streamed both ways."""
    # A virtual key's live token: the real ImageRouter key goes up instead (docs/policies.md#virtual-keys).
    auth = rt.upstream_authorization(scope["headers"])
    head = request_head(scope["headers"], drop=AUTHORIZATION if auth is not None else frozenset())
    length, sent = head.content_length, head.sent
    if auth is not None:
        sent.append(("authorization", auth))
    body_done = asyncio.Event()
    body: bytes | AsyncIterator[bytes] | None = None
    if not head.chunked and length is not None and length.strip().isdigit() and int(length) <= SMALL_REQUEST_BYTES:
        body = await read_body(receive, length, SMALL_REQUEST_BYTES, timeout_s=rt.settings.body_timeout_s)
        body_done.set()
    elif head.chunked or length is not None:
        body = stream_body(receive, body_done)  # large uploads stream through
        if length is not None and not head.chunked:
            # A streamed body keeps the length it declared; with chunked framing the length
            # is the server's to ignore (RFC 9112 §6.3), so it never goes up beside it.
            sent.append(("content-length", length))
    else:
        body_done.set()
    # upstream.timeout_s bounds the whole exchange, time blocked sending to a client that stopped
    # reading included (aiohttp's own timeout covers only the upstream side).
    deadline = asyncio.get_running_loop().time() + rt.policy.upstream.timeout_s
    try:
        resp = await rt.upstream.open(scope["method"], path, scope.get("query_string", b""), sent, body)
    except UpstreamError as exc:
        await exc.response()(scope, receive, send)
        return

    async def watch_disconnect() -> None:
        # A client that goes away on an unguarded route closes the upstream at once.
        await body_done.wait()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                resp.close()
                return

    watcher: asyncio.Task[None] | None = None
    sending = True
    try:
        async with deadline_at(deadline):
            await send({"type": "http.response.start", "status": resp.status, "headers": response_headers(resp)})
            sending = False
            if not resp.content.is_eof():
                # Only a response still arriving needs watching; most arrive whole with the headers.
                watcher = asyncio.create_task(watch_disconnect())
            write_s = rt.settings.write_timeout_s
            whole = arrived_whole(resp.content)
            if whole is not None:
                sending = True
                await send_within(scope, send, {"type": "http.response.body", "body": whole}, write_s)
                return
            async for chunk in body_chunks(resp.content):
                sending = True
                message = {"type": "http.response.body", "body": chunk, "more_body": True}
                await send_within(scope, send, message, write_s)
                sending = False
            sending = True
            await send_within(scope, send, {"type": "http.response.body", "body": b"", "more_body": False}, write_s)
    except (TimeoutError, aiohttp.ClientError, WriteStalled) as exc:
        if sending:
            abort_client(scope)
            after = "--write-timeout-s" if isinstance(exc, WriteStalled) else "upstream.timeout_s"
            raise ClientStalled(f"the client of an unguarded response stopped reading; dropped after {after}") from exc
        if watcher is None or not watcher.done():
            # The upstream broke mid-body: abort the client's connection too, so it sees a cut.
            raise UpstreamBroken(
                "the upstream body of an unguarded response broke off; the client's connection was cut"
            ) from exc
    finally:
        if watcher is not None:
            watcher.cancel()
        resp.release()
