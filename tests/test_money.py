"""USD strings and numbers <-> integer micro-dollars: exact, or refused."""

from __future__ import annotations

import decimal

import pytest

from proxy.money import (
    MAX_ABS_MICROS,
    MoneyError,
    format_usd,
    usd_to_micros,
    usd_to_micros_ceil,
)


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        ("0.0001", 100),
        ("30", 30_000_000),
        ("25.5000", 25_500_000),
        ("0", 0),
        ("0.000001", 1),
        ("1.", 1_000_000),
        (".5", 500_000),
        ("1000000000", MAX_ABS_MICROS),  # exactly a billion dollars is the largest accepted
        (7, 7_000_000),
        (0.07, 70_000),
        (0.3, 300_000),
        (decimal.Decimal("1.234567"), 1_234_567),
    ],
)
def test_usd_to_micros_converts_exactly(value, micros):
    assert usd_to_micros(value) == micros
    assert isinstance(usd_to_micros(value), int)


@pytest.mark.parametrize(
    "value",
    [
        "1e3",
        "1E3",
        "0x10",
        "inf",
        "nan",
        "Infinity",
        "",
        "-",
        ".",
        "1,5",
        "$1",
        "1 000",
        None,
        True,
        False,
        [1],
        {"usd": 1},
        float("inf"),
        float("nan"),
        decimal.Decimal("NaN"),
        decimal.Decimal("Infinity"),
    ],
)
def test_usd_to_micros_rejects_non_decimal_notation(value):
    with pytest.raises(MoneyError):
        usd_to_micros(value)


@pytest.mark.parametrize("value", ["0.0000001", "1.1234567", 1e-7, decimal.Decimal("0.0000005")])
def test_usd_to_micros_rejects_more_than_six_decimals(value):
    with pytest.raises(MoneyError, match="more than 6 decimals"):
        usd_to_micros(value)


def test_trailing_zeros_beyond_six_decimals_are_exact_and_accepted():
    assert usd_to_micros("1.50000000") == 1_500_000


@pytest.mark.parametrize("value", ["-0.0001", "-30", -1, -0.5])
def test_negatives_are_rejected_unless_allowed(value):
    with pytest.raises(MoneyError, match="negative"):
        usd_to_micros(value)
    assert usd_to_micros(value, allow_negative=True) < 0


def test_allow_negative_converts_exactly():
    assert usd_to_micros("-5.2500", allow_negative=True) == -5_250_000
    assert usd_to_micros("-0", allow_negative=False) == 0


@pytest.mark.parametrize("value", ["1000000000.000001", "99999999999", 10**10, 1e300, "-1000000000.000001"])
def test_huge_values_are_rejected(value):
    with pytest.raises(MoneyError):
        usd_to_micros(value, allow_negative=True)


@pytest.mark.parametrize("value", ["0.99999999999999999999999999999", "1.00000000000000000000000000001"])
def test_more_than_six_decimals_is_rejected_even_past_28_significant_digits(value):
    # the default decimal context would round these to a whole micro-dollar
    with pytest.raises(MoneyError):
        usd_to_micros(value)


def test_overlong_or_huge_exponent_values_are_rejected():
    for value in ["1" + "0" * 60, "0." + "0" * 60 + "1", decimal.Decimal("1E+400"), decimal.Decimal("1E-400"), 10**400]:
        with pytest.raises(MoneyError):
            usd_to_micros(value)


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        ("0.3", 300_000),
        ("0.0001", 100),
        ("0.00001", 100),  # below one tick rounds up to one tick
        ("0.00010001", 200),
        ("0.039", 39_000),
        ("0", 0),
        (0.07, 70_000),
        (decimal.Decimal("1.23456"), 1_234_600),
        (3, 3_000_000),
    ],
)
def test_usd_to_micros_ceil_rounds_up_to_a_ten_thousandth(value, micros):
    assert usd_to_micros_ceil(value) == micros


def test_usd_to_micros_ceil_honours_the_quantum():
    assert usd_to_micros_ceil("0.0000011", quantum_micros=1) == 2
    assert usd_to_micros_ceil("0.011", quantum_micros=10_000) == 20_000


@pytest.mark.parametrize("value", ["-0.01", "1e3", None, True, "1000000000.0001"])
def test_usd_to_micros_ceil_rejects_bad_prices(value):
    with pytest.raises(MoneyError):
        usd_to_micros_ceil(value)


def test_usd_to_micros_ceil_never_rounds_below_the_price():
    assert usd_to_micros_ceil("0.00010000000000000000000000000001") == 200


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "0.0000"),
        (100, "0.0001"),
        (500, "0.0005"),
        (1_234_500, "1.2345"),
        (1_234_567, "1.234567"),
        (1_230_000, "1.2300"),
        (30_000_000, "30.0000"),
        (-100, "-0.0001"),
        (-5_250_000, "-5.2500"),
    ],
)
def test_format_usd_prints_at_least_four_decimals(micros, text):
    assert format_usd(micros) == text


@pytest.mark.parametrize("micros", [0, 1, 99, 100, 1_234_567, 25_500_000, -70_100, MAX_ABS_MICROS])
def test_format_usd_round_trips(micros):
    assert usd_to_micros(format_usd(micros), allow_negative=True) == micros
