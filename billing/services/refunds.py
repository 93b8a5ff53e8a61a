"""Refunds (voids): idempotent per charge, executed before the void window closes, expired otherwise.

A void is idempotent at Tpaga, so a refund whose outcome is unknown (a 5xx, a lost answer, a lost worker) is
sent again with backoff until its deadline, then settled by a lookup of the charge: voided, or expired and
flagged for a person. While a refund is `unknown`, its `lease_expires_at` holds the time of its next try.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing import task_names
from billing.db import cas
from billing.db.models import ChargeAttempt, Invoice, Refund
from billing.domain.refunds import refund_deadline
from billing.domain.states import AttemptState, RefundState
from billing.gateway import errors as gw
from billing.services import events
from billing.services.context import Context, enqueue
from billing.services.errors import InvalidRequest, NotFound
from billing.services.pause import PauseReason, pause_billing

log = logging.getLogger("billing.refunds")


# An unknown refund waits as long as it has existed (so the waits double), within these bounds.
RETRY_FIRST = timedelta(seconds=60)
RETRY_MAX = timedelta(hours=1)


@dataclass(frozen=True)
class RefundOutcome:
    refund_id: int
    state: str
    created: bool = False
    invoice_id: int | None = None  # known when the refund was requested, not part of `as_dict`

    def as_dict(self) -> dict[str, Any]:
        return {"refund_id": self.refund_id, "state": str(self.state), "created": self.created}


def request_refund(
    ctx: Context, *, reason: str, invoice_id: int | None = None, attempt_id: int | None = None
) -> RefundOutcome:
    """Record a refund of a charge and enqueue it; a second request for the same charge returns the first.

    Name the charge by its invoice (the invoice's approved attempt) or by its attempt, which must have been
    approved: a declined attempt is refused, never swapped for another attempt of its invoice.
    """
    if (invoice_id is None) == (attempt_id is None):
        raise InvalidRequest("give exactly one of invoice_id or charge_id")
    reason = _checked_reason(reason)
    now = ctx.clock.now()
    try:
        with ctx.unit_of_work() as session:
            return _request(ctx, session, now, invoice_id, attempt_id, reason)
    except IntegrityError:
        # A concurrent request for the same charge won the unique constraint: this run finds its refund.
        with ctx.unit_of_work() as session:
            return _request(ctx, session, now, invoice_id, attempt_id, reason)


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
    if not expired:
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


def execute_refund(ctx: Context, refund_id: int) -> RefundOutcome:
    """Void the charge at Tpaga if the window is still open (again, for an unknown refund whose next try has
    come); past the window, a requested refund is expired without calling Tpaga and an unknown one is settled
    by a lookup of the charge."""
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        refund = session.get(Refund, refund_id)
        if refund is None:
            raise NotFound(f"refund {refund_id} does not exist")
        if refund.state not in (RefundState.REQUESTED, RefundState.UNKNOWN):
            return RefundOutcome(refund_id, refund.state)
        was = RefundState(refund.state)
        if was is RefundState.UNKNOWN and refund.lease_expires_at is not None and now < refund.lease_expires_at:
            return RefundOutcome(refund_id, was)  # a message early for its backoff (two scans enqueued it)
        attempt = session.get(ChargeAttempt, refund.charge_attempt_id)
        assert attempt is not None and attempt.tpaga_charge_id
        charge_id = attempt.tpaga_charge_id
        invoice_id, requested_at, deadline = refund.invoice_id, refund.requested_at, refund.deadline_at
        if now >= deadline and was is RefundState.REQUESTED:
            if cas.transition(
                session,
                Refund,
                refund_id,
                RefundState.EXPIRED,
                now=now,
                finished_at=now,
                error="void window passed; Tpaga not called",
            ):
                events.record(session, now, "refund.expired", refund_id=refund_id, invoice_id=invoice_id)
            return RefundOutcome(refund_id, RefundState.EXPIRED)
        if now < deadline and not cas.transition(
            session,
            Refund,
            refund_id,
            RefundState.SENDING,
            now=now,
            lease_expires_at=now + ctx.sending_lease,
            finished_at=None,
        ):
            return RefundOutcome(refund_id, "claimed_elsewhere")
    if now >= deadline:
        return _settle_by_lookup(ctx, refund_id, invoice_id, charge_id, requested_at)
    return _send(ctx, refund_id, invoice_id, charge_id, was, requested_at, deadline)


def _send(
    ctx: Context,
    refund_id: int,
    invoice_id: int,
    charge_id: str,
    was: RefundState,
    requested_at: datetime,
    deadline: datetime,
) -> RefundOutcome:
    state: RefundState = RefundState.VOIDED
    status: int | None = 202
    error: str | None = None
    pause = False
    try:
        ctx.gateway.refund(charge_id)
    except gw.RefundRejectedError as exc:
        if exc.charge is not None and exc.charge.voided:
            # An earlier try of this refund (whose answer was lost) made the void: the money is back.
            state, status, error = RefundState.VOIDED, exc.http_status, "already voided at Tpaga"
        else:
            state, status, error = RefundState.REJECTED, exc.http_status, "Tpaga refused the void (406)"
    except gw.NotSentError:
        state, status, error = RefundState.REQUESTED, None, "not sent; will retry"
    except gw.UnauthorizedError:
        state, status, error, pause = RefundState.REQUESTED, 401, "unauthorized; billing paused", True
    except Exception as exc:  # unknown: the void may have happened
        state, status, error = RefundState.UNKNOWN, getattr(exc, "http_status", None), type(exc).__name__
    if state is RefundState.REQUESTED and was is RefundState.UNKNOWN:
        state = RefundState.UNKNOWN  # this try never left, but an earlier one may have voided the charge
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        values: dict[str, Any] = {"http_status": status, "error": error, "lease_expires_at": None}
        if state is RefundState.UNKNOWN:
            values["lease_expires_at"] = _next_try(now, requested_at, deadline)
        if state is not RefundState.REQUESTED:
            values["finished_at"] = now
        if cas.transition(session, Refund, refund_id, state, now=now, **values):
            if pause:
                pause_billing(session, now, PauseReason.UNAUTHORIZED, None)
            events.record(
                session, now, f"refund.{state}", refund_id=refund_id, invoice_id=invoice_id, http_status=status
            )
    return RefundOutcome(refund_id, state)


def _next_try(now: datetime, requested_at: datetime, deadline: datetime) -> datetime:
    """When an unknown refund is tried again: after as long as it has existed (bounded), and at the latest at
    its deadline, when the lookup that settles it is due."""
    wait = min(max(now - requested_at, RETRY_FIRST), RETRY_MAX)
    return min(now + wait, deadline)


def _settle_by_lookup(
    ctx: Context, refund_id: int, invoice_id: int, charge_id: str, requested_at: datetime
) -> RefundOutcome:
    """Past its deadline, an unknown refund is what Tpaga says of the charge: voided, or not (expired, and
    flagged: the money must be returned by hand). A failed lookup is tried again later."""
    try:
        charge = ctx.gateway.get_charge(charge_id)
    except gw.TpagaError as exc:
        now = ctx.clock.now()
        log.warning(
            "refund %s: the lookup of its charge failed (%s); trying again later", refund_id, type(exc).__name__
        )
        with ctx.unit_of_work() as session:
            cas.update_while(
                session,
                Refund,
                refund_id,
                RefundState.UNKNOWN,
                lease_expires_at=now + min(max(now - requested_at, RETRY_FIRST), RETRY_MAX),
            )
        return RefundOutcome(refund_id, RefundState.UNKNOWN)
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        if charge.voided:
            if cas.transition(
                session,
                Refund,
                refund_id,
                RefundState.VOIDED,
                now=now,
                finished_at=now,
                lease_expires_at=None,
                error="voided at Tpaga (found by a lookup)",
            ):
                events.record(session, now, "refund.voided", refund_id=refund_id, invoice_id=invoice_id, by="lookup")
            return RefundOutcome(refund_id, RefundState.VOIDED)
        if cas.transition(
            session,
            Refund,
            refund_id,
            RefundState.EXPIRED,
            now=now,
            finished_at=now,
            lease_expires_at=None,
            error="void window passed; Tpaga says the charge was not voided",
        ):
            events.record(
                session,
                now,
                "refund.flagged",
                refund_id=refund_id,
                invoice_id=invoice_id,
                reason="the void's outcome stayed unknown until the window passed and Tpaga did not void the "
                "charge: refund it by hand",
            )
    return RefundOutcome(refund_id, RefundState.EXPIRED)


def due_refund_ids(session: Session, now: datetime, limit: int = 500) -> list[int]:
    """Refunds to execute now: every requested one, and every unknown one whose next try has come."""
    unknown_due = (Refund.state == RefundState.UNKNOWN) & or_(
        Refund.lease_expires_at.is_(None), Refund.lease_expires_at <= now
    )
    return list(
        session.execute(
            select(Refund.id)
            .where(or_(Refund.state == RefundState.REQUESTED, unknown_due))
            .order_by(Refund.deadline_at)
            .limit(limit)
        ).scalars()
    )


def expire_refunds(ctx: Context) -> int:
    """Requested refunds past their deadline become expired (Tpaga not called); refunds stuck in sending
    become unknown, due for another try at once. Returns how many expired."""
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        late = list(
            session.execute(
                select(Refund.id, Refund.invoice_id).where(
                    Refund.state == RefundState.REQUESTED, Refund.deadline_at <= now
                )
            ).all()
        )
        expired = cas.transition_ids(
            session,
            Refund,
            [r.id for r in late],
            RefundState.EXPIRED,
            now=now,
            finished_at=now,
            error="void window passed; Tpaga not called",
        )
        invoices = {r.id: r.invoice_id for r in late}
        rows = [events.row(now, "refund.expired", refund_id=i, invoice_id=invoices[i]) for i in expired]
        lost = list(
            session.execute(
                select(Refund.id, Refund.invoice_id).where(
                    Refund.state == RefundState.SENDING, Refund.lease_expires_at <= now
                )
            ).all()
        )
        unknown = cas.transition_ids(
            session,
            Refund,
            [r.id for r in lost],
            RefundState.UNKNOWN,
            now=now,
            finished_at=now,
            lease_expires_at=now,
            error="worker lost while voiding",
        )
        invoices = {r.id: r.invoice_id for r in lost}
        rows += [
            events.row(now, "refund.unknown", refund_id=i, invoice_id=invoices[i], reason="worker lost")
            for i in unknown
        ]
        events.record_many(session, rows)
    return len(expired)
