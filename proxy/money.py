"""Money at the edges: ImageRouter's USD strings and policy amounts <-> integer micro-dollars.

Below the HTTP edge every amount is an `int` count of micro-dollars (`cost_micros`), so Redis and
Lua never see a float and `"25.5000"` converts exactly to 25_500_000.
"""

from __future__ import annotations

import decimal
import functools
import math
import re

MICROS_PER_USD = 1_000_000
# Plain decimal notation only (surrounding white space aside): "1e3", "0x10", "inf" are refused
# rather than guessed at.
_USD_RE = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")
# 10^15 micro-dollars = one billion dollars; anything larger is a corrupt figure, not a balance.
MAX_ABS_MICROS = 10**15
# The most one call may hold or be charged: $1,000,000. A larger hold is refused (403); a larger
# cost reported by the upstream is a corrupt figure, charged as this much and logged. With every
# scope limit at most MAX_ABS_MICROS, sums stay far below 2^53, where Lua's doubles stop being exact.
MAX_CALL_MICROS = 10**12


# Exact arithmetic for any input we accept: the default context rounds at 28 digits.
_EXACT = decimal.Context(prec=80, traps=[decimal.Inexact, decimal.InvalidOperation])
MAX_TEXT_LEN = 40


class MoneyError(ValueError):
    """A money value that does not convert exactly to micro-dollars."""


def _to_decimal(value: object) -> decimal.Decimal:
    if isinstance(value, bool):
        raise MoneyError(f"expected a USD amount, got {value!r}")
    if isinstance(value, int):
        return decimal.Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MoneyError(f"expected a finite USD amount, got {value!r}")
        # repr() is the shortest string that round-trips: 0.07 -> "0.07", not 0.07000000000000000666.
        return decimal.Decimal(repr(value))
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise MoneyError(f"expected a finite USD amount, got {value!r}")
        return value
    if isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_TEXT_LEN or not _USD_RE.match(text):
            raise MoneyError(f"not a plain decimal USD amount: {value!r}")
        return decimal.Decimal(text)
    raise MoneyError(f"expected a USD amount, got {type(value).__name__} {value!r}")


def _scale(value: object) -> decimal.Decimal:
    amount = _to_decimal(value)
    if amount.adjusted() > 15:
        raise MoneyError(f"USD amount {value!r} is out of range")
    try:
        return _EXACT.multiply(amount, decimal.Decimal(MICROS_PER_USD))
    except decimal.DecimalException as exc:
        raise MoneyError(f"USD amount {value!r} cannot be converted exactly") from exc


def usd_to_micros(value: object, *, allow_negative: bool = False) -> int:
    """Convert a USD amount (string, int, float or Decimal) to micro-dollars, exactly.

    Raises `MoneyError` for non-decimal notation, more than six decimals, negative amounts (unless
    `allow_negative`) and magnitudes above a billion dollars.
    """
    amount = _scale(value)
    if amount != amount.to_integral_value():
        raise MoneyError(f"USD amount {value!r} has more than 6 decimals")
    micros = int(amount)
    if micros < 0 and not allow_negative:
        raise MoneyError(f"USD amount {value!r} is negative")
    if abs(micros) > MAX_ABS_MICROS:
        raise MoneyError(f"USD amount {value!r} is out of range")
    return micros


def usd_to_micros_ceil(value: object, *, quantum_micros: int = 100) -> int:
    """Convert a price to micro-dollars rounded **up** to `quantum_micros` (default $0.0001).

    Used for holds: ImageRouter rounds charges up to 1/10,000 USD, so a hold rounded up the same
    way is never below what the upstream pre-charges for the same price.
    """
    amount = _scale(value)
    if amount < 0:
        raise MoneyError(f"price {value!r} is negative")
    micros = int(amount.to_integral_value(rounding=decimal.ROUND_CEILING))
    micros = -(-micros // quantum_micros) * quantum_micros
    if micros > MAX_ABS_MICROS:
        raise MoneyError(f"price {value!r} is out of range")
    return micros


@functools.lru_cache(maxsize=4096)  # the same few amounts (holds, prices) come back call after call
def format_usd(micros: int) -> str:
    """`1_234_500` -> `"1.2345"`: at least four decimals, as ImageRouter prints money."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    text = f"{frac:06d}".rstrip("0").ljust(4, "0")
    return f"{sign}{whole}.{text}"
