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


def breakdown(amount: Decimal) -> Breakdown:
    rete_renta = _pesos(amount * RETE_RENTA_RATE)
    rete_ica = _pesos(amount * RETE_ICA_RATE)
    rete_iva = ZERO
    retentions = rete_renta + rete_ica + rete_iva
    # Small charges would otherwise owe more than they bring in; cap the fee so net stays >= 0.
    fee = max(ZERO, min(_pesos(FIXED_FEE + amount * FEE_RATE), amount - retentions))
    return Breakdown(fee, rete_renta, rete_ica, rete_iva, amount - fee - retentions)


def money(value: Decimal) -> str:
    """Tpaga's wire form of an amount: a string with exactly two decimals."""
    return f"{value:.2f}"
