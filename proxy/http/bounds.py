"""The bounds `GuardedHttpProtocol` (proxy/http/protocol.py) keeps on a connection, and what it
answers past them: the sizes of a request head's parts, the pipelined requests read ahead, the
responses written before (or instead of) the app, the one WARNING line that counts them, the
flow control that holds reading, and the process's file-descriptor limit for `max_connections`
(docs/failure-modes.md).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from typing import TYPE_CHECKING

from uvicorn.protocols.http.flow_control import FlowControl

from proxy.errors import render_envelope

if TYPE_CHECKING:
    from proxy.http.protocol import GuardedHttpProtocol

log = logging.getLogger("spend_guard.serving")
# File descriptors a process needs beyond its client connections: one upstream connection per
# guarded call in flight, Redis, logs.
SPARE_FDS = 256
# Cut heads and refused connections are logged in one WARNING line at most this often, the first
# this long after the first of them (so a burst is one line).
TALLY_LOG_S = 60.0
TALLY_FIRST_S = 2.0
# Bounds on the parts of a request head (its total is Settings.max_head_bytes).
MAX_URL_BYTES = 8 * 1024
MAX_LINE_BYTES = 8 * 1024
MAX_HEADERS = 100
# While a head arrives the parser is fed at most this much at once: a head is cut within this many
# bytes past its bound.
FEED_BYTES = 4 * 1024
# A head's request line and line breaks beside its URL, header names and values (what the bound counts).
HEAD_FRAMING_BYTES = 64
# Requests read and waiting behind the one being answered on a connection: past it the connection
# is not read until they are answered. While a response is outstanding the parser is fed this
# much at a time, so at most this many bytes of requests more are queued.
MAX_PIPELINED = 16
PIPELINED_FEED_BYTES = 512


def _raw_response(status: bytes, error_type: str, message: str, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 response carrying the error envelope, written to a connection before (or
    instead of) the ASGI app."""
    body = render_envelope(error_type, message)
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: close\r\n"
        + extra
        + b"\r\n"
        + body
    )


HEAD_TIMEOUT_RESPONSE = _raw_response(
    b"408 Request Timeout", "request_timeout", "The request head did not arrive in time; the connection is closed."
)
URL_TOO_LONG_RESPONSE = _raw_response(
    b"414 URI Too Long",
    "invalid_request_error",
    f"The request URL exceeds {MAX_URL_BYTES} bytes; the connection is closed.",
)
LINE_TOO_LONG_RESPONSE = _raw_response(
    b"431 Request Header Fields Too Large",
    "invalid_request_error",
    f"A request header line exceeds {MAX_LINE_BYTES} bytes; the connection is closed.",
)
TOO_MANY_HEADERS_RESPONSE = _raw_response(
    b"431 Request Header Fields Too Large",
    "invalid_request_error",
    f"The request has more than {MAX_HEADERS} headers; the connection is closed.",
)


@functools.lru_cache(maxsize=4)
def head_too_large_response(max_head_bytes: int) -> bytes:
    return _raw_response(
        b"431 Request Header Fields Too Large",
        "invalid_request_error",
        f"The request head (its URL and headers) exceeds {max_head_bytes} bytes; the connection is closed.",
    )


TOO_MANY_RESPONSE = _raw_response(
    b"503 Service Unavailable",
    "guard_unavailable",
    "The proxy has too many open connections; retry shortly.",
    b"retry-after: 1\r\n",
)


class Tally:
    """Slow heads cut and connections refused since the last WARNING line (one per process)."""

    def __init__(self) -> None:
        self.cut = 0
        self.refused = 0
        self.too_large = 0
        self.idle = 0
        self.logged_at = float("-inf")
        self.pending: asyncio.TimerHandle | None = None

    def count(
        self, protocol: GuardedHttpProtocol, *, cut: int = 0, refused: int = 0, too_large: int = 0, idle: int = 0
    ) -> None:
        self.cut += cut
        self.refused += refused
        self.too_large += too_large
        self.idle += idle
        if self.pending is None:
            now = protocol.loop.time()
            delay = max(TALLY_FIRST_S, self.logged_at + TALLY_LOG_S - now)
            self.pending = protocol.loop.call_later(
                delay, self.flush, protocol.head_timeout_s, protocol.max_connections, protocol.loop
            )

    def flush(self, head_timeout_s: float, max_connections: int, loop: asyncio.AbstractEventLoop) -> None:
        log.warning(
            "slow clients: %d connection(s) cut for a request head slower than %g s, %d refused at max_connections=%d, "
            "%d idle kept-alive connection(s) closed there to make room, %d request head(s) refused past their size "
            "bounds",
            self.cut,
            head_timeout_s,
            self.refused,
            max_connections,
            self.idle,
            self.too_large,
        )
        self.cut = self.refused = self.too_large = self.idle = 0
        self.logged_at = loop.time()
        self.pending = None


class HeldFlow(FlowControl):
    """uvicorn's flow control, plus a hold on reading that nothing but `release` lifts (uvicorn
    resumes reading whenever a request asks for its body, pipelined requests or not)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__(transport)
        self.held = False

    def hold(self) -> None:
        self.held = True
        self.pause_reading()

    def release(self) -> None:
        self.held = False
        self.resume_reading()

    def resume_reading(self) -> None:
        if not self.held:
            super().resume_reading()


def raise_fd_limit(max_connections: int) -> None:
    """Lift the soft file-descriptor limit towards what `max_connections` needs (up to the hard
    limit, which needs no privilege); warn when even that is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections * 2 + SPARE_FDS  # a client connection and its upstream one
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    if target < wanted:
        log.warning(
            "max_connections=%d wants %d file descriptors but the limit is %d; "
            "lower --max-connections or raise ulimit -n",
            max_connections,
            wanted,
            target,
        )
