"""Billing periods counted from a fixed anchor, in local calendar terms, with month-end clamping.

Every boundary is computed from the anchor itself (never from the previous boundary), so a
subscription anchored on January 31 renews on Feb 28/29, Mar 31, Apr 30, ... and never drifts.
All returned datetimes are aware UTC; periods are half-open: [start, end).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from fractions import Fraction
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from billing.domain.clock_rules import BOGOTA, require_aware


class Interval(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


@dataclass(frozen=True)
class Period:
    """One billing period: index `index` (0 = the one starting at the anchor), [start, end) in UTC."""

    index: int
    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        require_aware("start", self.start)
        require_aware("end", self.end)
        if not self.start < self.end:
            raise ValueError(f"a period must end after it starts: {self.start} .. {self.end}")

    def contains(self, when: datetime) -> bool:
        """True when `when` falls in [start, end)."""
        return self.start <= require_aware("when", when) < self.end


def _require_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _interval(value: Interval | str) -> Interval:
    try:
        return Interval(value)
    except ValueError:
        known = ", ".join(repr(i.value) for i in Interval)
        raise ValueError(f"unknown interval {value!r}; expected one of {known}") from None


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValueError(f"unknown time zone {tz!r}") from None


def _months_per_period(interval: Interval, count: int) -> int:
    return count if interval is Interval.MONTH else 12 * count


def _days_per_period(interval: Interval, count: int) -> int:
    return count if interval is Interval.DAY else 7 * count


def _shift_local(local: datetime, k: int, interval: Interval, count: int) -> datetime:
    """`local` moved k*count intervals on the local calendar, clamped to month ends, wall time kept."""
    if interval in (Interval.DAY, Interval.WEEK):
        # date arithmetic on the naive wall time: a "day" is a calendar day, whatever DST does
        date = local.date() + timedelta(days=k * _days_per_period(interval, count))
        return local.replace(year=date.year, month=date.month, day=date.day)
    months = local.month - 1 + k * _months_per_period(interval, count)
    year, month = local.year + months // 12, months % 12 + 1
    day = min(local.day, calendar.monthrange(year, month)[1])
    # replace() keeps tzinfo, wall time and fold: boundary 0 is exactly the anchor
    return local.replace(year=year, month=month, day=day)


def _to_utc(local: datetime) -> datetime:
    # A wall time in a DST gap or fold resolves by PEP 495 (fold=0: the earlier offset),
    # which is deterministic, so every caller computes the same instant.
    return local.astimezone(UTC)


def period_boundary(anchor: datetime, k: int, interval: Interval | str, count: int, tz: str = BOGOTA) -> datetime:
    """The k-th period boundary (k >= 0; boundary 0 is the anchor), as aware UTC.

    Computed from the anchor in local calendar terms of `tz`: add k*count intervals to the
    anchor's local date, clamp the day to the month's length (Jan 31 -> Feb 28/29 -> Mar 31;
    a Feb 29 yearly anchor -> Feb 28 in common years), and keep the anchor's local wall time.
    """
    require_aware("anchor", anchor)
    _require_int("k", k, 0)
    _require_int("count", count, 1)
    unit = _interval(interval)
    local = anchor.astimezone(_zone(tz))
    try:
        return _to_utc(_shift_local(local, k, unit, count))
    except (OverflowError, ValueError):
        raise ValueError(f"boundary {k} of every {count} {unit.value} from {anchor} is out of range") from None


def period_at(anchor: datetime, index: int, interval: Interval | str, count: int, tz: str = BOGOTA) -> Period:
    """Period `index` (>= 0): [boundary(index), boundary(index + 1))."""
    _require_int("index", index, 0)
    return Period(
        index=index,
        start=period_boundary(anchor, index, interval, count, tz),
        end=period_boundary(anchor, index + 1, interval, count, tz),
    )


def period_index_at(anchor: datetime, when: datetime, interval: Interval | str, count: int, tz: str = BOGOTA) -> int:
    """Index of the period containing `when`, or -1 when `when` is before the anchor.

    Estimates the index from the local calendar distance, then corrects it by a step or two,
    so the cost does not grow with the age of the subscription.
    """
    require_aware("anchor", anchor)
    require_aware("when", when)
    _require_int("count", count, 1)
    unit = _interval(interval)
    zone = _zone(tz)
    if when < anchor:
        return -1
    start, now = anchor.astimezone(zone), when.astimezone(zone)
    if unit in (Interval.MONTH, Interval.YEAR):
        months = (now.year - start.year) * 12 + (now.month - start.month)
        k = months // _months_per_period(unit, count)
    else:
        k = (now.date() - start.date()).days // _days_per_period(unit, count)
    k = max(k, 0)
    while k > 0 and period_boundary(anchor, k, unit, count, tz) > when:
        k -= 1
    while period_boundary(anchor, k + 1, unit, count, tz) <= when:
        k += 1
    return k


def due_period_indexes(
    anchor: datetime,
    next_index: int,
    now: datetime,
    interval: Interval | str,
    count: int,
    tz: str = BOGOTA,
    limit: int | None = None,
) -> list[int]:
    """Every period index >= `next_index` whose start is <= `now`, oldest first.

    After downtime this returns one index per missed period, none skipped; `limit` caps how
    many are returned (the oldest ones), so a caller catching up in batches resumes where it
    stopped by passing the next index.
    """
    require_aware("anchor", anchor)
    require_aware("now", now)
    _require_int("next_index", next_index, 0)
    if limit is not None:
        _require_int("limit", limit, 0)
    current = period_index_at(anchor, now, interval, count, tz)
    last = current if limit is None else min(current, next_index + limit - 1)
    return list(range(next_index, last + 1))


def trial_end(start: datetime, trial_days: int, tz: str = BOGOTA) -> datetime:
    """End of a trial of `trial_days` local calendar days from `start` (0: no trial, `start`), as UTC."""
    require_aware("start", start)
    _require_int("trial_days", trial_days, 0)
    local = start.astimezone(_zone(tz))
    try:
        return _to_utc(_shift_local(local, trial_days, Interval.DAY, 1))
    except (OverflowError, ValueError):
        raise ValueError(f"a trial of {trial_days} days from {start} is out of range") from None


# A month is a twelfth of a year: 52 weeks and 365 days a year (the usual MRR convention; leap days ignored).
_PERIODS_PER_YEAR = {Interval.DAY: 365, Interval.WEEK: 52, Interval.MONTH: 12, Interval.YEAR: 1}


def monthly_share(interval: Interval | str, count: int) -> Fraction:
    """The share of one period's amount that falls in a month (for MRR): 1/3 for every 3 months, 52/12 weekly."""
    _require_int("count", count, 1)
    return Fraction(_PERIODS_PER_YEAR[_interval(interval)], 12 * count)
