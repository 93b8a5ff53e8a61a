"""Opening invoices: one per due subscription period, never skipped, never duplicated."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing.db.models import Invoice, Plan, Subscription
from billing.domain.periods import Interval, due_period_indexes, period_at, period_boundary
from billing.domain.states import InvoiceState, SubscriptionStatus
from billing.services import events
from billing.services.context import Context, enqueue

# Catch-up after long downtime is bounded per pass so one subscription cannot hold a transaction forever.
MAX_PERIODS_PER_PASS = 24


def _insert_invoice(session: Session, values: dict[str, Any]) -> int | None:
    """INSERT ... ON CONFLICT DO NOTHING on (subscription_id, period_index); the id if this call inserted it."""
    dialect = session.get_bind().dialect.name
    ins: Any = postgresql.insert(Invoice) if dialect == "postgresql" else sqlite.insert(Invoice)
    stmt = (
        ins.values(**values)
        .on_conflict_do_nothing(index_elements=["subscription_id", "period_index"])
        .returning(Invoice.id)
    )
    return session.execute(stmt).scalar_one_or_none()


def due_subscriptions_query(now: datetime, limit: int) -> Select[Subscription]:
    """Subscriptions whose next period has started; skip rows another worker holds (PostgreSQL)."""
    return (
        select(Subscription)
        .where(Subscription.next_billing_at.is_not(None), Subscription.next_billing_at <= now)
        .order_by(Subscription.next_billing_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def open_due_invoices(ctx: Context, *, limit: int = 500) -> int:
    """Open the invoices of every due period of up to `limit` subscriptions; returns how many were opened."""
    now = ctx.clock.now()
    opened = 0
    plans: dict[int, Plan] = {}
    with ctx.unit_of_work() as session:
        for sub in session.execute(due_subscriptions_query(now, limit)).scalars().all():
            plan = plans.get(sub.plan_id) or session.get(Plan, sub.plan_id)
            assert plan is not None
            plans[plan.id] = plan
            opened += _open_for_subscription(ctx, session, sub, plan, now)
    return opened


def _open_for_subscription(ctx: Context, session: Session, sub: Subscription, plan: Plan, now: datetime) -> int:
    interval, count, tz = Interval(plan.interval), plan.interval_count, ctx.timezone
    old_index = sub.next_period_index
    indexes = due_period_indexes(sub.anchor_at, old_index, now, interval, count, tz, limit=MAX_PERIODS_PER_PASS)
    opened = 0
    new_index = old_index
    values: dict[str, Any] = {"updated_at": now}
    for index in indexes:
        period = period_at(sub.anchor_at, index, interval, count, tz)
        if sub.cancel_at is not None and period.start >= sub.cancel_at:
            values.update(status=SubscriptionStatus.CANCELED, canceled_at=now, next_billing_at=None)
            events.record(session, now, "subscription.canceled", subscription_id=sub.id, at_period_end=True)
            break
        invoice_id = _insert_invoice(
            session,
            {
                "subscription_id": sub.id,
                "period_index": index,
                "period_start": period.start,
                "period_end": period.end,
                "amount_minor": plan.amount_minor,
                "currency": plan.currency,
                "state": InvoiceState.OPEN,
                "due_at": period.start,
                "created_at": now,
                "updated_at": now,
            },
        )
        new_index = index + 1
        values.update(current_period_start=period.start, current_period_end=period.end)
        if invoice_id is not None:
            opened += 1
            enqueue(session, now, "billing.charge_invoice", invoice_id=invoice_id)
            events.record(session, now, "invoice.opened", subscription_id=sub.id, invoice_id=invoice_id, period=index)
    if "next_billing_at" not in values:
        values["next_billing_at"] = period_boundary(sub.anchor_at, new_index, interval, count, tz)
    if sub.status == SubscriptionStatus.TRIALING and new_index > 0:
        values.setdefault("status", SubscriptionStatus.ACTIVE)
    values["next_period_index"] = new_index
    # Compare-and-set on the period counter: a second beat or worker that got here first wins, and the
    # unique (subscription_id, period_index) constraint already made its invoices the only ones.
    session.execute(
        update(Subscription)
        .where(Subscription.id == sub.id, Subscription.next_period_index == old_index)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return opened


def open_invoice_count(session: Session, subscription_id: int) -> int:
    return len(
        session.execute(
            select(Invoice.id).where(
                Invoice.subscription_id == subscription_id,
                Invoice.state.in_((InvoiceState.OPEN, InvoiceState.REVIEW)),
            )
        ).all()
    )
