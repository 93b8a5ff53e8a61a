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


def _retry_days_from(day: date) -> list[date]:
    """The paydays of `day`'s month and the next, each followed by the business day after it, in order."""
    following = date(day.year + day.month // 12, day.month % 12 + 1, 1)
    found: list[date] = []
    for month_start in (day.replace(day=1), following):
        for payday in paydays(month_start.year, month_start.month):
            found += [payday, next_business_day(payday)]
    return sorted(set(found))


def next_payday_retry(not_before: datetime, *, hour: int, timezone: str = BOGOTA) -> datetime:
    """The first payday, or the business day right after one, at `hour` local time, that is not before
    `not_before` (aware). The day after counts too: salaries land during the payday, and a retry that the
    one-day gap pushed past the payday's morning still comes while the money is there."""
    require_aware("not_before", not_before)
    if isinstance(hour, bool) or not isinstance(hour, int) or not 0 <= hour <= 23:
        raise ValueError(f"hour must be a whole hour 0-23, got {hour!r}")
    zone = ZoneInfo(timezone)
    day = not_before.astimezone(zone).date()
    while True:
        for candidate in _retry_days_from(day):
            at = datetime.combine(candidate, time(hour), zone)
            if at >= not_before:
                return at
        day = date(day.year + day.month // 12, day.month % 12 + 1, 1)
