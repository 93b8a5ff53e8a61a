"""Plans, customers, cards and subscriptions."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import task_names
from billing.db import cas
from billing.db.models import Card, Customer, Invoice, Plan, Subscription
from billing.domain.money import Money, MoneyError
from billing.domain.periods import Interval, period_boundary, trial_end
from billing.domain.states import CardStatus, InvoiceState, SubscriptionStatus
from billing.domain.tax import Tax, TaxError, tax_of
from billing.services import events, stream
from billing.services.cards import usable_card_of_customer
from billing.services.context import Context, enqueue
from billing.services.errors import InvalidRequest, NotFound

_GRACE = timedelta(minutes=5)
PLAN_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def create_plan(
    ctx: Context,
    *,
    code: str,
    name: str,
    amount: Money,
    interval: str = "month",
    interval_count: int = 1,
    trial_days: int = 0,
) -> int:
    """Create a plan; amounts are exact minor units. COP plans must be whole pesos (Tpaga charges whole COP)."""
    check_plan_terms(code, amount, interval, interval_count, trial_days)
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        if session.execute(select(Plan.id).where(Plan.code == code)).first():
            raise InvalidRequest(f"a plan with code {code!r} already exists")
        plan = Plan(
            code=code,
            name=name or code,
            amount_minor=amount.amount_minor,
            currency=amount.currency,
            interval=interval,
            interval_count=interval_count,
            trial_days=trial_days,
            created_at=now,
        )
        session.add(plan)
        session.flush()
        return plan.id


def check_plan_terms(code: object, amount: Money, interval: object, interval_count: object, trial_days: object) -> None:
    """Raise InvalidRequest naming the first term of a plan that is not allowed."""
    if not isinstance(code, str) or not PLAN_CODE.match(code):
        raise InvalidRequest("plan code must be 1-64 characters of letters, digits, '_', '.', '-'")
    try:
        Interval(str(interval))
    except ValueError:
        raise InvalidRequest(f"interval must be one of day, week, month, year; got {interval!r}") from None
    if isinstance(interval_count, bool) or not isinstance(interval_count, int) or not 1 <= interval_count <= 120:
        raise InvalidRequest("interval_count must be a whole number from 1 to 120")
    if isinstance(trial_days, bool) or not isinstance(trial_days, int) or not 0 <= trial_days <= 730:
        raise InvalidRequest("trial_days must be a whole number from 0 to 730")
    if amount.amount_minor <= 0:
        raise InvalidRequest("plan amount must be positive")
    if amount.currency == "COP" and amount.amount_minor % 100:
        raise InvalidRequest(f"COP amounts must be whole pesos, got {amount.major} COP")


def tax_from_input(treatment: object, rate: object = None) -> Tax:
    """A plan's tax treatment and rate from a user's input (InvalidRequest naming what is wrong)."""
    try:
        return tax_of(treatment, rate)
    except TaxError as exc:
        raise InvalidRequest(str(exc)) from None


def money_from_input(amount: str, currency: str) -> Money:
    """Parse a user's amount like '45000' or '45000.00' exactly."""
    try:
        return Money.from_major(amount, currency.upper())
    except (MoneyError, ArithmeticError, ValueError) as exc:
        raise InvalidRequest(str(exc)) from None


def create_customer(
    ctx: Context,
    *,
    email: str | None = None,
    first_name: str | None = None,
    last_name: str | None = None,
    merchant_customer_id: str | None = None,
) -> int:
    """Create the customer at Tpaga, then here; idempotent on merchant_customer_id."""
    if merchant_customer_id is not None:
        with ctx.sessions() as session:
            existing = session.execute(
                select(Customer.id).where(Customer.merchant_customer_id == merchant_customer_id)
            ).scalar_one_or_none()
        if existing is not None:
            return existing
    remote = ctx.gateway.create_customer(
        first_name=first_name, last_name=last_name, email=email, merchant_customer_id=merchant_customer_id
    )
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        customer = Customer(
            tpaga_customer_id=remote.id,
            merchant_customer_id=merchant_customer_id,
            email=email,
            first_name=first_name,
            last_name=last_name,
            created_at=now,
        )
        session.add(customer)
        session.flush()
        emit_customer(session, now, "customer.created", customer)
        return customer.id


def emit_customer(session: Session, now: datetime, type_: str, customer: Customer, **extra: object) -> None:
    """customer.created / customer.updated with the customer's contact fields (what an app mails to)."""
    stream.emit(
        session,
        now,
        type_,
        customer_id=customer.id,
        email=customer.email,
        first_name=customer.first_name,
        last_name=customer.last_name,
        phone=customer.phone,
        **extra,
    )


def attach_card(ctx: Context, *, customer_id: int, token: str) -> int:
    """Associate a card from a temporary token (see `commands.attach_card`); returns the card's id."""
    from billing.services import commands  # commands builds on this module

    return int(commands.attach_card_result(ctx, customer_id=customer_id, token=token)["card_id"])


def retry_waiting_invoices(session: Session, now: datetime, customer_id: int, card_id: int) -> None:
    """Point live subscriptions at the new card and charge their open invoices at once (not while paused); `now`
    is the caller's, read before its transaction (a shared test clock reads the database)."""
    live = (SubscriptionStatus.TRIALING, SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE)
    subs = session.execute(
        select(Subscription).where(Subscription.customer_id == customer_id, Subscription.status.in_(live))
    ).scalars()
    for sub in subs:
        sub.card_id = card_id
        sub.updated_at = now
        if sub.paused_at is not None:
            continue
        invoices = session.execute(
            select(Invoice.id).where(Invoice.subscription_id == sub.id, Invoice.state == InvoiceState.OPEN)
        ).scalars()
        for invoice_id in invoices:
            # Compare-and-set: only invoices still open are rescheduled; in-flight attempts are untouched
            # because an attempt row, not due_at, is what blocks a second charge.
            if cas.update_while(session, Invoice, invoice_id, InvoiceState.OPEN, due_at=now, updated_at=now):
                enqueue(session, now, task_names.CHARGE_INVOICE, invoice_id=invoice_id)
                events.record(session, now, "invoice.retry_new_card", subscription_id=sub.id, invoice_id=invoice_id)


def subscribe(
    ctx: Context,
    *,
    customer_id: int,
    plan_id: int,
    card_id: int | None = None,
    anchor_at: datetime | None = None,
    trial_days: int | None = None,
    external_id: str | None = None,
) -> int:
    """Start a subscription with a usable card; the first period starts at the anchor (the trial's end when
    there is a trial)."""
    now = ctx.clock.now()  # before the transaction: a shared test clock reads the database
    with ctx.unit_of_work() as session:
        customer = session.get(Customer, customer_id)
        if customer is None:
            raise NotFound(f"customer {customer_id} does not exist")
        plan = session.get(Plan, plan_id)
        if plan is None:
            raise NotFound(f"plan {plan_id} does not exist")
        if card_id is None:
            usable = usable_card_of_customer(session, customer_id)
            if usable is None:
                raise InvalidRequest(f"customer {customer_id} has no usable card")
            card_id = usable[0]
        else:
            card = session.get(Card, card_id)
            if card is None or card.customer_id != customer_id:
                raise NotFound(f"card {card_id} does not belong to customer {customer_id}")
            if card.status != CardStatus.USABLE:
                raise InvalidRequest(f"card {card_id} is not usable")
        if (
            external_id is not None
            and session.execute(select(Subscription.id).where(Subscription.external_id == external_id)).first()
        ):
            raise InvalidRequest(f"a subscription with external id {external_id!r} already exists")
        sub = new_subscription(
            session,
            ctx,
            now,
            customer_id=customer_id,
            plan=plan,
            card_id=card_id,
            anchor_at=anchor_at,
            trial_days=trial_days,
        )
        sub.external_id = external_id
        session.flush()
        return sub.id


def new_subscription(
    session: Session,
    ctx: Context,
    now: datetime,
    *,
    customer_id: int,
    plan: Plan,
    card_id: int | None = None,
    anchor_at: datetime | None = None,
    trial_days: int | None = None,
) -> Subscription:
    """Add a subscription in the caller's transaction; without a card, the customer's newest usable one (if
    any: invoices without a card wait for one)."""
    if card_id is None:
        usable = usable_card_of_customer(session, customer_id)
        card_id = usable[0] if usable else None
    days = plan.trial_days if trial_days is None else trial_days
    if isinstance(days, bool) or not isinstance(days, int) or not 0 <= days <= 730:
        raise InvalidRequest("trial_days must be a whole number from 0 to 730")
    trial_end_at = trial_end(now, days, ctx.timezone) if days else None
    if anchor_at is not None:
        if anchor_at.tzinfo is None:
            raise InvalidRequest("anchor_at must carry a time zone")
        if anchor_at < now - _GRACE:
            raise InvalidRequest("anchor_at must not be in the past")
        anchor = anchor_at
    else:
        anchor = trial_end_at or now
    sub = Subscription(
        customer_id=customer_id,
        plan_id=plan.id,
        card_id=card_id,
        status=SubscriptionStatus.TRIALING if trial_end_at else SubscriptionStatus.ACTIVE,
        anchor_at=anchor,
        next_period_index=0,
        next_billing_at=period_boundary(anchor, 0, Interval(plan.interval), plan.interval_count, ctx.timezone),
        trial_end_at=trial_end_at,
        created_at=now,
        updated_at=now,
    )
    session.add(sub)
    session.flush()
    events.record(session, now, "subscription.created", subscription_id=sub.id, plan=plan.code)
    # Access starts now: through the trial, or through the first period (its invoice is opened at the anchor).
    first_end = trial_end_at or period_boundary(anchor, 1, Interval(plan.interval), plan.interval_count, ctx.timezone)
    stream.emit(
        session,
        now,
        "subscription.created",
        subscription_id=sub.id,
        status=str(sub.status),
        plan_code=plan.code,
        **stream.money(plan.amount_minor, plan.currency),
        interval=str(plan.interval),
        interval_count=plan.interval_count,
        trial_end_at=stream.iso(trial_end_at),
        next_billing_at=stream.iso(sub.next_billing_at),
        entitlement=stream.entitlement(True, first_end),
    )
    return sub
