"""Dunning after recorded declines: reschedule, await a new card, pause billing, or give up."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from billing.db import bulk, cas
from billing.db.models import Card, ChargeAttempt, Invoice, Subscription
from billing.domain.declines import DeclineClass
from billing.domain.dunning import Action, decide_after_decline
from billing.domain.states import CardStatus, InvoiceState, SubscriptionStatus
from billing.services import events
from billing.services.context import Context
from billing.services.pause import PauseReason, pause_billing

_INVOICES: Any = Invoice.__table__


# When one batch holds declines of two invoices of the same subscription, the strongest status wins.
_STATUS_RANK = {SubscriptionStatus.PAST_DUE: 1, SubscriptionStatus.UNPAID: 2, SubscriptionStatus.CANCELED: 3}


def apply_declines(
    ctx: Context, session: Session, now: datetime, declines: list[tuple[int, int, str, DeclineClass]]
) -> None:
    """`apply_decline` for many (invoice id, attempt id, errorCode, class): the dunning decision of each, written
    with one statement per kind of change."""
    if not declines:
        return
    dialect = bulk.dialect_of(session)
    invoices = bulk.lock_rows(
        session, Invoice, [d[0] for d in declines], "state", "subscription_id", "soft_failures", "first_failure_at"
    )
    card_of: dict[int, int] = dict(
        session.execute(
            select(ChargeAttempt.id, ChargeAttempt.card_id).where(
                bulk.id_in(ChargeAttempt.id, [d[1] for d in declines], dialect)
            )
        ).all()
    )
    # A card attached while the declined one's charge was in flight: the invoice is retried with it.
    current_card = dict(
        session.execute(
            select(Subscription.id, Card.id)
            .join(Card, Card.id == Subscription.card_id)
            .where(
                bulk.id_in(Subscription.id, sorted({i.subscription_id for i in invoices.values()}), dialect),
                Card.status == CardStatus.USABLE,
            )
        ).all()
    )
    invoice_updates: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    unusable: dict[int, str] = {}
    subscription_status: dict[int, SubscriptionStatus] = {}
    event_rows = []
    for invoice_id, attempt_id, code, klass in declines:
        invoice = invoices[invoice_id]
        soft = invoice.soft_failures + (1 if klass == DeclineClass.SOFT else 0)
        first_failure = invoice.first_failure_at or now
        decision = decide_after_decline(ctx.policy, klass, first_failure_at=first_failure, soft_failures=soft, now=now)
        values: dict[str, Any] = {"id": invoice_id, "last_error_code": code, "updated_at": now}
        if decision.counts_as_attempt:
            values.update(soft_failures=soft, first_failure_at=first_failure)
        if decision.action == Action.RETRY:
            values["due_at"] = decision.retry_at
        elif decision.action == Action.UNCOLLECTIBLE:
            values.update(state=InvoiceState.UNCOLLECTIBLE, due_at=None)
        elif decision.action == Action.AWAIT_NEW_CARD:
            other = current_card.get(invoice.subscription_id)
            values["due_at"] = now if other is not None and other != card_of[attempt_id] else None
        elif decision.action == Action.PAUSE_MERCHANT:
            values["due_at"] = now  # charged again as soon as billing resumes
            pause_billing(session, now, PauseReason.MERCHANT_DECLINE, code)
        elif decision.action == Action.REVIEW:
            values.update(state=InvoiceState.REVIEW, due_at=None, review_reason=f"errorCode {code!r}")
        if invoice.state == InvoiceState.OPEN:
            invoice_updates[tuple(sorted(values))].append(values)
        if decision.card_unusable:
            unusable[card_of[attempt_id]] = code
        status = decision.subscription_status
        if status is not None:
            current = subscription_status.get(invoice.subscription_id)
            if current is None or _STATUS_RANK.get(status, 0) >= _STATUS_RANK.get(current, 0):
                subscription_status[invoice.subscription_id] = status
        event_rows.append(
            events.row(
                now,
                "charge.declined",
                subscription_id=invoice.subscription_id,
                invoice_id=invoice_id,
                attempt_id=attempt_id,
                error_code=code,
                decline_class=str(klass),
                action=str(decision.action),
            )
        )
    for rows in invoice_updates.values():
        to = rows[0].get("state")
        if to is None:
            bulk.update_rows(session, Invoice, rows)  # the invoices are locked above and open
        else:
            cas.transition_rows(session, Invoice, rows, to, now=now)
    for card_id, code in sorted(unusable.items()):
        session.execute(update(Card).where(Card.id == card_id).values(status=CardStatus.UNUSABLE, unusable_code=code))
    for subscription_id, status in sorted(subscription_status.items()):
        sub_values: dict[str, Any] = {"updated_at": now}
        if status in (SubscriptionStatus.UNPAID, SubscriptionStatus.CANCELED):
            sub_values["next_billing_at"] = None
            if status == SubscriptionStatus.CANCELED:
                sub_values["canceled_at"] = now
        cas.transition(session, Subscription, subscription_id, status, now=now, **sub_values)
    events.record_many(session, event_rows)


def settle_subscriptions(session: Session, now: datetime, subscription_ids: list[int]) -> None:
    """Subscriptions left with no open or in-review invoice are active again (after a payment)."""
    if not subscription_ids:
        return
    dialect = bulk.dialect_of(session)
    # The state test sits inside the aggregate, so no index on state can be chosen for it (see
    # billing.db.bulk): the subscriptions' invoices are read through (subscription_id, period_index).
    unsettled = case((_INVOICES.c.state.in_((InvoiceState.OPEN, InvoiceState.REVIEW)), 1), else_=0)
    outstanding = set(
        session.execute(
            select(_INVOICES.c.subscription_id)
            .where(bulk.id_in(_INVOICES.c.subscription_id, subscription_ids, dialect))
            .group_by(_INVOICES.c.subscription_id)
            .having(func.max(unsettled) == 1)
        ).scalars()
    )
    settled = [s for s in subscription_ids if s not in outstanding]
    if settled:
        # Only a subscription that was waiting for this payment (past due, or trialing) changes: quietly, since
        # an active one is the common case and no conflict.
        session.execute(
            update(Subscription)
            .where(
                bulk.id_in(Subscription.id, settled, dialect),
                Subscription.status.in_(cas.from_states(Subscription, SubscriptionStatus.ACTIVE)),
            )
            .values(status=SubscriptionStatus.ACTIVE, updated_at=now)
            .execution_options(synchronize_session=False)
        )
