"""Observers for the other response shapes: SSE streams, compressed bodies, and the factory that
picks one by content type and encoding (the JSON body scanner lives in scanner.py)."""

from __future__ import annotations

import decimal
import json
import zlib

# A longer cost token is not a price; a longer key is neither `cost` nor `error`.
from proxy.scanner import (
    _EOL,
    ERROR,
    MAX_EVENT_BYTES,
    MAX_INFLATE_BYTES,
    MAX_TOKEN_BYTES,
    UNKNOWN,
    BodyObserver,
    JsonScanner,
    Outcome,
    _cost_to_micros,
)

# Answers up to this size are parsed once at the end; larger ones are scanned as they stream.
SMALL_BODY_BYTES = 64 * 1024


class SseScanner:
    """Reads `text/event-stream` events; the last event carrying a `cost` decides the outcome.

    A chat stream ends with a chunk holding top-level `cost` and `usage`; the responses API ends
    with `{"type": "response.completed", "response": {..., "cost": ...}}`.
    """

    def __init__(self) -> None:
        self._line = bytearray()  # the current line, held until its end of line arrives
        self._line_bytes = 0  # length of the current line, also when not held (oversized)
        self._data: list[bytes] = []
        self._event_bytes = 0
        self._oversized = False
        self._skip_lf = False  # the previous chunk ended on `\r`; a leading `\n` is the same EOL
        self._cost: int | None = None
        self._doubt = False  # a later event may have carried a cost we could not read
        self._error = False

    def feed(self, chunk: bytes) -> None:
        pos = 0
        if self._skip_lf and chunk[:1] == b"\n":
            pos = 1
        self._skip_lf = False
        for match in _EOL.finditer(chunk, pos):
            self._add_to_line(chunk[pos : match.start()])
            self._end_line()
            pos = match.end()
            self._skip_lf = pos == len(chunk) and match.group() == b"\r"
        self._add_to_line(chunk[pos:])

    def finish(self, complete: bool = True) -> Outcome:
        # A broken stream's unterminated event may be cut short: only a complete one is read.
        if complete:
            if self._line_bytes:
                self._end_line()
            self._dispatch()
        if self._cost is not None:
            return Outcome("cost", self._cost)
        if self._error and not self._doubt:
            return ERROR
        return UNKNOWN

    def _add_to_line(self, piece: bytes) -> None:
        if not piece:
            return
        self._line_bytes += len(piece)
        if self._event_bytes + self._line_bytes > MAX_EVENT_BYTES:
            self._oversized = True
            self._data.clear()
            self._line.clear()
        if not self._oversized:
            self._line += piece

    def _end_line(self) -> None:
        line = bytes(self._line)
        blank = self._line_bytes == 0
        self._line.clear()
        self._line_bytes = 0
        if blank:
            self._dispatch()
        elif self._oversized or line.startswith(b":"):
            return
        else:
            name, colon, value = line.partition(b":")
            if name == b"data":
                if colon and value.startswith(b" "):
                    value = value[1:]
                self._data.append(value)
                self._event_bytes += len(value) + 1

    def _dispatch(self) -> None:
        if self._oversized:
            self._cost = None
            self._doubt = True
        elif self._data:
            self._read_event(b"\n".join(self._data))
        self._data.clear()
        self._event_bytes = 0
        self._oversized = False

    def _read_event(self, data: bytes) -> None:
        if data.strip() == b"[DONE]":
            return
        try:
            event = json.loads(data, parse_float=decimal.Decimal)
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict):
            return
        if isinstance(event.get("error"), dict):
            self._error = True
        cost = event.get("cost")
        response = event.get("response")
        if cost is None and isinstance(response, dict):
            cost = response.get("cost")
        if cost is not None:
            self._cost = _cost_to_micros(cost)
            self._doubt = self._cost is None


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
            data = json.loads(
                self._kept.decode("utf-8"), parse_float=_number, parse_int=_number, parse_constant=_no_constants
            )
        except (ValueError, RecursionError):
            return UNKNOWN
        if not isinstance(data, dict):
            return UNKNOWN
        # The scanner's rules: a `cost` is charged whenever present (an unreadable one charges
        # the hold); only an `error` that is an object releases it.
        if "cost" in data:
            micros = _cost_to_micros(data["cost"])
            return UNKNOWN if micros is None else Outcome("cost", micros)
        return ERROR if isinstance(data.get("error"), dict) else UNKNOWN


def _number(token: str) -> object:
    # The scanner's rule: a number token longer than MAX_TOKEN_BYTES is not a price.
    return decimal.Decimal(token) if len(token) <= MAX_TOKEN_BYTES else None


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


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
