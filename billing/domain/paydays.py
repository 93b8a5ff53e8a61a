"""Colombia's pay calendar: business days and the paydays that insufficient-funds retries wait for.

Most employers pay on the 15th and on the last day of the month, earlier when that day is a weekend or a
holiday. The holidays come from the `holidays` package's Colombian calendar, which moves the Ley Emiliani
holidays to the following Monday as the law does (a hand-kept list would go stale each year).
"""

from __future__ import annotations

import calendar
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import holidays

from billing.domain.clock_rules import BOGOTA, require_aware


@lru_cache(maxsize=64)
def _colombian_holidays(year: int) -> frozenset[date]:
    return frozenset(holidays.country_holidays("CO", years=year))


def is_business_day(day: date) -> bool:
    """Monday to Friday and not a Colombian public holiday."""
    return day.weekday() < 5 and day not in _colombian_holidays(day.year)


def previous_business_day(day: date) -> date:
    """`day` itself when it is a business day, else the last business day before it."""
    while not is_business_day(day):
        day -= timedelta(days=1)
    return day


def next_business_day(day: date) -> date:
    """The first business day strictly after `day`."""
    day += timedelta(days=1)
    while not is_business_day(day):
        day += timedelta(days=1)
    return day


def paydays(year: int, month: int) -> tuple[date, date]:
    """The month's two paydays: the 15th and its last day, each moved back to the previous business day."""
    last = calendar.monthrange(year, month)[1]
    return previous_business_day(date(year, month, 15)), previous_business_day(date(year, month, last))


def _retry_days_from(day: date) -> list[tuple[date, date]]:
    """(retry day, its payday) for the paydays of `day`'s month, the one before (whose last payday's next
    business day may fall in this month) and the next: each payday, and the business day after it."""
    this = day.replace(day=1)
    previous = (this - timedelta(days=1)).replace(day=1)
    following = date(day.year + day.month // 12, day.month % 12 + 1, 1)
    found: set[tuple[date, date]] = set()
    for month_start in (previous, this, following):
        for payday in paydays(month_start.year, month_start.month):
            found |= {(payday, payday), (next_business_day(payday), payday)}
    return sorted(found)


def next_payday_retry(declined_at: datetime, *, gap: timedelta, hour: int, timezone: str = BOGOTA) -> datetime:
    """When to retry a charge declined for lack of funds at `declined_at` (aware): the first payday, or the
    business day right after a payday that came on or after the decline's day, that is on or after the local
    date of `declined_at + gap`; at `hour` local time, or at `declined_at + gap` itself when that is later the
    same day (a retry is never early, and one that ran a few minutes late must not lose its day).

    The day after counts because salaries land during the payday: a retry that the gap pushed past the payday
    still comes while the money is there. It does not count for a payday before the decline, whose money was
    already missing when the charge declined."""
    require_aware("declined_at", declined_at)
    if isinstance(hour, bool) or not isinstance(hour, int) or not 0 <= hour <= 23:
        raise ValueError(f"hour must be a whole hour 0-23, got {hour!r}")
    if not isinstance(gap, timedelta) or gap < timedelta(0):
        raise ValueError(f"gap must be a non-negative timedelta, got {gap!r}")
    zone = ZoneInfo(timezone)
    not_before = declined_at + gap
    declined_on = declined_at.astimezone(zone).date()
    first_day = day = not_before.astimezone(zone).date()
    while True:
        for candidate, payday in _retry_days_from(day):
            if candidate >= first_day and (candidate == payday or payday >= declined_on):
                return max(datetime.combine(candidate, time(hour), zone), not_before)
        day = date(day.year + day.month // 12, day.month % 12 + 1, 1)
