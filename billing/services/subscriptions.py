"""Cancelling subscriptions."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.db import cas
from billing.db.models import ChargeAttempt, Invoice, Plan, Subscription
from billing.domain.periods import Interval, period_boundary
from billing.domain.states import InvoiceState, SubscriptionStatus
from billing.services import events, stream
from billing.services.charging.attempts import IN_FLIGHT
from billing.services.context import Context
from billing.services.errors import InvalidRequest, NotFound
from billing.services.refunds import request_refund


def cancel_subscription(
    ctx: Context,
    *,
    subscription_id: int,
    at_period_end: bool = False,
    refund_last_charge: bool = False,
    guard: Callable[[Session, Subscription], None] | None = None,
    record: Callable[[Session, datetime, dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Cancel now (open invoices without a charge in flight are voided) or at the period's end.

    `guard` sees the subscription first, in the cancel's transaction (a command reads its external id), and `record`
    the result before it commits (the command ledger); the refund is requested after the commit.
    """
    for name, value in (("at_period_end", at_period_end), ("refund_last_charge", refund_last_charge)):
        if not isinstance(value, bool):
            raise InvalidRequest(f"{name} must be true or false")
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        sub = session.get(Subscription, subscription_id)
        if sub is None:
            raise NotFound(f"subscription {subscription_id} does not exist")
        if guard is not None:
            guard(session, sub)
        if sub.status == SubscriptionStatus.CANCELED:
            result: dict[str, Any] = {
                "subscription_id": subscription_id,
                "status": sub.status,
                "changed": False,
            }
        elif at_period_end and (sub.next_billing_at is not None or _renews_on_resume(sub)):
            # Only a subscription that still renews has a period end to wait for; an unpaid one (no next
            # billing time) is never picked up by the renewal scan again, so it is canceled now below. A paused
            # one renews once resumed: its period ends where its next billing time was before the pause (the
            # renewal scan cancels it there), so a pause and a cancel end the same in either order.
            sub.cancel_at = sub.next_billing_at or _next_boundary(session, ctx, sub)
            sub.updated_at = now
            events.record(session, now, "subscription.cancel_scheduled", subscription_id=subscription_id)
            stream.emit(
                session,
                now,
                "subscription.cancel_scheduled",
                subscription_id=subscription_id,
                status=str(sub.status),
                cancel_at=stream.iso(sub.cancel_at),
                entitlement=stream.subscription_entitlement(sub, now),
            )
            result = {
                "subscription_id": subscription_id,
                "status": sub.status,
                "changed": True,
                "cancel_at": sub.cancel_at.isoformat(),
            }
        else:
            changed = _cancel_now(session, now, subscription_id)
            if changed:
                events.record(session, now, "subscription.canceled", subscription_id=subscription_id)
                stream.emit(
                    session,
                    now,
                    "subscription.canceled",
                    subscription_id=subscription_id,
                    status=str(SubscriptionStatus.CANCELED),
                    reason="requested",
                    entitlement=stream.entitlement(False, now),
                )
            result = {
                "subscription_id": subscription_id,
                "status": SubscriptionStatus.CANCELED,
                "changed": changed,
            }
        if record is not None:
            record(session, now, dict(result))
    if refund_last_charge:
        result["refund"] = refund_last_paid(ctx, subscription_id)
    return result


def _renews_on_resume(sub: Subscription) -> bool:
    return sub.paused_at is not None and sub.status != SubscriptionStatus.UNPAID


def _next_boundary(session: Session, ctx: Context, sub: Subscription) -> datetime:
    plan = session.get_one(Plan, sub.plan_id)
    return period_boundary(
        sub.anchor_at, sub.next_period_index, Interval(plan.interval), plan.interval_count, ctx.timezone
    )


def refund_last_paid(ctx: Context, subscription_id: int) -> dict[str, Any] | None:
    """Request the refund of the subscription's last paid invoice (idempotent: one refund per charge)."""
    with ctx.sessions() as session:
        last_paid = session.execute(
            select(Invoice.id)
            .where(Invoice.subscription_id == subscription_id, Invoice.state == InvoiceState.PAID)
            .order_by(Invoice.period_index.desc())
            .limit(1)
        ).scalar_one_or_none()
    if last_paid is None:
        return None
    return request_refund(ctx, invoice_id=last_paid, reason="subscription canceled").as_dict()


def _cancel_now(session: Session, now: datetime, subscription_id: int) -> bool:
    """Cancel, voiding the open invoices that have no charge in flight; False when a concurrent cancel won.

    The open invoices are locked first (a claim or `mark_sending` holding one is waited for), and which of them
    have a charge in flight is read only then, by a statement of its own: in READ COMMITTED a single UPDATE
    with a NOT EXISTS would re-check the invoice row after the wait but read the attempts from its old
    snapshot, missing the attempt the claim just committed. A `pending` attempt has not left; `mark_sending`
    refuses it once the invoice is void. Invoices before subscription: the order the charge path locks in.
    """
    locked = list(
        session.execute(
            select(Invoice.id)
            .where(Invoice.subscription_id == subscription_id, Invoice.state == InvoiceState.OPEN)
            .order_by(Invoice.id)
            .with_for_update()
        ).scalars()
    )
    in_flight = (
        set(
            session.execute(
                select(ChargeAttempt.invoice_id).where(
                    ChargeAttempt.invoice_id.in_(locked), ChargeAttempt.state.in_(IN_FLIGHT)
                )
            ).scalars()
        )
        if locked
        else set()
    )
    voided = cas.transition_ids(
        session,
        Invoice,
        [i for i in locked if i not in in_flight],
        InvoiceState.VOID,
        now=now,
        due_at=None,
        updated_at=now,
    )
    if voided:
        stream.emit_many(
            session,
            [
                stream.row(
                    now,
                    "invoice.voided",
                    subscription_id=subscription_id,
                    invoice_id=invoice.id,
                    **stream.money(invoice.amount_minor, invoice.currency),
                    period_start=stream.iso(invoice.period_start),
                    period_end=stream.iso(invoice.period_end),
                )
                for invoice in session.execute(
                    select(Invoice).where(Invoice.id.in_(voided)).order_by(Invoice.id)
                ).scalars()
            ],
        )
    return cas.transition(
        session,
        Subscription,
        subscription_id,
        SubscriptionStatus.CANCELED,
        now=now,
        canceled_at=now,
        next_billing_at=None,
        paused_at=None,
        resumes_at=None,
        updated_at=now,
    )
