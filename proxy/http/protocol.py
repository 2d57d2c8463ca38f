"""The server side of a connection: limits uvicorn does not set, and quiet logs for cut responses.

uvicorn times out idle kept-alive connections, but not a request head that arrives slowly (or never
arrives), and its `limit_concurrency` still accepts every connection. `GuardedHttpProtocol` is its
httptools protocol with both bounds (docs/failure-modes.md):

- a request head must be complete within `head_timeout_s` of its first byte (or of the connection,
  for the first request): past it the client gets a 408 in the error envelope and the connection
  is closed; a connection that never sent a byte is closed;
- at `max_connections` open connections (per process) a new connection first makes room by
  closing the connection idle longest between requests (kept alive: its client reconnects), else
  by cutting the connection that has waited longest for its request head (a slow client, answered
  408 as above); only when every connection is busy with a request does the new one get a 503 in
  the envelope and get closed at once. So slow or idle clients can neither use up the process's
  file descriptors nor keep a prompt client (or `/-/healthz`) out.

A request head is bounded in size as it arrives (docs/failure-modes.md#a-request-head-too-large):
its URL and header names and values together at most `max_head_bytes` (16 KiB, counted as Node
counts them, Node's default), each header line at most MAX_LINE_BYTES and at most MAX_HEADERS of
them (431 past any of these), its URL at most MAX_URL_BYTES (414); then the connection is closed.
httptools takes whatever it is fed in one go and keeps a header line still arriving inside
itself, so while a head arrives the parser is fed FEED_BYTES at a time and the bytes of the head
are counted between feeds.

Pipelined requests are bounded too: once MAX_PIPELINED wait behind the one being answered, the
connection is not read until they are answered (uvicorn pauses reading then, but resumes it
whenever a request reads its body, and parses all it was given in one go).

Each guarded request also finds `spend_guard.abort` in its scope's `extensions`: the guard calls
it to drop a client that stopped reading (`transport.close()` would wait for the unread bytes).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.deadlines import unwatch, watch
from proxy.errors import UpstreamBroken
from proxy.http.bounds import (
    FEED_BYTES,
    HEAD_FRAMING_BYTES,
    HEAD_TIMEOUT_RESPONSE,
    LINE_TOO_LONG_RESPONSE,
    MAX_HEADERS,
    MAX_LINE_BYTES,
    MAX_PIPELINED,
    MAX_URL_BYTES,
    PIPELINED_FEED_BYTES,
    TOO_MANY_HEADERS_RESPONSE,
    TOO_MANY_RESPONSE,
    URL_TOO_LONG_RESPONSE,
    HeldFlow,
    Tally,
    head_too_large_response,
)
from proxy.http.upstream import ABORT_EXTENSION, FLOW_EXTENSION, ClientStalled
from proxy.logs import LogFormat, uvicorn_log_config
from proxy.settings import Settings

# When the server stops, a connection accepted but not sent a byte yet is closed after this long.
RETIRING_FIRST_BYTE_S = 1.0


@functools.lru_cache(maxsize=1)
def _worker_settings() -> Settings:
    # Workers are started by uvicorn in factory mode: the CLI passed its options in SPEND_GUARD_*.
    return Settings.from_env()


class _HeadDeadline:
    """A request head's deadline in the sweep (proxy/deadlines.py)."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: GuardedHttpProtocol) -> None:
        self.protocol = protocol

    def expire(self) -> None:
        self.protocol.head_timed_out()


class _HeadRefused(Exception):
    """Raised in a parser callback to stop parsing a head past one of its bounds."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and size bounds for request heads and a connection cap."""

    flow: HeldFlow

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = _worker_settings()
        self.head_timeout_s = limits.head_timeout_s
        self.max_connections = limits.max_connections
        self.limit_concurrency = None  # this class's own cap replaces uvicorn's
        self.max_head_bytes = limits.max_head_bytes
        self.head_deadline: _HeadDeadline | None = None
        self.head_begun = False
        self.between = True  # no message in progress: the next byte fed begins a head
        self.heads = 0  # heads begun on this connection
        self.head_bytes = 0  # of the head in progress, as fed
        self.header_count = 0
        self.head_size = 0  # the URL and every header name and value so far, as Node counts a head
        self.url_parts: list[bytes] = []  # joined once the head is in (uvicorn's `url +=` is quadratic)
        self.url_bytes = 0
        self.refusal: bytes | None = None  # a head was refused: nothing more is read
        self.body_left = 0  # of a body of known length being read
        self.held: bytearray | None = None  # read but not parsed while enough requests wait (reading paused)
        self.retiring = False  # the server is stopping: the request this connection is waiting for is its last
        # This process's connections waiting for a request head, oldest first (one server per
        # process, so its state object is where they are shared).
        self.waiting: dict[GuardedHttpProtocol, None] = server_state.__dict__.setdefault("spend_guard_waiting", {})
        # ...and those idle between requests (kept alive, no byte of a next head yet), longest idle first.
        self.idle: dict[GuardedHttpProtocol, None] = server_state.__dict__.setdefault("spend_guard_idle", {})
        self.tally: Tally = server_state.__dict__.setdefault("spend_guard_tally", Tally())

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = HeldFlow(transport)
        if self.max_connections and len(self.connections) > self.max_connections:
            if self.idle:  # a kept-alive connection idle between requests goes first (its client reconnects)
                self.tally.count(self, idle=1)
                next(iter(self.idle)).close_idle()
            else:
                # (A head pipelined behind a response still running is never cut here.)
                oldest = next((p for p in self.waiting if p.cycle is None or p.cycle.response_complete), None)
                if oldest is None:
                    transport.write(TOO_MANY_RESPONSE)
                    transport.close()
                    self.tally.count(self, refused=1)
                    return
                oldest.cut_slow_head()
        self._arm()  # the first request's head is due within head_timeout_s of the connection

    def shutdown(self) -> None:
        """uvicorn closes a connection that has no request yet at once when the server stops. One
        accepted just before (its request perhaps already on the wire) would see its connection
        dropped unanswered, so it is kept for its one request, answered with `Connection: close`:
        a head already begun has its head deadline; no byte yet, RETIRING_FIRST_BYTE_S."""
        if self.cycle is not None or self.transport.is_closing():
            super().shutdown()
            return
        self.retiring = True
        if not self.head_begun:
            self.loop.call_later(RETIRING_FIRST_BYTE_S, self._close_if_no_request)

    def _close_if_no_request(self) -> None:
        if self.cycle is None and not self.head_begun and not self.transport.is_closing():
            self._disarm()
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.idle.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refusal is not None:
            return  # a refused head closes the connection: nothing after it is read
        if self.held is not None:
            self.held += data  # (arrived as reading was paused)
            return
        self._unset_keepalive_if_required()
        self.idle.pop(self, None)
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if len(self.pipeline) >= MAX_PIPELINED:
                # Enough requests wait behind the one being answered: read on once they are.
                self.held = bytearray(view[pos:])
                self.flow.hold()
                return
            piece = view[pos : pos + self._next_feed()]
            heads, between = self.heads, self.between
            if not self._parse(piece):
                return
            pos += len(piece)
            if self.head_begun:
                if self.heads == heads:
                    self.head_bytes += len(piece)
                elif self.heads == heads + 1 and between:
                    self.head_bytes = len(piece)  # it began with this piece
                else:
                    self.head_bytes = 0  # it began after another message in this piece: counted from the next
                # As fed, a head also holds its line breaks, separators and request line around what
                # the bound counts: they are allowed for.
                if self.head_bytes > self.max_head_bytes + HEAD_FRAMING_BYTES + 4 * self.header_count:
                    self.refuse_head(head_too_large_response(self.max_head_bytes))
                    return

    def _next_feed(self) -> int:
        """How much to feed the parser next: the rest of a body of known length at once; else a
        head's worth, less while a response is still outstanding (what comes is pipelined)."""
        if not (self.between or self.head_begun):
            return self.body_left or FEED_BYTES  # in a body (chunked ones: a piece at a time)
        if self.cycle is not None and not self.cycle.response_complete:
            return PIPELINED_FEED_BYTES
        return FEED_BYTES

    def release_held(self) -> None:
        """Read on after a pipeline drained: first what was held back."""
        if self.held is None or self.transport.is_closing() or len(self.pipeline) >= MAX_PIPELINED:
            return
        data, self.held = bytes(self.held), None
        self.flow.release()
        if data:
            self.data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.held is not None:
            self.loop.call_soon(self.release_held)
        elif not self.pipeline and self.timeout_keep_alive_task is not None:
            self.idle[self] = None  # kept alive, waiting for a next request

    def close_idle(self) -> None:
        """Close a kept-alive connection between requests (as its keep-alive timeout would)."""
        self.idle.pop(self, None)
        if not self.transport.is_closing():
            self.transport.close()

    def _parse(self, piece: memoryview) -> bool:
        """Feed the parser as uvicorn does; False once the connection is done with."""
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserError:
            if self.refusal is not None:
                self.refuse_head(self.refusal)
                return False
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return False
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        return True

    def refuse_head(self, response: bytes) -> None:
        """Answer a head past its bounds and close; behind a response still being sent, close after it."""
        self.refusal = response
        self._disarm()
        self.tally.count(self, too_large=1)
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.flow.pause_reading()
            self.cycle.keep_alive = False  # the latest request's answer ends the connection
            return
        self.transport.write(response)
        self.transport.close()

    def _stop(self, response: bytes) -> None:
        self.refusal = response
        raise _HeadRefused

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_begun = True
        self.between = False
        self.heads += 1
        self.header_count = self.url_bytes = self.head_size = 0
        self.url_parts = []
        # A later request's head is due within head_timeout_s of its first bytes (an idle
        # kept-alive connection is uvicorn's timeout_keep_alive's to close).
        self._arm()

    # on_url and on_header run for every piece of every head: the head's size is counted inline.

    def on_url(self, url: bytes) -> None:
        size = len(url)
        self.url_bytes += size
        if self.url_bytes > MAX_URL_BYTES:
            self._stop(URL_TOO_LONG_RESPONSE)
        self.head_size += size
        if self.head_size > self.max_head_bytes:
            self._stop(head_too_large_response(self.max_head_bytes))
        self.url_parts.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if self.header_count > MAX_HEADERS:
            self._stop(TOO_MANY_HEADERS_RESPONSE)
        size = len(name) + len(value)
        if size > MAX_LINE_BYTES:
            self._stop(LINE_TOO_LONG_RESPONSE)
        self.head_size += size
        if self.head_size > self.max_head_bytes:
            self._stop(head_too_large_response(self.max_head_bytes))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        self.head_begun = False
        self.url = self.url_parts[0] if len(self.url_parts) == 1 else b"".join(self.url_parts)
        self.body_left = 0
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit():
                self.body_left = int(value)
            elif name == b"transfer-encoding":  # chunked: the length is not the body's
                self.body_left = 0
                break
        super().on_headers_complete()
        if self.retiring and self.cycle is not None:
            self.cycle.keep_alive = False  # the server is stopping: this request is the connection's last
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[ABORT_EXTENSION] = self.transport.abort
        extensions[FLOW_EXTENSION] = self.flow

    def on_body(self, body: bytes) -> None:
        self.body_left = max(0, self.body_left - len(body))
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.between = True
        self.body_left = 0
        super().on_message_complete()

    def _arm(self) -> None:
        # No loop timer per head (a timer armed and cancelled per request cost ~4 us): the
        # deadline sweep of proxy/deadlines.py checks open heads every RESOLUTION_S.
        if self.head_deadline is None and self.head_timeout_s > 0:
            self.head_deadline = _HeadDeadline(self)
            watch(self.head_deadline, self.loop.time() + self.head_timeout_s, self.loop)
            self.waiting[self] = None

    def _disarm(self) -> None:
        if self.head_deadline is not None:
            unwatch(self.head_deadline, self.loop)
            self.head_deadline = None
            self.waiting.pop(self, None)

    def head_timed_out(self) -> None:
        self.head_deadline = None
        self.waiting.pop(self, None)
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a response still running: judge it once that one is done.
            self._arm()
            return
        self.cut_slow_head()

    def cut_slow_head(self) -> None:
        """Close a connection still waiting for its request head: 408 if part of one came."""
        self._disarm()
        if self.transport.is_closing():
            return
        if self.head_begun:
            self.transport.write(HEAD_TIMEOUT_RESPONSE)
        self.transport.close()
        self.tally.count(self, cut=1)


class CutResponseFilter(logging.Filter):
    """uvicorn logs "Exception in ASGI application" with a traceback for every exception an app
    raises; a response the proxy cut on purpose (upstream body broken, client stopped reading)
    becomes one WARNING line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (UpstreamBroken, ClientStalled)):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "%s", (str(exc) or "response cut: the client's connection was closed",)
            record.exc_info, record.exc_text = None, None
        return True


def log_config(log_format: LogFormat = "text") -> dict[str, Any]:
    """uvicorn's own logging config in `log_format`, with `CutResponseFilter` on its error logger."""
    return uvicorn_log_config(log_format, {"cut_response": {"()": f"{__name__}.CutResponseFilter"}})
