"""Cancelling subscriptions."""

from __future__ import annotations

from typing import Any

from sqlalchemy import exists, select, update

from billing.db.models import ChargeAttempt, Invoice, Subscription
from billing.domain.states import AttemptState, InvoiceState, SubscriptionStatus
from billing.services import events
from billing.services.context import Context
from billing.services.errors import InvalidRequest, NotFound
from billing.services.refunds import request_refund


def cancel_subscription(
    ctx: Context, *, subscription_id: int, at_period_end: bool = False, refund_last_charge: bool = False
) -> dict[str, Any]:
    """Cancel now (open invoices without a charge in flight are voided) or at the period's end."""
    for name, value in (("at_period_end", at_period_end), ("refund_last_charge", refund_last_charge)):
        if not isinstance(value, bool):
            raise InvalidRequest(f"{name} must be true or false")
    now = ctx.clock.now()
    last_paid: int | None = None
    with ctx.unit_of_work() as session:
        sub = session.get(Subscription, subscription_id)
        if sub is None:
            raise NotFound(f"subscription {subscription_id} does not exist")
        if sub.status == SubscriptionStatus.CANCELED:
            result: dict[str, Any] = {
                "subscription_id": subscription_id,
                "status": sub.status,
                "changed": False,
            }
        elif at_period_end and sub.next_billing_at is not None:
            # Only a subscription that still renews has a period end to wait for; an unpaid one (no next
            # billing time) is never picked up by the renewal scan again, so it is canceled now below.
            sub.cancel_at = sub.next_billing_at
            sub.updated_at = now
            events.record(session, now, "subscription.cancel_scheduled", subscription_id=subscription_id)
            result = {
                "subscription_id": subscription_id,
                "status": sub.status,
                "changed": True,
                "cancel_at": sub.cancel_at.isoformat(),
            }
        else:
            session.execute(
                update(Subscription)
                .where(Subscription.id == subscription_id, Subscription.status != SubscriptionStatus.CANCELED)
                .values(status=SubscriptionStatus.CANCELED, canceled_at=now, next_billing_at=None, updated_at=now)
            )
            in_flight = exists().where(
                ChargeAttempt.invoice_id == Invoice.id,
                ChargeAttempt.state.in_((AttemptState.PENDING, AttemptState.SENDING, AttemptState.UNKNOWN)),
            )
            session.execute(
                update(Invoice)
                .where(Invoice.subscription_id == subscription_id, Invoice.state == InvoiceState.OPEN, ~in_flight)
                .values(state=InvoiceState.VOID, due_at=None, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            events.record(session, now, "subscription.canceled", subscription_id=subscription_id)
            result = {
                "subscription_id": subscription_id,
                "status": SubscriptionStatus.CANCELED,
                "changed": True,
            }
        if refund_last_charge:
            last_paid = session.execute(
                select(Invoice.id)
                .where(Invoice.subscription_id == subscription_id, Invoice.state == InvoiceState.PAID)
                .order_by(Invoice.period_index.desc())
                .limit(1)
            ).scalar_one_or_none()
    if refund_last_charge:
        if last_paid is None:
            result["refund"] = None
        else:
            result["refund"] = request_refund(ctx, invoice_id=last_paid, reason="subscription canceled").as_dict()
    return result
