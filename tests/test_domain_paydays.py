"""Colombia's pay calendar: business days, paydays moved back before weekends and holidays, and the retry time
that insufficient-funds dunning picks from them."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import holidays
import pytest

from billing.domain.paydays import is_business_day, next_payday_retry, paydays

BOGOTA = ZoneInfo("America/Bogota")
YEAR_2027 = [date(2027, 1, 1) + timedelta(days=n) for n in range(365)]

# 2027's Colombian holidays, written out by hand (Ley Emiliani moves them to Monday): a second source, so a
# change in the package shows up here and not only as a different retry.
HOLIDAYS_2027 = {
    date(2027, 1, 1),
    date(2027, 1, 11),
    date(2027, 3, 22),
    date(2027, 3, 25),
    date(2027, 3, 26),
    date(2027, 5, 1),
    date(2027, 5, 10),
    date(2027, 5, 31),
    date(2027, 6, 7),
    date(2027, 7, 5),
    date(2027, 7, 12),
    date(2027, 7, 20),
    date(2027, 8, 7),
    date(2027, 8, 16),
    date(2027, 10, 18),
    date(2027, 11, 1),
    date(2027, 11, 15),
    date(2027, 12, 8),
    date(2027, 12, 25),
}


def test_the_known_2027_holidays_are_not_business_days_and_match_the_package() -> None:
    assert set(holidays.country_holidays("CO", years=2027)) == HOLIDAYS_2027
    assert [d for d in sorted(HOLIDAYS_2027) if is_business_day(d)] == []


def test_a_business_day_is_a_weekday_that_is_no_colombian_holiday_every_day_of_a_year() -> None:
    co = holidays.Colombia(years=2027)
    wrong = [d for d in YEAR_2027 if is_business_day(d) != (d.weekday() < 5 and d not in co)]
    assert wrong == []
    assert sum(map(is_business_day, YEAR_2027)) == 261 - 16  # 261 weekdays, 16 holidays not on a Saturday


@pytest.mark.parametrize(
    ("year", "month", "expected"),
    [
        (2027, 1, (date(2027, 1, 15), date(2027, 1, 29))),  # the 31st is a Sunday
        (2027, 2, (date(2027, 2, 15), date(2027, 2, 26))),  # the 28th is a Sunday
        (2027, 3, (date(2027, 3, 15), date(2027, 3, 31))),
        (2027, 5, (date(2027, 5, 14), date(2027, 5, 28))),  # 15th Saturday; 31st Corpus Christi (Monday)
        (2027, 8, (date(2027, 8, 13), date(2027, 8, 31))),  # the 15th is a Sunday
        (2027, 11, (date(2027, 11, 12), date(2027, 11, 30))),  # 15th Independence of Cartagena (Monday)
        (2027, 12, (date(2027, 12, 15), date(2027, 12, 31))),
        (2026, 12, (date(2026, 12, 15), date(2026, 12, 31))),
        (2028, 1, (date(2028, 1, 14), date(2028, 1, 31))),  # the 15th is a Saturday
    ],
)
def test_known_paydays(year: int, month: int, expected: tuple[date, date]) -> None:
    assert paydays(year, month) == expected


@pytest.mark.parametrize("month", range(1, 13))
def test_every_payday_of_a_year_is_the_last_business_day_on_or_before_the_15th_and_the_months_end(
    month: int,
) -> None:
    co = holidays.Colombia(years=2027)
    for payday, nominal in zip(paydays(2027, month), (15, 31), strict=True):
        assert payday.weekday() < 5 and payday not in co
        assert payday.month == month and payday.day <= nominal
        # no business day between the payday and the nominal day (or the month's end)
        later = [d for d in YEAR_2027 if d.month == month and payday < d and d.day <= nominal]
        assert [d for d in later if d.weekday() < 5 and d not in co] == []


DAY = timedelta(days=1)
ALL_PAYDAYS = {p for y, m in [(2026, 12), *((2027, m) for m in range(1, 13)), (2028, 1)] for p in paydays(y, m)}


def _is_retry_day(d: date, declined_on: date) -> bool:
    """A payday, or the business day after a payday that came on or after the decline's day."""
    previous = d - DAY
    while not is_business_day(previous):
        previous -= DAY
    return is_business_day(d) and (d in ALL_PAYDAYS or (previous in ALL_PAYDAYS and previous >= declined_on))


def test_a_funds_retry_lands_on_the_first_payday_or_business_day_after_it_and_never_early() -> None:
    for day in YEAR_2027:
        for hour in (7, 16):
            declined_at = datetime(day.year, day.month, day.day, hour, 30, tzinfo=BOGOTA)
            at = next_payday_retry(declined_at, gap=DAY, hour=9)
            local = at.astimezone(BOGOTA)
            # at nine on its day, or a day after the decline when that is later the same day; never earlier
            assert at == max(datetime(local.year, local.month, local.day, 9, tzinfo=BOGOTA), declined_at + DAY)
            assert _is_retry_day(local.date(), day), (declined_at, local)
            # the first such day: none was skipped between the gap's end and the retry
            start = (declined_at + DAY).date()
            between = [start + timedelta(days=n) for n in range((local.date() - start).days)]
            assert [d for d in between if _is_retry_day(d, day)] == [], (declined_at, local)


@pytest.mark.parametrize(
    ("declined_at", "expected"),
    [
        # The case: a 51 on Monday 2027-01-04 waits for Friday the 15th.
        (datetime(2027, 1, 4, 15, 0, tzinfo=UTC), datetime(2027, 1, 15, 9, 0, tzinfo=BOGOTA)),
        # The day before a payday, after the hour: the payday, a full day after the decline.
        (datetime(2027, 1, 14, 16, 0, tzinfo=UTC), datetime(2027, 1, 15, 11, 0, tzinfo=BOGOTA)),
        # The Friday payday's retry declined at 09:05: Monday the 18th, the business day after it, not the weekend.
        (datetime(2027, 1, 15, 14, 5, tzinfo=UTC), datetime(2027, 1, 18, 9, 0, tzinfo=BOGOTA)),
        # Monday 15 February's retry declined at 09:05: Tuesday at 09:05, a day later, keeping its day.
        (datetime(2027, 2, 15, 14, 5, tzinfo=UTC), datetime(2027, 2, 16, 9, 5, tzinfo=BOGOTA)),
        # Declined on Saturday the 16th, after the payday's money was gone: the next payday, Friday the 29th
        # (the 31st is a Sunday), not Monday the 18th.
        (datetime(2027, 1, 16, 15, 0, tzinfo=UTC), datetime(2027, 1, 29, 9, 0, tzinfo=BOGOTA)),
        (datetime(2027, 1, 20, 12, 0, tzinfo=UTC), datetime(2027, 1, 29, 9, 0, tzinfo=BOGOTA)),
        # Year's end: declined on payday Friday 2027-12-31, retried Monday 2028-01-03.
        (datetime(2027, 12, 31, 15, 0, tzinfo=UTC), datetime(2028, 1, 3, 9, 0, tzinfo=BOGOTA)),
        # Declined on New Year's Day 2027 (a holiday): not Monday the 4th (after 2026-12-31's payday), the 15th.
        (datetime(2027, 1, 1, 18, 0, tzinfo=BOGOTA), datetime(2027, 1, 15, 9, 0, tzinfo=BOGOTA)),
        # Exactly a day before a payday's hour: that payday at its hour.
        (datetime(2027, 3, 14, 9, 0, tzinfo=BOGOTA), datetime(2027, 3, 15, 9, 0, tzinfo=BOGOTA)),
    ],
)
def test_known_funds_retries(declined_at: datetime, expected: datetime) -> None:
    assert next_payday_retry(declined_at, gap=DAY, hour=9) == expected


def test_the_hour_is_local_to_bogota_whatever_zone_the_decline_is_given_in() -> None:
    tokyo = timezone(timedelta(hours=9))
    at = next_payday_retry(datetime(2027, 1, 4, 8, 0, tzinfo=tokyo), gap=DAY, hour=14)  # Sunday 3rd in Bogota
    assert at == datetime(2027, 1, 15, 14, 0, tzinfo=BOGOTA) == datetime(2027, 1, 15, 19, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"declined_at": datetime(2027, 1, 5), "hour": 9}, "timezone-aware"),
        ({"declined_at": datetime(2027, 1, 5, tzinfo=UTC), "hour": 24}, "whole hour 0-23"),
        ({"declined_at": datetime(2027, 1, 5, tzinfo=UTC), "hour": -1}, "whole hour 0-23"),
        ({"declined_at": datetime(2027, 1, 5, tzinfo=UTC), "hour": 9.5}, "whole hour 0-23"),
        ({"declined_at": datetime(2027, 1, 5, tzinfo=UTC), "hour": True}, "whole hour 0-23"),
        ({"declined_at": datetime(2027, 1, 5, tzinfo=UTC), "hour": 9, "gap": timedelta(hours=-1)}, "gap must be"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        next_payday_retry(**{"gap": DAY, **kwargs})  # type: ignore[arg-type]
