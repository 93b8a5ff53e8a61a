"""Money is exact: integer minor units with a currency, never float."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.domain.money import CURRENCY_EXPONENTS, Money, MoneyError, parse_decimal

currencies = st.sampled_from(sorted(CURRENCY_EXPONENTS))


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        ("4500.00", "COP", 450000),
        ("4500", "COP", 450000),
        (4500, "COP", 450000),
        (Decimal("4500.5"), "COP", 450050),
        ("0.01", "USD", 1),
        ("0", "USD", 0),
        ("-3.5", "USD", -350),
        (" 12.30 ", "USD", 1230),
        ("4500.000", "COP", 450000),  # trailing zeros are still exact
        ("1e3", "COP", 100000),
        ("1234567890123456789012345.67", "COP", 123456789012345678901234567),
    ],
)
def test_from_major_converts_exactly_to_minor_units(amount: Decimal | str | int, currency: str, minor: int) -> None:
    assert Money.from_major(amount, currency) == Money(minor, currency)


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (1.5, "float"),
        (True, "bool"),
        ("0.001", "more than 2 decimal places"),
        ("4500.005", "more than 2 decimal places"),
        ("1e-999999999", "more than 2 decimal places"),
        ("1e40", "too large"),
        ("NaN", "not a decimal amount"),
        ("inf", "not a decimal amount"),
        (Decimal("NaN"), "finite"),
        (Decimal("-Infinity"), "finite"),
        ("1_000", "not a decimal amount"),
        ("4,500.00", "not a decimal amount"),
        ("", "not a decimal amount"),
        ("\u0664\u0665", "not a decimal amount"),  # non-ASCII digits
        (None, "str, int or Decimal"),
    ],
)
def test_from_major_rejects_floats_and_inexact_or_malformed_amounts(amount: object, message: str) -> None:
    with pytest.raises(MoneyError, match=message):
        Money.from_major(amount, "COP")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("amount_minor", "currency", "message"),
    [
        (1.0, "COP", "amount_minor must be an int"),
        (True, "COP", "amount_minor must be an int"),
        (Decimal(1), "COP", "amount_minor must be an int"),
        ("100", "COP", "amount_minor must be an int"),
        (100, "EUR", "unknown currency 'EUR'"),
        (100, "cop", "unknown currency 'cop'"),
        (100, "", "unknown currency ''"),
        (100, None, "currency must be a str"),
    ],
)
def test_money_rejects_non_integer_amounts_and_unknown_currencies(
    amount_minor: object, currency: object, message: str
) -> None:
    with pytest.raises(MoneyError, match=message):
        Money(amount_minor, currency)  # type: ignore[arg-type]


def test_money_error_is_a_value_error() -> None:
    assert issubclass(MoneyError, ValueError)


@pytest.mark.parametrize(
    ("money", "major", "text"),
    [
        (Money(450000, "COP"), Decimal("4500.00"), "4500.00 COP"),
        (Money(0, "USD"), Decimal("0.00"), "0.00 USD"),
        (Money(5, "USD"), Decimal("0.05"), "0.05 USD"),
        (Money(-5, "USD"), Decimal("-0.05"), "-0.05 USD"),
        (Money(10**40, "USD"), Decimal("1" + "0" * 38 + ".00"), "1" + "0" * 38 + ".00 USD"),
    ],
)
def test_major_and_str_show_exactly_the_currency_exponent(money: Money, major: Decimal, text: str) -> None:
    assert money.major == major
    assert money.major.as_tuple().exponent == -2
    assert str(money) == text


def test_money_of_the_same_currency_adds_and_subtracts() -> None:
    assert Money(450000, "COP") + Money(50, "COP") == Money(450050, "COP")
    assert Money(450000, "COP") - Money(50, "COP") == Money(449950, "COP")


def test_adding_or_subtracting_different_currencies_raises() -> None:
    with pytest.raises(MoneyError, match="currencies differ"):
        Money(1, "COP") + Money(1, "USD")
    with pytest.raises(MoneyError, match="currencies differ"):
        Money(1, "COP") - Money(1, "USD")


def test_adding_a_number_to_money_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Money(1, "COP") + 1  # type: ignore[operator]


def test_money_is_frozen_and_hashable() -> None:
    money = Money(1, "COP")
    with pytest.raises(AttributeError):
        money.amount_minor = 2  # type: ignore[misc]
    assert {money, Money(1, "COP")} == {money}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4500.00", Decimal("4500.00")),
        ("4500", Decimal("4500")),
        (" 4500.00\n", Decimal("4500.00")),
        ("-0.5", Decimal("-0.5")),
        (4500, Decimal(4500)),
        (Decimal("1.10"), Decimal("1.10")),
    ],
)
def test_parse_decimal_reads_gateway_amounts_exactly(value: object, expected: Decimal) -> None:
    parsed = parse_decimal(value)
    assert parsed == expected
    assert str(parsed) == str(expected)


@pytest.mark.parametrize(
    "value",
    [4500.0, float("nan"), True, "NaN", "sNaN", "Infinity", "-inf", "abc", "", None, [], b"4500"],
)
def test_parse_decimal_rejects_floats_non_finite_and_garbage(value: object) -> None:
    with pytest.raises(MoneyError):
        parse_decimal(value)


@given(amount_minor=st.integers(min_value=-(10**30), max_value=10**30), currency=currencies)
def test_money_round_trips_through_major_units(amount_minor: int, currency: str) -> None:
    money = Money(amount_minor, currency)
    assert Money.from_major(money.major, currency) == money
    assert Money.from_major(str(money.major), currency) == money
    assert Money.from_major(str(money).split()[0], currency) == money


@given(a=st.integers(-(10**20), 10**20), b=st.integers(-(10**20), 10**20), currency=currencies)
def test_money_arithmetic_matches_integer_arithmetic(a: int, b: int, currency: str) -> None:
    assert (Money(a, currency) + Money(b, currency)).amount_minor == a + b
    assert (Money(a, currency) - Money(b, currency)).amount_minor == a - b
    assert (Money(a, currency) + Money(b, currency)).major == Money(a, currency).major + Money(b, currency).major


@given(value=st.decimals(allow_nan=False, allow_infinity=False, places=6, min_value=-(10**9), max_value=10**9))
def test_from_major_accepts_exactly_the_amounts_a_cent_can_express(value: Decimal) -> None:
    exact = value == value.quantize(Decimal("0.01"))
    if exact:
        assert Money.from_major(value, "USD").major == value
    else:
        with pytest.raises(MoneyError, match="decimal places"):
            Money.from_major(value, "USD")
