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
from billing.domain.dunning import Action, ColombiaPolicy, decide_after_decline
from billing.domain.states import AttemptState, CardStatus, InvoiceState, SubscriptionStatus
from billing.services import events, stream
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
    invoices = bulk.lock_rows(session, Invoice, [d[0] for d in declines], *_LOCKED_COLUMNS)
    attempts = {
        row.id: row
        for row in session.execute(
            select(ChargeAttempt.id, ChargeAttempt.card_id, ChargeAttempt.attempt_number).where(
                bulk.id_in(ChargeAttempt.id, [d[1] for d in declines], dialect)
            )
        )
    }
    card_of: dict[int, int] = {i: row.card_id for i, row in attempts.items()}
    card_declines = _recent_card_declines(ctx, session, now, sorted(set(card_of.values())))
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
    failed: list[dict[str, Any]] = []  # invoice.payment_failed, which the status events of the pass follow
    decided_by: dict[int, dict[str, Any]] = {}  # per subscription: the decline that set its status
    for invoice_id, attempt_id, code, klass in declines:
        invoice = invoices[invoice_id]
        soft = invoice.soft_failures + (1 if klass == DeclineClass.SOFT else 0)
        first_failure = invoice.first_failure_at or now
        decision = decide_after_decline(
            ctx.policy,
            klass,
            first_failure_at=first_failure,
            soft_failures=soft,
            now=now,
            code=code,
            previous_code=invoice.last_error_code,
            card_declines=card_declines.get(card_of[attempt_id], 0),
        )
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
        facts = {
            "invoice_id": invoice_id,
            "error_code": code,
            "decline_class": str(klass),
            "attempt": attempts[attempt_id].attempt_number,
            "next_retry_at": stream.iso(values.get("due_at")),
            "needs_new_card": decision.action == Action.AWAIT_NEW_CARD and values.get("due_at") is None,
        }
        money = stream.money(invoice.amount_minor, invoice.currency)
        failed.append(
            stream.row(
                now,
                "invoice.payment_failed",
                subscription_id=invoice.subscription_id,
                **{"invoice_id": invoice_id, "charge_id": attempt_id, "attempt": facts["attempt"], **money, **facts},
            )
        )
        status = decision.subscription_status
        if status is not None:
            current = subscription_status.get(invoice.subscription_id)
            if current is None or _STATUS_RANK.get(status, 0) >= _STATUS_RANK.get(current, 0):
                subscription_status[invoice.subscription_id] = status
                decided_by[invoice.subscription_id] = {**facts, "period_end": invoice.period_end}
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
    closed: list[dict[str, Any]] = []  # invoice.uncollectible and invoice.in_review
    for rows in invoice_updates.values():
        to = rows[0].get("state")
        if to is None:
            bulk.update_rows(session, Invoice, rows)  # the invoices are locked above and open
        else:
            moved = cas.transition_rows(session, Invoice, rows, to, now=now)
            closed += [_closed(now, to, invoices[r["id"]], r, failed) for r in rows if r["id"] in moved]
    cards = _lock_usable_cards(session, sorted(unusable)) if unusable else []
    for card_id, code in sorted(unusable.items()):
        session.execute(update(Card).where(Card.id == card_id).values(status=CardStatus.UNUSABLE, unusable_code=code))
    status_rows = []
    for subscription_id, status in sorted(subscription_status.items()):
        sub_values: dict[str, Any] = {"updated_at": now}
        if status in (SubscriptionStatus.UNPAID, SubscriptionStatus.CANCELED):
            sub_values["next_billing_at"] = None
            if status == SubscriptionStatus.CANCELED:
                sub_values["canceled_at"] = now
        if cas.transition(session, Subscription, subscription_id, status, now=now, **sub_values):
            status_rows.append(_status_event(now, subscription_id, status, decided_by[subscription_id]))
    events.record_many(session, event_rows)
    cards_rows = [
        stream.row(
            now,
            "card.unusable",
            customer_id=card.customer_id,
            brand=card.brand,
            last_four=card.last_four,
            exp_month=card.exp_month,
            exp_year=card.exp_year,
            error_code=unusable[card.id],
            decline_class=str(DeclineClass.HARD),
        )
        for card in cards
    ]
    stream.emit_many(session, [*failed, *closed, *status_rows, *cards_rows])


# The invoice columns dunning locks and reads: what it decides on, and what its stream events carry.
_LOCKED_COLUMNS = (
    "state",
    "subscription_id",
    "soft_failures",
    "first_failure_at",
    "amount_minor",
    "currency",
    "period_end",
    "last_error_code",
)


def _recent_card_declines(ctx: Context, session: Session, now: datetime, card_ids: list[int]) -> dict[int, int]:
    """Per card, its declined charges within the policy's card period, the ones just recorded included: the
    card networks count retries per card, across invoices and subscriptions. Only the colombia policy caps them;
    the (card_id, finished_at) index keeps this to the card's own rows."""
    policy = ctx.policy
    if not isinstance(policy, ColombiaPolicy) or not card_ids:
        return {}
    return {
        card_id: count
        for card_id, count in session.execute(
            select(ChargeAttempt.card_id, func.count())
            .where(
                bulk.id_in(ChargeAttempt.card_id, card_ids, bulk.dialect_of(session)),
                ChargeAttempt.state == AttemptState.DECLINED,
                ChargeAttempt.finished_at > now - policy.card_period,
            )
            .group_by(ChargeAttempt.card_id)
        ).all()
    }


def _lock_usable_cards(session: Session, card_ids: list[int]) -> list[Any]:
    """The cards a hard decline makes unusable that were still usable (card.unusable once per card)."""
    return list(
        session.execute(
            select(Card.id, Card.customer_id, Card.brand, Card.last_four, Card.exp_month, Card.exp_year)
            .where(Card.id.in_(card_ids), Card.status == CardStatus.USABLE)
            .order_by(Card.id)
            .with_for_update()
        )
    )


def _closed(
    now: datetime, to: Any, invoice: Any, values: dict[str, Any], failed: list[dict[str, Any]]
) -> dict[str, Any]:
    """invoice.uncollectible (dunning gave up) or invoice.in_review (a decline code nobody can read)."""
    facts = next(r["data"] for r in reversed(failed) if r["data"]["invoice_id"] == values["id"])
    if to == InvoiceState.UNCOLLECTIBLE:
        return stream.row(
            now,
            "invoice.uncollectible",
            subscription_id=invoice.subscription_id,
            invoice_id=values["id"],
            **stream.money(invoice.amount_minor, invoice.currency),
            error_code=facts["error_code"],
            attempt=facts["attempt"],
        )
    return stream.row(
        now,
        "invoice.in_review",
        subscription_id=invoice.subscription_id,
        invoice_id=values["id"],
        charge_id=facts["charge_id"],
        attempt=facts["attempt"],
        **stream.money(invoice.amount_minor, invoice.currency),
        reason=values.get("review_reason"),
    )


def _status_event(
    now: datetime, subscription_id: int, status: SubscriptionStatus, facts: dict[str, Any]
) -> dict[str, Any]:
    """subscription.past_due (access kept while dunning runs), .unpaid or .canceled (access ends now)."""
    period_end = facts.pop("period_end")
    if status == SubscriptionStatus.PAST_DUE:
        return stream.row(
            now,
            "subscription.past_due",
            subscription_id=subscription_id,
            status=str(status),
            **facts,
            entitlement=stream.entitlement(True, period_end),
        )
    if status == SubscriptionStatus.UNPAID:
        return stream.row(
            now,
            "subscription.unpaid",
            subscription_id=subscription_id,
            status=str(status),
            invoice_id=facts["invoice_id"],
            error_code=facts["error_code"],
            decline_class=facts["decline_class"],
            attempt=facts["attempt"],
            entitlement=stream.entitlement(False, now),
        )
    return stream.row(
        now,
        "subscription.canceled",
        subscription_id=subscription_id,
        status=str(status),
        reason="dunning",
        entitlement=stream.entitlement(False, now),
    )


def settle_subscriptions(session: Session, now: datetime, subscription_ids: list[int]) -> list[int]:
    """Subscriptions left with no open or in-review invoice are active again (after a payment); returns those
    that changed (they were past due: a trialing subscription has no invoice to pay)."""
    if not subscription_ids:
        return []
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
    if not settled:
        return []
    # Only a subscription that was waiting for this payment (past due, or trialing) changes: quietly, since
    # an active one is the common case and no conflict. RETURNING names the ones that did (no statement more).
    return list(
        session.execute(
            update(Subscription)
            .where(
                bulk.id_in(Subscription.id, settled, dialect),
                Subscription.status.in_(cas.from_states(Subscription, SubscriptionStatus.ACTIVE)),
            )
            .values(status=SubscriptionStatus.ACTIVE, updated_at=now)
            .returning(Subscription.id)
            .execution_options(synchronize_session=False)
        ).scalars()
    )
