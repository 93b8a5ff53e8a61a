"""The append-only event log."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from billing.db import bulk
from billing.db.models import Event

log = logging.getLogger("billing.events")

# Kinds that need a human: logged at WARNING so an operator's log alerting sees them.
ALERT_KINDS = frozenset(
    {
        "attempt.unknown",
        "billing.paused",
        "refund.unknown",
        "charge.duplicate",
        "attempt.late_answer",
        "refund.flagged",
        "webhook.failing",
    }
)


def record(
    session: Session,
    now: datetime,
    kind: str,
    *,
    subscription_id: int | None = None,
    invoice_id: int | None = None,
    attempt_id: int | None = None,
    refund_id: int | None = None,
    **data: Any,
) -> None:
    session.add(
        Event(
            at=now,
            kind=kind,
            subscription_id=subscription_id,
            invoice_id=invoice_id,
            attempt_id=attempt_id,
            refund_id=refund_id,
            data=data,
        )
    )
    if kind in ALERT_KINDS:
        log.warning("ALERT %s invoice=%s attempt=%s refund=%s %s", kind, invoice_id, attempt_id, refund_id, data)


def row(
    now: datetime,
    kind: str,
    *,
    subscription_id: int | None = None,
    invoice_id: int | None = None,
    attempt_id: int | None = None,
    refund_id: int | None = None,
    **data: Any,
) -> dict[str, Any]:
    """One event as a row for `record_many`: the same row `record` writes."""
    return {
        "at": now,
        "kind": kind,
        "subscription_id": subscription_id,
        "invoice_id": invoice_id,
        "attempt_id": attempt_id,
        "refund_id": refund_id,
        "data": data,
    }


def record_many(session: Session, rows: list[dict[str, Any]]) -> None:
    """The events of many changes in one INSERT."""
    bulk.insert_rows(session, Event, rows)
    for item in rows:
        if item["kind"] in ALERT_KINDS:
            log.warning(
                "ALERT %s invoice=%s attempt=%s refund=%s %s",
                item["kind"],
                item["invoice_id"],
                item["attempt_id"],
                item["refund_id"],
                item["data"],
            )
