"""A JSON value read as a number the way JavaScript's `Number()` reads it.

ImageRouter runs on Node.js: where it turns a request field into a number it gets what
`Number(value)` gives (zod's `z.coerce.number()` calls it too). The guard reads the numbers a
hold rests on the same way, so the two never disagree on what a request asks for:

- a number is itself (JSON.parse makes every number a double: an integer past 2^53 rounds, one
  past a double's range is Infinity);
- `true` is 1, `false` and `null` are 0;
- a string loses the whitespace JavaScript strips (not Python's: no U+001C-U+001F, no U+0085),
  and is then 0 if empty, `0x`/`0o`/`0b` digits (no sign), or a decimal literal with an optional
  sign, fraction and exponent, or `Infinity`; anything else (`"1_000"`, `"inf"`, `"-0x1"`,
  full-width digits) is NaN;
- an array is its elements joined with commas (null as empty), then read as a string: `[5]` is 5,
  `[]` is 0, `[1, 2]` is NaN;
- an object is NaN.
"""

from __future__ import annotations

import math
import re

NAN = math.nan
# StrWhiteSpaceChar: WhiteSpace (TAB, VT, FF, ZWNBSP, the Zs category) and LineTerminator.
JS_WHITESPACE = (
    "\t\n\v\f\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
_DECIMAL = re.compile(r"[+-]?(?:Infinity|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)")
_NON_DECIMAL = re.compile(r"0(?:[xX][0-9a-fA-F]+|[oO][0-7]+|[bB][01]+)")
_RADIX = {"x": 16, "o": 8, "b": 2}


def js_number(value: object) -> float:
    """`Number(value)` for a value as Python's json module parsed it (NaN: not a number)."""
    if value is None or isinstance(value, bool):
        return float(bool(value))
    if isinstance(value, (int, float)):
        return _double(value)
    if isinstance(value, str):
        return _from_string(value)
    if isinstance(value, list):
        try:
            text = _joined(value)
        except RecursionError:
            return NAN
        return NAN if text is None else _from_string(text)
    return NAN


def _double(value: int | float) -> float:
    """The double JSON.parse makes of a number literal (Python keeps integers exact)."""
    try:
        return float(value)
    except OverflowError:  # an integer past a double's range
        return math.inf if value > 0 else -math.inf


def _from_string(text: str) -> float:
    text = text.strip(JS_WHITESPACE)
    if not text:
        return 0.0
    if _NON_DECIMAL.fullmatch(text):
        return _double(int(text[2:], _RADIX[text[1].lower()]))
    if _DECIMAL.fullmatch(text):
        return float(text.replace("Infinity", "inf"))
    return NAN


def _joined(items: list[object]) -> str | None:
    """Array.prototype.join(",") of JSON values, or None where an element is an object (whose
    string is "[object Object]", or a TypeError: either way no number)."""
    parts: list[str] = []
    for item in items:
        if item is None:
            parts.append("")
        elif isinstance(item, bool):
            parts.append("true" if item else "false")
        elif isinstance(item, (int, float)):
            parts.append(_number_text(_double(item)))
        elif isinstance(item, str):
            parts.append(item)
        elif isinstance(item, list):
            inner = _joined(item)
            if inner is None:
                return None
            parts.append(inner)
        else:
            return None
    return ",".join(parts)


def _number_text(number: float) -> str:
    """A double as text that `_from_string` reads back to the same value (as String() would)."""
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return "0" if number == 0 else repr(number)
