"""Objects as Tpaga writes them (tpaga-api.md section 3), and the emulator's ledger entries."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from billing.sandbox import cards
from billing.sandbox.clock import iso
from billing.sandbox.money import money
from billing.sandbox.state import Card, Charge, Customer, RefundRecord, Token


def dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def customer(c: Customer) -> dict[str, object]:
    return {"id": c.id, **c.fields, "dateCreated": iso(c.created_at)}


def token(t: Token) -> dict[str, object]:
    return {"token": t.id, "used": t.used}


def card(c: Card) -> dict[str, object]:
    return {
        "id": c.id,
        "bin": c.number[:6],
        "lastFour": c.number[-4:],
        "type": c.brand,
        "fingerprint": cards.fingerprint(c.number),
        "expirationMonth": f"{c.expiration_month:02d}",
        "expirationYear": str(c.expiration_year),
        "cardHolderName": c.holder_name,
        "customer": c.customer_id,
        **c.extra,
        "validationCharge": {
            "successful": c.validation_code == cards.APPROVED,
            "errorCode": c.validation_code,
        },
        "dateCreated": iso(c.created_at),
    }


def charge(c: Charge) -> dict[str, object]:
    r = c.request
    f = c.fees
    return {
        "id": c.id,
        "amount": money(r.amount),
        "taxAmount": money(r.tax_amount),
        "iacAmount": money(r.iac_amount),
        "tipAmount": money(r.tip_amount),
        "netAmount": money(f.net),
        "tpagaFeeAmount": money(f.fee),
        "reteRentaAmount": money(f.rete_renta),
        "reteIcaAmount": money(f.rete_ica),
        "reteIvaAmount": money(f.rete_iva),
        "currency": r.currency,
        "creditCard": c.card_id,
        "customer": c.customer_id,
        "installments": r.installments,
        "orderId": r.order_id,
        "description": r.description,
        "thirdPartyId": r.third_party_id,
        "childMerchantId": r.child_merchant_id,
        # A voided charge is no longer paid (the blog's refund sample), though it was approved.
        "paid": c.approved and c.voided_at is None,
        "paymentTransaction": c.payment_transaction,
        "transactionInfo": {"authorizationCode": c.authorization_code, "status": c.status},
        "errorCode": c.error_code,
        "errorMessage": cards.error_message(c.error_code),
        "dateCreated": iso(c.created_at),
    }


def ledger_charge(c: Charge) -> dict[str, object]:
    return {
        "id": c.id,
        "orderId": c.request.order_id,
        "creditCard": c.card_id,
        "customer": c.customer_id,
        "amount": money(c.request.amount),
        "currency": c.request.currency,
        "paid": c.approved,
        "status": c.status,
        "errorCode": c.error_code,
        "dateCreated": iso(c.created_at),
        "voided": c.voided_at is not None,
        "delivery": c.delivery,
    }


def ledger_refund(r: RefundRecord, c: Charge) -> dict[str, object]:
    return {
        "chargeId": r.charge_id,
        "orderId": c.request.order_id,
        "creditCard": c.card_id,
        "outcome": r.outcome,
        "reason": r.reason,
        "dateCreated": iso(r.created_at),
        "delivery": r.delivery,
    }


def ledger(charges: list[Charge], refunds: list[tuple[RefundRecord, Charge]]) -> dict[str, object]:
    return {
        "charges": [ledger_charge(c) for c in charges],
        "refunds": [ledger_refund(r, c) for r, c in refunds],
    }


# The transaction report's columns (docs/operations.md §8): the format `billing review import` reads by default.
REPORT_COLUMNS = ("orderId", "chargeId", "amount", "currency", "status", "errorCode", "date")


def report_csv(charges: list[Charge]) -> bytes:
    """The merchant dashboard's transaction report as CSV: one line per charge, its status as it is now."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(REPORT_COLUMNS)
    for c in charges:
        writer.writerow(
            (
                c.request.order_id or "",
                c.id,
                money(c.request.amount),
                c.request.currency,
                c.status,
                c.error_code,
                iso(c.created_at),
            )
        )
    return out.getvalue().encode()
