"""Executing refunds (voids) before the void window closes, and expiring those it closed on.

A void is idempotent at Tpaga, so a refund whose outcome is unknown (a 5xx, a lost answer, a lost worker) is
sent again with backoff until its deadline, then settled by a lookup of the charge: voided, or expired and
flagged for a person. While a refund is `unknown`, its `lease_expires_at` holds the time of its next try.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from billing.db import cas
from billing.db.models import ChargeAttempt, Refund
from billing.domain.states import RefundState
from billing.gateway import errors as gw
from billing.services import events
from billing.services.context import Context
from billing.services.errors import NotFound
from billing.services.pause import PauseReason, pause_billing
from billing.services.refunds import RefundOutcome, emit_refunds

log = logging.getLogger("billing.refunds")

# An unknown refund waits as long as it has existed (so the waits double), within these bounds.
RETRY_FIRST = timedelta(seconds=60)
RETRY_MAX = timedelta(hours=1)


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
                emit_refunds(session, now, "refund.expired", [refund_id])
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
            if state in (RefundState.VOIDED, RefundState.REJECTED):
                emit_refunds(session, now, f"refund.{state}", [refund_id])
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
                emit_refunds(session, now, "refund.voided", [refund_id])
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
            emit_refunds(session, now, "refund.expired", [refund_id])
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
        expired = _move(
            session,
            now,
            (Refund.state == RefundState.REQUESTED, Refund.deadline_at <= now),
            RefundState.EXPIRED,
            "refund.expired",
            {},
            finished_at=now,
            error="void window passed; Tpaga not called",
        )
        lost = _move(
            session,
            now,
            (Refund.state == RefundState.SENDING, Refund.lease_expires_at <= now),
            RefundState.UNKNOWN,
            "refund.unknown",
            {"reason": "worker lost"},
            finished_at=now,
            lease_expires_at=now,
            error="worker lost while voiding",
        )
        events.record_many(session, expired + lost)
        emit_refunds(session, now, "refund.expired", [row["refund_id"] for row in expired])
    return len(expired)


def _move(
    session: Session,
    now: datetime,
    where: tuple[Any, ...],
    to: RefundState,
    kind: str,
    data: dict[str, Any],
    **values: Any,
) -> list[dict[str, Any]]:
    """Move the refunds matching `where` to `to` (checked transitions); the events of those that moved."""
    found = dict(session.execute(select(Refund.id, Refund.invoice_id).where(*where)).all())
    moved = cas.transition_ids(session, Refund, list(found), to, now=now, **values)
    return [events.row(now, kind, refund_id=i, invoice_id=found[i], **data) for i in moved]
