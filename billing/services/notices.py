"""Advance notices in the event stream: `card.expiring`, `subscription.trial_will_end`,
`subscription.renewal_upcoming` (docs/events.md), each sent once.

A scan (beat's `billing.open_due_invoices`, and `billing tick`) finds what has entered its notice window and
marks it with a compare-and-set on the columns of migration 0005 (`cards.expiry_noticed_at`,
`subscriptions.trial_noticed_at`, `subscriptions.renewal_noticed_index`) in the transaction that emits the
event: two beats scanning at once emit each notice once, whichever marks the row first.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from billing.db.models import Card, Plan, Subscription
from billing.domain.periods import Interval
from billing.domain.states import CardStatus, SubscriptionStatus
from billing.services import stream
from billing.services.context import Context

NOTICE_BATCH = 500
LIVE = (SubscriptionStatus.TRIALING, SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE)


def send_notices(ctx: Context, *, limit: int = NOTICE_BATCH) -> dict[str, int]:
    """One pass of each scan (up to `limit` notices of each kind); how many of each were emitted."""
    now = ctx.clock.now()
    counts = {}
    with ctx.unit_of_work() as session:
        counts["trial_will_end"] = _trials(ctx, session, now, limit)
    with ctx.unit_of_work() as session:
        counts["renewal_upcoming"] = _renewals(ctx, session, now, limit)
    with ctx.unit_of_work() as session:
        counts["card_expiring"] = _cards(ctx, session, now, limit)
    return counts


def _claim(session: Session, model: Any, ids: list[int], unclaimed: Any, **values: Any) -> set[int]:
    """Mark the rows still unmarked; the ids this caller marked (a concurrent scan's rows are not)."""
    if not ids:
        return set()
    return set(
        session.execute(
            update(model)
            .where(model.id.in_(ids), unclaimed)
            .values(**values)
            .returning(model.id)
            .execution_options(synchronize_session=False)
        ).scalars()
    )


def _trials(ctx: Context, session: Session, now: datetime, limit: int) -> int:
    if not ctx.trial_notice:
        return 0
    found = session.execute(
        select(
            Subscription.id,
            Subscription.trial_end_at,
            Subscription.next_billing_at,
            Plan.amount_minor,
            Plan.currency,
        )
        .join(Plan, Plan.id == Subscription.plan_id)
        .where(
            Subscription.status == SubscriptionStatus.TRIALING,
            Subscription.trial_noticed_at.is_(None),
            Subscription.paused_at.is_(None),
            Subscription.trial_end_at > now,
            Subscription.trial_end_at <= now + ctx.trial_notice,
        )
        .order_by(Subscription.trial_end_at)
        .limit(limit)
    ).all()
    mine = _claim(
        session, Subscription, [r.id for r in found], Subscription.trial_noticed_at.is_(None), trial_noticed_at=now
    )
    stream.emit_many(
        session,
        [
            stream.row(
                now,
                "subscription.trial_will_end",
                subscription_id=r.id,
                status=str(SubscriptionStatus.TRIALING),
                trial_end_at=stream.iso(r.trial_end_at),
                next_billing_at=stream.iso(r.next_billing_at),
                **stream.money(r.amount_minor, r.currency),
                entitlement=stream.entitlement(True, r.trial_end_at),
            )
            for r in found
            if r.id in mine
        ],
    )
    return len(mine)


# Plans whose period is at least the shortest month get a renewal notice; weekly ones would get one per charge.
_MONTH_OR_LONGER = or_(
    Plan.interval.in_((Interval.MONTH, Interval.YEAR)),
    and_(Plan.interval == Interval.WEEK, Plan.interval_count >= 4),
    and_(Plan.interval == Interval.DAY, Plan.interval_count >= 28),
)


def _renewals(ctx: Context, session: Session, now: datetime, limit: int) -> int:
    if not ctx.renewal_notice:
        return 0
    not_noticed = or_(
        Subscription.renewal_noticed_index.is_(None),
        Subscription.renewal_noticed_index < Subscription.next_period_index,
    )
    found = session.execute(
        select(Subscription, Plan.amount_minor, Plan.currency)
        .join(Plan, Plan.id == Subscription.plan_id)
        .where(
            Subscription.next_billing_at > now,
            Subscription.next_billing_at <= now + ctx.renewal_notice,
            Subscription.status.in_((SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE)),
            Subscription.next_period_index > 0,  # the first charge is no renewal
            Subscription.paused_at.is_(None),
            Subscription.cancel_at.is_(None),
            not_noticed,
            _MONTH_OR_LONGER,
        )
        .order_by(Subscription.next_billing_at)
        .limit(limit)
    ).all()
    mine = _claim(
        session,
        Subscription,
        [sub.id for sub, _, _ in found],
        not_noticed,
        renewal_noticed_index=Subscription.next_period_index,
    )
    stream.emit_many(
        session,
        [
            stream.row(
                now,
                "subscription.renewal_upcoming",
                subscription_id=sub.id,
                status=str(sub.status),
                renews_at=stream.iso(sub.next_billing_at),
                period_index=sub.next_period_index,
                **stream.money(amount_minor, currency),
                entitlement=stream.subscription_entitlement(sub, now),
            )
            for sub, amount_minor, currency in found
            if sub.id in mine
        ],
    )
    return len(mine)


def _month_number(when: datetime, tz: str) -> int:
    local = when.astimezone(ZoneInfo(tz))
    return local.year * 12 + local.month - 1


def card_expires_at(exp_year: int, exp_month: int, tz: str) -> datetime:
    """A card is good through the last day of its expiry month: it expires when the next month begins."""
    year, month = (exp_year + 1, 1) if exp_month == 12 else (exp_year, exp_month + 1)
    return datetime(year, month, 1, tzinfo=ZoneInfo(tz)).astimezone(UTC)


def _cards(ctx: Context, session: Session, now: datetime, limit: int) -> int:
    """Cards of live subscriptions whose expiry comes within the notice (the month ends within it), not yet
    expired; a customer's spare cards nobody charges are left alone."""
    if not ctx.card_expiring_notice:
        return 0
    month = Card.exp_year * 12 + Card.exp_month - 1
    in_use = select(Subscription.card_id).where(Subscription.status.in_(LIVE), Subscription.card_id.is_not(None))
    found = session.execute(
        select(Card.id, Card.customer_id, Card.brand, Card.last_four, Card.exp_month, Card.exp_year)
        .where(
            Card.status == CardStatus.USABLE,
            Card.expiry_noticed_at.is_(None),
            Card.exp_year.is_not(None),
            Card.exp_month.is_not(None),
            month >= _month_number(now, ctx.timezone),
            month < _month_number(now + ctx.card_expiring_notice, ctx.timezone),
            Card.id.in_(in_use),
        )
        .order_by(Card.id)
        .limit(limit)
    ).all()
    mine = _claim(session, Card, [r.id for r in found], Card.expiry_noticed_at.is_(None), expiry_noticed_at=now)
    stream.emit_many(
        session,
        [
            stream.row(
                now,
                "card.expiring",
                customer_id=r.customer_id,
                brand=r.brand,
                last_four=r.last_four,
                exp_month=r.exp_month,
                exp_year=r.exp_year,
                expires_at=stream.iso(card_expires_at(r.exp_year, r.exp_month, ctx.timezone)),
            )
            for r in found
            if r.id in mine
        ],
    )
    return len(mine)
