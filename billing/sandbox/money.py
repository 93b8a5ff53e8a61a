"""Fees and retentions of a charge, and money as Tpaga writes it (two-decimal strings)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

ZERO = Decimal("0.00")
_PESO = Decimal(1)

# Nobody published Tpaga's fee formula. These rates are this emulator's own [OURS] and were picked so that
# the blog's real sample comes out exactly: 4500 -> fee 868, reteRenta 68, reteIca 19, net 3545.
FIXED_FEE = Decimal(700)
FEE_RATE = Decimal("0.0373")
RETE_RENTA_RATE = Decimal("0.015")
RETE_ICA_RATE = Decimal("0.00414")
# ReteIVA is withheld from the IVA a charge carries (15 % of it is what Colombian card acquirers withhold);
# the blog's sample carried no IVA, so its reteIva is 0 whatever this rate is.
RETE_IVA_RATE = Decimal("0.15")
MAX_RATE = Decimal("0.2")


@dataclass(frozen=True, slots=True)
class Rates:
    """The emulator's settlement formula (SandboxConfig's fee_* and rete_* fields): fee = fixed + rate of the
    amount; reteRenta and reteICA are rates of the base (amount less its IVA and INC); reteIVA a rate of the
    IVA (taxAmount)."""

    fixed_fee: Decimal = FIXED_FEE
    fee_rate: Decimal = FEE_RATE
    rete_renta_rate: Decimal = RETE_RENTA_RATE
    rete_ica_rate: Decimal = RETE_ICA_RATE
    rete_iva_rate: Decimal = RETE_IVA_RATE

    def validate(self) -> None:
        """Raise ValueError naming the first rate outside its range."""
        if not self.fixed_fee.is_finite() or self.fixed_fee < 0:
            raise ValueError(f"fee_fixed must be >= 0, got {self.fixed_fee}")
        # At most 20 % each: far above any real figure, and low enough that the withholdings of a charge never
        # add up to more than it (so netAmount is never negative).
        for name in ("fee_rate", "rete_renta_rate", "rete_ica_rate", "rete_iva_rate"):
            rate = getattr(self, name)
            if not rate.is_finite() or not 0 <= rate <= MAX_RATE:
                raise ValueError(f"{name} must be between 0 and {MAX_RATE}, got {rate}")


DEFAULT_RATES = Rates()


@dataclass(frozen=True, slots=True)
class Breakdown:
    """What Tpaga keeps from a charge; net = amount - fee - retentions, never negative."""

    fee: Decimal
    rete_renta: Decimal
    rete_ica: Decimal
    rete_iva: Decimal
    net: Decimal


def _pesos(value: Decimal) -> Decimal:
    return value.quantize(_PESO, rounding=ROUND_HALF_UP).quantize(ZERO)


def breakdown(amount: Decimal, tax: Decimal = ZERO, iac: Decimal = ZERO, rates: Rates = DEFAULT_RATES) -> Breakdown:
    """What Tpaga keeps from a charge of `amount` that includes `tax` (IVA) and `iac` (INC)."""
    base = max(ZERO, amount - tax - iac)
    rete_renta = _pesos(base * rates.rete_renta_rate)
    rete_ica = _pesos(base * rates.rete_ica_rate)
    rete_iva = _pesos(min(tax, amount) * rates.rete_iva_rate)
    retentions = rete_renta + rete_ica + rete_iva
    # Small charges would otherwise owe more than they bring in; cap the fee so net stays >= 0.
    fee = max(ZERO, min(_pesos(rates.fixed_fee + amount * rates.fee_rate), amount - retentions))
    return Breakdown(fee, rete_renta, rete_ica, rete_iva, amount - fee - retentions)


def money(value: Decimal) -> str:
    """Tpaga's wire form of an amount: a string with exactly two decimals."""
    return f"{value:.2f}"
