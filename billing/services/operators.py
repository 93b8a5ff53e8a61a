"""Who did it and why: every operator action that changes state leaves an `operator.action` event, written in
the transaction of the change it made (so an action that changed nothing leaves nothing)."""

from __future__ import annotations

import getpass
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from billing.services import events
from billing.services.errors import InvalidRequest

ACTION_EVENT = "operator.action"
MAX_BY = 64
MAX_REASON = 255


def _clean(name: str, value: object, longest: int) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > longest:
        raise InvalidRequest(f"{name} must be a non-empty string of at most {longest} characters")
    if any(unicodedata.category(c) == "Cc" for c in value):
        # PostgreSQL refuses NUL in text, and a newline in an audit line would forge the next one.
        raise InvalidRequest(f"{name} must not contain control characters (NUL, newlines, tabs, escapes)")
    return value.strip()


def os_user() -> str:
    """The operator's login name, for a default `--by`; 'unknown' where the OS has none (a bare container)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no LOGNAME/USER and no passwd entry for the uid
        return "unknown"


@dataclass(frozen=True)
class Actor:
    """An operator (`by`, a login name or an email) and why they acted (`reason`, optional)."""

    by: str
    reason: str | None = None

    @classmethod
    def of(cls, by: str | None, reason: str | None) -> Actor:
        """Checked input: `by` defaults to the OS user; an empty or overlong value is refused."""
        who = _clean("--by", by if by is not None else os_user(), MAX_BY)
        why = None if reason is None else _clean("--reason", reason, MAX_REASON)
        return cls(who, why)

    def record(
        self,
        session: Session,
        now: datetime,
        action: str,
        *,
        subscription_id: int | None = None,
        invoice_id: int | None = None,
        attempt_id: int | None = None,
        refund_id: int | None = None,
        **data: Any,
    ) -> None:
        """The `operator.action` event of one change, in the caller's transaction."""
        events.record(
            session,
            now,
            ACTION_EVENT,
            subscription_id=subscription_id,
            invoice_id=invoice_id,
            attempt_id=attempt_id,
            refund_id=refund_id,
            action=action,
            by=self.by,
            reason=self.reason,
            **data,
        )
