"""The void window: until when an approved charge may still be refunded through Tpaga."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from billing.domain.clock_rules import BOGOTA, require_aware

# Tpaga's "same day" is a calendar day in Colombia, whatever zone this deployment bills its periods in.
TPAGA_TZ = ZoneInfo(BOGOTA)


class RefundWindow(StrEnum):
    H24 = "24h"  # 24 hours after the approval
    SAME_DAY = "same_day"  # until the next midnight in Bogota after the approval


def _window(value: RefundWindow | str) -> RefundWindow:
    try:
        return RefundWindow(value)
    except ValueError:
        raise ValueError(f"unknown refund window {value!r}; expected '24h' or 'same_day'") from None


def window_end(approved_at: datetime, window: RefundWindow | str) -> datetime:
    """The first instant (aware UTC) at which Tpaga refuses to void a charge it approved at `approved_at`.

    "24h": approved_at + 24 hours. "same_day": the next midnight in Bogota after approved_at.
    """
    require_aware("approved_at", approved_at)
    kind = _window(window)
    if kind is RefundWindow.H24:
        return approved_at.astimezone(UTC) + timedelta(hours=24)
    next_day = approved_at.astimezone(TPAGA_TZ).date() + timedelta(days=1)
    return datetime(next_day.year, next_day.month, next_day.day, tzinfo=TPAGA_TZ).astimezone(UTC)


def refund_deadline(approved_at: datetime, window: RefundWindow | str, margin: timedelta = timedelta(0)) -> datetime:
    """The first instant (aware UTC) at which this system no longer sends a void for a charge it recorded as
    approved at `approved_at`.

    `margin` bounds how far our times may be from Tpaga's: our approval time trails Tpaga's by the answer's
    latency, and a void takes time to arrive. The deadline is the earlier of the window's end for an approval
    `margin` before ours (Tpaga's earliest possible deadline: never later than its real one) and the window's
    end for ours less `margin` (room for the void to arrive). For "24h" both are approved_at + 24h - margin;
    for "same_day" an approval recorded within `margin` after midnight counts for the day before.
    """
    if not isinstance(margin, timedelta) or margin < timedelta(0):
        raise ValueError(f"margin must be a non-negative timedelta, got {margin!r}")
    require_aware("approved_at", approved_at)
    return min(window_end(approved_at - margin, window), window_end(approved_at, window) - margin)


def is_refundable(
    approved_at: datetime, now: datetime, window: RefundWindow | str, margin: timedelta = timedelta(0)
) -> bool:
    """True while `now` is before the refund deadline of a charge approved at `approved_at`."""
    require_aware("now", now)
    return now < refund_deadline(approved_at, window, margin)
