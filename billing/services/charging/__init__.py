"""The charge pipeline. Read `pipeline` first: it calls `claims` (phases 1-2), the gateway, then `outcomes`
(phase 4, which applies `dunning` and the billing pause). `attempts` holds the value types."""

from billing.services.charging.attempts import CallResult, ChargeOutcome, Claim, HeldBack, Outcome
from billing.services.charging.pipeline import charge_invoice, charge_invoices

__all__ = ["CallResult", "ChargeOutcome", "Claim", "HeldBack", "Outcome", "charge_invoice", "charge_invoices"]
