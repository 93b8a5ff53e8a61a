"""Phases 1 and 2 of a charge: claim due invoices (their attempts written `pending`), then mark them `sending`.

Claim (one transaction for the whole batch): take each invoice off the schedule with a compare-and-set
(`due_at` -> NULL where it is open, due now, not locked by another claimer and with no attempt in flight), then
write its attempt `pending` with a deterministic orderId. Mark sending (one transaction, just before the
requests leave): the attempts are in flight with a lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing.db import bulk, cas
from billing.db.models import Card, ChargeAttempt, Invoice, Plan, Subscription
from billing.domain.money import Money
from billing.domain.states import AttemptState, CardStatus, InvoiceState, SubscriptionStatus
from billing.domain.tax import WIRE_FIELDS, TaxTreatment
from billing.services import events
from billing.services.cards import usable_card_of_customer
from billing.services.charging.attempts import OPEN_ATTEMPT_STATES, ChargeOutcome, Claim, Outcome
from billing.services.context import Context
from billing.services.pause import billing_paused

_ATTEMPTS: Any = ChargeAttempt.__table__


def claim_invoices(ctx: Context, invoice_ids: Sequence[int]) -> tuple[list[Claim], dict[int, ChargeOutcome]]:
    """First commit: take the due invoices off the schedule and write their attempts, all in one transaction.

    Returns the claims, and for every other id why it was not claimed (`paused`, `not_found`,
    `already_paid`, `in_review`, `not_scheduled`, `not_due`, `claimed_elsewhere`, `void`, `no_usable_card`).
    """
    ids = list(dict.fromkeys(invoice_ids))
    now = ctx.clock.now()
    try:
        with ctx.unit_of_work() as session:
            return _claim_in(ctx, session, now, ids)
    except IntegrityError:
        # A constraint refused an attempt (a concurrent claimer won): the whole claim rolled back.
        return [], {i: ChargeOutcome(i, Outcome.CLAIMED_ELSEWHERE) for i in ids}


def _claim_in(
    ctx: Context, session: Session, now: datetime, ids: list[int]
) -> tuple[list[Claim], dict[int, ChargeOutcome]]:
    if billing_paused(session) is not None:
        return [], {i: ChargeOutcome(i, Outcome.PAUSED) for i in ids}
    outcomes: dict[int, ChargeOutcome] = {}
    taken = _take_due(session, ids, now, outcomes)
    if not taken:
        return [], outcomes
    t_inv, t_sub, t_plan, t_card = (m.__table__ for m in (Invoice, Subscription, Plan, Card))  # Core, no ORM objects
    rows = session.execute(
        select(
            t_inv.c.id,
            t_inv.c.amount_minor,
            t_inv.c.currency,
            t_inv.c.period_index,
            t_inv.c.tax_treatment,
            t_inv.c.tax_minor,
            t_sub.c.id.label("subscription_id"),
            t_sub.c.status,
            t_sub.c.paused_at,
            t_sub.c.customer_id,
            t_plan.c.name.label("plan_name"),
            t_card.c.id.label("card_id"),
            t_card.c.tpaga_card_id,
            t_card.c.status.label("card_status"),
        )
        .select_from(
            t_inv.join(t_sub, t_sub.c.id == t_inv.c.subscription_id)
            .join(t_plan, t_plan.c.id == t_sub.c.plan_id)
            .outerjoin(t_card, t_card.c.id == t_sub.c.card_id)
        )
        .where(bulk.id_in(t_inv.c.id, taken, bulk.dialect_of(session)))
        .order_by(t_inv.c.id)
    ).all()
    wanted: list[tuple[Any, int, str]] = []  # (row, card id, Tpaga card id)
    for row in rows:
        if row.status == SubscriptionStatus.CANCELED:
            cas.transition(session, Invoice, row.id, InvoiceState.VOID, now=now, due_at=None, updated_at=now)
            outcomes[row.id] = ChargeOutcome(row.id, Outcome.VOID)
            continue
        if row.paused_at is not None:
            # Rescheduled by a decline after the pause (its charge was already in flight): it waits again.
            cas.update_while(session, Invoice, row.id, InvoiceState.OPEN, due_at=None, updated_at=now)
            outcomes[row.id] = ChargeOutcome(row.id, Outcome.SUBSCRIPTION_PAUSED)
            continue
        card: tuple[int, str] | None = None
        if row.card_id is not None and row.card_status == CardStatus.USABLE:
            card = (row.card_id, row.tpaga_card_id)
        else:
            card = usable_card_of_customer(session, row.customer_id)
        if card is None:
            _await_card(session, now, row.id, row.subscription_id)
            outcomes[row.id] = ChargeOutcome(row.id, Outcome.NO_USABLE_CARD)
            continue
        wanted.append((row, *card))
    if not wanted:
        return [], outcomes
    numbers: dict[int, int] = dict(
        session.execute(
            select(_ATTEMPTS.c.invoice_id, func.max(_ATTEMPTS.c.attempt_number))
            .where(bulk.id_in(_ATTEMPTS.c.invoice_id, [row.id for row, _, _ in wanted], bulk.dialect_of(session)))
            .group_by(_ATTEMPTS.c.invoice_id)
        ).all()
    )
    values = []
    for row, card_id, _ in wanted:
        number = numbers.get(row.id, 0) + 1
        values.append(
            {
                "invoice_id": row.id,
                "attempt_number": number,
                "order_id": f"inv{row.id}-a{number}",
                "card_id": card_id,
                "amount_minor": row.amount_minor,
                "currency": row.currency,
                "state": AttemptState.PENDING,
                "lease_expires_at": now + ctx.sending_lease,
                "created_at": now,
            }
        )
    # ON CONFLICT DO NOTHING covers every unique index: a partial index refusing a second attempt in flight
    # skips that one invoice instead of failing the batch.
    inserted = dict(
        bulk.insert_rows(session, ChargeAttempt, values, returning=("invoice_id", "id"), on_conflict_do_nothing=True)
    )
    claims: list[Claim] = []
    for (row, _, tpaga_card_id), value in zip(wanted, values, strict=True):
        attempt_id = inserted.get(row.id)
        if attempt_id is None:
            # Put it back on the schedule as we found it (due), for whoever holds its attempt to settle.
            session.execute(
                update(Invoice)
                .where(Invoice.id == row.id, Invoice.state == InvoiceState.OPEN, Invoice.due_at.is_(None))
                .values(due_at=now, updated_at=now)
            )
            outcomes[row.id] = ChargeOutcome(row.id, Outcome.CLAIMED_ELSEWHERE)
            continue
        claims.append(
            Claim(
                invoice_id=row.id,
                attempt_id=attempt_id,
                order_id=value["order_id"],
                card_tpaga_id=tpaga_card_id,
                amount=Money(row.amount_minor, row.currency),
                description=f"{row.plan_name} period {row.period_index + 1}",
                **_tax_fields(row),
            )
        )
    return claims, outcomes


def _tax_fields(row: Any) -> dict[str, Money]:
    """The claim's tax fields from its invoice's tax line; invoices opened before migration 0007 have none and
    send what they always did (taxAmount 0)."""
    if row.tax_minor is None or row.tax_treatment is None:
        return {}
    field = WIRE_FIELDS.get(TaxTreatment(row.tax_treatment))
    if field is None:
        return {}
    tax = Money(row.tax_minor, row.currency)
    return {"tax_amount": tax} if field == "taxAmount" else {"iac_amount": tax}


def _take_due(session: Session, ids: list[int], now: datetime, outcomes: dict[int, ChargeOutcome]) -> list[int]:
    """Take every id that is open, due now and without an attempt in flight off the schedule (due_at -> NULL),
    skipping rows another claimer holds (PostgreSQL; SQLite serializes writers). The others get their reason
    in `outcomes`."""
    locked = bulk.lock_rows(session, Invoice, ids, "state", "due_at", skip_locked=True)
    due = [i for i in ids if i in locked and _reason(locked[i], now) is None]
    busy = (
        set(
            session.execute(
                select(_ATTEMPTS.c.invoice_id).where(
                    bulk.id_in(_ATTEMPTS.c.invoice_id, due, bulk.dialect_of(session)),
                    _ATTEMPTS.c.state.in_(OPEN_ATTEMPT_STATES),
                )
            ).scalars()
        )
        if due
        else set()
    )
    taken = [i for i in due if i not in busy]
    bulk.update_ids(session, Invoice, taken, due_at=None, updated_at=now)
    # Ids not locked: unknown, or held by another claimer right now (read without waiting for it).
    unlocked = [i for i in ids if i not in locked]
    found = (
        {
            row.id: row
            for row in session.execute(
                select(Invoice.id, Invoice.state, Invoice.due_at).where(
                    bulk.id_in(Invoice.id, unlocked, bulk.dialect_of(session))
                )
            )
        }
        if unlocked
        else {}
    )
    for invoice_id in ids:
        if invoice_id in busy:
            outcomes[invoice_id] = ChargeOutcome(invoice_id, Outcome.CLAIMED_ELSEWHERE)
        elif invoice_id in locked:
            reason = _reason(locked[invoice_id], now)
            if reason is not None:
                outcomes[invoice_id] = ChargeOutcome(invoice_id, reason)
        elif invoice_id not in found:
            outcomes[invoice_id] = ChargeOutcome(invoice_id, Outcome.NOT_FOUND)
        else:
            outcomes[invoice_id] = ChargeOutcome(
                invoice_id, _reason(found[invoice_id], now) or Outcome.CLAIMED_ELSEWHERE
            )
    return taken


def _reason(invoice: Any, now: datetime) -> Outcome | None:
    """Why an invoice (state, due_at) cannot be charged now, or None when it can."""
    if invoice.state != InvoiceState.OPEN:
        return _NOT_OPEN[InvoiceState(invoice.state)]
    if invoice.due_at is None:
        return Outcome.NOT_SCHEDULED
    if invoice.due_at > now:
        return Outcome.NOT_DUE
    return None


_NOT_OPEN = {
    InvoiceState.PAID: Outcome.ALREADY_PAID,
    InvoiceState.REVIEW: Outcome.IN_REVIEW,
    InvoiceState.UNCOLLECTIBLE: Outcome.UNCOLLECTIBLE,
    InvoiceState.VOID: Outcome.VOID,
}


def _await_card(session: Session, now: datetime, invoice_id: int, subscription_id: int) -> None:
    """No usable card: the invoice waits off the schedule (attaching a card reschedules it)."""
    cas.update_while(session, Invoice, invoice_id, InvoiceState.OPEN, due_at=None, updated_at=now)
    cas.transition(session, Subscription, subscription_id, SubscriptionStatus.PAST_DUE, now=now, updated_at=now)
    events.record(session, now, "invoice.awaiting_card", subscription_id=subscription_id, invoice_id=invoice_id)


def mark_sending(ctx: Context, claims: Sequence[Claim]) -> tuple[list[Claim], list[ChargeOutcome]]:
    """Second commit: the attempts are in flight with a lease before the requests leave.

    The invoices are locked first, which serializes this with `cancel_subscription`: a claim whose invoice was
    voided or whose subscription was canceled since the claim is `void`, its attempt `not_sent`; one whose
    invoice left `open` otherwise, or whose attempt is no longer `pending` (reconciliation gave up on it), is
    `lost_claim`. Neither is sent.
    """
    if not claims:
        return [], []
    now = ctx.clock.now()
    refused: dict[int, Outcome] = {}
    with ctx.unit_of_work() as session:
        t_inv, t_sub = Invoice.__table__, Subscription.__table__
        invoices = {
            row.id: row
            for row in session.execute(
                select(t_inv.c.id, t_inv.c.state, t_inv.c.subscription_id, t_sub.c.status)
                .join(t_sub, t_sub.c.id == t_inv.c.subscription_id)
                .where(bulk.id_in(t_inv.c.id, sorted({c.invoice_id for c in claims}), bulk.dialect_of(session)))
                .order_by(t_inv.c.id)
                .with_for_update(of=t_inv)
            )
        }
        canceled = {i.subscription_id for i in invoices.values() if i.status == SubscriptionStatus.CANCELED}
        for claim in claims:
            invoice = invoices.get(claim.invoice_id)
            if invoice is not None and invoice.state == InvoiceState.OPEN and invoice.subscription_id not in canceled:
                continue
            if invoice is None or invoice.state not in (InvoiceState.OPEN, InvoiceState.VOID):
                refused[claim.attempt_id] = Outcome.LOST_CLAIM
                reason = f"invoice {invoice.state if invoice else 'missing'} before sending"
            else:
                refused[claim.attempt_id] = Outcome.VOID
                reason = "subscription canceled before sending"
            _refuse_sending(session, now, claim, invoice is not None and invoice.state == InvoiceState.OPEN, reason)
        marked = set(
            cas.transition_ids(
                session,
                ChargeAttempt,
                [c.attempt_id for c in claims if c.attempt_id not in refused],
                AttemptState.SENDING,
                now=now,
                sent_at=now,
                lease_expires_at=now + ctx.sending_lease,
            )
        )
    sending = [c for c in claims if c.attempt_id in marked]
    lost = [
        ChargeOutcome(c.invoice_id, refused.get(c.attempt_id, Outcome.LOST_CLAIM), c.attempt_id)
        for c in claims
        if c.attempt_id not in marked
    ]
    return sending, lost


def _refuse_sending(session: Session, now: datetime, claim: Claim, still_open: bool, reason: str) -> None:
    """The claim's invoice may no longer be charged: its attempt never leaves (`not_sent`). An invoice still
    open of a canceled subscription is voided, as a claim would have done."""
    if not cas.transition(
        session,
        ChargeAttempt,
        claim.attempt_id,
        AttemptState.NOT_SENT,
        now=now,
        error_message=reason,
        finished_at=now,
        lease_expires_at=None,
    ):
        return  # no longer pending: reconciliation settled it first
    if still_open:
        cas.transition(session, Invoice, claim.invoice_id, InvoiceState.VOID, now=now, due_at=None, updated_at=now)
    events.record(
        session, now, "charge.not_sent", invoice_id=claim.invoice_id, attempt_id=claim.attempt_id, error=reason
    )
