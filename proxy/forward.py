"""The upstream side: one aiohttp session, request building, hop-by-hop headers, error mapping.

Only the configured upstream is ever contacted: the target is always `base_url` + the request's
own path and query, whatever the Host header or an absolute-form target says.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterable, Iterable
from urllib.parse import quote_from_bytes

import aiohttp
from yarl import URL

from proxy.errors import UpstreamError

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
# Headers aiohttp would otherwise add on its own: the client's request passes as it was sent.
HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP_HEADERS)
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_DROP_SIZED = frozenset({"host", "content-length"})
_DROP_STREAMED = frozenset({"host"})
_PATH_SAFE = b"/%:@!$&'()*+,;=-._~"
_ALREADY_SAFE = re.compile(rb"[A-Za-z0-9/%:@!$&'()*+,;=._~-]*")


def strip_hop_by_hop(headers: Iterable[tuple[str, str]], *, drop: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers and those the `Connection` header names (RFC 9110 §7.6.1)."""
    lowered = [(name.lower(), name, value) for name, value in headers]
    dropped = HOP_BY_HOP_HEADERS | drop
    for lower, _, value in lowered:
        if lower == "connection":
            dropped = dropped | {token.strip().lower() for token in value.split(",")}
    return [(name, value) for lower, name, value in lowered if lower not in dropped]


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

    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout_s: float, connect_timeout_s: float) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s)

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
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> aiohttp.ClientResponse:
        """Send the request; return the response with its headers read (body not yet read)."""
        # A sized body gets its Content-Length from aiohttp; a streamed one keeps the client's.
        sent = strip_hop_by_hop(headers, drop=_DROP_SIZED if body is None or isinstance(body, bytes) else _DROP_STREAMED)
        try:
            return await self.session.request(
                method,
                self.url_for(raw_path, query),
                headers=sent,
                data=body,
                allow_redirects=False,
                timeout=self.timeout,
                compress=False,
            )
        except asyncio.TimeoutError as exc:
            raise UpstreamError(504, "ImageRouter did not answer in time (upstream timeout).") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(502, f"ImageRouter could not be reached ({type(exc).__name__}).") from exc


def response_headers(resp: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    """Upstream response headers for the client (names lower-cased), hop-by-hop ones removed.

    Works on the raw bytes: this runs for every response, and most carry no `Connection` list."""
    raw = resp.raw_headers
    listed: set[bytes] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            listed.update(token.strip().lower() for token in value.split(b","))
    out = []
    for name, value in raw:
        lower = name.lower()
        if lower not in HOP_BY_HOP_BYTES and lower not in listed:
            out.append((lower, value))
    return out
