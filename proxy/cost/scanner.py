"""Find out what an upstream response cost while it streams through, without buffering it.

ImageRouter answers a generation with 200 at once, a space every 3 s as a heartbeat, then one JSON
object with a top-level `cost` (or `error`) next to megabytes of base64. `JsonScanner` reads only
the structure of that object: string contents are skipped with `bytes.find`, so a 20 MB
`b64_json` costs a few hundred `find` calls and the scanner holds a few hundred bytes.
Chat and responses routes with `stream: true` send SSE instead: `observers.SseScanner` reads
those, and `observers.observer_for` picks one from the response headers.
"""

from __future__ import annotations

import decimal
import json
import re
from dataclasses import dataclass
from typing import Literal, Protocol

from proxy.money import MAX_ABS_MICROS

# A longer cost token is not a price; a longer key is neither `cost` nor `error`.
MAX_TOKEN_BYTES = 64
# Deeper nesting is refused (CPython's json gives up near 1000 too); keeps the stack <= 1 KiB.
MAX_DEPTH = 1024
MAX_EVENT_BYTES = 1 << 20
# Largest piece of decompressed output held at once, whatever the compression ratio.
MAX_INFLATE_BYTES = 256 << 10

_WS = re.compile(rb"[ \t\n\r]*")
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = re.compile(rb"[0-9eE.+\-]*")
_LETTERS = re.compile(rb"[a-z]*")
_PLAIN_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
EOL = re.compile(rb"\r\n|\r|\n")
# String contents up to the closing quote (or a lone `\` at the end), escapes included.
_STRING_BODY = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)
# `, scalar` repeated inside an array, each scalar followed by a delimiter in the same chunk.
_ARRAY_SCALARS = re.compile(
    rb"(?:[ \t\n\r]*,[ \t\n\r]*(?:-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
    rb"|true|false|null)(?=[ \t\n\r,\]}]))*+"
)
# Room for any <= 64-digit cost token times 10**6, so scaling never rounds.
_EXACT = decimal.Context(prec=100)

_QUOTE, _BACKSLASH, _COMMA, _COLON = 0x22, 0x5C, 0x2C, 0x3A
_LBRACE, _RBRACE, _LBRACKET, _RBRACKET = 0x7B, 0x7D, 0x5B, 0x5D
_OPENERS = {_LBRACE: _RBRACE, _LBRACKET: _RBRACKET}

# Parser states between tokens, and inside a token that may straddle two chunks.
_START, _KEY_OR_END, _KEY, _COLON_NEXT, _VALUE, _VALUE_OR_END, _AFTER_VALUE, _DONE = range(8)
_IN_STRING, _IN_NUMBER, _IN_LITERAL = range(8, 11)
# What the current top-level key is.
_OTHER, _COST, _ERROR = range(3)
_INVALID_COST = -1


def _number_dfa() -> tuple[dict[int, int], ...]:
    """JSON number grammar for numbers split across chunks; accepting states are 2, 3, 5, 8."""
    table: tuple[dict[int, int], ...] = tuple({} for _ in range(9))
    for digit in b"0123456789":
        first = 2 if digit == ord("0") else 3
        table[0][digit] = table[1][digit] = first
        table[3][digit] = 3
        table[4][digit] = table[5][digit] = 5
        table[6][digit] = table[7][digit] = table[8][digit] = 8
    table[0][ord("-")] = 1
    table[2][ord(".")] = table[3][ord(".")] = 4
    for state in (2, 3, 5):
        table[state][ord("e")] = table[state][ord("E")] = 6
    table[6][ord("+")] = table[6][ord("-")] = 7
    return table


_NUMBER_DFA = _number_dfa()
_NUMBER_ACCEPTS = frozenset({2, 3, 5, 8})


@dataclass(frozen=True)
class Outcome:
    """What a response body says about its charge: an error, a cost, or nothing trustworthy."""

    kind: Literal["error", "cost", "unknown"]
    cost_micros: int | None = None  # set only when kind == "cost"


UNKNOWN = Outcome("unknown")
ERROR = Outcome("error")


class BodyObserver(Protocol):
    """Sees every chunk of a response body; `finish` is called once, after the last one.

    `complete=False` means the stream broke (upstream reset, cut off) before its end.
    """

    def feed(self, chunk: bytes) -> None: ...

    def finish(self, complete: bool = True) -> Outcome: ...


def usd_decimal_to_micros(amount: decimal.Decimal) -> int | None:
    """Micro-dollars rounded up, or None for a negative, non-finite or out-of-range amount."""
    if not amount.is_finite() or amount < 0:
        return None
    if amount == 0:
        return 0
    if amount.adjusted() > 9:  # >= $10**10
        return None
    if amount.adjusted() < -7:  # below a tenth of a micro-dollar, and still a charge
        return 1
    scaled = amount.scaleb(6, _EXACT)  # exact: at most 64 digits in a 100-digit context
    micros = int(scaled.to_integral_value(rounding=decimal.ROUND_CEILING, context=_EXACT))
    return micros if micros <= MAX_ABS_MICROS else None


def cost_to_micros(value: object) -> int | None:
    """A parsed `cost` (int, Decimal or plain decimal string) to micro-dollars, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return usd_decimal_to_micros(decimal.Decimal(value))
    if isinstance(value, decimal.Decimal):
        return usd_decimal_to_micros(value)
    if isinstance(value, str) and len(value) <= MAX_TOKEN_BYTES:
        if _PLAIN_DECIMAL.fullmatch(value):
            return usd_decimal_to_micros(decimal.Decimal(value))
    return None


def _decode_string(raw: bytes) -> str | None:
    """JSON-unescape the contents of a short string token; None if it is not valid JSON."""
    if _BACKSLASH not in raw:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None
    try:
        text = json.loads(b'"' + raw + b'"')
    except ValueError:
        return None
    return text if isinstance(text, str) else None


def _odd_backslashes(segment: bytes) -> bool:
    """Whether `segment` ends in an odd run of backslashes (so the next byte is escaped)."""
    return (len(segment) - len(segment.rstrip(b"\\"))) % 2 == 1


class _Invalid(Exception):
    """The body is not one JSON object; raised inside `JsonScanner` only."""


class JsonScanner:
    """Incremental scanner for a body that must be exactly one JSON object.

    It checks the grammar of the whole body but only reads the values of top-level `cost` and
    `error` keys. String contents are jumped over, never copied (except short keys and a `cost`
    string), so held memory stays at a few hundred bytes however large the body is. Contents of
    skipped strings are not validated.
    """

    def __init__(self) -> None:
        self._state = _START
        self._stack = bytearray()  # one opening bracket per nesting level
        self._invalid = False
        self._key = _OTHER  # meaning of the latest top-level key
        self._field = _OTHER  # meaning of the value being read (top-level values only)
        self._in_key = False
        self._escape_pending = False  # the previous chunk ended inside a string on a lone `\`
        self._token = bytearray()  # a captured key, cost or literal, at most 65 bytes
        self._capture = False
        self._number_state = 0
        self._error = False
        self._cost: int | None = None  # micros, _INVALID_COST, or None when absent

    def feed(self, chunk: bytes) -> None:
        if self._invalid or not chunk:
            return
        try:
            self._scan(chunk)
        except _Invalid:
            self._invalid = True
            self._stack.clear()
            self._token.clear()

    def finish(self, complete: bool = True) -> Outcome:
        if self._invalid or not complete or self._state != _DONE:
            return UNKNOWN
        # A top-level `cost` is charged whenever present, beside an error or not; one we cannot
        # read means the hold is charged. Only an `error` that is an object releases the hold.
        if self._cost is not None:
            return UNKNOWN if self._cost == _INVALID_COST else Outcome("cost", self._cost)
        if self._error:
            return ERROR
        return UNKNOWN

    def _scan(self, chunk: bytes) -> None:
        end = len(chunk)
        pos = 0
        if self._state >= _IN_STRING:  # finish the token the previous chunk cut
            pos = self._continue_token(chunk, 0)
            if pos < 0:
                return
        while True:
            if self._state == _AFTER_VALUE and self._stack[-1] == _LBRACKET:
                match = _ARRAY_SCALARS.match(chunk, pos)  # `[1, 2, 3...]` without a loop per value
                assert match is not None
                pos = match.end()
            match = _WS.match(chunk, pos)
            assert match is not None  # `*` always matches
            pos = match.end()
            if pos >= end:
                return
            byte = chunk[pos]
            state = self._state
            if state == _AFTER_VALUE:
                if byte == _COMMA:
                    self._state = _KEY if self._stack[-1] == _LBRACE else _VALUE
                    pos += 1
                else:
                    pos = self._close(byte, pos)
            elif state == _KEY or state == _KEY_OR_END:
                if byte == _QUOTE:
                    self._in_key = True
                    self._capture = len(self._stack) == 1
                    pos = self._start_token(_IN_STRING, chunk, pos + 1)
                elif byte == _RBRACE and state == _KEY_OR_END:
                    pos = self._close(byte, pos)
                else:
                    raise _Invalid
            elif state == _COLON_NEXT:
                if byte != _COLON:
                    raise _Invalid
                self._state = _VALUE
                pos += 1
            elif state == _VALUE_OR_END and byte == _RBRACKET:
                pos = self._close(byte, pos)
            elif state == _START:
                if byte != _LBRACE:
                    raise _Invalid
                self._open(byte)
                pos += 1
            elif state == _DONE:
                raise _Invalid  # trailing garbage after the object
            else:
                pos = self._value(chunk, pos, byte)
            if pos < 0:
                return

    def _open(self, byte: int) -> None:
        if len(self._stack) >= MAX_DEPTH:
            raise _Invalid
        self._stack.append(byte)
        self._state = _KEY_OR_END if byte == _LBRACE else _VALUE_OR_END

    def _close(self, byte: int, pos: int) -> int:
        if not self._stack or _OPENERS[self._stack[-1]] != byte:
            raise _Invalid
        self._stack.pop()
        self._state = _AFTER_VALUE if self._stack else _DONE
        return pos + 1

    def _value(self, chunk: bytes, pos: int, byte: int) -> int:
        """Start a value at `pos`; return where scanning resumes, or -1 if the chunk ran out."""
        field = self._key if len(self._stack) == 1 else _OTHER
        self._field = field
        if field == _ERROR:
            self._error = byte == _LBRACE  # the last `error` key counts, as in JSON.parse
        if byte == _QUOTE:
            self._in_key = False
            self._capture = field == _COST
            return self._start_token(_IN_STRING, chunk, pos + 1)
        if field == _COST and byte not in b"-0123456789":
            self._cost = _INVALID_COST
        if byte in _OPENERS:
            self._open(byte)
            return pos + 1
        if byte == ord("-") or 0x30 <= byte <= 0x39:
            self._capture = field == _COST
            self._number_state = 0
            return self._start_token(_IN_NUMBER, chunk, pos)
        if byte in b"tfn":
            return self._start_token(_IN_LITERAL, chunk, pos)
        raise _Invalid

    def _start_token(self, state: int, chunk: bytes, pos: int) -> int:
        self._state = state
        self._token.clear()
        return self._continue_token(chunk, pos)

    def _continue_token(self, chunk: bytes, pos: int) -> int:
        if self._state == _IN_STRING:
            pos = self._skip_string(chunk, pos)
            if pos >= 0:
                self._end_string()
            return pos
        if self._state == _IN_NUMBER:
            return self._skip_number(chunk, pos)
        return self._skip_literal(chunk, pos)

    def _keep(self, piece: bytes) -> None:
        """Append to the captured token, stopping one byte past the limit (= too long)."""
        room = MAX_TOKEN_BYTES + 1 - len(self._token)
        if self._capture and room > 0:
            self._token += piece[:room]

    def _skip_string(self, chunk: bytes, pos: int) -> int:
        """Jump to the closing quote; return the position after it, or -1 if the chunk ran out."""
        start = pos
        if self._escape_pending:  # the first byte is escaped by the previous chunk's `\`
            self._escape_pending = False
            pos += 1
        quote = chunk.find(b'"', pos)
        # Backslashes right before the quote are counted back to `pos` only: the byte before
        # `pos` is the opening quote or an escaped byte, never a pending `\`.
        if quote > pos and chunk[quote - 1] == _BACKSLASH and _odd_backslashes(chunk[pos:quote]):
            # An escaped quote: walk the rest of the chunk escape by escape, in C.
            match = _STRING_BODY.match(chunk, quote + 1)
            assert match is not None
            quote = match.end()
            if quote == len(chunk) or chunk[quote] == _BACKSLASH:
                self._escape_pending = quote < len(chunk)  # stopped on a lone trailing `\`
                quote = -1
        elif quote < 0 and chunk[-1] == _BACKSLASH:
            self._escape_pending = _odd_backslashes(chunk[pos:])
        if self._capture:
            stop = start + MAX_TOKEN_BYTES + 1
            self._keep(chunk[start : stop if quote < 0 else min(quote, stop)])
        return -1 if quote < 0 else quote + 1

    def _end_string(self) -> None:
        self._state = _COLON_NEXT if self._in_key else _AFTER_VALUE
        if not self._capture:
            return
        text = _decode_string(bytes(self._token)) if len(self._token) <= MAX_TOKEN_BYTES else ""
        if text is None:
            raise _Invalid  # a bad escape json.loads would refuse
        if self._in_key:
            self._key = _COST if text == "cost" else _ERROR if text == "error" else _OTHER
        elif self._field == _COST:
            self._cost = self._micros(cost_to_micros(text))

    def _skip_number(self, chunk: bytes, pos: int) -> int:
        match = _NUMBER_CHARS.match(chunk, pos)
        assert match is not None
        end = match.end()
        run = chunk[pos:end]
        if self._number_state == 0 and end < len(chunk):  # whole number in this chunk
            if not _NUMBER.fullmatch(run):
                raise _Invalid
            self._number_state = 2
        else:
            state = self._number_state
            for byte in run:
                next_state = _NUMBER_DFA[state].get(byte)
                if next_state is None:
                    raise _Invalid
                state = next_state
            self._number_state = state
        self._keep(run)
        if end == len(chunk):
            return -1
        if self._number_state not in _NUMBER_ACCEPTS:
            raise _Invalid
        self._state = _AFTER_VALUE
        if self._field == _COST:
            micros = None
            if len(self._token) <= MAX_TOKEN_BYTES:
                micros = usd_decimal_to_micros(decimal.Decimal(self._token.decode()))
            self._cost = self._micros(micros)
        return end

    def _skip_literal(self, chunk: bytes, pos: int) -> int:
        match = _LETTERS.match(chunk, pos)
        assert match is not None
        end = match.end()
        if len(self._token) + end - pos > 5:
            raise _Invalid
        self._token += chunk[pos:end]
        if end == len(chunk):
            return -1
        if bytes(self._token) not in (b"true", b"false", b"null"):
            raise _Invalid
        self._state = _AFTER_VALUE
        return end

    @staticmethod
    def _micros(micros: int | None) -> int:
        return _INVALID_COST if micros is None else micros
