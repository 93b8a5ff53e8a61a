"""The void window: until when an approved charge may still be refunded through Tpaga."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_TZ = "America/Bogota"


class RefundWindow(StrEnum):
    H24 = "24h"  # 24 hours after the approval
    SAME_DAY = "same_day"  # until the next local midnight after the approval


def _require_aware(name: str, value: datetime) -> None:
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")


def _window(value: RefundWindow | str) -> RefundWindow:
    try:
        return RefundWindow(value)
    except ValueError:
        raise ValueError(f"unknown refund window {value!r}; expected '24h' or 'same_day'") from None


def refund_deadline(approved_at: datetime, window: RefundWindow | str, tz: str = DEFAULT_TZ) -> datetime:
    """The first instant (aware UTC) at which a charge approved at `approved_at` can no longer be voided.

    "24h": approved_at + 24 hours. "same_day": the next midnight in `tz` after approved_at.
    """
    _require_aware("approved_at", approved_at)
    kind = _window(window)
    if kind is RefundWindow.H24:
        return approved_at.astimezone(UTC) + timedelta(hours=24)
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValueError(f"unknown time zone {tz!r}") from None
    local = approved_at.astimezone(zone)
    next_day = local.date() + timedelta(days=1)
    # Where midnight falls in a DST gap, fold=0 resolves it to the instant the new day begins.
    midnight = datetime(next_day.year, next_day.month, next_day.day, tzinfo=zone)
    return midnight.astimezone(UTC)


def is_refundable(approved_at: datetime, now: datetime, window: RefundWindow | str, tz: str = DEFAULT_TZ) -> bool:
    """True while `now` is before the refund deadline of a charge approved at `approved_at`."""
    _require_aware("now", now)
    return now < refund_deadline(approved_at, window, tz)
