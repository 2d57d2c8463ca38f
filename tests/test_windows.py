"""Spend-limit windows at their exact boundaries, and ImageRouter timestamps."""

from __future__ import annotations

import datetime as dt

import pytest

from proxy.windows import (
    parse_timestamp_ms,
    to_ms,
    window_end,
    window_start,
    window_start_ms,
)

UTC = dt.UTC
MS = dt.timedelta(milliseconds=1)


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, ms: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, second, ms * 1000, tzinfo=UTC).timestamp()


def midnight(year: int, month: int, day: int) -> dt.datetime:
    return dt.datetime(year, month, day, tzinfo=UTC)


def last_ms(year: int, month: int, day: int) -> float:
    return at(year, month, day, 23, 59, 59, 999)


# (instant, period, expected start, expected end)
CASES = [
    # Sunday 23:59:59.999 still belongs to the week that began on the previous Monday ...
    (last_ms(2026, 3, 8), "week", midnight(2026, 3, 2), midnight(2026, 3, 9)),
    # ... and Monday 00:00:00.000 opens a new one.
    (at(2026, 3, 9), "week", midnight(2026, 3, 9), midnight(2026, 3, 16)),
    (last_ms(2026, 3, 8), "day", midnight(2026, 3, 8), midnight(2026, 3, 9)),
    (at(2026, 3, 9), "day", midnight(2026, 3, 9), midnight(2026, 3, 10)),
    # Last millisecond of a 31-day month, then the 1st.
    (last_ms(2026, 1, 31), "month", midnight(2026, 1, 1), midnight(2026, 2, 1)),
    (at(2026, 2, 1), "month", midnight(2026, 2, 1), midnight(2026, 3, 1)),
    (last_ms(2026, 1, 31), "day", midnight(2026, 1, 31), midnight(2026, 2, 1)),
    (at(2026, 2, 1), "day", midnight(2026, 2, 1), midnight(2026, 2, 2)),
    # 29 February 2028 (a Tuesday in a leap year).
    (at(2028, 2, 29, 12), "day", midnight(2028, 2, 29), midnight(2028, 3, 1)),
    (last_ms(2028, 2, 29), "day", midnight(2028, 2, 29), midnight(2028, 3, 1)),
    (at(2028, 2, 29, 12), "week", midnight(2028, 2, 28), midnight(2028, 3, 6)),
    (at(2028, 2, 29, 12), "month", midnight(2028, 2, 1), midnight(2028, 3, 1)),
    (last_ms(2028, 2, 29), "month", midnight(2028, 2, 1), midnight(2028, 3, 1)),
    (at(2028, 3, 1), "month", midnight(2028, 3, 1), midnight(2028, 4, 1)),
    # Year rollover: 31 December 23:59:59.999 -> 1 January.
    (last_ms(2026, 12, 31), "month", midnight(2026, 12, 1), midnight(2027, 1, 1)),
    (at(2027, 1, 1), "month", midnight(2027, 1, 1), midnight(2027, 2, 1)),
    (last_ms(2026, 12, 31), "day", midnight(2026, 12, 31), midnight(2027, 1, 1)),
    (at(2027, 1, 1), "day", midnight(2027, 1, 1), midnight(2027, 1, 2)),
    # An ISO week spanning two years: Thursday 31 Dec 2026 and Friday 1 Jan 2027 share a week.
    (last_ms(2026, 12, 31), "week", midnight(2026, 12, 28), midnight(2027, 1, 4)),
    (at(2027, 1, 1), "week", midnight(2026, 12, 28), midnight(2027, 1, 4)),
    # Sunday 31 Dec 2028 ends a week; Monday 1 Jan 2029 starts week, month and year together.
    (last_ms(2028, 12, 31), "week", midnight(2028, 12, 25), midnight(2029, 1, 1)),
    (at(2029, 1, 1), "week", midnight(2029, 1, 1), midnight(2029, 1, 8)),
    (at(2029, 1, 1), "month", midnight(2029, 1, 1), midnight(2029, 2, 1)),
]


@pytest.mark.parametrize(("now_s", "period", "start", "end"), CASES)
def test_window_start_and_end_at_boundaries(now_s, period, start, end):
    assert window_start(period, now_s) == start
    assert window_end(period, now_s) == end
    assert window_start_ms(period, now_s) == to_ms(start)
    assert start.timestamp() <= now_s < end.timestamp()


def test_the_test_dates_fall_on_the_weekdays_the_cases_assume():
    assert dt.date(2026, 3, 8).isoweekday() == 7
    assert dt.date(2026, 12, 31).isoweekday() == 4
    assert dt.date(2028, 12, 31).isoweekday() == 7
    assert dt.date(2028, 2, 29).isoweekday() == 2


@pytest.mark.parametrize("period", ["day", "week", "month"])
def test_one_millisecond_before_a_window_end_is_still_inside(period):
    now = at(2026, 6, 15, 9, 30)
    end = window_end(period, now)
    assert end is not None
    before = (end - MS).timestamp()
    assert window_start(period, before) == window_start(period, now)
    assert window_start(period, end.timestamp()) == end


def test_lifetime_has_no_window():
    now = at(2026, 6, 15)
    assert window_start(None, now) is None
    assert window_end(None, now) is None
    assert window_start_ms(None, now) == 0


def test_unknown_period_is_an_error():
    with pytest.raises(ValueError):
        window_start("year", at(2026, 1, 1))  # type: ignore[arg-type]


def test_window_start_ms_is_epoch_milliseconds():
    assert window_start_ms("day", at(1970, 1, 1, 12)) == 0
    assert window_start_ms("day", at(2026, 1, 1, 23, 59, 59, 999)) == 1_767_225_600_000


JAN1_2026_MS = 1_767_225_600_000


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2026-01-01T00:00:00.000Z", JAN1_2026_MS),
        ("2026-01-01T00:00:00Z", JAN1_2026_MS),
        ("2026-01-01T00:00:00z", JAN1_2026_MS),
        ("2026-01-01T00:00:00+00:00", JAN1_2026_MS),
        ("2026-01-01T02:00:00+02:00", JAN1_2026_MS),
        ("2025-12-31T19:00:00-05:00", JAN1_2026_MS),
        ("2026-01-01T05:30:00.250+05:30", JAN1_2026_MS + 250),
        ("2026-01-01T00:00:00", JAN1_2026_MS),  # naive means UTC
        ("2026-01-01 00:00:00", JAN1_2026_MS),
        ("2026-01-01T00:00:00.5Z", JAN1_2026_MS + 500),
        ("2026-01-01T00:00:00.123Z", JAN1_2026_MS + 123),
        ("2026-01-01T00:00:00.123999Z", JAN1_2026_MS + 123),  # sub-ms truncated, never rounded up
        ("  2026-01-01T00:00:01Z  ", JAN1_2026_MS + 1000),
    ],
)
def test_parse_timestamp_ms(text, ms):
    assert parse_timestamp_ms(text) == ms


def test_parse_timestamp_ms_keeps_none():
    assert parse_timestamp_ms(None) is None


@pytest.mark.parametrize(
    "value",
    ["garbage", "", "   ", "2026-13-01T00:00:00Z", "2026-01-32", "yesterday", "12:00", 1767225600, 1.5, True, []],
)
def test_parse_timestamp_ms_rejects_garbage(value):
    with pytest.raises(ValueError):
        parse_timestamp_ms(value)
