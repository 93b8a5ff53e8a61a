"""What Tpaga answered about attempts, applied whichever way the answer came (the call itself, a lookup, an
operator): approvals pay invoices, declines run dunning. Each write is a checked transition (billing.db.cas),
and the effects follow only the attempts that moved.

An answer that arrives after its attempt was settled without it (an operator's "not charged", reconciliation)
is recorded all the same and raised as an ALERT (`attempt.late_answer`); an approval that would be its
invoice's second makes the attempt `duplicate`, and its charge is voided automatically inside the window.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.db import bulk, cas
from billing.db.models import ChargeAttempt, Invoice
from billing.domain.declines import DeclineClass, classify
from billing.domain.money import Money, MoneyError
from billing.domain.states import AttemptState, InvoiceState, RefundState
from billing.gateway.models import Charge
from billing.services import events, refunds, stream
from billing.services.charging.attempts import Outcome
from billing.services.charging.dunning import apply_declines, settle_subscriptions
from billing.services.context import Context

# Attempt column -> the Charge attribute holding Tpaga's figure for it.
_SETTLEMENT_AMOUNTS = {
    "tax_amount_minor": "tax_amount",
    "iac_amount_minor": "iac_amount",
    "fee_minor": "tpaga_fee_amount",
    "rete_renta_minor": "rete_renta_amount",
    "rete_ica_minor": "rete_ica_amount",
    "rete_iva_minor": "rete_iva_amount",
    "net_minor": "net_amount",
}


SETTLEMENT_COLUMNS = (*_SETTLEMENT_AMOUNTS, "payment_transaction", "tpaga_created_at")


@dataclass(frozen=True)
class Answer:
    """What Tpaga said about one attempt, whichever way it reached us (the call, a lookup, an operator)."""

    invoice_id: int
    attempt_id: int
    charge_id: str | None
    error_code: str
    decline_class: DeclineClass
    error_message: str | None = None
    authorization_code: str | None = None
    http_status: int | None = None
    approved_at: datetime | None = None
    # Tpaga's settlement figures (attempt columns of migration 0007), written on approvals only; every key is
    # always there (None when unknown) since a batch of rows is written with one set of columns.
    settlement: Mapping[str, Any] = field(default_factory=lambda: dict.fromkeys(SETTLEMENT_COLUMNS))

    @classmethod
    def of_charge(cls, invoice_id: int, attempt_id: int, charge: Charge, *, http_status: int | None) -> Answer:
        return cls(
            invoice_id,
            attempt_id,
            charge.id,
            charge.error_code,
            DeclineClass.APPROVED if charge.paid else classify(charge.error_code),
            charge.error_message,
            charge.authorization_code,
            http_status,
            charge.date_created,
            settlement_of(charge),
        )


def settlement_of(charge: Charge) -> dict[str, Any]:
    """The settlement columns of an attempt from Tpaga's charge, in minor units exactly as Tpaga wrote them.

    A figure that is missing, or not an exact amount of the charge's currency, is stored as null: the approval
    itself must be recorded whatever the breakdown looks like, and the report shows what is missing."""
    row: dict[str, Any] = {}
    for column, attribute in _SETTLEMENT_AMOUNTS.items():
        value = getattr(charge, attribute)
        try:
            row[column] = None if value is None else Money.from_major(value, charge.currency).amount_minor
        except MoneyError:
            row[column] = None
    row["payment_transaction"] = (charge.payment_transaction or "")[:64] or None
    row["tpaga_created_at"] = charge.date_created
    return row


def record_approvals(
    ctx: Context, session: Session, now: datetime, answers: list[Answer], invoices: Mapping[int, Any]
) -> dict[int, Outcome]:
    """Approved answers: the attempt is approved and its invoice paid, unless the invoice already has an
    approved attempt, in which case this one is a duplicate and is voided. `invoices` are the answers'
    invoices (state, subscription_id), locked by the caller: two answers for one invoice (a late one and its
    retry's) are decided in turn. Returns the outcome of every attempt that is not plainly approved."""
    if not answers:
        return {}
    # Every approval pays its invoice in the same transaction (or voids itself): only an invoice that is no
    # longer open can have an approved attempt already.
    settled = [a.invoice_id for a in answers if invoices[a.invoice_id].state in _MAY_HAVE_APPROVAL]
    already = (
        dict(
            session.execute(
                select(ChargeAttempt.invoice_id, ChargeAttempt.id).where(
                    bulk.id_in(ChargeAttempt.invoice_id, settled, bulk.dialect_of(session)),
                    ChargeAttempt.state == AttemptState.APPROVED,
                )
            ).all()
        )
        if settled
        else {}
    )
    first = [a for a in answers if already.get(a.invoice_id, a.attempt_id) == a.attempt_id]
    firsts = {a.attempt_id for a in first}
    second = [a for a in answers if a.attempt_id not in firsts]
    result: dict[int, Outcome] = {}
    moved = cas.transition_rows(
        session, ChargeAttempt, [_attempt_row(a, now) for a in first], AttemptState.APPROVED, now=now
    )
    paid: list[tuple[int, int]] = []
    event_rows = []
    for answer in first:
        if answer.attempt_id not in moved:
            continue  # recorded before (a redelivery, a re-run commit): nothing to apply twice
        invoice = invoices[answer.invoice_id]
        if moved[answer.attempt_id] == AttemptState.NOT_SENT:
            event_rows.append(_late(now, invoice.subscription_id, answer, "approved", moved[answer.attempt_id]))
        if invoice.state == InvoiceState.VOID:
            # The subscription was canceled before this charge was known: the money goes back.
            _void_unwanted(ctx, session, now, answer, "charge of a voided invoice (subscription canceled)")
            result[answer.attempt_id] = Outcome.VOID
            continue
        paid.append((answer.invoice_id, answer.attempt_id))
    duplicates = cas.transition_rows(
        session, ChargeAttempt, [_attempt_row(a, now) for a in second], AttemptState.DUPLICATE, now=now
    )
    for answer in second:
        if answer.attempt_id in duplicates:
            event_rows.append(
                events.row(
                    now,
                    "charge.duplicate",
                    subscription_id=invoices[answer.invoice_id].subscription_id,
                    invoice_id=answer.invoice_id,
                    attempt_id=answer.attempt_id,
                    approved_attempt_id=already[answer.invoice_id],
                )
            )
            _void_unwanted(ctx, session, now, answer, "automatic void of a duplicate approval")
            result[answer.attempt_id] = Outcome.DUPLICATE
    mark_invoices_paid(session, now, paid, invoices)
    events.record_many(session, event_rows)
    return result


_MAY_HAVE_APPROVAL = frozenset({InvoiceState.PAID, InvoiceState.VOID})


def _attempt_row(answer: Answer, now: datetime) -> dict[str, Any]:
    return {
        "id": answer.attempt_id,
        "tpaga_charge_id": answer.charge_id,
        "error_code": answer.error_code,
        "error_message": (answer.error_message or "")[:255],
        "decline_class": answer.decline_class,
        "authorization_code": answer.authorization_code,
        "http_status": answer.http_status,
        "finished_at": now,
        "approved_at": min(answer.approved_at or now, now),
        "lease_expires_at": None,
        **answer.settlement,
    }


def _late(now: datetime, subscription_id: int, answer: Answer, outcome: str, was: Any) -> dict[str, Any]:
    """The ALERT for an answer that arrived after its attempt had been settled without it."""
    return events.row(
        now,
        "attempt.late_answer",
        subscription_id=subscription_id,
        invoice_id=answer.invoice_id,
        attempt_id=answer.attempt_id,
        outcome=outcome,
        settled_as=str(was),
        error_code=answer.error_code,
    )


def _void_unwanted(ctx: Context, session: Session, now: datetime, answer: Answer, reason: str) -> None:
    """A refund of a charge nobody wanted, inside the void window; flagged when the window has passed."""
    approved_at = min(answer.approved_at or now, now)
    refund = refunds.open_refund(ctx, session, now, answer.attempt_id, answer.invoice_id, approved_at, reason)
    if refund.state == RefundState.EXPIRED:
        events.record(
            session,
            now,
            "refund.flagged",
            invoice_id=answer.invoice_id,
            attempt_id=answer.attempt_id,
            refund_id=refund.refund_id,
            reason=f"{reason}; the void window has passed: refund it by hand",
        )


# The invoice columns the charge path locks and reads: its state, and what its stream events carry.
LOCKED_INVOICE_COLUMNS = ("state", "subscription_id", "amount_minor", "currency", "period_start", "period_end")


def invoice_paid(now: datetime, invoice: Any, attempt_id: int) -> dict[str, Any]:
    """The stream's `invoice.paid` for a locked invoice row (LOCKED_INVOICE_COLUMNS)."""
    amount = Money(invoice.amount_minor, invoice.currency)
    return stream.row(
        now,
        "invoice.paid",
        subscription_id=invoice.subscription_id,
        invoice_id=invoice.id,
        charge_id=attempt_id,
        amount=str(amount.major),
        currency=amount.currency,
        period_start=invoice.period_start.isoformat(),
        period_end=invoice.period_end.isoformat(),
        entitlement={"active": True, "until": invoice.period_end.isoformat()},
    )


def mark_invoices_paid(
    session: Session, now: datetime, paid: list[tuple[int, int]], invoices: Mapping[int, Any]
) -> None:
    """Invoices (with their approved attempts; `invoices` locked by the caller) become paid; a subscription with
    nothing else outstanding is active again."""
    if not paid:
        return
    moved = cas.transition_locked(
        session,
        Invoice,
        {i: invoices[i].state for i, _ in paid},
        InvoiceState.PAID,
        now=now,
        paid_at=now,
        due_at=None,
        review_reason=None,
        updated_at=now,
    )
    events.record_many(
        session,
        [
            events.row(
                now, "charge.approved", subscription_id=invoices[inv].subscription_id, invoice_id=inv, attempt_id=att
            )
            for inv, att in paid
        ],
    )
    charge_of = dict(paid)
    rows = [invoice_paid(now, invoices[i], charge_of[i]) for i in moved]
    recovered = settle_subscriptions(session, now, sorted({invoices[i].subscription_id for i in moved}))
    if recovered:
        paid_of = {invoices[i].subscription_id: invoices[i] for i in moved}  # the last paid period of each
        rows += [
            stream.row(
                now,
                "subscription.recovered",
                subscription_id=s,
                status="active",
                invoice_id=paid_of[s].id,
                entitlement={"active": True, "until": paid_of[s].period_end.isoformat()},
            )
            for s in sorted(recovered)
        ]
    stream.emit_many(session, rows)


_APPROVAL_ONLY = frozenset({"approved_at", *SETTLEMENT_COLUMNS})


def record_declines(ctx: Context, session: Session, now: datetime, answers: list[Answer]) -> dict[int, Outcome]:
    """Declined answers: the attempt is declined and dunning acts, for the attempts that moved from in flight.
    A decline for an attempt already settled as not charged is recorded and flagged, without dunning."""
    if not answers:
        return {}
    # A decline carries Tpaga's breakdown too, but nothing is settled: only what an approval has is stored.
    rows = [{k: v for k, v in _attempt_row(a, now).items() if k not in _APPROVAL_ONLY} for a in answers]
    moved = cas.transition_rows(session, ChargeAttempt, rows, AttemptState.DECLINED, now=now)
    live = [a for a in answers if a.attempt_id in moved and moved[a.attempt_id] != AttemptState.NOT_SENT]
    late = [a for a in answers if a.attempt_id in moved and moved[a.attempt_id] == AttemptState.NOT_SENT]
    for answer in live:
        if moved[answer.attempt_id] == AttemptState.UNKNOWN:
            # A lookup settled it: the invoice leaves review so that dunning can act on the decline.
            cas.transition(
                session, Invoice, answer.invoice_id, InvoiceState.OPEN, now=now, review_reason=None, updated_at=now
            )
    apply_declines(ctx, session, now, [(a.invoice_id, a.attempt_id, a.error_code, a.decline_class) for a in live])
    if late:
        subscriptions = dict(
            session.execute(
                select(Invoice.id, Invoice.subscription_id).where(
                    bulk.id_in(Invoice.id, [a.invoice_id for a in late], bulk.dialect_of(session))
                )
            ).all()
        )
        events.record_many(
            session,
            [_late(now, subscriptions[a.invoice_id], a, "declined", AttemptState.NOT_SENT) for a in late],
        )
    return {}
