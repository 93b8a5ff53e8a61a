"""Colombian tax on a plan's price: which treatment, at which rate, and how a tax-inclusive price splits.

Colombian consumer prices include their tax, so a plan's amount is what the customer pays; the tax is the
part of it that Tpaga must be told about, in `taxAmount` (IVA) or `iacAmount` (INC, the consumption tax),
in whole pesos rounded half up. Pure functions only: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from billing.domain.money import CURRENCY_EXPONENTS, Money


class TaxTreatment(StrEnum):
    """How a plan's price is taxed. `excluded` (outside IVA, e.g. cloud computing) and `exempt` (taxed at 0 %)
    both send no tax; they differ in the merchant's books, not on the wire."""

    IVA = "iva"
    INC = "inc"
    EXCLUDED = "excluded"
    EXEMPT = "exempt"


# Rates in whole percent: the first is the default. IVA is 19 % in general and 5 % for some goods; INC is 8 %.
ALLOWED_RATES: dict[TaxTreatment, tuple[int, ...]] = {
    TaxTreatment.IVA: (19, 5),
    TaxTreatment.INC: (8,),
    TaxTreatment.EXCLUDED: (0,),
    TaxTreatment.EXEMPT: (0,),
}


# The charge field of Tpaga's API that carries each taxed treatment; the others send no tax.
WIRE_FIELDS: dict[TaxTreatment, str] = {TaxTreatment.IVA: "taxAmount", TaxTreatment.INC: "iacAmount"}


class TaxError(ValueError):
    """An unknown treatment or a rate the treatment does not allow."""


@dataclass(frozen=True)
class Tax:
    """A treatment and its rate in whole percent, always a valid pair (see `tax_of`)."""

    treatment: TaxTreatment
    rate: int

    @property
    def wire_field(self) -> str | None:
        """The charge field that carries this tax at Tpaga, or None when nothing is sent."""
        return WIRE_FIELDS.get(self.treatment)


EXCLUDED = Tax(TaxTreatment.EXCLUDED, 0)


def tax_of(treatment: object, rate: object = None) -> Tax:
    """The Tax for a treatment name and an optional rate (None: the treatment's default). Raises TaxError."""
    try:
        kind = TaxTreatment(treatment) if isinstance(treatment, str) else None
    except ValueError:
        kind = None
    if kind is None:
        names = ", ".join(t.value for t in TaxTreatment)
        raise TaxError(f"unknown tax treatment {treatment!r}; expected one of {names}")
    allowed = ALLOWED_RATES[kind]
    if rate is None:
        return Tax(kind, allowed[0])
    if isinstance(rate, bool) or not isinstance(rate, int) or rate not in allowed:
        shown = " or ".join(str(r) for r in allowed)
        raise TaxError(f"tax rate {rate!r} is not allowed for {kind.value}; allowed: {shown}")
    return Tax(kind, rate)


@dataclass(frozen=True)
class TaxSplit:
    """A tax-inclusive price split into its base and its tax; base + tax == the price."""

    base: Money
    tax: Money


def _quantum(currency: str) -> int:
    # Tax goes to Tpaga in whole units of the currency (whole pesos): 100 minor units per peso for COP.
    quantum: int = 10 ** CURRENCY_EXPONENTS[currency]
    return quantum


def split_inclusive(price: Money, tax: Tax) -> TaxSplit:
    """Split a tax-inclusive price: tax = price * rate / (100 + rate), rounded half up to whole units of the
    currency; base = price - tax. Integer arithmetic only, so the split is exact for every amount."""
    if price.amount_minor < 0:
        raise TaxError("a price to split must not be negative")
    quantum = _quantum(price.currency)
    # Exact tax in whole units is price_minor * rate / ((100 + rate) * quantum); half up with integers:
    numerator = price.amount_minor * tax.rate
    denominator = (100 + tax.rate) * quantum
    units = (2 * numerator + denominator) // (2 * denominator)
    tax_minor = units * quantum
    return TaxSplit(Money(price.amount_minor - tax_minor, price.currency), Money(tax_minor, price.currency))
