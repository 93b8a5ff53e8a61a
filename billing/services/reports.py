"""Operator views: status counts and outcomes by errorCode."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.db import control
from billing.db.models import ChargeAttempt, Invoice, Refund, Subscription
from billing.domain.declines import classify
from billing.domain.states import AttemptState, InvoiceState, RefundState


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


# --- Tpaga's settlement figures ---------------------------------------------------------------------------

# Tpaga settles by Colombian calendar day whatever BILLING_TIMEZONE says, so its days are Bogota's.
SETTLEMENT_TIMEZONE = "America/Bogota"
SETTLEMENT_FIGURES = ("gross_minor", "tax_minor", "fee_minor", "rete_renta_minor", "rete_ica_minor", "rete_iva_minor")
SETTLEMENT_TOTALS = (*SETTLEMENT_FIGURES, "net_minor")


def settlement(
    session: Session, currency: str = "COP", since: datetime | None = None, until: datetime | None = None
) -> dict[str, Any]:
    """Approved charges per Bogota day of Tpaga's `dateCreated` (our approval time when it gave none), in
    [since, until): gross, tax (IVA + INC), Tpaga's fee, each withholding and net, as Tpaga returned them, in
    minor units, with totals. A charge voided since is not paid out, so it is left out. `unreported` counts
    charges without Tpaga's figures (approved before migration 0007): their figures count as 0, their net as
    unknown (not in net_minor)."""
    when = func.coalesce(ChargeAttempt.tpaga_created_at, ChargeAttempt.approved_at)
    voided = select(Refund.id).where(Refund.charge_attempt_id == ChargeAttempt.id, Refund.state == RefundState.VOIDED)
    query = select(
        ChargeAttempt.tpaga_created_at,
        ChargeAttempt.approved_at,
        ChargeAttempt.amount_minor,
        ChargeAttempt.tax_amount_minor,
        ChargeAttempt.iac_amount_minor,
        ChargeAttempt.fee_minor,
        ChargeAttempt.rete_renta_minor,
        ChargeAttempt.rete_ica_minor,
        ChargeAttempt.rete_iva_minor,
        ChargeAttempt.net_minor,
    ).where(ChargeAttempt.state == AttemptState.APPROVED, ChargeAttempt.currency == currency, ~voided.exists())
    if since is not None:
        query = query.where(when >= since)
    if until is not None:
        query = query.where(when < until)
    zone = ZoneInfo(SETTLEMENT_TIMEZONE)
    days: dict[str, dict[str, Any]] = {}
    for row in session.execute(query).all():
        # coalesce() loses the column type on SQLite (a naive string comes back): take the typed columns.
        at = row.tpaga_created_at or row.approved_at
        day = days.setdefault(
            at.astimezone(zone).date().isoformat(),
            {"charges": 0, "unreported": 0, **dict.fromkeys(SETTLEMENT_TOTALS, 0)},
        )
        figures = (
            row.amount_minor,
            (row.tax_amount_minor or 0) + (row.iac_amount_minor or 0),
            row.fee_minor or 0,
            row.rete_renta_minor or 0,
            row.rete_ica_minor or 0,
            row.rete_iva_minor or 0,
        )
        for key, value in zip(SETTLEMENT_FIGURES, figures, strict=True):
            day[key] += value
        day["charges"] += 1
        if row.net_minor is None:
            day["unreported"] += 1
        else:
            day["net_minor"] += row.net_minor
    listed = [{"date": date, **values} for date, values in sorted(days.items())]
    totals = {key: sum(d[key] for d in listed) for key in SETTLEMENT_TOTALS}
    return {"currency": currency, "days": listed, "totals": totals}
