"""Operator views: status counts and outcomes by errorCode."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.db import control
from billing.db.models import ChargeAttempt, Invoice, Refund, Subscription
from billing.domain.declines import classify
from billing.domain.states import InvoiceState


def _counts(session: Session, column: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in session.execute(select(column, func.count()).group_by(column)).all()}


def status(session: Session) -> dict[str, Any]:
    """Counts by state of invoices, attempts, refunds and subscriptions; the review queue's size; any pause."""
    invoices = _counts(session, Invoice.state)
    return {
        "invoices": invoices,
        "attempts": _counts(session, ChargeAttempt.state),
        "refunds": _counts(session, Refund.state),
        "subscriptions": _counts(session, Subscription.status),
        "review": invoices.get(InvoiceState.REVIEW, 0),
        "paused": control.get_pause(session),
    }


def outcomes_by_code(
    session: Session, since: datetime | None = None, until: datetime | None = None
) -> list[dict[str, Any]]:
    """Finished attempts grouped by errorCode, with the code's class, count and amount (minor units)."""
    query = select(
        ChargeAttempt.state,
        ChargeAttempt.error_code,
        ChargeAttempt.currency,
        func.count(),
        func.sum(ChargeAttempt.amount_minor),
    ).group_by(ChargeAttempt.state, ChargeAttempt.error_code, ChargeAttempt.currency)
    if since is not None:
        query = query.where(ChargeAttempt.created_at >= since)
    if until is not None:
        query = query.where(ChargeAttempt.created_at < until)
    rows: list[dict[str, Any]] = []
    for state, code, currency, count, total in session.execute(query).all():
        rows.append(
            {
                "error_code": code,
                "class": str(classify(code)) if code is not None else None,
                "state": state,
                "count": int(count),
                "amount_minor": int(total or 0),
                "currency": currency,
            }
        )
    rows.sort(key=lambda r: (-r["count"], str(r["error_code"])))
    return rows
