"""The server side of a connection: limits uvicorn does not set, and quiet logs for cut responses.

uvicorn times out idle kept-alive connections, but not a request head that arrives slowly (or never
arrives), and its `limit_concurrency` still accepts every connection. `GuardedHttpProtocol` is its
httptools protocol with both bounds (docs/failure-modes.md):

- a request head must be complete within `head_timeout_s` of its first byte (or of the connection,
  for the first request): past it the client gets a 408 in the error envelope and the connection
  is closed; a connection that never sent a byte is closed;
- at `max_connections` open connections (per process) a new connection first makes room by
  cutting the connection that has waited longest for its request head (a slow client, answered
  408 as above); only when every connection is busy with a request does the new one get a 503 in
  the envelope and get closed at once. So slow clients can neither use up the process's file
  descriptors nor keep a prompt client (or `/-/healthz`) out.

Each guarded request also finds `spend_guard.abort` in its scope's `extensions`: the guard calls
it to drop a client that stopped reading (`transport.close()` would wait for the unread bytes).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.deadlines import unwatch, watch
from proxy.errors import UpstreamBroken, render_envelope
from proxy.http.upstream import ABORT_EXTENSION, ClientStalled
from proxy.logs import LogFormat, uvicorn_log_config
from proxy.settings import Settings

log = logging.getLogger("spend_guard.serving")
# File descriptors a process needs beyond its client connections: one upstream connection per
# guarded call in flight, Redis, logs.
SPARE_FDS = 256
# Cut heads and refused connections are logged in one WARNING line at most this often, the first
# this long after the first of them (so a burst is one line).
TALLY_LOG_S = 60.0
TALLY_FIRST_S = 2.0


@functools.lru_cache(maxsize=1)
def _worker_settings() -> Settings:
    # Workers are started by uvicorn in factory mode: the CLI passed its options in SPEND_GUARD_*.
    return Settings.from_env()


def _raw_response(status: bytes, error_type: str, message: str, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 response carrying the error envelope, written to a connection before (or
    instead of) the ASGI app."""
    body = render_envelope(error_type, message)
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode() + b"\r\nconnection: close\r\n" + extra + b"\r\n" + body
    )


HEAD_TIMEOUT_RESPONSE = _raw_response(
    b"408 Request Timeout", "request_timeout", "The request head did not arrive in time; the connection is closed."
)
TOO_MANY_RESPONSE = _raw_response(
    b"503 Service Unavailable",
    "guard_unavailable",
    "The proxy has too many open connections; retry shortly.",
    b"retry-after: 1\r\n",
)


class _Tally:
    """Slow heads cut and connections refused since the last WARNING line (one per process)."""

    def __init__(self) -> None:
        self.cut = 0
        self.refused = 0
        self.logged_at = float("-inf")
        self.pending: asyncio.TimerHandle | None = None

    def count(self, protocol: GuardedHttpProtocol, *, cut: int = 0, refused: int = 0) -> None:
        self.cut += cut
        self.refused += refused
        if self.pending is None:
            now = protocol.loop.time()
            delay = max(TALLY_FIRST_S, self.logged_at + TALLY_LOG_S - now)
            self.pending = protocol.loop.call_later(
                delay, self.flush, protocol.head_timeout_s, protocol.max_connections, protocol.loop
            )

    def flush(self, head_timeout_s: float, max_connections: int, loop: asyncio.AbstractEventLoop) -> None:
        log.warning(
            "slow clients: %d connection(s) cut for a request head slower than %g s, %d refused at max_connections=%d",
            self.cut,
            head_timeout_s,
            self.refused,
            max_connections,
        )
        self.cut = self.refused = 0
        self.logged_at = loop.time()
        self.pending = None


class _HeadDeadline:
    """A request head's deadline in the sweep (proxy/deadlines.py)."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: GuardedHttpProtocol) -> None:
        self.protocol = protocol

    def expire(self) -> None:
        self.protocol.head_timed_out()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for request heads and a connection cap."""

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
        self.head_deadline: _HeadDeadline | None = None
        self.head_begun = False
        # This process's connections waiting for a request head, oldest first (one server per
        # process, so its state object is where they are shared).
        self.waiting: dict[GuardedHttpProtocol, None] = server_state.__dict__.setdefault("spend_guard_waiting", {})
        self.tally: _Tally = server_state.__dict__.setdefault("spend_guard_tally", _Tally())

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections and len(self.connections) > self.max_connections:
            # (A head pipelined behind a response still running is never cut here.)
            oldest = next((p for p in self.waiting if p.cycle is None or p.cycle.response_complete), None)
            if oldest is None:
                transport.write(TOO_MANY_RESPONSE)
                transport.close()
                self.tally.count(self, refused=1)
                return
            oldest.cut_slow_head()
        self._arm()  # the first request's head is due within head_timeout_s of the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_begun = True
        # A later request's head is due within head_timeout_s of its first bytes (an idle
        # kept-alive connection is uvicorn's timeout_keep_alive's to close).
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self.head_begun = False
        super().on_headers_complete()
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[ABORT_EXTENSION] = self.transport.abort

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
