"""Reconciliation: expire stuck attempts, resolve unknown ones by lookup, and the operator's review queue."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.db import bulk
from billing.db.models import ChargeAttempt, Invoice
from billing.domain.money import Money
from billing.domain.states import AttemptState, InvoiceState
from billing.gateway import errors as gw
from billing.services.charging.outcomes import abandon_unsent, mark_unknown, resolve_not_charged, settle_from_charge
from billing.services.context import Context
from billing.services.errors import InvalidRequest, NotFound
from billing.services.operators import Actor

log = logging.getLogger("billing.reconcile")


def expire_stuck_attempts(ctx: Context, limit: int = 500) -> dict[str, int]:
    """Attempts whose worker died: `pending` never left (not_sent, retried); `sending` may have charged."""
    now = ctx.clock.now()
    counts = {"not_sent": 0, "unknown": 0}
    with ctx.unit_of_work() as session:
        rows = session.execute(
            select(ChargeAttempt.id, ChargeAttempt.invoice_id, ChargeAttempt.state)
            .where(
                ChargeAttempt.state.in_((AttemptState.PENDING, AttemptState.SENDING)),
                ChargeAttempt.lease_expires_at <= now,
            )
            .limit(limit)
        ).all()
        # Invoices before attempts, as every writer of both locks them (see charging.outcomes.record_in).
        bulk.lock_rows(session, Invoice, [invoice_id for _, invoice_id, _ in rows], "state")
        for attempt_id, invoice_id, state in rows:
            if state == AttemptState.PENDING:
                if abandon_unsent(session, now, invoice_id, attempt_id):
                    counts["not_sent"] += 1
            elif mark_unknown(session, now, invoice_id, attempt_id, "lease_expired", None, None):
                counts["unknown"] += 1
    return counts


def resolve_unknown_by_lookup(ctx: Context, limit: int = 100) -> dict[str, int]:
    """Unknown attempts that carry a Tpaga charge id are settled with a GET; the rest wait for an operator."""
    with ctx.sessions() as session:
        rows = session.execute(
            select(ChargeAttempt.id, ChargeAttempt.invoice_id, ChargeAttempt.tpaga_charge_id)
            .where(ChargeAttempt.state == AttemptState.UNKNOWN, ChargeAttempt.tpaga_charge_id.is_not(None))
            .limit(limit)
        ).all()
    counts = {"approved": 0, "declined": 0, "still_unknown": 0}
    for attempt_id, invoice_id, charge_id in rows:
        try:
            charge = ctx.gateway.get_charge(str(charge_id))
        except gw.TpagaError as exc:
            log.info("lookup of attempt %s failed: %s", attempt_id, type(exc).__name__)
            counts["still_unknown"] += 1
            continue
        try:
            outcome = settle_from_charge(ctx, invoice_id, attempt_id, charge, by="lookup")
        except Exception as exc:  # one bad item never stops the sweep: the others are settled all the same
            log.error("ALERT settling attempt %s from its lookup failed (%s)", attempt_id, type(exc).__name__)
            outcome = "failed"
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def review_queue(session: Session, limit: int | None = 100, offset: int = 0) -> list[dict[str, Any]]:
    """Invoices waiting for an operator, oldest first, with the attempt that blocks them; None means all.
    `offset` skips that many of the oldest (pages)."""
    if limit is not None and limit < 1:
        raise InvalidRequest(f"limit must be at least 1, got {limit}")
    if offset < 0:
        raise InvalidRequest(f"offset must not be negative, got {offset}")
    query = (
        select(Invoice, ChargeAttempt)
        .outerjoin(
            ChargeAttempt,
            (ChargeAttempt.invoice_id == Invoice.id) & (ChargeAttempt.state == AttemptState.UNKNOWN),
        )
        .where(Invoice.state == InvoiceState.REVIEW)
        # The id breaks ties so that a page is the same page on every run.
        .order_by(Invoice.updated_at, Invoice.id)
    )
    if offset:
        query = query.offset(offset)
    rows = session.execute(query if limit is None else query.limit(limit)).all()
    return [
        {
            "invoice_id": inv.id,
            "subscription_id": inv.subscription_id,
            "amount_minor": inv.amount_minor,
            "currency": inv.currency,
            "reason": inv.review_reason,
            "attempt_id": att.id if att else None,
            "order_id": att.order_id if att else None,
            "tpaga_charge_id_known": bool(att and att.tpaga_charge_id),
            "since": inv.updated_at.isoformat(),
        }
        for inv, att in rows
    ]


def review_export(session: Session) -> list[dict[str, Any]]:
    """Every invoice in review, oldest first, with what a search of Tpaga's transaction report needs: the
    orderId, the amount, and when the request may have reached Tpaga (from `sent_at` to `flagged_at`)."""
    query = (
        select(Invoice, ChargeAttempt)
        .outerjoin(
            ChargeAttempt,
            (ChargeAttempt.invoice_id == Invoice.id) & (ChargeAttempt.state == AttemptState.UNKNOWN),
        )
        .where(Invoice.state == InvoiceState.REVIEW)
        .order_by(Invoice.updated_at, Invoice.id)
    )
    return [
        {
            "invoice_id": inv.id,
            "subscription_id": inv.subscription_id,
            "attempt_id": att.id if att else None,
            "order_id": att.order_id if att else None,
            "amount": str(Money(inv.amount_minor, inv.currency).major),
            "currency": inv.currency,
            "sent_at": (att.sent_at or att.created_at).isoformat() if att else None,
            "flagged_at": att.finished_at.isoformat() if att and att.finished_at else None,
            "charge_id_known": bool(att and att.tpaga_charge_id),
            "reason": inv.review_reason,
            "since": inv.updated_at.isoformat(),
        }
        for inv, att in session.execute(query).all()
    ]


def review_count(session: Session) -> int:
    """How many invoices are in review (one row each in review_queue: an invoice has one unknown attempt)."""
    query = select(func.count()).select_from(Invoice).where(Invoice.state == InvoiceState.REVIEW)
    return int(session.execute(query).scalar_one())


def resolve_review(
    ctx: Context,
    *,
    invoice_id: int,
    charged: bool,
    tpaga_charge_id: str | None = None,
    actor: Actor | None = None,
) -> str:
    """An operator settles a review item: charged (verified by a GET on the given charge id) or not charged.
    The `actor`, when given, is recorded with the settlement (an `operator.action` event)."""
    with ctx.sessions() as session:
        invoice = session.get(Invoice, invoice_id)
        if invoice is None:
            raise NotFound(f"invoice {invoice_id} does not exist")
        if invoice.state != InvoiceState.REVIEW:
            raise InvalidRequest(f"invoice {invoice_id} is not in review (state {invoice.state})")
        attempt = session.execute(
            select(ChargeAttempt).where(
                ChargeAttempt.invoice_id == invoice_id, ChargeAttempt.state == AttemptState.UNKNOWN
            )
        ).scalar_one_or_none()
    if charged:
        if not tpaga_charge_id:
            raise InvalidRequest("resolving as charged needs the Tpaga charge id")
        if attempt is None:
            raise InvalidRequest(f"invoice {invoice_id} has no unknown attempt to settle")
        try:
            charge = ctx.gateway.get_charge(tpaga_charge_id)
        except gw.NotFoundError:
            raise InvalidRequest("Tpaga has no charge with that id") from None
        if charge.order_id != attempt.order_id:
            raise InvalidRequest("that charge belongs to another order, not to this invoice's attempt")
        if not charge.paid:
            raise InvalidRequest("Tpaga says that charge is not paid; resolve as not charged instead")
        note = _resolved_by(actor, "review.resolve", invoice_id, attempt.id, charge_id=charge.id)
        return settle_from_charge(ctx, invoice_id, attempt.id, charge, by="operator", note=note)
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        if not resolve_not_charged(session, now, invoice_id, attempt.id if attempt else None):
            raise InvalidRequest(f"invoice {invoice_id} was settled meanwhile; nothing changed")
        if actor is not None:
            actor.record(
                session,
                now,
                "review.resolve",
                invoice_id=invoice_id,
                attempt_id=attempt.id if attempt else None,
                outcome="not_charged",
            )
    return "not_charged"


def _resolved_by(
    actor: Actor | None, action: str, invoice_id: int, attempt_id: int, **data: Any
) -> Callable[[Session, datetime, str], None] | None:
    """The hook that records an operator's settlement in its own transaction (see settle_from_charge)."""
    if actor is None:
        return None

    def note(session: Session, now: datetime, outcome: str) -> None:
        actor.record(session, now, action, invoice_id=invoice_id, attempt_id=attempt_id, outcome=outcome, **data)

    return note


def due_invoice_ids(session: Session, now: datetime, limit: int = 1000) -> list[int]:
    """Open invoices whose attempt time has come (first tries, dunning retries, lost messages)."""
    return list(
        session.execute(
            select(Invoice.id)
            .where(Invoice.state == InvoiceState.OPEN, Invoice.due_at.is_not(None), Invoice.due_at <= now)
            .order_by(Invoice.due_at)
            .limit(limit)
        ).scalars()
    )
