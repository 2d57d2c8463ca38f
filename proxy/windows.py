"""Spend-limit windows, as ImageRouter resets them: 00:00 UTC today, on ISO Monday, on the 1st.

Window starts are computed here in Python from one clock and passed to Lua as integer
milliseconds; no reset job exists, so no reset can be missed.
"""

from __future__ import annotations

import datetime as dt
import functools
import math

from proxy.types import Period

UTC = dt.UTC


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=UTC)


def window_start(period: Period | None, now_s: float) -> dt.datetime | None:
    """Start of the window containing `now_s`, or None for a lifetime cap."""
    if period is None:
        return None
    # Windows start on whole UTC days, so the whole second decides them exactly: cache on it
    # (this runs for several scopes on every guarded call).
    return _window_start(period, math.floor(now_s))


@functools.lru_cache(maxsize=256)
def _window_start(period: Period, second: int) -> dt.datetime:
    today = dt.datetime.fromtimestamp(second, UTC).date()
    if period == "day":
        return _midnight(today)
    if period == "week":
        return _midnight(today - dt.timedelta(days=today.weekday()))
    if period == "month":
        return _midnight(today.replace(day=1))
    raise ValueError(f"unknown period {period!r}")


def window_end(period: Period | None, now_s: float) -> dt.datetime | None:
    """First instant of the next window (when the current one resets), or None for lifetime."""
    start = window_start(period, now_s)
    if start is None:
        return None
    if period == "day":
        return start + dt.timedelta(days=1)
    if period == "week":
        return start + dt.timedelta(days=7)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


def to_ms(moment: dt.datetime) -> int:
    return (moment - EPOCH) // dt.timedelta(milliseconds=1)


def window_start_ms(period: Period | None, now_s: float) -> int:
    """Window start in epoch milliseconds; 0 for a lifetime cap (everything counts)."""
    return 0 if period is None else _window_start_ms(period, math.floor(now_s))


@functools.lru_cache(maxsize=256)
def _window_start_ms(period: Period, second: int) -> int:
    return to_ms(_window_start(period, second))


def window_starts_ms(now_s: float) -> tuple[int, int, int]:
    """The day, week and month window starts in epoch milliseconds, in that order, as the store's
    reserve and levels scripts take them."""
    return window_start_ms("day", now_s), window_start_ms("week", now_s), window_start_ms("month", now_s)


def parse_timestamp_ms(value: object) -> int | None:
    """ImageRouter timestamps (ISO 8601, `Z` or offset; naive means UTC) -> epoch ms; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected an ISO 8601 timestamp, got {value!r}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    moment = dt.datetime.fromisoformat(text.replace(" ", "T", 1))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return to_ms(moment)


def format_ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
