"""Refund requests: one refund per approved charge, with its deadline inside the void window; a second request
for the same charge returns the first. `billing.services.voids` executes them."""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing import task_names
from billing.db.models import ChargeAttempt, Invoice, Refund
from billing.domain.refunds import refund_deadline
from billing.domain.states import AttemptState, RefundState
from billing.services import events, stream
from billing.services.context import Context, enqueue
from billing.services.errors import InvalidRequest, NotFound
from billing.services.operators import Actor

log = logging.getLogger("billing.refunds")


@dataclass(frozen=True)
class RefundOutcome:
    refund_id: int
    state: str
    created: bool = False
    invoice_id: int | None = None  # known when the refund was requested, not part of `as_dict`

    def as_dict(self) -> dict[str, Any]:
        return {"refund_id": self.refund_id, "state": str(self.state), "created": self.created}


def request_refund(
    ctx: Context,
    *,
    reason: str,
    invoice_id: int | None = None,
    attempt_id: int | None = None,
    actor: Actor | None = None,
) -> RefundOutcome:
    """Record a refund of a charge and enqueue it; a second request for the same charge returns the first.

    Name the charge by its invoice (the invoice's approved attempt) or by its attempt, which must have been
    approved: a declined attempt is refused, never swapped for another attempt of its invoice. The `actor` (an
    operator) is recorded with a refund this call creates.
    """
    if (invoice_id is None) == (attempt_id is None):
        raise InvalidRequest("give exactly one of invoice_id or charge_id")
    reason = _checked_reason(reason)
    if actor is not None and actor.reason is None:
        actor = replace(actor, reason=reason)
    now = ctx.clock.now()
    try:
        with ctx.unit_of_work() as session:
            return _audited(session, now, actor, _request(ctx, session, now, invoice_id, attempt_id, reason))
    except IntegrityError:
        # A concurrent request for the same charge won the unique constraint: this run finds its refund.
        with ctx.unit_of_work() as session:
            return _audited(session, now, actor, _request(ctx, session, now, invoice_id, attempt_id, reason))


def _audited(session: Session, now: datetime, actor: Actor | None, outcome: RefundOutcome) -> RefundOutcome:
    if actor is not None and outcome.created:
        actor.record(
            session,
            now,
            "refund.request",
            invoice_id=outcome.invoice_id,
            refund_id=outcome.refund_id,
            state=str(outcome.state),
        )
    return outcome


def _checked_reason(reason: object) -> str:
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 255:
        raise InvalidRequest("reason must be a non-empty string of at most 255 characters")
    if any(unicodedata.category(c) == "Cc" for c in reason):
        # PostgreSQL refuses NUL in text, and no other control character belongs in an operator's note.
        raise InvalidRequest("reason must not contain control characters (NUL, newlines, tabs, escapes)")
    return reason.strip()


def _request(
    ctx: Context, session: Session, now: datetime, invoice_id: int | None, attempt_id: int | None, reason: str
) -> RefundOutcome:
    if attempt_id is not None:
        attempt = session.get(ChargeAttempt, attempt_id)
        if attempt is None:
            raise NotFound(f"charge {attempt_id} does not exist")
        existing = session.execute(select(Refund).where(Refund.charge_attempt_id == attempt_id)).scalar_one_or_none()
        if existing is not None:
            return RefundOutcome(existing.id, existing.state, invoice_id=existing.invoice_id)
        if attempt.state != AttemptState.APPROVED:
            raise InvalidRequest(f"charge {attempt_id} was not approved (state {attempt.state}): nothing to refund")
    else:
        if session.get(Invoice, invoice_id) is None:
            raise NotFound(f"invoice {invoice_id} does not exist")
        found = session.execute(
            select(ChargeAttempt).where(
                ChargeAttempt.invoice_id == invoice_id, ChargeAttempt.state == AttemptState.APPROVED
            )
        ).scalar_one_or_none()
        if found is None:
            raise InvalidRequest(f"invoice {invoice_id} has no approved charge to refund")
        attempt = found
    approved_at = attempt.approved_at or attempt.finished_at or now
    return open_refund(ctx, session, now, attempt.id, attempt.invoice_id, approved_at, reason)


def open_refund(
    ctx: Context, session: Session, now: datetime, attempt_id: int, invoice_id: int, approved_at: datetime, reason: str
) -> RefundOutcome:
    """The refund of one approved charge, in the caller's transaction: the existing one if there is one,
    else requested (and its execution enqueued) inside the void window, or expired past it."""
    existing = session.execute(select(Refund).where(Refund.charge_attempt_id == attempt_id)).scalar_one_or_none()
    if existing is not None:
        return RefundOutcome(existing.id, existing.state, invoice_id=existing.invoice_id)
    # Tpaga's window, not the billing time zone: its "same day" is always Bogota's.
    deadline = refund_deadline(approved_at, ctx.refund_window, ctx.refund_safety_margin)
    expired = now >= deadline
    refund = Refund(
        charge_attempt_id=attempt_id,
        invoice_id=invoice_id,
        reason=reason,
        state=RefundState.EXPIRED if expired else RefundState.REQUESTED,
        deadline_at=deadline,
        requested_at=now,
        finished_at=now if expired else None,
        error="void window passed before the request" if expired else None,
    )
    session.add(refund)
    session.flush()
    events.record(
        session,
        now,
        "refund.expired" if expired else "refund.requested",
        invoice_id=invoice_id,
        attempt_id=attempt_id,
        refund_id=refund.id,
    )
    if expired:
        emit_refunds(session, now, "refund.expired", [refund.id])
    else:
        enqueue(session, now, task_names.EXECUTE_REFUND, refund_id=refund.id)
    return RefundOutcome(refund.id, refund.state, created=True, invoice_id=invoice_id)


def record_voided_at_gateway(session: Session, now: datetime, attempt_id: int, invoice_id: int) -> None:
    """A charge a lookup found already voided at Tpaga (by someone else): its refund, recorded as done."""
    if session.execute(select(Refund.id).where(Refund.charge_attempt_id == attempt_id)).first() is not None:
        return
    refund = Refund(
        charge_attempt_id=attempt_id,
        invoice_id=invoice_id,
        reason="voided at Tpaga before this system learned of the charge",
        state=RefundState.VOIDED,
        deadline_at=now,
        requested_at=now,
        finished_at=now,
    )
    session.add(refund)
    session.flush()
    events.record(session, now, "refund.voided", invoice_id=invoice_id, attempt_id=attempt_id, refund_id=refund.id)
    emit_refunds(session, now, "refund.voided", [refund.id])


def emit_refunds(session: Session, now: datetime, type_: str, refund_ids: Sequence[int]) -> None:
    """refund.voided / .expired / .rejected for refunds that just reached that state, in the order of their
    subscriptions (one read for all: refunds are not the charge path)."""
    if not refund_ids:
        return
    rows = session.execute(
        select(
            Refund.id,
            Refund.invoice_id,
            Refund.charge_attempt_id,
            Refund.reason,
            Invoice.subscription_id,
            Invoice.amount_minor,
            Invoice.currency,
        )
        .join(Invoice, Invoice.id == Refund.invoice_id)
        .where(Refund.id.in_(list(refund_ids)))
        .order_by(Refund.id)
    ).all()
    stream.emit_many(
        session,
        [
            stream.row(
                now,
                type_,
                subscription_id=r.subscription_id,
                refund_id=r.id,
                invoice_id=r.invoice_id,
                charge_id=r.charge_attempt_id,
                **stream.money(r.amount_minor, r.currency),
                reason=r.reason,
            )
            for r in rows
        ],
    )
