"""Observers for compressed and small bodies, and the factory that picks one by content type and
encoding (the JSON body scanner lives in scanner.py, the SSE reader in sse.py)."""

from __future__ import annotations

import decimal
import json
import zlib

from proxy.cost.scanner import (
    ERROR,
    MAX_INFLATE_BYTES,
    MAX_TOKEN_BYTES,
    UNKNOWN,
    BodyObserver,
    JsonScanner,
    Outcome,
    cost_to_micros,
)

# A longer cost token is not a price; a longer key is neither `cost` nor `error`.
from proxy.cost.sse import SseScanner

# Answers up to this size are parsed once at the end; larger ones are scanned as they stream.
SMALL_BODY_BYTES = 64 * 1024


class _Inflating:
    """Feeds the decompressed body to `inner`, at most MAX_INFLATE_BYTES at a time."""

    def __init__(self, inner: BodyObserver, wbits: int | None) -> None:
        self._inner = inner
        self._wbits = wbits  # None: deflate, zlib-wrapped or raw, decided by the first 2 bytes
        self._head = b""
        self._inflater: zlib._Decompress | None = None
        self._failed = False

    def feed(self, chunk: bytes) -> None:
        if self._failed or not chunk:
            return
        if self._inflater is None:
            chunk = self._head + chunk
            if len(chunk) < 2:
                self._head = chunk
                return
            self._head = b""
            wbits = self._wbits
            if wbits is None:
                zlib_header = chunk[0] & 0x0F == 8 and (chunk[0] << 8 | chunk[1]) % 31 == 0
                wbits = zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
            self._inflater = zlib.decompressobj(wbits)
        self._inflate(chunk)

    def finish(self, complete: bool = True) -> Outcome:
        if self._failed or self._inflater is None:
            return UNKNOWN
        self._inflate(b"")  # output zlib still holds back
        if self._failed:
            return UNKNOWN
        return self._inner.finish(complete and self._inflater.eof)

    def _inflate(self, data: bytes) -> None:
        inflater = self._inflater
        assert inflater is not None
        try:
            while True:
                out = inflater.decompress(data, MAX_INFLATE_BYTES)
                if out:
                    self._inner.feed(out)
                data = inflater.unconsumed_tail
                if not data and len(out) < MAX_INFLATE_BYTES:
                    break
        except zlib.error:
            self._failed = True
            return
        if inflater.unused_data:  # bytes after the end of the compressed stream
            self._failed = True


class _Opaque:
    """A body in an encoding we cannot read: its cost is unknown."""

    def feed(self, chunk: bytes) -> None:
        pass

    def finish(self, complete: bool = True) -> Outcome:
        return UNKNOWN


class SmallBodyFirst:
    """Most answers are under a kilobyte (a URL and a cost): keep them and let the C `json` parser
    read them once at the end, which is several times cheaper than scanning in Python. Past
    `SMALL_BODY_BYTES` what was kept goes to the streaming `JsonScanner`, which takes over, so a
    20 MB `b64_json` is still never held. The outcome rules are the scanner's."""

    def __init__(self) -> None:
        self._kept = bytearray()
        self._scanner: JsonScanner | None = None

    def feed(self, chunk: bytes) -> None:
        if self._scanner is not None:
            self._scanner.feed(chunk)
            return
        self._kept += chunk
        if len(self._kept) > SMALL_BODY_BYTES:
            self._scanner = JsonScanner()
            self._scanner.feed(bytes(self._kept))
            self._kept = bytearray()

    def finish(self, complete: bool = True) -> Outcome:
        if self._scanner is not None:
            return self._scanner.finish(complete)
        if not complete:
            return UNKNOWN
        try:
            data = _JSON.decode(self._kept.decode("utf-8"))
        except (ValueError, RecursionError):
            return UNKNOWN
        if not isinstance(data, dict):
            return UNKNOWN
        # The scanner's rules: a `cost` is charged whenever present (an unreadable one charges
        # the hold); only an `error` that is an object releases it.
        if "cost" in data:
            micros = cost_to_micros(data["cost"])
            return UNKNOWN if micros is None else Outcome("cost", micros)
        return ERROR if isinstance(data.get("error"), dict) else UNKNOWN


def _number(token: str) -> object:
    # The scanner's rule: a number token longer than MAX_TOKEN_BYTES is not a price.
    return decimal.Decimal(token) if len(token) <= MAX_TOKEN_BYTES else None


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


# One decoder for every answer (json.loads with arguments builds a decoder each call).
_JSON = json.JSONDecoder(parse_float=_number, parse_int=_number, parse_constant=_no_constants)


# The compressed codings observer_for reads a cost through, with zlib's wbits for each (None:
# deflate, zlib-wrapped or raw). With `identity`, the codings a spending call may ask for.
INFLATE_WBITS: dict[str, int | None] = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": None}
READABLE_CODINGS = frozenset({"identity", *INFLATE_WBITS})


def readable_accept_encoding(values: list[str]) -> str:
    """The client's `Accept-Encoding`, cut to the codings whose body the guard can read (order and
    q-values kept); `identity` if none is left. A brotli or zstd answer would hide its `cost`."""
    kept = [
        part.strip()
        for value in values
        for part in value.split(",")
        if part.split(";", 1)[0].strip().lower() in READABLE_CODINGS
    ]
    return ", ".join(kept) if kept else "identity"


def observer_for(content_type: str | None, content_encoding: str | None = None) -> BodyObserver:
    """The observer for a response with these `Content-Type` and `Content-Encoding` headers."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    inner: BodyObserver = SseScanner() if media_type == "text/event-stream" else SmallBodyFirst()
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return inner
    if encoding in INFLATE_WBITS:
        return _Inflating(inner, INFLATE_WBITS[encoding])
    return _Opaque()
