"""The append-only event log."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from billing.db.models import Event

log = logging.getLogger("billing.events")

# Kinds that need a human: logged at WARNING so an operator's log alerting sees them.
ALERT_KINDS = frozenset({"attempt.unknown", "billing.paused", "refund.unknown", "charge.duplicate"})


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
