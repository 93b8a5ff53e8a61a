"""Read models for operators: invoices with their attempts, and one subscription's whole story in time order."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from billing.db import bulk
from billing.db.models import ChargeAttempt, Event, Invoice, Plan, Refund, Subscription
from billing.domain.money import Money
from billing.domain.states import InvoiceState
from billing.services.errors import InvalidRequest, NotFound


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _money(amount_minor: int, currency: str) -> str:
    return str(Money(amount_minor, currency).major)


def attempt_dict(a: ChargeAttempt) -> dict[str, Any]:
    # Tpaga's charge id is what an operator looks a charge up by (it is no secret); the card is never shown.
    return {
        "id": a.id,
        "number": a.attempt_number,
        "order_id": a.order_id,
        "state": str(a.state),
        "error_code": a.error_code,
        "decline_class": str(a.decline_class) if a.decline_class is not None else None,
        "error_message": a.error_message,
        "unknown_reason": a.unknown_reason,
        "tpaga_charge_id": a.tpaga_charge_id,
        "amount": _money(a.amount_minor, a.currency),
        "currency": a.currency,
        "created_at": _iso(a.created_at),
        "sent_at": _iso(a.sent_at),
        "finished_at": _iso(a.finished_at),
    }


def refund_dict(r: Refund) -> dict[str, Any]:
    return {
        "id": r.id,
        "attempt_id": r.charge_attempt_id,
        "state": str(r.state),
        "reason": r.reason,
        "deadline_at": _iso(r.deadline_at),
        "requested_at": _iso(r.requested_at),
        "finished_at": _iso(r.finished_at),
        "error": r.error,
    }


def invoice_dict(i: Invoice, attempts: list[ChargeAttempt], refunds: list[Refund]) -> dict[str, Any]:
    return {
        "id": i.id,
        "subscription_id": i.subscription_id,
        "period_index": i.period_index,
        "period_start": _iso(i.period_start),
        "period_end": _iso(i.period_end),
        "amount": _money(i.amount_minor, i.currency),
        "currency": i.currency,
        "state": str(i.state),
        "due_at": _iso(i.due_at),
        # When the next charge of this invoice goes out (a dunning retry, or the first try); null once it is
        # no longer collected, or while it waits for a new card or a review.
        "next_attempt_at": _iso(i.due_at) if i.state == InvoiceState.OPEN else None,
        "paid_at": _iso(i.paid_at),
        "last_error_code": i.last_error_code,
        "review_reason": i.review_reason,
        "created_at": _iso(i.created_at),
        "attempts": [attempt_dict(a) for a in attempts],
        "refunds": [refund_dict(r) for r in refunds],
    }


def _children(
    session: Session, invoices: list[Invoice]
) -> tuple[dict[int, list[ChargeAttempt]], dict[int, list[Refund]]]:
    """The attempts (in order) and refunds of these invoices, by invoice id."""
    ids = [i.id for i in invoices]
    attempts: dict[int, list[ChargeAttempt]] = defaultdict(list)
    refunds: dict[int, list[Refund]] = defaultdict(list)
    if ids:
        dialect = bulk.dialect_of(session)
        for a in session.execute(
            select(ChargeAttempt)
            .where(bulk.id_in(ChargeAttempt.invoice_id, ids, dialect))
            .order_by(ChargeAttempt.attempt_number)
        ).scalars():
            attempts[a.invoice_id].append(a)
        for r in session.execute(
            select(Refund).where(bulk.id_in(Refund.invoice_id, ids, dialect)).order_by(Refund.id)
        ).scalars():
            refunds[r.invoice_id].append(r)
    return attempts, refunds


def _details(session: Session, invoices: list[Invoice]) -> list[dict[str, Any]]:
    attempts, refunds = _children(session, invoices)
    return [invoice_dict(i, attempts[i.id], refunds[i.id]) for i in invoices]


def list_invoices(
    session: Session, *, subscription_id: int | None = None, state: str | None = None, limit: int | None = 50
) -> tuple[list[dict[str, Any]], int]:
    """Invoices, newest first, each with its attempts and refunds; and how many match in all."""
    filters = []
    if subscription_id is not None:
        filters.append(Invoice.subscription_id == subscription_id)
    if state is not None:
        filters.append(Invoice.state == state)
    total = int(session.execute(select(func.count()).select_from(Invoice).where(*filters)).scalar_one())
    query = select(Invoice).where(*filters).order_by(Invoice.id.desc())
    invoices = list(session.execute(query if limit is None else query.limit(limit)).scalars())
    return _details(session, invoices), total


def find_subscription(session: Session, subscription_id: int | None, external_id: str | None) -> Subscription:
    if (subscription_id is None) == (external_id is None):
        raise InvalidRequest("give a subscription id or --external-id, one of them")
    if subscription_id is not None:
        sub = session.get(Subscription, subscription_id)
        if sub is None:
            raise NotFound(f"subscription {subscription_id} does not exist")
        return sub
    found = session.execute(select(Subscription).where(Subscription.external_id == external_id)).scalar_one_or_none()
    if found is None:
        raise NotFound(f"no subscription has external id {external_id!r}")
    return found


def subscription_timeline(session: Session, sub: Subscription) -> dict[str, Any]:
    """The subscription's state, its invoices (with attempts and refunds) and everything that happened to it,
    oldest first: its rows' own times and every event naming it or one of its invoices (operator actions
    included)."""
    plan = session.get(Plan, sub.plan_id)
    invoices = list(
        session.execute(select(Invoice).where(Invoice.subscription_id == sub.id).order_by(Invoice.period_index))
        .scalars()
        .all()
    )
    attempts_of, refunds_of = _children(session, invoices)
    details = [invoice_dict(i, attempts_of[i.id], refunds_of[i.id]) for i in invoices]
    naming = [Event.subscription_id == sub.id]
    if invoices:
        naming.append(bulk.id_in(Event.invoice_id, [i.id for i in invoices], bulk.dialect_of(session)))
    found = session.execute(select(Event).where(or_(*naming)).order_by(Event.at, Event.id)).scalars().all()
    # (when, rank, entry): a row's own entry comes before the events of the same instant.
    entries: list[tuple[datetime, int, dict[str, Any]]] = [
        (sub.created_at, 0, {"at": _iso(sub.created_at), "kind": "subscription", "status_now": str(sub.status)})
    ]
    for inv, shown in zip(invoices, details, strict=True):
        entries.append(
            (
                inv.created_at,
                1,
                {
                    "at": shown["created_at"],
                    "kind": "invoice",
                    "invoice_id": inv.id,
                    "period_index": inv.period_index,
                    "amount": shown["amount"],
                    "currency": inv.currency,
                    "state_now": shown["state"],
                },
            )
        )
    for att in (a for i in invoices for a in attempts_of[i.id]):
        # When the request left (its outcome's events follow, at their own times).
        when = att.sent_at or att.created_at
        entries.append(
            (
                when,
                2,
                {
                    "at": _iso(when),
                    "kind": "attempt",
                    "invoice_id": att.invoice_id,
                    "attempt_id": att.id,
                    "order_id": att.order_id,
                    "state_now": str(att.state),
                    "finished_at": _iso(att.finished_at),
                    "error_code": att.error_code,
                    "decline_class": str(att.decline_class) if att.decline_class is not None else None,
                    "unknown_reason": att.unknown_reason,
                },
            )
        )
    for ref in (r for i in invoices for r in refunds_of[i.id]):
        entries.append(
            (
                ref.requested_at,
                2,
                {
                    "at": _iso(ref.requested_at),
                    "kind": "refund",
                    "invoice_id": ref.invoice_id,
                    "refund_id": ref.id,
                    "state_now": str(ref.state),
                    "reason": ref.reason,
                },
            )
        )
    for ev in found:
        ids = {"invoice_id": ev.invoice_id, "attempt_id": ev.attempt_id, "refund_id": ev.refund_id}
        entry = {"at": _iso(ev.at), "kind": ev.kind, **{k: v for k, v in ids.items() if v is not None}}
        entries.append((ev.at, 3, {**entry, "data": dict(ev.data or {})}))
    entries.sort(key=lambda e: (e[0], e[1]))
    return {
        "subscription": {
            "id": sub.id,
            "external_id": sub.external_id,
            "status": str(sub.status),
            "customer_id": sub.customer_id,
            "card_id": sub.card_id,
            "plan": {
                "id": sub.plan_id,
                "code": plan.code if plan else None,
                "amount": _money(plan.amount_minor, plan.currency) if plan else None,
                "currency": plan.currency if plan else None,
                "every": f"{plan.interval_count} {plan.interval}" if plan else None,
            },
            "anchor_at": _iso(sub.anchor_at),
            "next_billing_at": _iso(sub.next_billing_at),
            "current_period_start": _iso(sub.current_period_start),
            "current_period_end": _iso(sub.current_period_end),
            "trial_end_at": _iso(sub.trial_end_at),
            "cancel_at": _iso(sub.cancel_at),
            "canceled_at": _iso(sub.canceled_at),
            "paused_at": _iso(sub.paused_at),
            "resumes_at": _iso(sub.resumes_at),
            "created_at": _iso(sub.created_at),
        },
        "invoices": details,
        "timeline": [entry for _, _, entry in entries],
    }
