"""The client side of a request: headers, the caller's bearer token, the body, the request id.

Helpers over raw ASGI messages, shared by the guard and the own endpoints.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import AsyncIterator, Callable

from proxy.deadlines import deadline
from proxy.errors import Rejected
from proxy.types import Receive, Scope

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ABSOLUTE_FORM_RE = re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*(/[^?#]*)?")
BEARER_RE = re.compile(r"^Bearer[ \t]+([\x21-\x7e]+)[ \t]*$", re.IGNORECASE)
# Sent with refusals made before the body was read, so the server drops the rest of the upload
# instead of reading it into the void on a kept-alive connection.
CLOSE = {"Connection": "close"}


def fingerprint(secret: str) -> str:
    """sha256 of the bearer secret, hex: how the policy names a key; the secret is never kept."""
    return hashlib.sha256(secret.encode()).hexdigest()


def header_pairs(scope: Scope) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def raw_path(scope: Scope) -> bytes:
    """The request's path as sent; an absolute-form target (`http://host/path`) keeps its path
    only, so neither it nor a Host header can change where a request goes or how it is guarded."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    if not raw.startswith(b"/"):
        match = ABSOLUTE_FORM_RE.match(raw)
        raw = (match.group(1) or b"/") if match else b"/" + raw
    return raw


def request_id(headers: list[tuple[str, str]]) -> str:
    given = header(headers, "x-request-id")
    if given and REQUEST_ID_RE.match(given):
        return given
    return os.urandom(16).hex()


def bearer(headers: list[tuple[str, str]]) -> str | None:
    values = [v for n, v in headers if n.lower() == "authorization"]
    if len(values) != 1:
        return None
    m = BEARER_RE.match(values[0])
    return m.group(1) if m else None


class BodyPool:
    """Bytes of guarded request bodies held in memory at once in this process, against one bound
    (docs/failure-modes.md#many-large-bodies-at-once). A body takes credit as its bytes arrive,
    never for a length it only declares. When the pool is short, a body holding less than a fair
    share (the bound over the bodies being read) makes room by cutting the body being read that
    holds the most (it is refused, 503); a body past its fair share is refused itself."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.held_bytes = 0
        self.reading: set[BodyLease] = set()

    def take(self, lease: BodyLease, size: int) -> bool:
        while self.held_bytes + size > self.limit_bytes:
            fair = self.limit_bytes // max(1, len(self.reading))
            if lease.size + size > fair:
                return False
            biggest = max((other for other in self.reading if other is not lease), key=_held, default=None)
            if biggest is None or biggest.size <= fair:
                return False
            biggest.cut()
        self.held_bytes += size
        return True

    def give(self, size: int) -> None:
        self.held_bytes = max(0, self.held_bytes - size)


def _held(lease: BodyLease) -> int:
    return lease.size


def busy() -> Rejected:
    return Rejected(
        503,
        "guard_unavailable",
        "Too many request bodies are being read at once; retry shortly.",
        scope="request",
        headers={"Retry-After": "1", **CLOSE},
    )


class BodyLease:
    """One request's share of a `BodyPool`; `release()` is idempotent."""

    __slots__ = ("pool", "size", "stop", "was_cut")

    def __init__(self, pool: BodyPool) -> None:
        self.pool = pool
        self.size = 0
        self.stop: Callable[[], None] | None = None  # ends the read in progress (while reading)
        self.was_cut = False

    def grow(self, size: int) -> None:
        if self.was_cut or not self.pool.take(self, size):
            raise busy()
        self.size += size

    def reading(self, stop: Callable[[], None]) -> None:
        """The body is being read; `stop()` ends that read if the pool needs its bytes."""
        self.stop = stop
        self.pool.reading.add(self)

    def read(self) -> None:
        self.stop = None
        self.pool.reading.discard(self)

    def cut(self) -> None:
        """Give the bytes back now and end the read (its reader answers 503)."""
        stop, self.was_cut = self.stop, True
        self.read()
        self.release()
        if stop is not None:
            stop()

    def release(self) -> None:
        self.pool.give(self.size)
        self.size = 0


def too_large(max_bytes: int) -> Rejected:
    return Rejected(
        413,
        "invalid_request_error",
        f"Request body exceeds the {max_bytes}-byte limit.",
        scope="request",
        headers=CLOSE,
    )


async def read_body(
    receive: Receive,
    declared: str | None,
    max_bytes: int,
    *,
    timeout_s: float | None = None,
    lease: BodyLease | None = None,
) -> bytes:
    """The whole body; `declared` is the request's Content-Length, if any. With `timeout_s`, a body
    that has not all arrived by then is refused (408); with `lease`, its bytes are counted in a
    pool as they arrive and refused (503) past what the pool allows it."""
    size = int(declared) if declared is not None and declared.strip().isdigit() else None
    if size is not None and size > max_bytes:
        raise too_large(max_bytes)
    try:
        async with deadline(timeout_s) as reading:
            if lease is not None and timeout_s is not None:
                lease.reading(reading.fire)
            try:
                return await _receive_all(receive, max_bytes, lease)
            finally:
                if lease is not None:
                    lease.read()
    except TimeoutError:
        if lease is not None and lease.was_cut:
            raise busy() from None
        raise Rejected(
            408,
            "request_timeout",
            f"The request body did not arrive within {timeout_s:g} s; nothing was forwarded.",
            scope="request",
            headers=CLOSE,
        ) from None


async def _receive_all(receive: Receive, max_bytes: int, lease: BodyLease | None) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Rejected(
                400, "invalid_request_error", "Client went away before sending the whole body.", scope="request"
            )
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise too_large(max_bytes)
        if lease is not None and chunk:
            lease.grow(len(chunk))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def stream_body(receive: Receive, done: asyncio.Event) -> AsyncIterator[bytes]:
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return
    finally:
        done.set()
