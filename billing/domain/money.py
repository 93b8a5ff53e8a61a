"""Exact money: integer minor units with their currency. Never float."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

CURRENCY_EXPONENTS: dict[str, int] = {"COP": 2, "USD": 2}

# Amounts of 10**30 major units or more are garbage, not money.
_MAX_MAJOR_DIGITS = 30
# Plain ASCII decimal notation with an optional exponent. Decimal() alone would also accept
# "1_000", "NaN", "Infinity" and non-ASCII digits, none of which a gateway amount should be.
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class MoneyError(ValueError):
    """Raised when an amount or a currency is malformed, inexact, or mixes currencies."""


def _exponent(currency: object) -> int:
    if not isinstance(currency, str):
        raise MoneyError(f"currency must be a str, got {type(currency).__name__}")
    try:
        return CURRENCY_EXPONENTS[currency]
    except KeyError:
        known = ", ".join(sorted(CURRENCY_EXPONENTS))
        raise MoneyError(f"unknown currency {currency!r}; expected one of {known}") from None


def parse_decimal(value: object) -> Decimal:
    """Exact `Decimal` from a gateway amount such as "4500.00", an int or a Decimal.

    Floats, bools, NaN, infinities and anything that is not plain decimal notation raise
    `MoneyError`.
    """
    if isinstance(value, bool | float):
        raise MoneyError(f"amounts must not be {type(value).__name__}: got {value!r}")
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise MoneyError(f"amount must be a finite number, got {value!r}")
        return value
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, str):
        text = value.strip()
        if not _DECIMAL_TEXT.fullmatch(text):
            raise MoneyError(f"not a decimal amount: {value!r}")
        try:
            return Decimal(text)
        except InvalidOperation:  # pragma: no cover - the pattern admits only valid literals
            raise MoneyError(f"not a decimal amount: {value!r}") from None
    raise MoneyError(f"amount must be a str, int or Decimal, got {type(value).__name__}")


@dataclass(frozen=True)
class Money:
    """An exact amount: `amount_minor` units of the currency's smallest unit (cents for COP and USD)."""

    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        if isinstance(self.amount_minor, bool) or not isinstance(self.amount_minor, int):
            raise MoneyError(
                f"amount_minor must be an int (minor units), got {type(self.amount_minor).__name__} "
                f"{self.amount_minor!r}"
            )
        _exponent(self.currency)

    @classmethod
    def from_major(cls, amount: Decimal | str | int, currency: str) -> Money:
        """Money from an amount in major units ("4500.00" COP), exactly.

        Raises `MoneyError` for floats and for amounts finer than the currency's minor unit
        ("0.001" USD); trailing zeros beyond the exponent ("4500.000") are exact and accepted.
        """
        exponent = _exponent(currency)
        value = parse_decimal(amount)
        if value.is_zero():
            return cls(0, currency)
        if value.adjusted() >= _MAX_MAJOR_DIGITS:
            # also keeps "1e999999999" from building a billion-digit integer
            raise MoneyError(f"{amount!r} is too large for an amount of money")
        sign, digits, value_exponent = value.as_tuple()
        assert isinstance(value_exponent, int)  # parse_decimal admits finite values only
        text = "".join(map(str, digits))
        shift = value_exponent + exponent
        if shift < 0:
            text, dropped = text[:shift], text[shift:]
            if dropped.strip("0"):
                raise MoneyError(f"{amount!r} has more than {exponent} decimal places, the precision of {currency}")
            shift = 0
        minor = int(text or "0") * 10**shift
        return cls(-minor if sign else minor, currency)

    @property
    def exponent(self) -> int:
        """Decimal places of the currency's minor unit."""
        return CURRENCY_EXPONENTS[self.currency]

    @property
    def major(self) -> Decimal:
        """The amount in major units with exactly `exponent` decimal places."""
        # Built from the digit tuple, so no Decimal context can round a very large amount.
        sign, digits, _ = Decimal(self.amount_minor).as_tuple()
        return Decimal((sign, digits, -self.exponent))

    def _same_currency(self, other: Money, operation: str) -> None:
        if other.currency != self.currency:
            raise MoneyError(f"cannot {operation} {self.currency} and {other.currency}: currencies differ")

    def __add__(self, other: Money) -> Money:
        if not isinstance(other, Money):
            return NotImplemented
        self._same_currency(other, "add")
        return Money(self.amount_minor + other.amount_minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        if not isinstance(other, Money):
            return NotImplemented
        self._same_currency(other, "subtract")
        return Money(self.amount_minor - other.amount_minor, self.currency)

    def __str__(self) -> str:
        return f"{self.major:f} {self.currency}"
