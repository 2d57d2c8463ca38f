"""The upstream side: one aiohttp session, request building, hop-by-hop headers, error mapping.

Only the configured upstream is ever contacted: the target is always `base_url` + the request's
own path and query, whatever the Host header or an absolute-form target says.
"""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_from_bytes

import aiohttp
from yarl import URL

from proxy.deadlines import deadline
from proxy.errors import UpstreamError, UpstreamNotSent
from proxy.types import Message, Send

# RFC 9110 §7.6.1, plus the pre-standard ones proxies still see.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP_HEADERS)
# Headers aiohttp would otherwise add on its own: the client's request passes as it was sent.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# Never forwarded as sent: aiohttp writes Host for the upstream and Content-Length for the body it
# sends, and uvicorn has already answered the client's `Expect: 100-continue` (passed on, it would
# make aiohttp wait for a second 100 Continue that the upstream need not send).
_REWRITTEN = frozenset({b"host", b"content-length", b"expect"})
_NOTHING: frozenset[bytes] = frozenset()
# aiohttp's own threshold (payload.TOO_LARGE_BYTES_BODY) for a body sent as one `bytes` write.
LARGE_BODY_BYTES = 1 << 20
# A response body at most this big that arrived whole with its head goes out as one message.
WHOLE_RESPONSE_BYTES = 256 * 1024
# The scope extension through which the server lets the guard drop a client's connection at once
# (set by `proxy.http.protocol.GuardedHttpProtocol`).
ABORT_EXTENSION = "spend_guard.abort"
# The server's flow control of the client connection (its `write_paused`): a send is bounded by the
# write timeout only when it can block, so a prompt client costs no deadline.
FLOW_EXTENSION = "spend_guard.flow"
_PATH_SAFE = b"/%:@!$&'()*+,;=-._~"
_ALREADY_SAFE = re.compile(rb"[A-Za-z0-9/%:@!$&'()*+,;=._~-]*")


class ClientStalled(Exception):
    """A client stopped reading a response for `--write-timeout-s` (or until `upstream.timeout_s`
    ran out): raised after its connection was dropped, so the call ends and settles."""


async def send_within(scope: Mapping[str, Any], send: Send, message: Message, timeout_s: float) -> None:
    """`send(message)`, failing with `WriteStalled` if the client takes none of it for `timeout_s`."""
    flow = scope.get("extensions", {}).get(FLOW_EXTENSION)
    if flow is None or not flow.write_paused:
        await send(message)  # it cannot block
        return
    try:
        async with deadline(timeout_s):
            await send(message)
    except TimeoutError:
        raise WriteStalled from None


class WriteStalled(Exception):
    """The client took nothing of a response for `--write-timeout-s`."""


def abort_client(scope: Mapping[str, Any]) -> None:
    """Drop the client's connection now, unsent bytes and all, where the server offers it (a plain
    close would wait for a client that stopped reading to take what is buffered)."""
    abort = scope.get("extensions", {}).get(ABORT_EXTENSION)
    if callable(abort):
        abort()


@dataclass(frozen=True, slots=True)
class RequestHead:
    """The client's request headers as they go upstream, read in one pass over the raw pairs."""

    sent: list[tuple[str, str]]  # hop-by-hop, Connection-listed, Host, Content-Length, Expect removed
    content_length: str | None
    chunked: bool


def request_head(raw: Iterable[tuple[bytes, bytes]], *, drop: frozenset[bytes] = _NOTHING) -> RequestHead:
    """Split the client's headers (RFC 9110 §7.6.1): `drop` names more to leave out (lower-case)."""
    sent: list[tuple[str, str]] = []
    length: str | None = None
    chunked = False
    listed: set[bytes] | None = None
    for name, value in raw:
        lower = name.lower()
        if lower in HOP_BY_HOP_BYTES or lower in _REWRITTEN or lower in drop:
            if lower == b"content-length":
                length = value.decode("latin-1")
            elif lower == b"transfer-encoding":
                chunked = True
            elif lower == b"connection":
                listed = _connection_tokens(value, listed)
            continue
        sent.append((lower.decode("latin-1"), _header_text(value)))
    if listed:
        names = {token.decode("latin-1") for token in listed}
        sent = [(name, value) for name, value in sent if name not in names]
    return RequestHead(sent, length, chunked)


def _header_text(value: bytes) -> str:
    """aiohttp writes header values as UTF-8: decoding them as UTF-8 sends the client's bytes
    unchanged. Bytes that are not UTF-8 (obsolete Latin-1 text) are read as Latin-1 and so go
    up re-encoded; no str makes aiohttp write them as they came."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _connection_tokens(value: bytes, listed: set[bytes] | None) -> set[bytes] | None:
    """The names a `Connection` header lists, beyond the hop-by-hop ones dropped anyway."""
    tokens = {token.strip().lower() for token in value.split(b",")} - HOP_BY_HOP_BYTES - {b"close", b""}
    if not tokens:
        return listed
    return tokens if listed is None else listed | tokens


def create_session(limit: int = 0) -> aiohttp.ClientSession:
    """The one upstream session: bytes pass through untouched, no cookie jar, no pool cap by default."""
    return aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300, enable_cleanup_closed=True),
        skip_auto_headers=SKIP_AUTO_HEADERS,  # once for the session, not per request
    )


class Upstream:
    """Opens requests to the configured upstream and maps failures to 502/504."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, timeout_s: float, connect_timeout_s: float
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)

    def url_for(self, raw_path: bytes, query: bytes) -> URL:
        raw_path = raw_path or b"/"
        # Nearly every target is already in URL form: pass it as is, quote only what is not.
        if _ALREADY_SAFE.fullmatch(raw_path):
            path = raw_path.decode("ascii")
        else:
            path = quote_from_bytes(raw_path, safe=_PATH_SAFE)
        if not path.startswith("/"):
            path = "/" + path
        target = self.base_url + path
        if query:
            target += "?" + quote_from_bytes(query, safe=_PATH_SAFE + b"?")
        # encoded=True: yarl must not re-normalise the path; the upstream sees what the client sent.
        return URL(target, encoded=True)

    async def open(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        sent: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> aiohttp.ClientResponse:
        """Send the request (`sent`: headers from `request_head`); return the response with its
        headers read (body not yet read). aiohttp writes Content-Length for a sized body."""
        data: bytes | io.BytesIO | AsyncIterable[bytes] | None = body
        if isinstance(body, bytes) and len(body) > LARGE_BODY_BYTES:
            # Written in pieces, still with its length: aiohttp warns that one write of a large
            # `bytes` may stall the event loop. BytesIO shares the bytes, it does not copy them.
            data = io.BytesIO(body)
        try:
            return await self.session.request(
                method,
                self.url_for(raw_path, query),
                headers=sent,
                data=data,
                allow_redirects=False,
                timeout=self.timeout,
                compress=False,
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamNotSent(504, "ImageRouter did not answer in time (upstream timeout).") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamNotSent(502, f"ImageRouter could not be reached ({type(exc).__name__}).") from exc
        except TimeoutError as exc:
            raise UpstreamError(504, "ImageRouter did not answer in time (upstream timeout).") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(502, f"ImageRouter could not be reached ({type(exc).__name__}).") from exc


def response_headers(resp: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    """Upstream response headers for the client (names lower-cased), hop-by-hop ones removed.

    Works on the raw bytes in one pass: this runs for every response, and a `Connection` header
    rarely lists anything beyond `keep-alive` or `close`."""
    out = []
    listed: set[bytes] | None = None
    for name, value in resp.raw_headers:
        lower = name.lower()
        if lower in HOP_BY_HOP_BYTES:
            if lower == b"connection":
                listed = _connection_tokens(value, listed)
            continue
        out.append((lower, value))
    if listed:
        out = [(name, value) for name, value in out if name not in listed]
    return out


def arrived_whole(content: aiohttp.StreamReader) -> bytes | None:
    """The whole body if it arrived with the head and is at most WHOLE_RESPONSE_BYTES (it then goes
    to the client as one last message); None: stream it with `body_chunks`. A bigger body is in
    memory too, but is not copied again."""
    if content.is_eof() and content.total_bytes <= WHOLE_RESPONSE_BYTES:
        return content.read_nowait()
    return None


async def body_chunks(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """An upstream body chunk by chunk, as `iter_any()` reads it, except that what the upstream
    sent before it broke off comes before the error.

    aiohttp's reader raises a connection error ahead of the bytes it has already buffered (the
    design asyncio's StreamReader shares: https://github.com/python/cpython/issues/75044), so
    whether the tail of a cut-off answer reached the client and the cost scanner would depend on
    whether the reader woke before the break was noticed.
    """
    while True:
        try:
            chunk = await content.readany()
        except aiohttp.ClientError:
            tail = _buffered(content)
            if tail:
                yield tail
            raise
        if not chunk:
            return
        yield chunk


def _buffered(content: aiohttp.StreamReader) -> bytes:
    buffer = getattr(content, "_buffer", None)  # the reader's unread chunks (aiohttp >= 3.9)
    if not buffer:
        return b""
    offset = getattr(content, "_buffer_offset", 0)
    tail = b"".join(buffer)[offset:]
    buffer.clear()
    return tail
