"""Opening invoices: one per due subscription period, never skipped, never duplicated.

A pass takes up to `limit` due subscriptions (`FOR UPDATE SKIP LOCKED`: concurrent openers split the work on
PostgreSQL; SQLite serializes writers), computes each one's due periods in Python, and writes the result with
a few statements for the whole pass: the invoices in one `INSERT ... ON CONFLICT DO NOTHING` (the unique
(subscription, period) constraint makes a second opener harmless), their events, one outbox intent per batch
of `batch_size` new invoices (`billing.charge_invoices`), and the subscriptions' new period counters with a
compare-and-set on the old counter.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import task_names
from billing.db import bulk
from billing.db.models import Invoice, Plan, Subscription
from billing.domain.money import Money
from billing.domain.periods import Interval, due_period_indexes, period_at, period_boundary
from billing.domain.states import InvoiceState, SubscriptionStatus
from billing.domain.tax import Tax, TaxTreatment, split_inclusive
from billing.services import events, stream
from billing.services.context import Context, enqueue

# Catch-up after long downtime is bounded per pass so one subscription cannot hold a transaction forever.
MAX_PERIODS_PER_PASS = 24
# Invoices per `billing.charge_invoices` message; 1 sends one `billing.charge_invoice` per invoice instead.
DEFAULT_BATCH_SIZE = 100

CHARGE_INVOICE = task_names.CHARGE_INVOICE
CHARGE_INVOICES = task_names.CHARGE_INVOICES


def due_subscription_rows(now: datetime, limit: int) -> Any:
    """Subscriptions whose next period has started, skipping rows another opener holds (PostgreSQL); only the
    columns that opening needs (Core columns: no ORM objects to build)."""
    table: Any = Subscription.__table__
    return (
        select(
            table.c.id,
            table.c.plan_id,
            table.c.status,
            table.c.anchor_at,
            table.c.next_period_index,
            table.c.cancel_at,
        )
        .where(table.c.next_billing_at.is_not(None), table.c.next_billing_at <= now)
        .order_by(table.c.next_billing_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def open_due_invoices(ctx: Context, *, limit: int = 500, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """Open the invoices of every due period of up to `limit` subscriptions; returns how many were opened.

    Their charges are enqueued through the outbox, `batch_size` invoices per message.
    """
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        subs = session.execute(due_subscription_rows(now, limit)).all()
        if not subs:
            return 0
        plans = {
            plan.id: plan
            for plan in session.execute(select(Plan).where(Plan.id.in_({sub.plan_id for sub in subs}))).scalars()
        }
        invoices: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        canceled: list[int] = []
        for sub in subs:
            update_values = _plan_subscription(ctx, sub, plans[sub.plan_id], now, invoices)
            if update_values.get("status") == SubscriptionStatus.CANCELED:
                canceled.append(sub.id)
            updates.append(update_values)
        opened = _insert_invoices(session, invoices)
        event_rows = [
            events.row(now, "subscription.canceled", subscription_id=subscription_id, at_period_end=True)
            for subscription_id in canceled
        ]
        event_rows += [
            events.row(now, "invoice.opened", subscription_id=subscription_id, invoice_id=invoice_id, period=period)
            for invoice_id, subscription_id, period in opened
        ]
        events.record_many(session, event_rows)
        stream.emit_many(session, _stream_rows(now, subs, updates, invoices, opened))
        invoice_ids = [invoice_id for invoice_id, _, _ in opened]
        if batch_size <= 1:
            for invoice_id in invoice_ids:
                enqueue(session, now, CHARGE_INVOICE, invoice_id=invoice_id)
        else:
            for start in range(0, len(invoice_ids), batch_size):
                enqueue(session, now, CHARGE_INVOICES, invoice_ids=invoice_ids[start : start + batch_size])
        _update_subscriptions(session, updates)
    return len(invoice_ids)


def tax_lines(plan: Plan) -> dict[str, Any]:
    """An invoice's tax columns from its plan's price (tax-inclusive) and treatment: base + tax = amount."""
    tax = Tax(TaxTreatment(plan.tax_treatment), plan.tax_rate)
    split = split_inclusive(Money(plan.amount_minor, plan.currency), tax)
    return {
        "tax_treatment": tax.treatment,
        "tax_rate": tax.rate,
        "base_minor": split.base.amount_minor,
        "tax_minor": split.tax.amount_minor,
    }


def _plan_subscription(
    ctx: Context, sub: Any, plan: Plan, now: datetime, invoices: list[dict[str, Any]]
) -> dict[str, Any]:
    """Append the invoice rows of the subscription's due periods; return its new values (with its old counter)."""
    interval, count, tz = Interval(plan.interval), plan.interval_count, ctx.timezone
    old_index = sub.next_period_index
    indexes = due_period_indexes(sub.anchor_at, old_index, now, interval, count, tz, limit=MAX_PERIODS_PER_PASS)
    new_index = old_index
    values: dict[str, Any] = {"id": sub.id, "old_next_period_index": old_index, "updated_at": now}
    for index in indexes:
        period = period_at(sub.anchor_at, index, interval, count, tz)
        if sub.cancel_at is not None and period.start >= sub.cancel_at:
            values.update(status=SubscriptionStatus.CANCELED, canceled_at=now, next_billing_at=None)
            break
        invoices.append(
            {
                "subscription_id": sub.id,
                "period_index": index,
                "period_start": period.start,
                "period_end": period.end,
                "amount_minor": plan.amount_minor,
                "currency": plan.currency,
                **tax_lines(plan),
                "state": InvoiceState.OPEN,
                "due_at": period.start,
                "created_at": now,
                "updated_at": now,
            }
        )
        new_index = index + 1
        values.update(current_period_start=period.start, current_period_end=period.end)
    if "next_billing_at" not in values:
        values["next_billing_at"] = period_boundary(sub.anchor_at, new_index, interval, count, tz)
    if sub.status == SubscriptionStatus.TRIALING and new_index > 0:
        values.setdefault("status", SubscriptionStatus.ACTIVE)
    values["next_period_index"] = new_index
    return values


def _stream_rows(
    now: datetime,
    subs: Sequence[Any],
    updates: list[dict[str, Any]],
    invoices: list[dict[str, Any]],
    opened: list[tuple[int, int, int]],
) -> list[dict[str, Any]]:
    """The pass's stream events, per subscription in order: activated (its first period started, after a
    trial or not), the invoices opened, canceled (a scheduled cancel reached its period end)."""
    new_ids = {(sub, period): invoice_id for invoice_id, sub, period in opened}
    by_sub: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in invoices:
        if (row["subscription_id"], row["period_index"]) in new_ids:
            by_sub[row["subscription_id"]].append(row)
    rows: list[dict[str, Any]] = []
    for sub, values in zip(subs, updates, strict=True):
        mine = by_sub.get(sub.id, [])
        if mine and mine[0]["period_index"] == 0:
            first = mine[0]
            rows.append(
                stream.row(
                    now,
                    "subscription.activated",
                    subscription_id=sub.id,
                    status=str(SubscriptionStatus.ACTIVE),
                    after_trial=sub.status == SubscriptionStatus.TRIALING,
                    period_start=stream.iso(first["period_start"]),
                    period_end=stream.iso(first["period_end"]),
                    entitlement=stream.entitlement(True, first["period_end"]),
                )
            )
        for invoice in mine:
            rows.append(
                stream.row(
                    now,
                    "invoice.opened",
                    subscription_id=sub.id,
                    invoice_id=new_ids[(sub.id, invoice["period_index"])],
                    period_index=invoice["period_index"],
                    period_start=stream.iso(invoice["period_start"]),
                    period_end=stream.iso(invoice["period_end"]),
                    **stream.money(invoice["amount_minor"], invoice["currency"]),
                    due_at=stream.iso(invoice["due_at"]),
                )
            )
        if values.get("status") == SubscriptionStatus.CANCELED:
            rows.append(
                stream.row(
                    now,
                    "subscription.canceled",
                    subscription_id=sub.id,
                    status=str(SubscriptionStatus.CANCELED),
                    reason="period_end",
                    entitlement=stream.entitlement(False, sub.cancel_at),
                )
            )
    return rows


def _insert_invoices(session: Session, rows: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """INSERT ... ON CONFLICT DO NOTHING on (subscription_id, period_index) for all rows; (id, subscription,
    period) of the ones this call inserted, in the rows' order."""
    returned = bulk.insert_rows(
        session,
        Invoice,
        rows,
        returning=("id", "subscription_id", "period_index"),
        on_conflict_do_nothing=True,
        conflict_columns=("subscription_id", "period_index"),
    )
    inserted = {(sub, period): invoice_id for invoice_id, sub, period in returned}
    return [
        (inserted[key], *key)
        for key in ((row["subscription_id"], row["period_index"]) for row in rows)
        if key in inserted
    ]


def _update_subscriptions(session: Session, updates: list[dict[str, Any]]) -> None:
    """Compare-and-set on the period counter: a second beat or worker that got here first wins, and the unique
    (subscription_id, period_index) constraint already made its invoices the only ones. One statement per set
    of changed columns."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for values in updates:
        groups[tuple(sorted(values))].append(values)
    for rows in groups.values():
        bulk.update_rows(session, Subscription, rows, unless_changed="next_period_index")
