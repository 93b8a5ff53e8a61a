"""Refunds (voids): idempotent per charge, executed before the void window closes, expired otherwise."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing.db.models import ChargeAttempt, Invoice, Refund
from billing.domain.refunds import refund_deadline
from billing.domain.states import AttemptState, RefundState
from billing.gateway import errors as gw
from billing.services import events
from billing.services.context import Context, enqueue
from billing.services.errors import InvalidRequest, NotFound
from billing.services.pause import PauseReason, pause_billing

log = logging.getLogger("billing.refunds")

EXECUTE_REFUND = "billing.execute_refund"


@dataclass(frozen=True)
class RefundOutcome:
    refund_id: int
    state: str
    created: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"refund_id": self.refund_id, "state": str(self.state), "created": self.created}


def request_refund(ctx: Context, *, invoice_id: int, reason: str) -> RefundOutcome:
    """Record a refund of the invoice's approved charge and enqueue it; a second request returns the first."""
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 255:
        raise InvalidRequest("reason must be a non-empty string of at most 255 characters")
    now = ctx.clock.now()
    try:
        with ctx.unit_of_work() as session:
            return _request(ctx, session, now, invoice_id, reason.strip())
    except IntegrityError:
        # A concurrent request for the same charge won the unique constraint: return its refund.
        with ctx.sessions() as session:
            refund = session.execute(
                select(Refund)
                .join(ChargeAttempt, ChargeAttempt.id == Refund.charge_attempt_id)
                .where(Refund.invoice_id == invoice_id, ChargeAttempt.state == AttemptState.APPROVED)
            ).scalar_one()
            return RefundOutcome(refund.id, refund.state)


def _request(ctx: Context, session: Session, now: datetime, invoice_id: int, reason: str) -> RefundOutcome:
    invoice = session.get(Invoice, invoice_id)
    if invoice is None:
        raise NotFound(f"invoice {invoice_id} does not exist")
    attempt = session.execute(
        select(ChargeAttempt).where(
            ChargeAttempt.invoice_id == invoice_id, ChargeAttempt.state == AttemptState.APPROVED
        )
    ).scalar_one_or_none()
    if attempt is None:
        raise InvalidRequest(f"invoice {invoice_id} has no approved charge to refund")
    approved_at = attempt.approved_at or attempt.finished_at or now
    return open_refund(ctx, session, now, attempt.id, invoice_id, approved_at, reason)


def open_refund(
    ctx: Context, session: Session, now: datetime, attempt_id: int, invoice_id: int, approved_at: datetime, reason: str
) -> RefundOutcome:
    """The refund of one approved charge, in the caller's transaction: the existing one if there is one,
    else requested (and its execution enqueued) inside the void window, or expired past it."""
    existing = session.execute(select(Refund).where(Refund.charge_attempt_id == attempt_id)).scalar_one_or_none()
    if existing is not None:
        return RefundOutcome(existing.id, existing.state)
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
    if not expired:
        enqueue(session, now, EXECUTE_REFUND, refund_id=refund.id)
    return RefundOutcome(refund.id, refund.state, created=True)


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


def _cas_refund(session: Session, refund_id: int, states: tuple[str, ...], **values: Any) -> bool:
    result = session.execute(update(Refund).where(Refund.id == refund_id, Refund.state.in_(states)).values(**values))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def execute_refund(ctx: Context, refund_id: int) -> RefundOutcome:
    """Void the charge at Tpaga if the window is still open; record expired without calling Tpaga if not."""
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        refund = session.get(Refund, refund_id)
        if refund is None:
            raise NotFound(f"refund {refund_id} does not exist")
        if refund.state != RefundState.REQUESTED:
            return RefundOutcome(refund_id, refund.state)
        if now >= refund.deadline_at:
            _cas_refund(
                session,
                refund_id,
                (RefundState.REQUESTED,),
                state=RefundState.EXPIRED,
                finished_at=now,
                error="void window passed; Tpaga not called",
            )
            events.record(session, now, "refund.expired", refund_id=refund_id, invoice_id=refund.invoice_id)
            return RefundOutcome(refund_id, RefundState.EXPIRED)
        attempt = session.get(ChargeAttempt, refund.charge_attempt_id)
        assert attempt is not None and attempt.tpaga_charge_id
        charge_id = attempt.tpaga_charge_id
        if not _cas_refund(
            session,
            refund_id,
            (RefundState.REQUESTED,),
            state=RefundState.SENDING,
            lease_expires_at=now + ctx.sending_lease,
        ):
            return RefundOutcome(refund_id, "claimed_elsewhere")
    state: str = RefundState.VOIDED
    status: int | None = 202
    error: str | None = None
    pause = False
    try:
        ctx.gateway.refund(charge_id)
    except gw.RefundRejectedError as exc:
        state, status, error = RefundState.REJECTED, exc.http_status, "Tpaga refused the void (406)"
    except gw.NotSentError:
        state, status, error = RefundState.REQUESTED, None, "not sent; will retry"
    except gw.UnauthorizedError:
        state, status, error, pause = RefundState.REQUESTED, 401, "unauthorized; billing paused", True
    except Exception as exc:  # unknown: the void may have happened
        state, status, error = RefundState.UNKNOWN, getattr(exc, "http_status", None), type(exc).__name__
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        done = state not in (RefundState.REQUESTED,)
        _cas_refund(
            session,
            refund_id,
            (RefundState.SENDING,),
            state=state,
            http_status=status,
            error=error,
            lease_expires_at=None,
            finished_at=now if done else None,
        )
        if pause:
            pause_billing(session, now, PauseReason.UNAUTHORIZED, None)
        events.record(session, now, f"refund.{state}", refund_id=refund_id, http_status=status)
    return RefundOutcome(refund_id, state)


def due_refund_ids(session: Session, limit: int = 500) -> list[int]:
    return list(
        session.execute(
            select(Refund.id).where(Refund.state == RefundState.REQUESTED).order_by(Refund.deadline_at).limit(limit)
        ).scalars()
    )


def expire_refunds(ctx: Context) -> int:
    """Requested refunds past their deadline become expired; refunds stuck in sending become unknown."""
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        expired = session.execute(
            update(Refund)
            .where(Refund.state == RefundState.REQUESTED, Refund.deadline_at <= now)
            .values(state=RefundState.EXPIRED, finished_at=now, error="void window passed; Tpaga not called")
        ).rowcount  # type: ignore[attr-defined]
        session.execute(
            update(Refund)
            .where(Refund.state == RefundState.SENDING, Refund.lease_expires_at <= now)
            .values(state=RefundState.UNKNOWN, finished_at=now, error="worker lost while voiding")
        )
    return int(expired)
