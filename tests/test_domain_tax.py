"""Tax on tax-inclusive prices: treatments, their allowed rates, and the split into base + tax."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.domain.money import Money
from billing.domain.tax import ALLOWED_RATES, Tax, TaxError, TaxTreatment, split_inclusive, tax_of


@pytest.mark.parametrize(
    ("price_pesos", "treatment", "rate", "tax_pesos"),
    [
        (119_000, "iva", 19, 19_000),  # the example: 100,000 + 19 %
        (45_000, "iva", 19, 7_185),  # 7,184.87 -> 7,185
        (1_190, "iva", 19, 190),
        (1, "iva", 19, 0),  # 0.16 -> 0
        (3, "iva", 19, 0),  # 0.479 -> 0
        (4, "iva", 19, 1),  # 0.639 -> 1
        (105_000, "iva", 5, 5_000),
        (21, "iva", 5, 1),  # exactly 1.0
        (10, "iva", 5, 0),  # 0.476 -> 0
        (108_000, "inc", 8, 8_000),
        (27, "inc", 8, 2),  # exactly 2.0
        (81, "inc", 8, 6),  # exactly 6.0
        (45_000, "excluded", 0, 0),
        (45_000, "exempt", 0, 0),
    ],
)
def test_split_of_a_tax_inclusive_cop_price(price_pesos: int, treatment: str, rate: int, tax_pesos: int) -> None:
    split = split_inclusive(Money(price_pesos * 100, "COP"), tax_of(treatment, rate))
    assert split.tax == Money(tax_pesos * 100, "COP")
    assert split.base == Money((price_pesos - tax_pesos) * 100, "COP")


def test_half_up_at_exactly_half_a_peso() -> None:
    # Prices with centavos make exact halves reachable: 20.25 * 8 / 108 = 1.5 and 10.50 * 5 / 105 = 0.5
    # both round up (half up, not to even); 17.85 * 19 / 119 = 2.85 rounds to 3.
    assert split_inclusive(Money(2025, "COP"), tax_of("inc")).tax == Money(200, "COP")
    assert split_inclusive(Money(1050, "COP"), tax_of("iva", 5)).tax == Money(100, "COP")
    assert split_inclusive(Money(1785, "COP"), tax_of("iva")).tax == Money(300, "COP")


def test_defaults_and_wire_fields() -> None:
    assert tax_of("iva") == Tax(TaxTreatment.IVA, 19)
    assert tax_of("inc") == Tax(TaxTreatment.INC, 8)
    assert tax_of("excluded") == Tax(TaxTreatment.EXCLUDED, 0)
    assert tax_of("exempt").rate == 0
    assert [tax_of(t).wire_field for t in ("iva", "inc", "excluded", "exempt")] == [
        "taxAmount",
        "iacAmount",
        None,
        None,
    ]


@pytest.mark.parametrize("treatment", ["vat", "IVA ", "", None, 19, "ivA"])
def test_unknown_treatment_is_refused_by_name(treatment: object) -> None:
    with pytest.raises(TaxError, match="unknown tax treatment"):
        tax_of(treatment)


@pytest.mark.parametrize(
    ("treatment", "rate"),
    [("iva", 16), ("iva", 0), ("iva", 8), ("inc", 19), ("inc", 4), ("excluded", 19), ("exempt", 5),
     ("iva", "19"), ("iva", 19.0), ("iva", True)],
)  # fmt: skip
def test_rate_outside_the_allowed_values_is_refused(treatment: str, rate: object) -> None:
    with pytest.raises(TaxError, match="not allowed"):
        tax_of(treatment, rate)


def test_negative_price_is_refused() -> None:
    with pytest.raises(TaxError):
        split_inclusive(Money(-100, "COP"), tax_of("iva"))


taxes = st.sampled_from([Tax(t, r) for t, rates in ALLOWED_RATES.items() for r in rates])


@given(pesos=st.integers(min_value=0, max_value=10**13), tax=taxes)
def test_base_plus_tax_is_the_price_and_tax_is_nearest_whole_peso(pesos: int, tax: Tax) -> None:
    price = Money(pesos * 100, "COP")
    split = split_inclusive(price, tax)
    assert split.base + split.tax == price
    assert split.tax.amount_minor % 100 == 0 and split.tax.amount_minor >= 0
    exact = Fraction(pesos * tax.rate, 100 + tax.rate)
    tax_pesos = Fraction(split.tax.amount_minor, 100)
    # Half up: within half a peso of the exact tax, and an exact half goes up.
    assert -Fraction(1, 2) < tax_pesos - exact <= Fraction(1, 2)


@given(minor=st.integers(min_value=0, max_value=10**15), tax=taxes)
def test_split_holds_for_amounts_with_cents(minor: int, tax: Tax) -> None:
    split = split_inclusive(Money(minor, "USD"), tax)
    assert split.base.amount_minor + split.tax.amount_minor == minor
    assert split.base.amount_minor >= 0
